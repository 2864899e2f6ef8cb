"""The monolith's published API document, served at ``GET /openapi.json``.

The document is ``openapi.json`` beside this module, shipped as package data (so a wheel or an
image serves exactly the file in the repository); docs/openapi/snet-1.0.json links to it. It is
read once and kept.
"""

from __future__ import annotations

from functools import cache
from importlib.resources import files

from twisted.web.iweb import IRequest

DOCUMENT = "openapi.json"
"""The document's file name in the ``snet.server`` package."""


@cache
def document_bytes() -> bytes:
    """The OpenAPI 3.1 document of the monolith's public API, as UTF-8 JSON."""
    return files("snet.server").joinpath(DOCUMENT).read_bytes()


def openapi_response(request: IRequest) -> bytes:
    """Answer *request* with the document: 200, ``application/json``."""
    body = document_bytes()
    request.setResponseCode(200)  # type: ignore[no-untyped-call]
    request.setHeader(b"Content-Type", b"application/json")  # type: ignore[no-untyped-call]
    request.setHeader(b"Content-Length", str(len(body)).encode("ascii"))  # type: ignore[no-untyped-call]
    return body
