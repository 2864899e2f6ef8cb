"""Request limits in the HTTP layer, below the apps: what a client may send and how long it
may take, enforced by the web server of either service before any app code runs.

``LimitedSite(resource, limits)`` is a ``twisted.web.server.Site`` whose connections obey an
``HTTPLimits`` value:

- **Body size.** A ``Content-Length`` over ``max_body`` is answered 413 as soon as the
  headers are in, before a byte of the body is read (and without ``100 Continue``); a
  chunked body is cut off with 413 the moment its decoded size passes ``max_body``. Either
  way the connection is closed, since the rest of the body is never read. Bodies within
  the limit are kept in memory (never spooled to a temporary file), so keep the limit
  small: the apps read at most 64 KiB of JSON anyway.
- **Bodies are never parsed here**: the site does not parse form bodies
  (``parsePOSTFormSubmission=False``); ``request.args`` holds the query string only, and
  the body stays bytes for the app to judge (the apps accept JSON only).
- **Deadlines.** The request line and all headers must arrive within ``header_timeout``
  seconds (counted from the connection's opening, or from the first byte of a later
  request on a kept-alive connection) and the whole body within ``body_timeout`` seconds
  after the headers. Unlike the idle timeout, which every byte resets, a deadline is not
  moved by a client that trickles bytes (slowloris). A late client gets 408 and is
  disconnected. Between requests the idle timeout (``idle_timeout``) applies as usual.
- **Connections.** At most ``max_connections`` connections are open per listener (per
  site). One more is closed at once, right after ``accept()``: the client sees the
  connection closed immediately and can go elsewhere or retry, instead of waiting unseen
  in the kernel's accept queue (which is what not accepting would do: Twisted has no
  public way to pause accepting, and a full queue would delay ``/health`` probes and
  every well-behaved client for as long as the flood lasts). The count of refused
  connections is kept for metrics (``LimitedSite.refused_connections``).
- **Header sizes** as Twisted has them (``max_header_bytes`` for the request line plus all
  headers, ``max_headers`` header lines): over either, Twisted answers 400 and closes.
- **No version in ``Server``**: every response says ``Server: snet`` (``server_name``).

The site speaks HTTP/1.1 only (no HTTP/2 upgrade; snet terminates no TLS) and writes no
access log: the apps log each request once, with its id.

Refusals made here carry the JSON error body of the apps (``message``, ``request_id``,
``code``): code 41300 for a body over the limit, 40800 for a missed deadline.
"""

from __future__ import annotations

import json
import re
import uuid
from io import BytesIO
from typing import Any

from attrs import field, frozen, validators
from twisted.internet.interfaces import IAddress, IDelayedCall
from twisted.internet.protocol import connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.http import RESPONSES, HTTPChannel
from twisted.web.http_headers import Headers
from twisted.web.resource import IResource
from twisted.web.server import Request, Site

from snet.web.errors import ErrorCode

log = Logger(namespace="snet.web.limits")


_positive = validators.gt(0)
_positive_seconds = validators.gt(0.0)


@frozen
class HTTPLimits:
    """What one listener accepts. The defaults suit snet's JSON APIs behind a proxy or not.

    :param max_body: bytes of request body (decoded, for chunked bodies). 64 KiB: the
        largest JSON body the apps read, so anything larger could only be refused later.
    :param max_header_bytes: bytes of request line plus headers (Twisted's default).
    :param max_headers: header lines per request; real clients send about ten.
    :param header_timeout: seconds for the request line and all headers. 10 s is ample for
        a client on any network (a few hundred bytes) and frees a slowloris' socket quickly.
    :param body_timeout: seconds for the whole body after the headers; 30 s allows 64 KiB
        at about 2 KB/s.
    :param idle_timeout: seconds a kept-alive connection may sit idle between requests
        (and a request's bytes may pause); Twisted's default.
    :param max_connections: open connections per listener. 1024 is far above what snet's
        clients and load tests open (tens) and well below the process' file limit.
    :param server_name: the ``Server`` header of every response; no version in it.
    """

    max_body: int = field(default=64 * 1024, validator=_positive)
    max_header_bytes: int = field(default=16 * 1024, validator=_positive)
    max_headers: int = field(default=100, validator=_positive)
    header_timeout: float = field(default=10.0, validator=_positive_seconds)
    body_timeout: float = field(default=30.0, validator=_positive_seconds)
    idle_timeout: float = field(default=60.0, validator=_positive_seconds)
    max_connections: int = field(default=1024, validator=_positive)
    server_name: bytes = b"snet"


