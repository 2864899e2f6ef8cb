"""Dialogs under faults: a steady stream of sends and lists through a real monolith
(``twistd snet-server``) to three real chat instances (``twistd snet-chat``) found through a
real Consul agent, with real MariaDB and Redis, while one thing breaks.

Each test starts its own fleet and monolith, so that the tests are independent; the ones that
kill Consul or stop MariaDB start private servers for it, so that nothing else sees the fault.
What the clients were told is compared with what MySQL holds: a send answered 200 is stored,
and stored once.
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
import uuid
from collections.abc import Iterator, Sequence

import pytest
from attrs import frozen

from snet.testing.fleet import ChatFleet, connect_client_tls, monolith, query
from snet.testing.processes import TwistdProcess, http_json
from snet.testing.servers import ConsulAgent, MariaDB, Redis
from snet.testing.traffic import (
    ApiUser,
    DialogTraffic,
    Outcome,
    admin_urls,
    compare_with_mysql,
    metric_value,
    register_user,
    served_sends,
    stored_texts,
)
from snet.testing.waiting import timed, wait_until

pytestmark = pytest.mark.integration


@frozen
class Deployment:
    """A fleet of three chat instances, a monolith in front and three users of it."""

    fleet: ChatFleet
    server: TwistdProcess
    base: str
    chat_mysql_url: str
    sender: ApiUser
    recipient: ApiUser
    lister: ApiUser

    def traffic(self, clients: int = 4) -> DialogTraffic:
        return DialogTraffic(
            self.base,
            sender=self.sender,
            recipient=self.recipient,
            lister=self.lister,
            clients=clients,
            max_seconds=60,
        )

    def metric(self, name: str, **labels: str) -> float | None:
        assert self.server.admin_url is not None
        return metric_value(self.server.admin_url, name, **labels)

    def sends_served(self) -> dict[str, int | None]:
        return {i: served_sends(url, timeout=1.0) for i, url in admin_urls(self.fleet).items()}

    def wait_all_serve_again(self, since: dict[str, int | None], timeout: float) -> float:
        """Wait until every running instance served more sends than in *since*; the time."""
        ids = self.fleet.running_ids()

        def all_serve() -> bool:
            now = self.sends_served()
            return all((now[i] or 0) > (since.get(i) or 0) for i in ids)

        return wait_until(timed(all_serve), timeout, f"{sorted(ids)} to serve again", interval=0.02)


def _unique(name: str) -> str:
    return f"{name}_{uuid.uuid4().hex[:8]}"


@contextlib.contextmanager
def deployment(
    *,
    consul_url: str,
    server_mysql: MariaDB,
    chat_mysql: MariaDB,
    redis: Redis,
    monolith_args: Sequence[str] = (),
    plaintext: bool = False,
) -> Iterator[Deployment]:
    chat_mysql_url = chat_mysql.create_database(_unique("faults_chat"))
    fleet = ChatFleet(
        consul_url=consul_url, mysql_url=chat_mysql_url, redis_url=redis.url, plaintext=plaintext
    )
    try:
        fleet.wait_all_passing()
        server = monolith(
            consul_url=consul_url,
            mysql_url=server_mysql.create_database(_unique("faults_server")),
            redis_url=redis.url.replace("/0", "/1"),
            chat_service=fleet.service,
            extra_args=monolith_args,
            plaintext=plaintext,
        )
        with server:
            assert server.health_url is not None
            base = server.health_url.removesuffix("/health")
            wait_until(
                lambda: base_metric(server, "snet_chat_instances_healthy") == 3,
                10,
                "the monolith to list three instances",
                interval=0.05,
            )
            yield Deployment(
                fleet,
                server,
                base,
                chat_mysql_url,
                register_user(base, "Sender"),
                register_user(base, "Recipient"),
                register_user(base, "Lister"),
            )
    finally:
        fleet.stop()


def base_metric(server: TwistdProcess, name: str) -> float | None:
    assert server.admin_url is not None
    return metric_value(server.admin_url, name)


@pytest.fixture
def shared(
    consul_agent: ConsulAgent, mariadb: MariaDB, redis_server: Redis
) -> Iterator[Deployment]:
    with deployment(
        consul_url=consul_agent.url, server_mysql=mariadb, chat_mysql=mariadb, redis=redis_server
    ) as running:
        yield running


def describe(failures: Sequence[Outcome], since: float) -> str:
    return "; ".join(
        f"{o.kind} {o.status} at +{o.ended - since:.2f}s via {o.instance} {o.error or ''}"
        for o in failures[:10]
    )


def assert_stored_once(running: Deployment, traffic: DialogTraffic) -> None:
    acknowledged = traffic.acknowledged_texts()
    assert acknowledged
    duplicated, lost = compare_with_mysql(running.chat_mysql_url, running.sender.id, acknowledged)
    assert duplicated == [], f"{len(duplicated)} stored twice or more: {duplicated[:5]}"
    assert lost == [], f"{len(lost)} acknowledged but not in MySQL: {lost[:5]}"


def test_sigterm_of_an_instance_fails_no_request(shared: Deployment) -> None:
    victim = shared.fleet.instances[0]
    with shared.traffic() as traffic:
        traffic.wait_for(100)
        fault = time.monotonic()
        victim.signal(signal.SIGTERM)
        assert victim.wait(20) in (0, -signal.SIGTERM)
        exited = time.monotonic()
        traffic.wait_for(300, since=exited)
    assert traffic.failures() == [], describe(traffic.failures(), fault)
    after = {o.instance for o in traffic.outcomes(since=exited)}
    assert shared.fleet.instance_id(0) not in after
    assert after == shared.fleet.ids() - {shared.fleet.instance_id(0)}
    assert_stored_once(shared, traffic)


def test_sigkill_of_an_instance_fails_no_request_and_loses_or_duplicates_no_message(
    shared: Deployment,
) -> None:
    victim = shared.fleet.instances[0]
    with shared.traffic() as traffic:
        traffic.wait_for(100)
        fault = time.monotonic()
        victim.signal(signal.SIGKILL)
        victim.wait(5)
        killed = time.monotonic()
        traffic.wait_for(300, since=killed)
    assert traffic.failures() == [], describe(traffic.failures(), fault)
    assert_stored_once(shared, traffic)
    after = {o.instance for o in traffic.outcomes(since=killed)}
    assert after == shared.fleet.ids() - {shared.fleet.instance_id(0)}


def out_of_rotation(running: Deployment, instance_id: str) -> bool:
    """Whether the monolith no longer sends to *instance_id*: ejected by its passive health,
    or gone from Consul's passing list (whichever saw the fault first)."""
    ejections = running.metric("snet_chat_ejections_total", instance=instance_id) or 0
    return ejections >= 1 or running.metric("snet_chat_instances_healthy") == 2


