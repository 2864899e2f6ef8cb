"""ChatWire, the monolith's HTTP client for chat calls, against a real ``twistd snet-chat``
instance over Connect (mutual TLS, identities from a real Consul agent): real answers read,
the connection kept, and an instance that is not who the policy expects never gets a call."""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator, Iterator

import pytest
import pytest_twisted
from twisted.internet import reactor

from snet.config import ConsulConfig
from snet.connect import (
    CertificateWatcher,
    ConnectPolicyForHTTPS,
    PeerIdentityError,
    identity_failure,
)
from snet.connect.wiring import MONOLITH_SERVICE
from snet.consul import TreqConsul
from snet.server.chat_client import ChatClient
from snet.server.chatwire import ChatCall, ChatWire
from snet.server.discovery import ChatEndpoint
from snet.testing.fleet import ChatFleet
from snet.testing.servers import ConsulAgent, MariaDB, Redis

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def chat_database(mariadb: MariaDB) -> str:
    return mariadb.create_database("chatwire_fleet")


@pytest.fixture
def fleet(
    consul_agent: ConsulAgent, chat_database: str, redis_server: Redis
) -> Iterator[ChatFleet]:
    fleet = ChatFleet(
        consul_url=consul_agent.url, mysql_url=chat_database, redis_url=redis_server.url, count=1
    )
    try:
        yield fleet
    finally:
        fleet.stop()


@pytest_twisted.async_yield_fixture
async def monolith_identity(consul_agent: ConsulAgent) -> AsyncIterator[CertificateWatcher]:
    consul = TreqConsul(ConsulConfig.from_url(consul_agent.url), timeout=5.0)
    watcher = CertificateWatcher(consul=consul, service=MONOLITH_SERVICE, clock=reactor)
    watcher.startService()
    try:
        await watcher.ready()
        yield watcher
    finally:
        await watcher.stopService()
        await consul.close()


def endpoint_of(fleet: ChatFleet) -> ChatEndpoint:
    return ChatEndpoint(fleet.instance_id(0), "127.0.0.1", int(fleet.url(0).rsplit(":", 1)[1]))


def call(method: bytes, target: bytes, body: object = None, key: str | None = None) -> ChatCall:
    headers = [(b"X-Snet-User-Id", b"41"), (b"Accept", b"application/json")]
    if key is not None:
        headers += [(b"Idempotency-Key", key.encode()), (b"Content-Type", b"application/json")]
    data = None if body is None else json.dumps(body).encode()
    return ChatCall(method, target, tuple(headers), data, True)


@pytest_twisted.ensureDeferred
async def test_calls_over_connect_are_answered_on_one_kept_alive_connection(
    fleet: ChatFleet, monolith_identity: CertificateWatcher
) -> None:
    wire = ChatWire(
        reactor, connect_timeout=1.0, tls=ConnectPolicyForHTTPS(monolith_identity, fleet.service)
    )
    chat = endpoint_of(fleet)
    key = uuid.uuid4().hex
    try:
        sent = await wire.exchange(
            chat, call(b"POST", b"/v1/dialogs/42/messages", {"text": "hi"}, key)
        )
        assert sent.status == 201, sent.body
        message = json.loads(sent.body)["message"]
        again = await wire.exchange(
            chat, call(b"POST", b"/v1/dialogs/42/messages", {"text": "hi"}, key)
        )
        assert (again.status, json.loads(again.body)["message"]) == (201, message)
        listed = await wire.exchange(chat, call(b"GET", b"/v1/dialogs/42/messages?limit=10"))
        assert listed.status == 200
        assert [m["id"] for m in json.loads(listed.body)["messages"]] == [message["id"]]
        missing = await wire.exchange(chat, call(b"GET", b"/v1/nowhere"))
        assert missing.status == 404
        bad = await wire.exchange(chat, call(b"POST", b"/v1/dialogs/42/messages", [], key + "x"))
        assert bad.status == 400 and "message" in json.loads(bad.body)
        assert wire.idle(chat) == 1  # every call went over the same connection
    finally:
        await wire.close()
    assert wire.idle(chat) == 0


@pytest_twisted.ensureDeferred
async def test_an_instance_with_another_identity_fails_as_identity_before_any_call(
    fleet: ChatFleet, monolith_identity: CertificateWatcher
) -> None:
    """The policy expects another service: the real chat instance is then not who it must be."""
    wire = ChatWire(
        reactor, connect_timeout=1.0, tls=ConnectPolicyForHTTPS(monolith_identity, "snet-other")
    )
    try:
        with pytest.raises(Exception) as raised:
            await wire.exchange(endpoint_of(fleet), call(b"GET", b"/v1/unread"))
        assert ChatClient._reason(raised.value) == "identity"
        wrong = identity_failure(raised.value)
        assert isinstance(wrong, PeerIdentityError), raised.value
        assert wrong.found is not None and wrong.found.endswith(f"/svc/{fleet.service}")
        assert wire.idle(endpoint_of(fleet)) == 0
    finally:
        await wire.close()
