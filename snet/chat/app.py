"""The chat service's HTTP API (Klein): send and list dialog messages, unread counters,
health and metrics. docs/chat-api.md describes it for its callers.

The acting user comes in ``X-Snet-User-Id`` (set by the monolith, which authenticates the
client). Only the monolith may say so: with an *authorizer* (Connect, the default wiring),
every ``/v1`` route first requires a verified Connect client certificate whose service
Consul's intentions allow (401 without one, 403 when not allowed; docs/trust.md), while
``/health`` and ``/metrics`` stay open to any TLS client (Consul's check). Every error is
a JSON body ``{"message", "request_id", "code"}`` (see snet.web.errors).
"""

from __future__ import annotations

import uuid
from typing import Any

from prometheus_client import Counter
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.iweb import IRequest

from snet.chat.store import Dialogs, IdempotencyKeyReused
from snet.chat_contract import (
    DEFAULT_LIMIT,
    IDEMPOTENCY_HEADER,
    MAX_BATCH_SENDS,
    MAX_LIMIT,
    SEND_BATCH_PATH,
    USER_HEADER,
    validate_idempotency_key,
    validate_message_text,
)
from snet.connect import ConnectAuthorizer
from snet.web.draining import InFlight
from snet.web.errors import (
    BadRequest,
    ClientCertificateRequired,
    Conflict,
    DomainErrors,
    ErrorCode,
    Forbidden,
    error_of,
    error_response,
)
from snet.web.inputs import MAX_ID, parse_id, query_arg, read_json_object
from snet.web.metrics import HTTPMetrics
from snet.web.requests import (
    header_text,
    is_client_token,
    json_response,
    notify_finish,
    request_id,
    set_header,
)
from snet.web.service import (
    HEALTH_TIMEOUT,
    RoutedKlein,
    ServiceApp,
    health_response,
    uncancellable,
)

log = Logger()

DOMAIN_ERRORS: DomainErrors = {
    IdempotencyKeyReused: (Conflict, ErrorCode.IDEMPOTENCY_KEY_REUSED),
}
"""What the stores' exceptions are answered with."""


def acting_user(request: IRequest) -> int:
    """The id of the user the request acts for, from ``X-Snet-User-Id``."""
    text = header_text(request, USER_HEADER)
    if text is None:
        raise BadRequest("the X-Snet-User-Id header is required", code=ErrorCode.MISSING_HEADER)
    return parse_id(text, "X-Snet-User-Id")


def parse_limit(text: str | None) -> int:
    """The page size: 1 to MAX_LIMIT in decimal digits, DEFAULT_LIMIT if absent."""
    if text is None:
        return DEFAULT_LIMIT
    if not (text.isascii() and text.isdigit() and not text.startswith("0")) or not (
        1 <= int(text) <= MAX_LIMIT
    ):
        raise BadRequest(
            f"limit must be an integer from 1 to {MAX_LIMIT}", code=ErrorCode.INVALID_PARAMETER
        )
    return int(text)


def parse_after_id(text: str | None) -> int | None:
    """The id the page starts after: a message id, or 0 (or absent) for the beginning."""
    if text is None or text == "0":
        return None
    return parse_id(text, "after_id")


def _json_id(value: object, name: str) -> int:
    """A positive id below 2**63 given as a JSON integer."""
    if type(value) is not int or not 1 <= value <= MAX_ID:
        raise BadRequest(
            f"{name} must be a positive integer below 2**63", code=ErrorCode.INVALID_PARAMETER
        )
    return value


def _item_request_id(item: object) -> str:
    """A batched send's own request id (the monolith's request it came from), else a new one."""
    rid = item.get("request_id") if isinstance(item, dict) else None
    return rid if isinstance(rid, str) and is_client_token(rid) else uuid.uuid4().hex


