"""The monolith as a real ``twistd -n snet-server`` process in front of three real chat
instances, all discovered through a real Consul agent, with real MariaDB and Redis: users,
friends, posts and feeds end to end, and dialogs spread evenly over every passing instance,
through a SIGTERM of one instance and the start of a fourth."""

from __future__ import annotations

import signal
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from typing import Any

import pytest

from snet.testing.fleet import ChatFleet, monolith, query
from snet.testing.processes import TwistdProcess, http_get, http_json
from snet.testing.servers import ConsulAgent, MariaDB, Redis
from snet.testing.waiting import timed, wait_until

pytestmark = pytest.mark.integration

INSTANCE = "X-Snet-Chat-Instance"


class Client:
    """A user of the public API: registers, logs in and calls with its bearer token."""

    def __init__(self, base: str, first_name: str, second_name: str) -> None:
        self.base = base
        password = uuid.uuid4().hex
        status, _, body = http_json(
            "POST",
            f"{base}/user/register",
            {
                "first_name": first_name,
                "second_name": second_name,
                "birthdate": "1990-04-01",
                "biography": "reads, writes",
                "city": "Moscow",
                "password": password,
            },
        )
        assert status == 200, body
        self.id: str = body["user_id"]
        status, _, body = http_json("POST", f"{base}/login", {"id": self.id, "password": password})
        assert status == 200, body
        self.token: str = body["token"]

    def call(self, method: str, path: str, body: object | None = None) -> tuple[int, Any, Any]:
        headers = {"Authorization": f"Bearer {self.token}"}
        status, got, answer = http_json(method, self.base + path, body, headers, timeout=10)
        return status, got, answer

    def send(self, peer: Client, text: str) -> tuple[int, str | None]:
        status, headers, _ = self.call("POST", f"/dialog/{peer.id}/send", {"text": text})
        return status, headers.get(INSTANCE)


@pytest.fixture(scope="module")
def databases(mariadb: MariaDB) -> tuple[str, str]:
    return mariadb.create_database("monolith_server"), mariadb.create_database("monolith_chat")


@pytest.fixture
def fleet(
    consul_agent: ConsulAgent, databases: tuple[str, str], redis_server: Redis
) -> Iterator[ChatFleet]:
    fleet = ChatFleet(
        consul_url=consul_agent.url,
        mysql_url=databases[1],
        redis_url=redis_server.url.replace("/0", "/1"),
    )
    try:
        fleet.wait_all_passing()
        yield fleet
    finally:
        fleet.stop()


@pytest.fixture
def server(
    consul_agent: ConsulAgent, databases: tuple[str, str], redis_server: Redis, fleet: ChatFleet
) -> Iterator[TwistdProcess]:
    process = monolith(
        consul_url=consul_agent.url,
        mysql_url=databases[0],
        redis_url=redis_server.url.replace("/0", "/2"),
        chat_service=fleet.service,
    )
    with process:
        yield process


def base_url(process: TwistdProcess) -> str:
    assert process.health_url is not None
    return process.health_url.removesuffix("/health")


def test_two_users_befriend_post_read_feeds_and_exchange_300_messages_spread_evenly(
    server: TwistdProcess, fleet: ChatFleet
) -> None:
    base = base_url(server)
    alice, bob = Client(base, "Alice", "Liddell"), Client(base, "Bob", "Marley")

    assert alice.call("PUT", f"/friend/set/{bob.id}")[0] == 200
    assert bob.call("PUT", f"/friend/set/{alice.id}")[0] == 200
    status, _, post_id = bob.call("POST", "/post/create", {"text": "one love"})
    assert status == 200, post_id
    status, _, feed = alice.call("GET", "/post/feed?offset=0&limit=10")
    assert status == 200, feed
    assert [(p["id"], p["text"], p["author_user_id"]) for p in feed] == [
        (post_id, "one love", bob.id)
    ]
    assert bob.call("GET", "/post/feed")[2] == []

    served: Counter[str] = Counter()
    texts = []
    for n in range(300):
        sender, recipient = (alice, bob) if n % 2 == 0 else (bob, alice)
        text = f"message {n} from {sender.id}"
        status, instance = sender.send(recipient, text)
        assert status == 200
        assert instance is not None
        served[instance] += 1
        texts.append((sender.id, recipient.id, text))

    assert set(served) == fleet.ids()
    assert max(served.values()) - min(served.values()) <= 1, served
    assert all(99 <= count <= 101 for count in served.values()), served

    status, headers, dialog = alice.call("GET", f"/dialog/{bob.id}/list")
    assert status == 200, dialog
    assert headers.get(INSTANCE) in fleet.ids()
    assert [(m["from"], m["to"], m["text"]) for m in dialog] == texts

    status, _, unread = bob.call("GET", "/dialog/unread")
    assert status == 200, unread