def test_sigstop_ejects_the_instance_after_bounded_failures_and_sigcont_brings_it_back(
    shared: Deployment,
) -> None:
    """A stopped instance accepts connections (the kernel does) but answers nothing: its
    calls time out and are retried elsewhere with the same key, it is taken out of rotation
    (ejected, or dropped from Consul's list when its check fails first), and once it goes on
    it is back in rotation within seconds."""
    victim = shared.fleet.instances[0]
    victim_id = shared.fleet.instance_id(0)
    with shared.traffic() as traffic:
        traffic.wait_for(100)
        fault = time.monotonic()
        victim.signal(signal.SIGSTOP)
        try:
            ejected = wait_until(
                timed(lambda: out_of_rotation(shared, victim_id)),
                15,
                f"{victim_id} out",
                interval=0.02,
            )
            traffic.wait_for(200, since=ejected)
            timeouts = shared.metric(
                "snet_chat_request_failures_total", instance=victim_id, reason="timeout"
            )
        finally:
            victim.signal(signal.SIGCONT)
        resumed = time.monotonic()
        before = shared.sends_served()
        back = wait_until(
            timed(
                lambda: (
                    (served_sends(shared.fleet.admin_url(0), timeout=1.0) or 0)
                    > (before[victim_id] or 0)
                )
            ),
            15,
            f"{victim_id} serving again",
            interval=0.02,
        )
        traffic.wait_for(50, since=back)
    failed = traffic.failures()
    assert timeouts is not None and timeouts >= 1, "no call to the stopped instance timed out"
    assert len(failed) <= 2, describe(failed, fault)
    assert [o for o in failed if o.started >= ejected] == [], describe(failed, fault)
    assert back - resumed < 5.0, f"back in rotation {back - resumed:.2f}s after SIGCONT"
    assert_stored_once(shared, traffic)


def consul_down_and_back(
    consul: ConsulAgent, running: Deployment, traffic: DialogTraffic
) -> tuple[float, float]:
    """Kill the agent under *traffic*, keep it down for at least 2 s (the monolith seeing it
    gone), start it again and wait until the monolith lists all three instances and every
    instance serves again; returns when it was killed and when it was started."""
    traffic.wait_for(100)
    killed = time.monotonic()
    consul.kill()
    traffic.wait_for(100, since=killed)
    time.sleep(max(0.0, killed + 2.0 - time.monotonic()))
    assert running.metric("snet_consul_reachable") == 0
    consul.start()
    restarted = time.monotonic()
    served = running.sends_served()
    wait_until(
        lambda: (
            running.metric("snet_chat_instances_healthy") == 3
            and running.metric("snet_consul_reachable") == 1
        ),
        15,
        "the monolith to list three instances and read Consul again",
        interval=0.02,
    )
    running.wait_all_serve_again(served, 10)
    return killed, restarted


