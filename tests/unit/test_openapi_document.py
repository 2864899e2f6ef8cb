"""The published OpenAPI document: the file kept in docs/openapi/ is the one served, and it keeps
every operation of the course contract with its paths, methods, parameters, fields and shapes.

What the monolith really does with it is checked by tests/integration/test_openapi_fuzzing.py.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from twisted.web.test.requesthelper import DummyRequest

from snet.server.openapi import document_bytes, openapi_response

DOCS = Path(__file__).parents[2] / "docs" / "openapi"
COURSE: dict[str, Any] = json.loads((DOCS / "otus-highload-architect-1.2.0.json").read_text())
SNET: dict[str, Any] = json.loads(document_bytes())
METHODS = ("get", "put", "post", "delete", "patch")


def resolve(document: dict[str, Any], node: Any) -> Any:
    """*node* with its local ``$ref`` followed (one level at a time, as deep as needed)."""
    while isinstance(node, dict) and "$ref" in node:
        target: Any = document
        for part in node["$ref"].removeprefix("#/").split("/"):
            target = target[part]
        node = target
    return node


def operations(document: dict[str, Any]) -> dict[tuple[str, str], dict[str, Any]]:
    return {
        (method, path): operation
        for path, item in document["paths"].items()
        for method, operation in item.items()
        if method in METHODS
    }


COURSE_OPERATIONS = operations(COURSE)
SNET_OPERATIONS = operations(SNET)


def test_the_served_document_is_the_one_in_docs() -> None:
    assert document_bytes() == (DOCS / "snet-1.0.json").read_bytes()
    assert SNET["openapi"] == "3.1.0"


def test_openapi_response_answers_the_document_as_json() -> None:
    request = DummyRequest([b"openapi.json"])
    assert openapi_response(request) == document_bytes()
    assert request.responseCode == 200
    assert request.responseHeaders.getRawHeaders(b"Content-Type") == [b"application/json"]


def test_every_course_operation_is_published_with_the_same_path_and_method() -> None:
    assert set(COURSE_OPERATIONS) <= set(SNET_OPERATIONS)


def test_snet_publishes_its_additions() -> None:
    additions = set(SNET_OPERATIONS) - set(COURSE_OPERATIONS)
    assert additions == {
        ("get", "/dialog/unread"),
        ("post", "/logout"),
        ("get", "/health"),
        ("get", "/openapi.json"),
    }


def parameters(document: dict[str, Any], operation: dict[str, Any]) -> dict[tuple[str, str], Any]:
    found = (resolve(document, p) for p in operation.get("parameters", []))
    return {(p["in"], p["name"]): p for p in found}


@pytest.mark.parametrize("key", sorted(COURSE_OPERATIONS), ids=" ".join)
def test_course_parameters_and_fields_are_kept(key: tuple[str, str]) -> None:
    course, snet = COURSE_OPERATIONS[key], SNET_OPERATIONS[key]
    course_parameters = parameters(COURSE, course)
    snet_parameters = parameters(SNET, snet)
    assert set(course_parameters) <= set(snet_parameters)
    for name, parameter in course_parameters.items():
        # snet may require what the course leaves optional, never the other way round.
        assert snet_parameters[name].get("required", False) >= parameter.get("required", False)
    if "requestBody" in course:
        course_body = resolve(
            COURSE, course["requestBody"]["content"]["application/json"]["schema"]
        )
        snet_body = resolve(SNET, snet["requestBody"]["content"]["application/json"]["schema"])
        assert set(course_body["properties"]) <= set(snet_body["properties"])
        assert set(course_body.get("required", [])) <= set(snet_body.get("required", []))
    assert security(COURSE, course) == security(SNET, snet)


def security(document: dict[str, Any], operation: dict[str, Any]) -> Any:
    return operation.get("security", document.get("security", []))


@pytest.mark.parametrize("key", sorted(COURSE_OPERATIONS), ids=" ".join)
def test_course_success_shapes_are_kept(key: tuple[str, str]) -> None:
    course = resolve(COURSE, COURSE_OPERATIONS[key]["responses"]["200"])
    snet = resolve(SNET, SNET_OPERATIONS[key]["responses"]["200"])
    if "content" not in course:
        return  # the course says nothing of the body; snet answers {}
    course_schema = resolve(COURSE, course["content"]["application/json"]["schema"])
    snet_schema = resolve(SNET, snet["content"]["application/json"]["schema"])
    assert snet_schema["type"] == course_schema["type"]
    if course_schema["type"] == "array":
        course_schema = resolve(COURSE, course_schema["items"])
        snet_schema = resolve(SNET, snet_schema["items"])
    assert set(course_schema.get("properties", {})) == set(snet_schema.get("properties", {}))


@pytest.mark.parametrize("key", sorted(SNET_OPERATIONS), ids=" ".join)
def test_every_error_has_the_error_body_and_every_secured_call_its_401(
    key: tuple[str, str],
) -> None:
    operation = SNET_OPERATIONS[key]
    for status, response in operation["responses"].items():
        if status.startswith(("4", "5")):
            schema = resolve(SNET, resolve(SNET, response)["content"]["application/json"]["schema"])
            error = SNET["components"]["schemas"]["Error"]
            assert schema is error or {"$ref": "#/components/schemas/Error"} in schema["allOf"]
    assert "500" in operation["responses"]
    if security(SNET, operation):
        assert "401" in operation["responses"]
