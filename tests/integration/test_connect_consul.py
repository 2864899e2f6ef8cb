"""snet.connect against a real Consul agent with Connect on, over real loopback TLS.

A chat-like HTTPS server (ConnectServerTLS + ConnectAuthorizer in front of a tiny resource)
and a monolith-like treq client (ConnectPolicyForHTTPS) take their identities from
CertificateWatchers of the agent. The agents are this module's own: intentions, a CA
rotation and ACLs change the whole agent.
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest
import pytest_twisted
import treq.client
from OpenSSL import SSL
from twisted.internet import reactor
from twisted.internet.defer import ensureDeferred
from twisted.internet.endpoints import TCP4ServerEndpoint
from twisted.internet.interfaces import IListeningPort, IOpenSSLClientConnectionCreator
from twisted.protocols.policies import ProtocolWrapper, WrappingFactory
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.web.client import Agent, HTTPConnectionPool
from twisted.web.iweb import IPolicyForHTTPS
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request, Site
from zope.interface import implementer

from snet.config import ConsulConfig
from snet.connect import (
    CertificateWatcher,
    ConnectAuthorizer,
    ConnectPolicyForHTTPS,
    ConnectServerTLS,
    Decision,
    IdentitySource,
    PeerIdentityError,
    identity_failure,
)
from snet.connect.acl import chat_rules, monolith_rules
from snet.consul import TreqConsul
from snet.retry import exponential_backoff
from snet.testing.connect import new_ca_private_key
from snet.testing.servers import HOST, ConsulAgent
from snet.testing.waiting import eventually, sleep

pytestmark = pytest.mark.integration

CHAT = "snet-chat"
SERVER = "snet-server"


@pytest.fixture(scope="module")
def agent() -> Iterator[ConsulAgent]:
    with ConsulAgent() as consul_agent:
        yield consul_agent


class DialogsStandIn(Resource):
    """``/health`` for anyone; every other path only for authorized callers, answering
    with who they are. ``requests`` lists every request that got this far."""

    isLeaf = True

    def __init__(self, authorizer: ConnectAuthorizer) -> None:
        super().__init__()
        self.authorizer = authorizer
        self.requests: list[bytes] = []

    def render(self, request: Request) -> bytes | int:
        assert request.path is not None
        self.requests.append(request.path)
        if request.path == b"/health":
            return b'{"status": "ok"}'

        def respond(decision: Decision) -> None:
            request.setResponseCode(decision.status)
            request.setHeader("Content-Type", "application/json")
            body = {"caller": decision.caller, "reason": decision.reason}
            request.write(json.dumps(body).encode())
            request.finish()

        self.authorizer.check_request(request).addCallback(respond)
        return NOT_DONE_YET


class BytesCounter(WrappingFactory):
    """Counts the application bytes that reach the server (decrypted: after TLS)."""

    def __init__(self, wrapped: Site) -> None:
        super().__init__(wrapped)
        self.count = 0

    def registerProtocol(self, p: ProtocolWrapper) -> None:
        super().registerProtocol(p)
        original = p.dataReceived

        def counted(data: bytes) -> None:
            self.count += len(data)
            original(data)

        p.dataReceived = counted  # type: ignore[method-assign]


class Harness:
    """Consul clients, watchers, TLS servers and clients of one test; ``close()`` ends all."""

    def __init__(self, agent: ConsulAgent) -> None:
        self.agent = agent
        self.clients: list[TreqConsul] = []
        self.watchers: list[CertificateWatcher] = []
        self.ports: list[IListeningPort] = []
        self.pools: list[HTTPConnectionPool] = []
        self.received = BytesCounter(Site(Resource()))
        """What reached the last server that ``serve`` started."""

    def consul(self, token: str | None = None) -> TreqConsul:
        client = TreqConsul(ConsulConfig.from_url(self.agent.url, token), timeout=5.0)
        self.clients.append(client)
        return client

    async def identity(self, service: str, token: str | None = None) -> CertificateWatcher:
        watcher = CertificateWatcher(
            consul=self.consul(token),
            service=service,
            clock=reactor,
            wait=10.0,
            retry_delay=exponential_backoff(initial=0.05, maximum=0.5),
        )
        watcher.startService()
        self.watchers.append(watcher)
        await watcher.ready()
        return watcher

    async def serve(
        self, source: IdentitySource, target: str = CHAT
    ) -> tuple[str, DialogsStandIn, ConnectAuthorizer]:
        authorizer = ConnectAuthorizer(
            consul=self.consul(), target=target, source=source, clock=reactor
        )
        resource = DialogsStandIn(authorizer)
        site = BytesCounter(Site(resource))
        factory = TLSMemoryBIOFactory(ConnectServerTLS(source), False, site)
        port = await TCP4ServerEndpoint(reactor, 0, interface=HOST).listen(factory)
        self.ports.append(port)
        self.received = site
        return f"https://{HOST}:{port.getHost().port}", resource, authorizer

    def http(self, policy: Any) -> treq.client.HTTPClient:
        pool = HTTPConnectionPool(reactor, persistent=False)
        self.pools.append(pool)
        return treq.client.HTTPClient(Agent(reactor, contextFactory=policy, pool=pool))

    def monolith(self, source: IdentitySource) -> treq.client.HTTPClient:
        return self.http(ConnectPolicyForHTTPS(source, CHAT))

    async def close(self) -> None:
        for watcher in self.watchers:
            await watcher.stopService()
        for port in self.ports:
            await port.stopListening()
        for pool in self.pools:
            await pool.closeCachedConnections()
        for client in self.clients:
            await client.close()


@pytest_twisted.async_yield_fixture
async def harness(agent: ConsulAgent) -> AsyncIterator[Harness]:
    setup = Harness(agent)
    try:
        yield setup
    finally:
        await setup.close()


async def get_json(http: treq.client.HTTPClient, url: str) -> tuple[int, Any]:
    response = await http.get(url)
    body = await response.json()
    return response.code, body


@pytest_twisted.ensureDeferred
async def test_the_monolith_and_a_chat_instance_prove_their_ids_to_each_other(
    harness: Harness,
) -> None:
    chat = await harness.identity(CHAT)
    monolith = await harness.identity(SERVER)
    assert chat.identity is not None and monolith.identity is not None
    assert chat.identity.spiffe_id.uri.endswith("/ns/default/dc/dc1/svc/snet-chat")
    assert chat.identity.trust_domain == monolith.identity.trust_domain
    url, _resource, _ = await harness.serve(chat)
    status, body = await get_json(harness.monolith(monolith), f"{url}/v1/dialogs/2/messages")
    assert status == 200, body
    assert body["caller"] == monolith.identity.spiffe_id.uri
    assert harness.received.count > 0  # the counter the rogue test relies on counts


@pytest_twisted.ensureDeferred
async def test_a_caller_without_a_client_certificate_reaches_health_only(
    harness: Harness,
) -> None:
    chat = await harness.identity(CHAT)
    url, _resource, _ = await harness.serve(chat)
    anonymous = harness.http(_NoClientCertificate())
    status, _ = await get_json(anonymous, f"{url}/health")
    assert status == 200
    status, body = await get_json(anonymous, f"{url}/v1/dialogs/2/messages")
    assert (status, body["caller"]) == (401, None)


@implementer(IPolicyForHTTPS, IOpenSSLClientConnectionCreator)
class _NoClientCertificate:
    """A TLS client that presents no certificate and trusts any server (like Consul's
    check with TLSSkipVerify)."""

    def creatorForNetloc(self, hostname: bytes, port: int) -> _NoClientCertificate:
        return self

    def clientConnectionForTLS(self, tls_protocol: object) -> SSL.Connection:
        connection = SSL.Connection(SSL.Context(SSL.TLS_METHOD), None)
        connection.set_connect_state()
        return connection


@pytest_twisted.ensureDeferred
async def test_a_rogue_instance_gets_no_request_and_the_failure_says_identity(
    harness: Harness,
) -> None:
    """An instance with a valid certificate of another service, reached as a chat instance."""
    rogue = await harness.identity("snet-rogue")
    monolith = await harness.identity(SERVER)
    url, resource, _ = await harness.serve(rogue, target="snet-rogue")
    with pytest.raises(Exception) as raised:
        await harness.monolith(monolith).post(f"{url}/v1/dialogs/2/messages", data=b"secret")
    failure = identity_failure(raised.value)
    assert isinstance(failure, PeerIdentityError), raised.value
    assert failure.found is not None and failure.found.endswith("/svc/snet-rogue")
    assert resource.requests == []
    assert harness.received.count == 0  # not one byte of the request reached the rogue


@pytest_twisted.ensureDeferred
async def test_intentions_decide_who_may_call_the_chat_service(
    harness: Harness, agent: ConsulAgent
) -> None:
    """snet-server -> snet-chat allowed, anything else -> snet-chat denied."""
    created = []
    for source, action in (("*", "deny"), (SERVER, "allow")):
        status, answer = agent.api(
            "POST",
            "/v1/connect/intentions",
            {"SourceName": source, "DestinationName": CHAT, "Action": action},
        )
        assert status == 200, answer
        assert isinstance(answer, dict)
        created.append(answer["ID"])
    try:
        chat = await harness.identity(CHAT)
        monolith = await harness.identity(SERVER)
        other = await harness.identity("snet-other")
        url, _, authorizer = await harness.serve(chat)
        status, body = await get_json(harness.monolith(monolith), f"{url}/v1/x")
        assert status == 200, body
        status, body = await get_json(harness.monolith(other), f"{url}/v1/x")
        assert status == 403
        assert "DENY" in body["reason"]
        # Answers are cached: the next calls of both callers ask Consul nothing.
        misses = authorizer.misses
        for source in (monolith, other):
            await get_json(harness.monolith(source), f"{url}/v1/x")
        assert authorizer.misses == misses
    finally:
        for intention in created:
            agent.api("DELETE", f"/v1/connect/intentions/{intention}")


@pytest_twisted.ensureDeferred
async def test_while_the_agent_answers_nothing_a_known_caller_is_not_held(
    harness: Harness, agent: ConsulAgent
) -> None:
    """A frozen agent (SIGSTOP: the kernel accepts the call, nobody answers) holds an
    authorize call as a restarting one does. Once the answer of a caller it answered lately
    is past its ttl (0 here), a request of that caller gets the last answer after ``slow_after``
    instead of waiting for the agent, or for the call's timeout (5 s here), which then would
    have been an error (``errors``)."""
    chat = await harness.identity(CHAT)
    monolith = await harness.identity(SERVER)
    url, _, authorizer = await harness.serve(chat)
    authorizer.ttl = 0  # every request asks the agent; its last answer may still stand
    http = harness.monolith(monolith)
    assert (await get_json(http, f"{url}/v1/x"))[0] == 200
    agent.pause()
    try:
        status, body = await get_json(http, f"{url}/v1/x")
        assert (status, authorizer.stale, authorizer.errors) == (200, 1, 0), body
    finally:
        agent.resume()


@pytest_twisted.ensureDeferred
async def test_a_ca_rotation_reaches_both_ends_and_calls_go_on(
    harness: Harness, agent: ConsulAgent
) -> None:
    """Steady calls, each on a new TLS connection, while the CA rotates: none fails."""
    chat = await harness.identity(CHAT)
    monolith = await harness.identity(SERVER)
    url, _, _ = await harness.serve(chat)
    http = harness.monolith(monolith)
    assert chat.identity is not None and monolith.identity is not None
    old_root = chat.identity.roots.active_root_id
    old_serials = {chat.identity.leaf.serial, monolith.identity.leaf.serial}
    outcomes: list[int | str] = []
    calling = True

    async def steady_calls() -> None:
        while calling:
            try:
                outcomes.append((await get_json(http, f"{url}/v1/x"))[0])
            except Exception as error:
                outcomes.append(repr(error))
            await sleep(0.05)

    calls = ensureDeferred(steady_calls())
    status, answer = agent.api(
        "PUT",
        "/v1/connect/ca/configuration",
        {"Provider": "consul", "Config": {"PrivateKey": new_ca_private_key()}},
    )
    assert status == 200, answer
    started = time.monotonic()
    try:

        def new_active(watcher: CertificateWatcher) -> bool:
            identity = watcher.identity
            return identity is not None and identity.roots.active_root_id != old_root

        await eventually(lambda: new_active(chat) and new_active(monolith), 20, "the new root")
        roots_seen = time.monotonic() - started

        def reissued() -> bool:
            # Consul 1.8 spreads the re-issue of leaves after a rotation over 30 s.
            return all(
                w.identity is not None and w.identity.leaf.serial not in old_serials
                for w in (chat, monolith)
            )

        await eventually(reissued, 60, "leaves from the new root")
        await sleep(0.2)  # a few calls with both new leaves
    finally:
        calling = False
        await calls
    print(
        f"\nCA rotation: new root seen after {roots_seen:.2f}s, new leaves after"
        f" {time.monotonic() - started:.2f}s; {len(outcomes)} calls meanwhile"
    )
    assert [o for o in outcomes if o != 200] == []
    assert len(outcomes) > 10


# --- ACLs -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def acl_agent() -> Iterator[ConsulAgent]:
    with ConsulAgent(acl_default_policy="deny") as consul_agent:
        yield consul_agent


def test_without_a_token_a_process_can_neither_register_nor_read(acl_agent: ConsulAgent) -> None:
    registration = {"Name": CHAT, "ID": "chat-anonymous", "Port": 9001}
    status, answer = acl_agent.api("PUT", "/v1/agent/service/register", registration)
    assert status == 403, answer
    status, answer = acl_agent.api(
        "PUT",
        "/v1/agent/service/register",
        {**registration, "ID": "chat-1"},
        acl_agent.management_token,
    )
    assert status == 200, answer
    # Registered, yet a reader without a token is shown nothing.
    status, answer = acl_agent.api("GET", "/v1/health/service/snet-chat")
    assert (status, answer) == (200, [])
    status, answer = acl_agent.api("GET", "/v1/agent/connect/ca/leaf/snet-chat")
    assert status == 403, answer


def test_a_chat_token_registers_its_own_service_only(acl_agent: ConsulAgent) -> None:
    token = acl_agent.create_token("chat-role", chat_rules(CHAT))
    status, answer = acl_agent.api(
        "PUT", "/v1/agent/service/register", {"Name": CHAT, "ID": "chat-2", "Port": 9002}, token
    )
    assert status == 200, answer
    status, answer = acl_agent.api(
        "PUT", "/v1/agent/service/register", {"Name": SERVER, "ID": "s", "Port": 1}, token
    )
    assert status == 403, answer
    status, answer = acl_agent.api("PUT", "/v1/agent/service/deregister/chat-2", None, token)
    assert status == 200, answer


@pytest_twisted.ensureDeferred
async def test_role_tokens_are_enough_for_connect(acl_agent: ConsulAgent) -> None:
    """With only their own tokens, both ends get identities and the monolith's call works
    once an intention allows it (ACLs default to deny, intentions too)."""
    harness = Harness(acl_agent)
    created = None
    try:
        chat_token = acl_agent.create_token("chat-connect", chat_rules(CHAT))
        monolith_token = acl_agent.create_token("monolith-connect", monolith_rules(SERVER, CHAT))
        chat = await harness.identity(CHAT, chat_token)
        monolith = await harness.identity(SERVER, monolith_token)
        authorizer = ConnectAuthorizer(
            consul=harness.consul(chat_token), target=CHAT, source=chat, clock=reactor
        )
        resource = DialogsStandIn(authorizer)
        factory = TLSMemoryBIOFactory(ConnectServerTLS(chat), False, Site(resource))
        port = await TCP4ServerEndpoint(reactor, 0, interface=HOST).listen(factory)
        harness.ports.append(port)
        url = f"https://{HOST}:{port.getHost().port}/v1/x"
        status, body = await get_json(harness.monolith(monolith), url)
        assert status == 403, body  # default deny
        status, answer = acl_agent.api(
            "POST",
            "/v1/connect/intentions",
            {"SourceName": SERVER, "DestinationName": CHAT, "Action": "allow"},
            acl_agent.management_token,
        )
        assert status == 200, answer
        assert isinstance(answer, dict)
        created = answer["ID"]
        authorizer2 = ConnectAuthorizer(
            consul=harness.consul(chat_token), target=CHAT, source=chat, clock=reactor
        )
        resource.authorizer = authorizer2
        status, body = await get_json(harness.monolith(monolith), url)
        assert status == 200, body
    finally:
        if created is not None:
            acl_agent.api(
                "DELETE", f"/v1/connect/intentions/{created}", None, acl_agent.management_token
            )
        await harness.close()