def test_sends_that_come_together_go_in_batch_calls_each_stored_once_and_answered(
    server: TwistdProcess, fleet: ChatFleet
) -> None:
    """Sixteen clients at once: the sends to an instance that come while a call to it is out
    go in batch calls (over Connect, as every call here), and each is answered with its own
    message and stored once."""
    base = base_url(server)
    alice, bob = Client(base, "Ada", "Batch"), Client(base, "Bea", "Batch")
    answers: list[tuple[str, int, Any]] = []

    def sender(client: int) -> None:
        for n in range(20):
            text = f"batched {client}-{n}"
            status, headers, _body = alice.call("POST", f"/dialog/{bob.id}/send", {"text": text})
            answers.append((text, status, headers.get(INSTANCE)))

    threads = [threading.Thread(target=sender, args=(c,)) for c in range(16)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)

    assert len(answers) == 320
    assert [a for a in answers if a[1] != 200 or a[2] not in fleet.ids()] == []
    stored = query(
        fleet.mysql_url,
        "SELECT text, COUNT(*) FROM chat_messages WHERE sender_id = %s GROUP BY text",
        int(alice.id),
    )
    assert dict(stored) == {text: 1 for text, _, _ in answers}
    assert server.admin_url is not None
    status, metrics = http_get(f"{server.admin_url}/metrics")
    assert status == 200
    values = {
        line.split()[0]: float(line.split()[1])
        for line in metrics.decode().splitlines()
        if line.startswith("snet_chat_send") and not line.startswith("#")
    }
    assert values["snet_chat_send_batch_calls_total"] >= 1, values
    assert (
        values["snet_chat_sends_in_batch_calls_total"]
        >= 2 * values["snet_chat_send_batch_calls_total"]
    )


def test_sigterm_of_one_instance_during_a_stream_of_sends_fails_no_request(
    server: TwistdProcess, fleet: ChatFleet
) -> None:
    base = base_url(server)
    alice, bob = Client(base, "Ann", "Stream"), Client(base, "Ben", "Stream")
    victim = fleet.instance_id(0)
    results: list[tuple[float, int, str | None]] = []
    stop = threading.Event()

    def stream(client: int) -> None:
        n = 0
        while not stop.is_set() and n < 5000:
            status, instance = alice.send(bob, f"stream {client}-{n}")
            results.append((time.monotonic(), status, instance))
            n += 1

    threads = [threading.Thread(target=stream, args=(c,)) for c in range(3)]
    for thread in threads:
        thread.start()
    wait_until(lambda: len(results) >= 150, 30, "a steady stream of sends")
    fleet.instances[0].signal(signal.SIGTERM)
    assert fleet.instances[0].wait(20) in (0, -signal.SIGTERM)
    stopped_at = time.monotonic()
    wait_until(lambda: sum(1 for r in results if r[0] > stopped_at) >= 150, 30, "more sends")
    stop.set()
    for thread in threads:
        thread.join(30)

    failed = [r for r in results if r[1] != 200]
    assert failed == []
    after = Counter(instance for at, _, instance in results if at > stopped_at)
    assert victim not in after
    assert set(after) == fleet.ids() - {victim}
    counts = sorted(after.values())
    # Three clients at once: each pick alternates, so the two differ by at most one per
    # client in flight when the counting window opens and closes.
    assert counts[1] - counts[0] <= 3, after
    stored = query(
        fleet.mysql_url,
        "SELECT COUNT(*) FROM chat_messages WHERE sender_id = %s",
        int(alice.id),
    )[0][0]
    assert stored == len(results)


def test_a_new_instance_receives_traffic_within_a_second_of_passing_its_check(
    server: TwistdProcess, fleet: ChatFleet
) -> None:
    base = base_url(server)
    alice, bob = Client(base, "Ada", "New"), Client(base, "Bo", "New")
    first_served: dict[str, float] = {}
    stop = threading.Event()
    failures: list[int] = []

    def stream() -> None:
        while not stop.is_set():
            status, instance = alice.send(bob, "hello")
            if status != 200:
                failures.append(status)
            elif instance is not None:
                first_served.setdefault(instance, time.monotonic())

    thread = threading.Thread(target=stream)
    thread.start()
    try:
        fleet.add_instance()
        new_id = fleet.instance_id(3)
        passing_at = wait_until(
            timed(lambda: new_id in fleet.passing_ids()),
            15,
            "the new instance passing",
            interval=0.005,
        )
        wait_until(lambda: new_id in first_served, 5, "the new instance served")
    finally:
        stop.set()
        thread.join(30)
    assert failures == []
    delay = first_served[new_id] - passing_at
    assert delay < 1.0, f"first request {delay:.3f}s after passing"


def test_with_no_chat_instance_dialog_calls_answer_503_with_retry_after(
    consul_agent: ConsulAgent, databases: tuple[str, str], redis_server: Redis
) -> None:
    process = monolith(
        consul_url=consul_agent.url,
        mysql_url=databases[0],
        redis_url=redis_server.url.replace("/0", "/2"),
        chat_service=f"nobody-{uuid.uuid4().hex[:6]}",
    )
    with process:
        base = base_url(process)
        alice, bob = Client(base, "Al", "Alone"), Client(base, "Bea", "Alone")
        status, headers, body = alice.call("POST", f"/dialog/{bob.id}/send", {"text": "hi"})
        assert status == 503, body
        assert int(headers["Retry-After"]) >= 1
        assert body["message"] and body["request_id"] and isinstance(body["code"], int)