def batched_send(item: object) -> tuple[int, int, str, str]:
    """(sender, recipient, text, key) of one send of a batch call, checked as the send route
    checks its headers and body.

    :raises BadRequest: naming what is wrong.
    """
    if not isinstance(item, dict):
        raise BadRequest("each send must be a JSON object", code=ErrorCode.INVALID_JSON)
    user_id = _json_id(item.get("user_id"), "user_id")
    peer = _json_id(item.get("peer_id"), "peer_id")
    if peer == user_id:
        raise BadRequest("cannot send a message to oneself", code=ErrorCode.SELF_DIALOG)
    key = item.get("idempotency_key")
    if not isinstance(key, str):
        raise BadRequest("idempotency_key is required", code=ErrorCode.MISSING_HEADER)
    validate_idempotency_key(key)
    return user_id, peer, validate_message_text(item.get("text")), key


def _item_error(error: BaseException, rid: str) -> dict[str, Any]:
    """A batched send's error, as the send route would answer it."""
    api_error = error_of(Failure(error), rid, DOMAIN_ERRORS)  # type: ignore[no-untyped-call]
    body = {"message": api_error.message, "request_id": rid, "code": api_error.code}
    return {"status": api_error.status, "body": body}


def _close_after_answer(request: IRequest) -> None:
    """Answer with ``Connection: close`` and close the connection once the answer is out:
    the caller's next call opens a new one (see snet.connect.authorize)."""
    set_header(request, b"Connection", b"close")
    transport = getattr(request, "transport", None)
    if transport is not None:
        notify_finish(request).addBoth(lambda _: transport.loseConnection())