def test_consul_agent_killed_and_restarted_fails_no_request_and_the_list_recovers(
    mariadb: MariaDB, redis_server: Redis
) -> None:
    """While the agent is down the monolith serves from the last list; once it is back the
    instances register again by themselves and the monolith lists and uses all three.

    In plaintext, on a dev agent, which forgets every registration: a restarted dev agent is
    also a new cluster (a new Connect CA and trust domain, no intentions), which a real agent
    restart never is; the next test restarts a persistent agent over Connect."""
    with (
        ConsulAgent() as consul,
        deployment(
            consul_url=consul.url,
            server_mysql=mariadb,
            chat_mysql=mariadb,
            redis=redis_server,
            plaintext=True,
        ) as running,
        running.traffic() as traffic,
    ):
        killed, restarted = consul_down_and_back(consul, running, traffic)
        traffic.stop()
        down = traffic.failures(since=killed, until=restarted)
        assert down == [], describe(down, killed)
        assert_stored_once(running, traffic)
        # The restarted dev agent has forgotten every registration and answers "none" until
        # the instances register again: the monolith keeps its last list meanwhile.
        after = traffic.failures(since=restarted)
        assert after == [], describe(after, restarted)


def test_a_real_consul_restart_over_connect_fails_no_call_and_stores_every_send_once(
    mariadb: MariaDB, redis_server: Redis
) -> None:
    """The agent restarts as a real one does (killed, then started with its data dir: the same
    cluster, CA and trust domain, intentions and registrations) while sends and lists flow
    over Connect mutual TLS: no call fails, every acknowledged send is stored once, all three
    instances serve again, and the intentions still refuse any other caller."""
    with (
        ConsulAgent(persistent=True) as consul,
        deployment(
            consul_url=consul.url, server_mysql=mariadb, chat_mysql=mariadb, redis=redis_server
        ) as running,
        running.traffic() as traffic,
    ):
        domain = consul.trust_domain()
        killed, _ = consul_down_and_back(consul, running, traffic)
        assert consul.trust_domain() == domain
        traffic.wait_for(100, since=time.monotonic())
        traffic.stop()
        failed = traffic.failures()
        assert failed == [], describe(failed, killed)
        assert_stored_once(running, traffic)
        intruder = connect_client_tls(consul.url, "intruder")
        status, _, body = http_json(
            "GET",
            f"{running.fleet.url(0)}/v1/dialogs/{running.recipient.id}/messages",
            headers={"X-Snet-User-Id": running.sender.id},
            tls=intruder,
        )
        assert status == 403, body


def test_a_dev_consul_restart_over_connect_is_a_new_ca_that_every_process_moves_to(
    mariadb: MariaDB, redis_server: Redis
) -> None:
    """A restarted *dev* agent is a new cluster: a new CA and trust domain. Every process
    moves to it and the calls succeed again. An instance refuses a call on a connection
    opened under the old trust domain once, and closes it: at most one 403 per connection
    the monolith had open to it (its 4 clients make at most 4 calls at a time), where such
    connections used to be refused for as long as the monolith kept them. Nothing refused
    was stored."""
    clients = 4
    with (
        ConsulAgent() as consul,
        deployment(
            consul_url=consul.url, server_mysql=mariadb, chat_mysql=mariadb, redis=redis_server
        ) as running,
        running.traffic(clients) as traffic,
    ):
        domain = consul.trust_domain()
        traffic.wait_for(100)
        killed = time.monotonic()
        consul.kill()
        traffic.wait_for(50, since=killed)
        consul.start()
        restarted = time.monotonic()
        assert consul.trust_domain() != domain

        def last_calls_succeed() -> bool:
            ended = sorted(traffic.outcomes(since=restarted), key=lambda o: o.ended)[-100:]
            return len(ended) == 100 and all(o.ok for o in ended)

        wait_until(last_calls_succeed, 30, "100 calls in a row to succeed", interval=0.05)
        traffic.wait_for(300, since=time.monotonic())
        traffic.stop()
        failed = traffic.failures(since=killed)
        assert all(o.status in (403, 503) for o in failed), describe(failed, killed)
        refused = [o for o in failed if o.status == 403]
        assert len(refused) <= clients * len(running.fleet.instances), describe(refused, killed)
        stored = stored_texts(running.chat_mysql_url, running.sender.id)
        assert not [o for o in failed if o.kind == "send" and o.text in stored]
        assert_stored_once(running, traffic)


