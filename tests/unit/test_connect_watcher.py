"""CertificateWatcher and ConnectAuthorizer against a fake agent in memory, on a Clock."""

from __future__ import annotations

import json
from typing import Any

import pytest
from twisted.internet.task import Clock
from twisted.logger import capturedLogs, formatEvent

from snet.config import ConsulConfig
from snet.connect import (
    CertificateWatcher,
    ConnectAuthorizer,
    ConnectIdentity,
    Decision,
    FixedIdentity,
    PeerIdentity,
)
from snet.consul import TreqConsul
from snet.testing import result_of
from snet.testing.connect import AUTHORIZE, ROOTS, FakeConnectAgent, TestCA

CHAT = "snet-chat"
LEAF = f"/v1/agent/connect/ca/leaf/{CHAT}"


@pytest.fixture
def ca() -> TestCA:
    return TestCA()


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def agent(ca: TestCA) -> FakeConnectAgent:
    return FakeConnectAgent(ca, CHAT)


@pytest.fixture
def consul(agent: FakeConnectAgent, clock: Clock) -> TreqConsul:
    return TreqConsul(
        ConsulConfig.from_url("http://127.0.0.1:8500"), reactor=clock, http=agent.stub
    )


def watcher_for(consul: TreqConsul, clock: Clock, **kwargs: Any) -> CertificateWatcher:
    return CertificateWatcher(
        consul=consul, service=CHAT, clock=clock, retry_delay=lambda n: 2.0**n, **kwargs
    )


def started(watcher: CertificateWatcher, clock: Clock, agent: FakeConnectAgent) -> None:
    watcher.startService()
    clock.advance(0)
    agent.stub.flush()


@pytest.fixture
def running(consul: TreqConsul, clock: Clock, agent: FakeConnectAgent) -> CertificateWatcher:
    """A watcher with the default settings, started, that has read both answers."""
    watcher = watcher_for(consul, clock)
    started(watcher, clock, agent)
    return watcher


# --- the watcher -------------------------------------------------------------------------------


def test_the_identity_is_read_from_the_leaf_and_the_roots(
    consul: TreqConsul, clock: Clock, agent: FakeConnectAgent, ca: TestCA
) -> None:
    watcher = watcher_for(consul, clock)
    ready = watcher.ready()
    started(watcher, clock, agent)
    identity = result_of(ready)
    assert identity is watcher.identity
    assert identity.spiffe_id == ca.spiffe_id(CHAT)
    assert identity.roots.certificates == (ca.certificate,)
    assert watcher.healthy
    assert result_of(watcher.ready()) is identity


def test_after_the_first_reads_both_endpoints_are_followed_with_blocking_queries(
    consul: TreqConsul, clock: Clock, agent: FakeConnectAgent
) -> None:
    watcher = watcher_for(consul, clock, wait=30.0)
    started(watcher, clock, agent)
    clock.advance(1)
    agent.stub.flush()
    assert agent.queries(LEAF) == [{}, {"index": "10", "wait": "30000ms"}]
    assert agent.queries(ROOTS) == [{}, {"index": "5", "wait": "30000ms"}]


def test_a_renewed_leaf_replaces_the_identity_and_tells_subscribers(
    running: CertificateWatcher, clock: Clock, agent: FakeConnectAgent, ca: TestCA
) -> None:
    watcher = running
    first = watcher.identity
    seen: list[ConnectIdentity] = []
    watcher.subscribe(seen.append)
    clock.advance(1)
    agent.set(LEAF, ca.consul_leaf(CHAT, 11))
    assert watcher.identity is not first and watcher.identity is not None
    assert watcher.identity.leaf.serial != first.leaf.serial  # type: ignore[union-attr]
    assert seen == [watcher.identity]


def test_a_rotated_root_replaces_the_identity_without_a_new_leaf(
    running: CertificateWatcher, clock: Clock, agent: FakeConnectAgent, ca: TestCA
) -> None:
    watcher = running
    leaf = watcher.identity.leaf  # type: ignore[union-attr]
    new_ca = TestCA(trust_domain=ca.trust_domain)
    clock.advance(1)
    agent.set(ROOTS, new_ca.consul_roots(ca))
    assert watcher.identity is not None
    assert watcher.identity.leaf is leaf
    assert watcher.identity.roots.certificates == (new_ca.certificate, ca.certificate)


