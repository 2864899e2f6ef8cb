"""Chat instances as real ``twistd -n snet-chat`` processes against a real Consul agent,
MariaDB and Redis: registration, stop order, crashes, agent restarts, idempotent sends,
unread counters and bad input, all observed from outside as an operator or client would."""

from __future__ import annotations

import signal
import ssl
import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest

from snet.testing.fleet import ChatFleet, query
from snet.testing.processes import http_json, opener
from snet.testing.servers import ConsulAgent, MariaDB, Redis
from snet.testing.waiting import wait_until

pytestmark = pytest.mark.integration


@pytest.fixture
def fleet(
    consul_agent: ConsulAgent, chat_database: str, redis_server: Redis
) -> Iterator[ChatFleet]:
    fleet = ChatFleet(
        consul_url=consul_agent.url, mysql_url=chat_database, redis_url=redis_server.url
    )
    try:
        yield fleet
    finally:
        fleet.stop()


@pytest.fixture(scope="module")
def chat_database(mariadb: MariaDB) -> str:
    return mariadb.create_database("chat_processes")


def send(
    base: str, sender: int, peer: int, text: str, key: str, tls: ssl.SSLContext | None
) -> tuple[int, dict[str, str], Any]:
    return http_json(
        "POST",
        f"{base}/v1/dialogs/{peer}/messages",
        {"text": text},
        {"X-Snet-User-Id": str(sender), "Idempotency-Key": key, "X-Request-ID": key},
        tls=tls,
    )


def test_three_instances_all_show_as_passing_in_consul(fleet: ChatFleet) -> None:
    fleet.wait_all_passing()
    entries = fleet.consul_entries()
    ports = sorted(e["Service"]["Port"] for e in entries)
    assert ports == sorted(int(fleet.url(i).rsplit(":", 1)[1]) for i in range(3))
    assert all(e["Service"]["Address"] == "127.0.0.1" for e in entries)
    assert all(e["Service"]["Meta"].get("version") for e in entries)


def test_sigterm_removes_the_instance_from_consul_before_the_process_exits(
    fleet: ChatFleet,
) -> None:
    victim = fleet.instances[0]
    victim_id = f"{fleet.service}-0"
    fleet.wait_all_passing()
    victim.signal(signal.SIGTERM)

    def gone_or_exited() -> str | None:
        registered = {e["Service"]["ID"] for e in fleet.consul_entries(passing=False)}
        if victim_id not in registered and victim.running():
            return "gone while running"
        return None if victim.running() else "exited"

    seen = wait_until(gone_or_exited, 20, f"{victim_id} to leave Consul", interval=0.01)
    assert seen == "gone while running", victim.log_tail()
    assert victim.wait(20) in (0, -signal.SIGTERM), victim.log_tail()
    assert victim_id not in {e["Service"]["ID"] for e in fleet.consul_entries(passing=False)}
    assert {f"{fleet.service}-1", f"{fleet.service}-2"} <= fleet.passing_ids()


def test_sigterm_during_a_stream_of_sends_answers_every_request_it_was_sent(
    fleet: ChatFleet,
) -> None:
    """Clients that follow Consul (as the monolith does) stop sending once the instance is
    deregistered; every request sent until then gets its answer, and every 201 is in MySQL."""
    fleet.wait_all_passing()
    base, victim_id = fleet.url(1), f"{fleet.service}-1"
    run = uuid.uuid4().hex[:8]
    acknowledged: list[str] = []
    failures: list[str] = []
    deregistered = threading.Event()
    sigterm_at: list[float] = []
    answered_after_sigterm: list[str] = []

    def stream(client: int) -> None:
        for n in range(5000):
            if deregistered.is_set():
                return
            key = f"{run}-{client}-{n}"
            try:
                status, _, _ = send(base, 11, 12, f"message {n}", key, fleet.caller_tls)
            except OSError as e:
                failures.append(f"{key}: {e!r}")
                continue
            if status != 201:
                failures.append(f"{key}: HTTP {status}")
                continue
            acknowledged.append(key)
            if sigterm_at:
                answered_after_sigterm.append(key)

    def watch_consul() -> None:
        wait_until(
            lambda: victim_id not in fleet.registered_ids(), 30, "deregistered", interval=0.005
        )
        deregistered.set()

    threads = [threading.Thread(target=stream, args=(client,)) for client in range(4)]
    for thread in threads:
        thread.start()
    wait_until(lambda: len(acknowledged) >= 50, 20, "a steady stream of sends")
    watcher = threading.Thread(target=watch_consul)
    watcher.start()
    sigterm_at.append(time.monotonic())
    fleet.instances[1].signal(signal.SIGTERM)
    for thread in [watcher, *threads]:
        thread.join(30)
    assert fleet.instances[1].wait(20) in (0, -signal.SIGTERM)
    assert failures == []
    assert answered_after_sigterm, "no request was in flight during the stop"
    stored = query(
        fleet.mysql_url,
        "SELECT COUNT(*) FROM chat_messages WHERE sender_id = 11 AND idempotency_key LIKE %s",
        f"{run}-%",
    )[0][0]
    assert stored == len(acknowledged)


def test_sigkill_turns_the_instance_check_critical(fleet: ChatFleet) -> None:
    victim_id = f"{fleet.service}-2"
    fleet.wait_all_passing()
    fleet.instances[2].signal(signal.SIGKILL)
    fleet.instances[2].wait(10)
    wait_until(lambda: fleet.check_status(victim_id) == "critical", 15, "check critical")
    assert victim_id not in fleet.passing_ids()


