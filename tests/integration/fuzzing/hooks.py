"""Schemathesis hooks for the run against snet's own document (docs/openapi/snet-1.0.json).

Loaded by path (``SCHEMATHESIS_HOOKS``) by tests/integration/test_openapi_fuzzing.py.

Authentication: ``NewUser`` registers a user through ``POST /user/register``, logs in through
``POST /login`` and uses that token for every operation that wants one, unless the stateful
phase already put a token there: the document's links carry the token of a user that was just
registered and logged in (register -> login -> feed, unread, posts, friends, dialogs).

A schema-valid request may still be refused for a reason no schema can state: the state of the
data (no user with that id, a post written by someone else, a dialog with oneself). The course
contract lists neither 404 nor 403 on those routes, so snet answers them 400 with a code that
names the reason. ``snet.toml`` therefore lets ``positive_data_acceptance`` accept a 400, and the
check here takes that back for every 400 that is not one of those state errors: a schema-valid
request refused as *invalid* (40001-40008, 40004, ...) still fails the run.
"""

from __future__ import annotations

import json
import uuid
from typing import Any

import requests
import schemathesis

STATE_ERRORS: dict[str, frozenset[int]] = {
    "POST /login": frozenset({40009}),  # wrong password
    "PUT /friend/set/{user_id}": frozenset({40010, 40011}),  # no such user, oneself
    "PUT /friend/delete/{user_id}": frozenset({40010, 40011}),
    "PUT /post/update": frozenset({40012, 40013}),  # no such post, not its author
    "PUT /post/delete/{id}": frozenset({40012, 40013}),
    "GET /post/get/{id}": frozenset({40012}),
    "POST /dialog/{user_id}/send": frozenset({40007, 40010}),  # oneself, no such user
    "GET /dialog/{user_id}/list": frozenset({40007, 40010}),
}
"""The 400 codes each operation may answer to a schema-valid request, by operation label."""


@schemathesis.check
def valid_data_refused_only_for_state(
    ctx: schemathesis.CheckContext, response: schemathesis.Response, case: schemathesis.Case
) -> bool | None:
    """A schema-valid request answered 400 must carry one of its operation's state codes."""
    meta = case.meta
    if meta is None or not meta.generation.mode.is_positive or response.status_code != 400:
        return None
    try:
        code = json.loads(response.content).get("code")
    except (ValueError, AttributeError):
        code = None
    allowed = STATE_ERRORS.get(case.operation.label, frozenset())
    if code not in allowed:
        raise AssertionError(
            f"schema-valid request refused with code {code}; {case.operation.label} may refuse"
            f" valid data only for the state of the data ({sorted(allowed) or 'never'})"
        )
    return None


@schemathesis.auth(refresh_interval=None, retry_on=[])
class NewUser:
    """A user registered and logged in through the API under test, once per run (a 401 to a
    request whose token schemathesis broke on purpose is no reason to log in again)."""

    def get(self, case: schemathesis.Case, context: schemathesis.AuthContext) -> str:
        base = case.operation.base_url.rstrip("/")
        password = uuid.uuid4().hex
        registered = requests.post(
            f"{base}/user/register",
            json={"first_name": "Fuzz", "second_name": "Tester", "birthdate": "1990-01-01",
                  "password": password},
            timeout=10,
        )  # fmt: skip
        registered.raise_for_status()
        logged_in = requests.post(
            f"{base}/login",
            json={"id": registered.json()["user_id"], "password": password},
            timeout=10,
        )
        logged_in.raise_for_status()
        token: str = logged_in.json()["token"]
        return token

    def set(self, case: schemathesis.Case, data: str, context: schemathesis.AuthContext) -> None:
        headers: Any = case.headers
        if headers is None:
            case.headers = headers = {}
        # A token already there came from a link (snet.toml has schemathesis generate no
        # Authorization headers of its own): the user who just logged in keeps it.
        if "Authorization" not in headers:
            headers["Authorization"] = f"Bearer {data}"