def test_while_the_agent_is_away_the_last_identity_stays_and_calls_back_off(
    consul: TreqConsul, clock: Clock, agent: FakeConnectAgent, ca: TestCA
) -> None:
    watcher = watcher_for(consul, clock, min_interval=0.0)
    started(watcher, clock, agent)
    agent.set(LEAF, ca.consul_leaf(CHAT, 11))
    identity = watcher.identity
    agent.error = (500, b"rpc error: No cluster leader")
    with capturedLogs() as events:
        clock.advance(0)  # the next blocking query goes out and fails
        agent.stub.flush()
        before = len(agent.queries(LEAF))
        for delay in (2.0, 4.0, 8.0):
            clock.advance(delay - 0.01)
            agent.stub.flush()
            assert len(agent.queries(LEAF)) == before
            clock.advance(0.01)
            agent.stub.flush()
            before += 1
            assert len(agent.queries(LEAF)) == before
    assert watcher.identity is identity
    assert not watcher.healthy
    warnings = [e for e in events if "keeping the last one" in str(formatEvent(e))]
    assert len(warnings) == 1
    agent.error = None
    with capturedLogs() as events:
        clock.advance(16.0)
        agent.stub.flush()
    assert watcher.healthy
    assert watcher.identity is identity  # the same leaf: nothing to replace
    # The first call after a failure does not block; the next one does.
    assert agent.queries(LEAF)[-2:] == [{}, {"index": "11", "wait": "60000ms"}]
    assert any("consul reachable again" in str(formatEvent(e)) for e in events)


def test_an_unusable_answer_keeps_the_last_identity_and_is_retried(
    running: CertificateWatcher, clock: Clock, agent: FakeConnectAgent, ca: TestCA
) -> None:
    watcher = running
    identity = watcher.identity
    clock.advance(1)
    agent.set(LEAF, {"CertPEM": "garbage", "PrivateKeyPEM": "garbage"})
    assert watcher.identity is identity
    agent.answers[LEAF] = (20, ca.consul_leaf(CHAT, 20))
    clock.advance(2.0)
    agent.stub.flush()
    assert watcher.identity is not identity


def test_a_new_cluster_ends_the_other_loops_back_off_and_the_identity_moves_at_once(
    consul: TreqConsul, clock: Clock, agent: FakeConnectAgent, ca: TestCA
) -> None:
    """A restarted dev agent is a new cluster. Both loops back off while it is away; the
    first answer of the new one (the leaf, 1 s later) makes the other (the roots, backing
    off for 100 s) be read at once, and the identity moves to the new trust domain."""
    delays = iter([1.0, 100.0])
    watcher = CertificateWatcher(
        consul=consul, service=CHAT, clock=clock, retry_delay=lambda n: next(delays, 100.0)
    )
    started(watcher, clock, agent)
    agent.error = (500, b"agent restarting")
    agent.set(LEAF, ca.consul_leaf(CHAT, 11))
    clock.advance(1)
    agent.stub.flush()
    assert not watcher.healthy
    new = TestCA()
    agent.error = None
    agent.answers[LEAF] = (3, new.consul_leaf(CHAT, 3))
    agent.answers[ROOTS] = (2, new.consul_roots())
    with capturedLogs() as events:
        for _ in range(3):
            clock.advance(1)
            agent.stub.flush()
    assert watcher.identity is not None
    assert watcher.identity.trust_domain == new.trust_domain
    assert watcher.identity.spiffe_id == new.spiffe_id(CHAT)
    assert watcher.healthy
    assert any("do not fit together" in str(formatEvent(e)) for e in events)


def test_a_leaf_of_a_new_cluster_cuts_the_blocked_roots_query_short(
    consul: TreqConsul, clock: Clock, agent: FakeConnectAgent, ca: TestCA
) -> None:
    """The leaf of a new trust domain arrives while the roots query is still held on the old
    agent's index: it is cancelled and the roots are read afresh."""
    watcher = watcher_for(consul, clock)
    started(watcher, clock, agent)
    clock.advance(1)
    agent.stub.flush()
    assert agent.queries(ROOTS)[-1] == {"index": "5", "wait": "60000ms"}
    new = TestCA()
    agent.answers[ROOTS] = (5, new.consul_roots())  # the held query stays held
    agent.set(LEAF, new.consul_leaf(CHAT, 11))
    clock.advance(1)
    agent.stub.flush()
    assert agent.queries(ROOTS)[-1] == {}
    assert watcher.identity is not None
    assert watcher.identity.trust_domain == new.trust_domain