class ChatAPI(ServiceApp):
    """The chat HTTP API; ``resource()`` is what a Site serves."""

    app = RoutedKlein()
    direct_endpoints = frozenset({"send_message", "send_batch"})

    def __init__(
        self,
        *,
        dialogs: Dialogs,
        in_flight: InFlight,
        metrics: HTTPMetrics,
        version: str,
        clock: IReactorTime | None = None,
        health_timeout: float = HEALTH_TIMEOUT,
        authorizer: ConnectAuthorizer | None = None,
    ) -> None:
        """Without an *authorizer* (``--insecure-plaintext``) every caller is trusted."""
        super().__init__(
            in_flight=in_flight,
            metrics=metrics,
            version=version,
            clock=clock,
            health_timeout=health_timeout,
        )
        self.dialogs = dialogs
        self.authorizer = authorizer
        self._batched = Counter(
            "snet_chat_batched_send_results",
            "Sends answered in batch calls (POST /v1/sends), by the status of each",
            ["status"],
            registry=metrics.registry,
        )
        self._batched_by_status: dict[int, Any] = {}

    async def authorized(self, request: IRequest) -> None:
        """Raise unless the caller may use the ``/v1`` routes (see the module docstring)."""
        if self.authorizer is None:
            return
        decision = await self.authorizer.check_request(request)
        if decision.allowed:
            return
        if decision.close_connection:
            _close_after_answer(request)
        if decision.status == 401:
            raise ClientCertificateRequired(
                f"a Connect client certificate is required: {decision.reason}"
            )
        raise Forbidden(f"{decision.caller} may not call this service: {decision.reason}")

    @app.handle_errors(Exception)
    def _error(self, request: IRequest, failure: Failure) -> bytes:
        return error_response(request, failure, DOMAIN_ERRORS)

    @app.route("/v1/dialogs/<peer_id>/messages", methods=["POST"])
    async def send_message(self, request: IRequest, peer_id: str) -> bytes:
        await self.authorized(request)
        user_id = acting_user(request)
        peer = parse_id(peer_id, "peer_id")
        if peer == user_id:
            raise BadRequest("cannot send a message to oneself", code=ErrorCode.SELF_DIALOG)
        key = header_text(request, IDEMPOTENCY_HEADER)
        if key is None:
            raise BadRequest(
                "the Idempotency-Key header is required", code=ErrorCode.MISSING_HEADER
            )
        validate_idempotency_key(key)
        body = read_json_object(request)
        text = validate_message_text(body.get("text"))
        # The store and the counter update run to their end even if the client goes away.
        message, created = await uncancellable(
            Deferred.fromCoroutine(
                self.dialogs.send(user_id, peer, text, key, request_id=request_id(request))
            )
        )
        if not created:
            set_header(request, b"Idempotent-Replayed", b"true")
        return json_response(request, {"message": message.to_json()}, 201)

    @app.route(SEND_BATCH_PATH, methods=["POST"])
    async def send_batch(self, request: IRequest) -> bytes:
        """Several sends, each as the send route would take and answer it (docs/chat-api.md):
        one result per send, in order; the sends are stored together."""
        await self.authorized(request)
        sends = read_json_object(request).get("sends")
        if not isinstance(sends, list) or not 1 <= len(sends) <= MAX_BATCH_SENDS:
            raise BadRequest(
                f"sends must be a list of 1 to {MAX_BATCH_SENDS} sends",
                code=ErrorCode.INVALID_PARAMETER,
            )
        rids = [_item_request_id(item) for item in sends]
        results: list[dict[str, Any]] = [{}] * len(sends)
        valid: list[tuple[int, int, str, str]] = []
        at: list[int] = []
        for index, item in enumerate(sends):
            try:
                valid.append(batched_send(item))
            except BadRequest as bad:
                results[index] = _item_error(bad, rids[index])
            else:
                at.append(index)
        # The store and the counter updates run to their end even if the caller goes away.
        outcomes = await uncancellable(
            Deferred.fromCoroutine(self.dialogs.send_many(valid, [rids[i] for i in at]))
        )
        for index, outcome in zip(at, outcomes, strict=True):
            if isinstance(outcome, Exception):
                results[index] = _item_error(outcome, rids[index])
            else:
                message, created = outcome
                results[index] = {
                    "status": 201,
                    "replayed": not created,
                    "body": {"message": message.to_json()},
                }
        batch = request_id(request)
        for index, result in enumerate(results):
            self._count_batched(result["status"])
            log.info(
                "[{request_id}] send {status} in batch {batch} ({number} of {count})",
                status=result["status"],
                batch=batch,
                number=index + 1,
                count=len(results),
                request_id=rids[index],
            )
        return json_response(request, {"results": results})

    def _count_batched(self, status: int) -> None:
        child = self._batched_by_status.get(status)
        if child is None:
            child = self._batched_by_status[status] = self._batched.labels(status=str(status))
        child.inc()

    @app.route("/v1/dialogs/<peer_id>/messages", methods=["GET"])
    async def list_messages(self, request: IRequest, peer_id: str) -> bytes:
        await self.authorized(request)
        user_id = acting_user(request)
        peer = parse_id(peer_id, "peer_id")
        if peer == user_id:
            raise BadRequest("there is no dialog with oneself", code=ErrorCode.SELF_DIALOG)
        after_id = parse_after_id(query_arg(request, "after_id"))
        limit = parse_limit(query_arg(request, "limit"))
        page = await self.dialogs.read(
            user_id, peer, after_id=after_id, limit=limit + 1, request_id=request_id(request)
        )
        more = len(page) > limit
        page = page[:limit]
        return json_response(
            request,
            {
                "messages": [message.to_json() for message in page],
                "next_after_id": page[-1].id if more else None,
            },
        )

    @app.route("/v1/unread", methods=["GET"])
    async def unread(self, request: IRequest) -> bytes:
        await self.authorized(request)
        user_id = acting_user(request)
        counts = await self.dialogs.unread_counts(user_id, request_id=request_id(request))
        return json_response(
            request,
            {
                "total": sum(counts.values()),
                "dialogs": [
                    {"peer_id": peer, "count": count} for peer, count in sorted(counts.items())
                ],
            },
        )

    @app.route("/v1/unread/rebuild", methods=["POST"])
    async def rebuild_unread(self, request: IRequest) -> bytes:
        await self.authorized(request)
        acting_user(request)
        readers = await uncancellable(Deferred.fromCoroutine(self.dialogs.rebuild_unread()))
        return json_response(request, {"readers": readers})

    @app.route("/health", methods=["GET"])
    async def health(self, request: IRequest) -> bytes:
        return await health_response(
            request,
            in_flight=self.in_flight,
            ping=self.dialogs.messages.ping,
            timeout=self.health_timeout,
            clock=self.clock,
            version=self.version,
        )