def test_chat_mysql_down_answers_503_with_retry_after_writes_nothing_partial_and_recovers(
    consul_agent: ConsulAgent, mariadb: MariaDB, redis_server: Redis
) -> None:
    with (
        MariaDB() as chat_mysql,
        deployment(
            consul_url=consul_agent.url,
            server_mysql=mariadb,
            chat_mysql=chat_mysql,
            redis=redis_server,
        ) as running,
        running.traffic() as traffic,
    ):
        traffic.wait_for(100)
        stopped = time.monotonic()
        chat_mysql.stop()
        time.sleep(max(0.0, stopped + 2.0 - time.monotonic()))
        chat_mysql.start()
        started = time.monotonic()
        served = running.sends_served()
        running.wait_all_serve_again(served, 20)
        traffic.wait_for(50, since=time.monotonic())
        traffic.stop()
        failed = traffic.failures()
        assert failed, "no call failed while the chat service's MySQL was down"
        assert {o.status for o in failed} == {503}, describe(failed, stopped)
        assert all(o.retry_after for o in failed), describe(failed, stopped)
        assert traffic.slowest() < 12.0, f"a call took {traffic.slowest():.1f}s"
        assert all(o.ended < started + 10 for o in failed), describe(failed, stopped)
        assert_stored_once(running, traffic)


def test_sigterm_of_the_monolith_answers_every_call_it_accepted(shared: Deployment) -> None:
    """A stopping monolith stops accepting connections, then finishes the calls it has: a
    client sees answers (200), then connection refused; never a call cut off without an
    answer, and every send it acknowledged is stored once."""
    with shared.traffic() as traffic:
        traffic.wait_for(100)
        fault = time.monotonic()
        shared.server.signal(signal.SIGTERM)
        assert shared.server.wait(20) in (0, -signal.SIGTERM), shared.server.log_tail()
        stopped = time.monotonic()
        wait_until(
            lambda: bool(traffic.failures(since=stopped)),
            10,
            "calls refused after the stop",
            interval=0.005,
        )
    in_flight = [o for o in traffic.outcomes() if o.started < fault < o.ended]
    assert any(o.ok for o in in_flight), "no call was answered across the stop"
    cut_off = [o for o in traffic.failures() if "ConnectionRefused" not in (o.error or "")]
    assert cut_off == [], describe(cut_off, fault)
    assert_stored_once(shared, traffic)


def unread_in_redis_equals_mysql(running: Deployment, redis: Redis) -> bool:
    """Whether the recipient's unread count in Redis (the chat service's database of *redis*)
    equals what MySQL says, now: the sender's messages above the recipient's read mark."""
    reader, peer = running.recipient.id, running.sender.id
    [(mysql,)] = query(
        running.chat_mysql_url,
        "SELECT COUNT(*) FROM chat_messages m LEFT JOIN chat_reads r"
        " ON r.reader_id = m.recipient_id AND r.peer_id = m.sender_id"
        " WHERE m.recipient_id = %s AND m.sender_id = %s AND m.id > COALESCE(r.last_read_id, 0)",
        reader,
        peer,
    )
    try:
        reply = redis.command("ZCARD", f"snet:unread:{{{reader}}}:{peer}", timeout=1.0)
        in_redis = int(reply.removeprefix(b":"))
    except (OSError, ValueError):
        return False
    return in_redis == int(mysql)


@pytest.mark.parametrize("fault", ["sigstop", "kill"])
def test_redis_stalled_or_restarted_loses_no_acknowledged_message_and_counters_converge(
    consul_agent: ConsulAgent, mariadb: MariaDB, fault: str
) -> None:
    """Redis frozen (SIGSTOP) for longer than the monolith's chat timeout, or killed and
    started again empty, under steady sends: every send answered 200 is in MySQL once, and
    the recipient's unread counter equals MySQL's count within 5 s of Redis answering."""
    with (
        Redis() as redis,
        deployment(
            consul_url=consul_agent.url, server_mysql=mariadb, chat_mysql=mariadb, redis=redis
        ) as running,
        running.traffic() as traffic,
    ):
        traffic.wait_for(100)
        began = time.monotonic()
        if fault == "sigstop":
            assert redis.pid is not None
            os.kill(redis.pid, signal.SIGSTOP)
            time.sleep(3.0)  # the fault's length: past the monolith's 2 s chat timeout
            os.kill(redis.pid, signal.SIGCONT)
        else:
            redis.kill()
            time.sleep(2.0)
            redis.start()
        back = time.monotonic()
        traffic.wait_for(100, since=back)
        traffic.stop()
        failed = traffic.failures(since=began)
        assert failed == [], describe(failed, began)
        assert_stored_once(running, traffic)
        converged = wait_until(
            timed(lambda: unread_in_redis_equals_mysql(running, redis)),
            10,
            "the unread counter to equal MySQL's count",
            interval=0.05,
        )
        assert converged - back < 5.0, f"converged {converged - back:.1f}s after Redis came back"