def test_answers_that_never_fit_together_are_not_read_again_and_again(
    running: CertificateWatcher, clock: Clock, agent: FakeConnectAgent
) -> None:
    """An agent that answers a leaf and roots of two domains (it never should) gets one more
    read of the other answer, not a loop of them; the last good identity stays."""
    identity = running.identity
    before = len(agent.queries(ROOTS))
    agent.set(LEAF, TestCA().consul_leaf(CHAT, 11))
    clock.advance(1)
    agent.stub.flush()
    assert len(agent.queries(ROOTS)) <= before + 2  # the fresh read, then a blocking one
    clock.advance(10)
    agent.stub.flush()
    assert len(agent.queries(ROOTS)) <= before + 2
    assert running.identity is identity


def test_stopping_cancels_the_blocking_queries(
    running: CertificateWatcher, clock: Clock, agent: FakeConnectAgent
) -> None:
    watcher = running
    clock.advance(1)
    agent.stub.flush()
    assert len(agent.held) == 2
    result_of(watcher.stopService())
    assert clock.getDelayedCalls() == []


def test_ready_waits_for_both_answers(
    consul: TreqConsul, clock: Clock, agent: FakeConnectAgent
) -> None:
    agent.error = (500, b"down")
    watcher = watcher_for(consul, clock)
    ready = watcher.ready()
    started(watcher, clock, agent)
    assert not ready.called and watcher.identity is None
    agent.error = None
    clock.advance(2.0)
    agent.stub.flush()
    assert result_of(ready) is watcher.identity


# --- the authorizer ----------------------------------------------------------------------------


@pytest.fixture
def authorizer(consul: TreqConsul, clock: Clock, ca: TestCA) -> ConnectAuthorizer:
    return ConnectAuthorizer(
        consul=consul, target=CHAT, source=FixedIdentity(ca.identity(CHAT)), clock=clock, ttl=3.0
    )


def test_without_a_verified_certificate_a_caller_is_unauthenticated(
    authorizer: ConnectAuthorizer, agent: FakeConnectAgent
) -> None:
    decision = result_of(authorizer.check_peer(None))
    assert (decision.allowed, decision.status) == (False, 401)
    decision = result_of(authorizer.check_peer(PeerIdentity("spiffe://x/not-a-service", "01")))
    assert decision.status == 401
    assert agent.queries(AUTHORIZE) == []


def test_a_caller_of_another_trust_domain_is_forbidden_without_asking(
    authorizer: ConnectAuthorizer, agent: FakeConnectAgent
) -> None:
    peer = PeerIdentity(TestCA().spiffe_id("snet-server").uri, "01")
    agent.authorized[peer.spiffe_id] = True
    assert result_of(authorizer.check_peer(peer)).status == 403
    assert agent.queries(AUTHORIZE) == []


def test_a_caller_of_another_trust_domain_has_its_connection_closed_a_refused_one_not(
    authorizer: ConnectAuthorizer, agent: FakeConnectAgent, ca: TestCA
) -> None:
    """Another domain can only be a connection from before this service moved to a new
    cluster: it can never be allowed, so it is to be closed. Consul's no is not final."""
    stale = result_of(authorizer.check_peer(PeerIdentity(TestCA().spiffe_id("x").uri, "01")))
    assert (stale.status, stale.close_connection) == (403, True)
    refused = result_of(authorizer.check_peer(PeerIdentity(ca.spiffe_id("x").uri, "01")))
    assert (refused.status, refused.close_connection) == (403, False)


def test_consuls_answers_are_followed_and_cached_for_the_ttl(
    authorizer: ConnectAuthorizer, agent: FakeConnectAgent, clock: Clock, ca: TestCA
) -> None:
    server = ca.spiffe_id("snet-server").uri
    rogue = ca.spiffe_id("rogue").uri
    agent.authorized[server] = True
    assert result_of(authorizer.authorize(server, "01")) == Decision.allow(server, "fake")
    assert result_of(authorizer.authorize(rogue, "02")).status == 403
    calls = len(agent.queries(AUTHORIZE))
    agent.authorized[server] = False
    clock.advance(2.9)
    assert result_of(authorizer.authorize(server, "01")).allowed
    assert len(agent.queries(AUTHORIZE)) == calls
    clock.advance(0.2)
    assert not result_of(authorizer.authorize(server, "01")).allowed
    assert authorizer.hits == 1 and authorizer.misses == 3
    body = json.loads(agent.requests[0][2])
    assert body == {"Target": CHAT, "ClientCertURI": server, "ClientCertSerial": "01"}


def test_concurrent_lookups_share_one_call(
    authorizer: ConnectAuthorizer, agent: FakeConnectAgent, ca: TestCA
) -> None:
    agent.hold_authorize = True
    server = ca.spiffe_id("snet-server").uri
    first, second = authorizer.authorize(server, "01"), authorizer.authorize(server, "01")
    assert len(agent.queries(AUTHORIZE)) == 1
    agent.release_authorize()
    assert result_of(first).allowed and result_of(second).allowed