_TOKEN = re.compile(rb"[A-Za-z0-9._:-]{1,128}")


def refusal(status: int, message: str, code: int, request_id: str) -> bytes:
    """A complete HTTP/1.1 response refusing a request: the apps' JSON error body,
    ``Connection: close`` (the connection is closed after it) and the request id."""
    body = json.dumps(
        {"message": message, "request_id": request_id, "code": code}, separators=(",", ":")
    ).encode("utf-8")
    reason: bytes = RESPONSES.get(status, b"Error")
    head = [
        b"HTTP/1.1 %d %s" % (status, reason),
        b"Content-Type: application/json",
        b"Content-Length: %d" % (len(body),),
        b"Connection: close",
        b"X-Request-ID: " + request_id.encode("ascii"),
    ]
    return b"\r\n".join(head) + b"\r\n\r\n" + body


class LimitedChannel(HTTPChannel):
    """An ``HTTPChannel`` that enforces ``limits`` (set by ``LimitedSite`` when it builds
    the channel): the body limit, the header and body deadlines, the ``Server`` header."""

    limits: HTTPLimits = HTTPLimits()
    site: LimitedSite

    def __init__(self) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self._deadline: IDelayedCall | None = None
        self._between_requests = False
        self._refused = False
        self._body_bytes = 0

    # --- the phases of a request: headers, body, handling, between requests --------------

    def connectionMade(self) -> None:
        self.maxHeaders = self.limits.max_headers
        self.totalHeadersSize = self.limits.max_header_bytes
        super().connectionMade()  # type: ignore[no-untyped-call]
        self.site.connection_opened(self)
        self._start_deadline(self.limits.header_timeout, "request line and headers")

    def dataReceived(self, data: bytes) -> None:
        if self._refused:
            return
        if self._between_requests and data:
            self._between_requests = False
            self._start_deadline(self.limits.header_timeout, "request line and headers")
        super().dataReceived(data)  # type: ignore[no-untyped-call]

    def allHeadersReceived(self) -> None:
        self._cancel_deadline()
        self._body_bytes = 0
        length = self.length
        if length is not None and length > self.limits.max_body:
            self.refuse_body()
            return
        super().allHeadersReceived()  # type: ignore[no-untyped-call]
        if length != 0:
            self._start_deadline(self.limits.body_timeout, "body")

    def rawDataReceived(self, data: bytes) -> None:
        if self._refused:
            return
        super().rawDataReceived(data)

    def allContentReceived(self) -> None:
        if self._refused:
            return
        self._cancel_deadline()
        super().allContentReceived()  # type: ignore[no-untyped-call]

    def requestDone(self, request: Any) -> None:
        self._between_requests = True
        super().requestDone(request)  # type: ignore[no-untyped-call]

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self._cancel_deadline()
        self.site.connection_closed(self)
        super().connectionLost(reason)  # type: ignore[no-untyped-call]

    def writeHeaders(self, version: bytes, code: bytes, reason: bytes, headers: Any) -> None:
        if isinstance(headers, Headers):
            headers.setRawHeaders(b"Server", [self.limits.server_name])
        super().writeHeaders(version, code, reason, headers)  # type: ignore[no-untyped-call]

    # --- limits ----------------------------------------------------------------------------

    def body_received(self, size: int) -> bool:
        """Count *size* more bytes of the current body; refuse the request (and return
        False) once the body is over the limit."""
        if self._refused:
            return False
        self._body_bytes += size
        if self._body_bytes > self.limits.max_body:
            self.refuse_body()
            return False
        return True

    def refuse_body(self) -> None:
        """Answer 413 and close: the body is, or will be, over the limit."""
        self._refuse(
            413,
            f"the body is over {self.limits.max_body} bytes",
            ErrorCode.CONTENT_TOO_LARGE,
            "body",
        )

    def _start_deadline(self, seconds: float, what: str) -> None:
        self._cancel_deadline()
        clock = self.site.reactor
        self._deadline = clock.callLater(seconds, self._deadline_passed, seconds, what)

    def _cancel_deadline(self) -> None:
        if self._deadline is not None and self._deadline.active():
            self._deadline.cancel()
        self._deadline = None

    def _deadline_passed(self, seconds: float, what: str) -> None:
        self._deadline = None
        self._refuse(
            408, f"the {what} did not arrive within {seconds:g}s", ErrorCode.REQUEST_TIMEOUT, what
        )

    def _refuse(self, status: int, message: str, code: int, what: str) -> None:
        """Answer *status* with a JSON error, stop reading and close the connection (by
        force after ``abortTimeout`` seconds if the client does not read the answer)."""
        if self._refused:
            return
        self._refused = True
        self._cancel_deadline()
        self.setTimeout(None)  # type: ignore[no-untyped-call]
        rid = self._request_id()
        peer = self.transport.getPeer() if self.transport is not None else None
        log.info(
            "[{request_id}] {status} to {peer}: {message}",
            request_id=rid,
            status=status,
            peer=str(peer),
            message=message,
            limit=what,
        )
        self.persistent = False
        assert self.transport is not None
        self.transport.write(refusal(status, message, code, rid))
        self.loseConnection()  # type: ignore[no-untyped-call]
        if self.abortTimeout is not None:
            clock = self.site.reactor
            self._abortingCall = clock.callLater(self.abortTimeout, self.forceAbortClient)

    def _request_id(self) -> str:
        """The client's ``X-Request-ID`` of the request being read, if sane; else a new one."""
        if self.requests:
            given = self.requests[-1].requestHeaders.getRawHeaders(b"X-Request-ID")
            if given and _TOKEN.fullmatch(given[0]):
                return str(given[0].decode("ascii"))
        return uuid.uuid4().hex