def test_restarting_the_consul_agent_brings_every_live_instance_back(
    fleet: ChatFleet, consul_agent: ConsulAgent
) -> None:
    fleet.wait_all_passing()
    consul_agent.restart()
    fleet.wait_all_passing(20)


def test_a_repeated_idempotency_key_stores_one_message_and_answers_alike(fleet: ChatFleet) -> None:
    key = f"same-{uuid.uuid4().hex}"
    first = send(fleet.url(0), 21, 22, "hello once", key, fleet.caller_tls)
    second = send(
        fleet.url(1), 21, 22, "hello once", key, fleet.caller_tls
    )  # another instance, same database
    assert first[0] == second[0] == 201
    assert first[2] == second[2]
    assert second[1].get("Idempotent-Replayed") == "true"
    rows = query(
        fleet.mysql_url,
        "SELECT COUNT(*) FROM chat_messages WHERE sender_id = 21 AND idempotency_key = %s",
        key,
    )
    assert rows[0][0] == 1


def test_unread_counters_match_mysql_after_a_rebuild(fleet: ChatFleet, redis_server: Redis) -> None:
    base = fleet.url(0)
    for n in range(5):
        assert send(base, 31, 32, f"to 32 #{n}", uuid.uuid4().hex, fleet.caller_tls)[0] == 201
    for n in range(3):
        assert (
            send(base, 33, 32, f"to 32 from 33 #{n}", uuid.uuid4().hex, fleet.caller_tls)[0] == 201
        )
    for n in range(2):
        assert send(base, 32, 31, f"to 31 #{n}", uuid.uuid4().hex, fleet.caller_tls)[0] == 201
    # 32 reads the dialog with 33: that counter clears.
    status, _, body = http_json(
        "GET",
        f"{base}/v1/dialogs/33/messages",
        headers={"X-Snet-User-Id": "32"},
        tls=fleet.caller_tls,
    )
    assert status == 200 and len(body["messages"]) == 3

    def unread(user: int) -> dict[int, int]:
        status, _, body = http_json(
            "GET", f"{base}/v1/unread", headers={"X-Snet-User-Id": str(user)}, tls=fleet.caller_tls
        )
        assert status == 200, body
        return {d["peer_id"]: d["count"] for d in body["dialogs"]}

    assert unread(32) == {31: 5}
    assert unread(31) == {32: 2}
    # Lose every counter, as if Redis had been emptied, then rebuild from MySQL.
    redis_server.flushall()
    assert unread(32) == {}
    status, _, body = http_json(
        "POST", f"{base}/v1/unread/rebuild", {}, {"X-Snet-User-Id": "1"}, tls=fleet.caller_tls
    )
    assert status == 200, body
    assert unread(32) == {31: 5}
    assert unread(31) == {32: 2}
    assert unread(33) == {}


def test_bad_input_gets_400_and_leaves_the_tables_unchanged(fleet: ChatFleet) -> None:
    base = fleet.url(0)

    def snapshot() -> tuple[Any, ...]:
        return (
            query(fleet.mysql_url, "SELECT COUNT(*), COALESCE(MAX(id), 0) FROM chat_messages")[0],
            query(fleet.mysql_url, "SELECT COUNT(*) FROM chat_reads")[0],
        )

    before = snapshot()
    headers = {"X-Snet-User-Id": "41", "Idempotency-Key": "bad-input"}
    cases: list[tuple[str, str, object, dict[str, str]]] = [
        ("POST", "/v1/dialogs/42/messages", {"text": ""}, headers),
        ("POST", "/v1/dialogs/42/messages", {"text": "   "}, headers),
        ("POST", "/v1/dialogs/42/messages", {"text": 5}, headers),
        ("POST", "/v1/dialogs/42/messages", {}, headers),
        ("POST", "/v1/dialogs/42/messages", ["text"], headers),
        ("POST", "/v1/dialogs/42/messages", {"text": "x" * 4097}, headers),
        ("POST", "/v1/dialogs/abc/messages", {"text": "hi"}, headers),
        ("POST", "/v1/dialogs/-1/messages", {"text": "hi"}, headers),
        ("POST", "/v1/dialogs/41/messages", {"text": "to myself"}, headers),
        ("POST", "/v1/dialogs/42/messages", {"text": "hi"}, {"X-Snet-User-Id": "x1"}),
        ("POST", "/v1/dialogs/42/messages", {"text": "hi"}, {"X-Snet-User-Id": "41"}),
        ("GET", "/v1/dialogs/42/messages?limit=0", None, headers),
        ("GET", "/v1/dialogs/42/messages?after_id=x", None, headers),
    ]
    for method, path, body, extra in cases:
        status, _, answer = http_json(method, base + path, body, extra, tls=fleet.caller_tls)
        assert status == 400, (path, body, answer)
        assert isinstance(answer, dict) and answer.get("message"), (path, body, answer)
    # Malformed JSON, sent raw.
    import urllib.request

    request = urllib.request.Request(
        f"{base}/v1/dialogs/42/messages", data=b"{not json", method="POST",
        headers={**headers, "Content-Type": "application/json"},
    )  # fmt: skip
    with pytest.raises(urllib.error.HTTPError) as error:
        opener(fleet.caller_tls).open(request, timeout=5)
    assert error.value.code == 400
    assert snapshot() == before