@pytest.mark.parametrize("error", [(500, b"boom"), (403, b"Permission denied"), (200, b"[]")])
def test_any_error_denies_and_is_not_cached(
    authorizer: ConnectAuthorizer,
    agent: FakeConnectAgent,
    ca: TestCA,
    error: tuple[int, bytes],
) -> None:
    server = ca.spiffe_id("snet-server").uri
    agent.authorized[server] = True
    agent.error = error
    with capturedLogs():
        decision = result_of(authorizer.authorize(server, "01"))
    assert (decision.allowed, decision.status) == (False, 403)
    assert authorizer.errors == 1
    agent.error = None
    assert result_of(authorizer.authorize(server, "01")).allowed


def allowed_once(authorizer: ConnectAuthorizer, agent: FakeConnectAgent, ca: TestCA) -> str:
    """The SPIFFE id of a caller Consul has just allowed (its answer now in the cache)."""
    server = ca.spiffe_id("snet-server").uri
    agent.authorized[server] = True
    assert result_of(authorizer.authorize(server, "01")).allowed
    return server


def test_while_consul_cannot_answer_a_known_caller_keeps_its_last_answer_for_a_while(
    authorizer: ConnectAuthorizer, agent: FakeConnectAgent, clock: Clock, ca: TestCA
) -> None:
    """An agent restart must not cut the monolith off; a caller never seen is still denied."""
    server = allowed_once(authorizer, agent, ca)
    agent.error = (500, b"no leader")
    clock.advance(authorizer.ttl + 1)
    with capturedLogs() as events:
        assert result_of(authorizer.authorize(server, "01")).allowed
        assert result_of(authorizer.authorize(server, "01")).allowed  # said once, not twice
        assert not result_of(authorizer.authorize(ca.spiffe_id("other").uri, "02")).allowed
    assert (authorizer.errors, authorizer.stale) == (3, 2)
    said = [formatEvent(e) for e in events]
    assert len(said) == 2 and "stands until Consul answers" in said[0]
    assert said[1].startswith("denying spiffe://")
    clock.advance(authorizer.stale_if_error)
    with capturedLogs():
        assert not result_of(authorizer.authorize(server, "01")).allowed


def test_while_consul_is_slow_a_known_callers_last_answer_stands_until_it_answers(
    authorizer: ConnectAuthorizer, agent: FakeConnectAgent, clock: Clock, ca: TestCA
) -> None:
    """A restarting agent can accept the call and answer only seconds later: a caller it
    answered lately is not held that long; its answer, when it comes, is followed."""
    server = allowed_once(authorizer, agent, ca)
    clock.advance(authorizer.ttl + 1)
    agent.hold_authorize = True
    waiting = authorizer.authorize(server, "01")
    stranger = authorizer.authorize(ca.spiffe_id("other").uri, "02")
    clock.advance(authorizer.slow_after - 0.01)
    assert not waiting.called
    with capturedLogs() as events:
        clock.advance(0.01)
    assert result_of(waiting).allowed
    assert "stands until Consul answers" in formatEvent(events[0])
    assert result_of(authorizer.authorize(server, "01")).allowed  # at once, while it is slow
    assert authorizer.stale == 2
    assert len(agent.queries(AUTHORIZE)) == 3  # the first, then one each: no new call
    assert not stranger.called  # never answered: no answer to stand in
    agent.authorized[server] = False  # from now on; the held calls are answered yes
    with capturedLogs() as events:
        agent.release_authorize()
    assert [formatEvent(e) for e in events] == [f"{server}: Consul answers again"]
    assert result_of(stranger).allowed
    assert clock.getDelayedCalls() == []
    agent.hold_authorize = False
    clock.advance(authorizer.ttl)  # the late yes was cached for the ttl; now Consul says no
    assert not result_of(authorizer.authorize(server, "01")).allowed


def test_an_answer_older_than_stale_if_error_does_not_stand_in_for_a_slow_consul(
    authorizer: ConnectAuthorizer, agent: FakeConnectAgent, clock: Clock, ca: TestCA
) -> None:
    server = allowed_once(authorizer, agent, ca)
    clock.advance(authorizer.stale_if_error)
    agent.hold_authorize = True
    waiting = authorizer.authorize(server, "01")
    clock.advance(authorizer.slow_after * 10)
    assert not waiting.called
    agent.release_authorize()
    assert result_of(waiting).allowed