class LimitedRequest(Request):
    """A request whose body counts against its channel's limit and stays in memory."""

    def gotLength(self, length: int | None) -> None:
        # The channel refuses a body over its limit, so every body that gets here is small.
        self.content = BytesIO()

    def handleContentChunk(self, data: bytes) -> None:
        channel = self.channel
        if isinstance(channel, LimitedChannel) and not channel.body_received(len(data)):
            return
        super().handleContentChunk(data)  # type: ignore[no-untyped-call]


class LimitedSite(Site):
    """A ``Site`` whose listener obeys *limits* (see the module docstring); no access log.

    ``open_connections`` is the number of connections open now and ``refused_connections``
    the number closed at once for being over ``max_connections``.
    """

    noisy = False
    protocol = LimitedChannel  # type: ignore[assignment]

    def __init__(
        self, resource: IResource, limits: HTTPLimits | None = None, *, reactor: Any = None
    ) -> None:
        self.limits = limits if limits is not None else HTTPLimits()
        super().__init__(  # type: ignore[no-untyped-call]
            resource,
            requestFactory=LimitedRequest,
            parsePOSTFormSubmission=False,
            timeout=self.limits.idle_timeout,
            reactor=reactor,
        )
        self._open: set[LimitedChannel] = set()
        self.refused_connections = 0
        self._at_cap = False

    @property
    def open_connections(self) -> int:
        """How many connections are open now."""
        return len(self._open)

    def buildProtocol(self, addr: IAddress | None) -> Any:
        if len(self._open) >= self.limits.max_connections:
            self.refused_connections += 1
            if not self._at_cap:
                self._at_cap = True
                log.warn(
                    "{count} connections open: closing new ones until some end",
                    count=len(self._open),
                )
            return None
        channel = super().buildProtocol(addr)  # type: ignore[no-untyped-call]
        channel.limits = self.limits
        return channel

    def connection_opened(self, channel: LimitedChannel) -> None:
        """Count *channel* as open (its ``connectionMade``)."""
        self._open.add(channel)

    def connection_closed(self, channel: LimitedChannel) -> None:
        """Count *channel* as closed (its ``connectionLost``)."""
        self._open.discard(channel)
        if self._at_cap and len(self._open) < self.limits.max_connections:
            self._at_cap = False
            log.info(
                "accepting connections again ({refused} refused so far)",
                refused=self.refused_connections,
            )

    def acceptableProtocols(self) -> list[bytes]:
        """HTTP/1.1 only, whatever TLS could negotiate."""
        return [b"http/1.1"]

    def log(self, request: Any) -> None:
        """No access log: the apps log each request once, with its id."""
