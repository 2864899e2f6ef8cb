"""A steady stream of dialog traffic through the monolith's public API, and what it tells.

Fault tests and ``bench/faults.py`` share it: :class:`DialogTraffic` runs K client threads,
each on one keep-alive ``http.client`` connection to the monolith (127.0.0.1 only), making
mostly sends (every text unique, so that MySQL can be asked about each one) and some lists,
bounded in count and in time, until stopped. Every request is recorded as an
:class:`Outcome`. Beside it:

- :func:`compare_with_mysql` compares what the clients were told with what MySQL holds
  (duplicated and lost messages);
- :func:`served_requests` reads a chat instance's own ``/metrics``: how many dialog requests it
  served, the same whether the monolith balances by itself or sends through a proxy;
- :func:`measure_pickup` starts one more chat instance and measures the time from its check
  passing in Consul to its first served request.

Blocking code with threads and sleeps: for integration tests and benchmarks, never for the
reactor thread.
"""

from __future__ import annotations

import http.client
import json
import threading
import time
import uuid
from collections.abc import Iterable, Mapping, Sequence
from types import TracebackType
from typing import Any
from urllib.parse import urlsplit

from attrs import define, field, frozen
from prometheus_client.parser import text_string_to_metric_families

from snet.testing.fleet import ChatFleet, query
from snet.testing.processes import http_get, http_json
from snet.testing.servers import free_port
from snet.testing.waiting import timed, wait_until

__all__ = [
    "LIST_ROUTE",
    "SEND_ROUTE",
    "ApiUser",
    "DialogTraffic",
    "DialogUsers",
    "Outcome",
    "Pickup",
    "admin_urls",
    "api_requests",
    "compare_with_mysql",
    "measure_pickup",
    "metric_value",
    "read_served",
    "register_user",
    "served_requests",
    "served_sends",
    "spread",
    "stored_texts",
    "wait_for_instances",
]

SEND_ROUTE = "/v1/dialogs/<peer_id>/messages"
"""The chat service's route template for sends (POST) and lists (GET), as /metrics names it."""
LIST_ROUTE = SEND_ROUTE
INSTANCE_HEADER = "X-Snet-Chat-Instance"


@frozen
class ApiUser:
    """A registered, logged-in user of the public API."""

    id: str
    token: str

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"}


def register_user(base_url: str, name: str) -> ApiUser:
    """Register a user through the monolith at *base_url* and log in."""
    password = uuid.uuid4().hex
    status, _, body = http_json(
        "POST",
        f"{base_url}/user/register",
        {"first_name": name, "second_name": "Traffic", "birthdate": "1990-01-01",
         "city": "Loop", "biography": "", "password": password},
    )  # fmt: skip
    if status != 200:
        raise RuntimeError(f"register {name}: {status} {body}")
    user_id = str(body["user_id"])
    status, _, body = http_json("POST", f"{base_url}/login", {"id": user_id, "password": password})
    if status != 200:
        raise RuntimeError(f"login {name}: {status} {body}")
    return ApiUser(user_id, str(body["token"]))


@frozen
class DialogUsers:
    """The three users a :class:`DialogTraffic` needs, registered through one monolith."""

    sender: ApiUser
    recipient: ApiUser
    lister: ApiUser

    @classmethod
    def register(cls, base_url: str) -> DialogUsers:
        return cls(*(register_user(base_url, name) for name in ("Sender", "Recipient", "Lister")))

    def traffic(self, base_url: str, **settings: Any) -> DialogTraffic:
        """Traffic between them through *base_url*; *settings* as DialogTraffic takes them."""
        return DialogTraffic(
            base_url, sender=self.sender, recipient=self.recipient, lister=self.lister, **settings
        )


@frozen
class Outcome:
    """One request of the stream, as its client saw it.

    *status* is 0 when no HTTP answer came (connection refused or lost, client timeout).
    Times are ``time.monotonic()``.
    """

    kind: str
    """``send`` or ``list``."""
    started: float
    ended: float
    status: int
    instance: str | None
    """``X-Snet-Chat-Instance`` of the answer: the instance that served (or the proxy)."""
    text: str | None
    """The text sent (sends only)."""
    retry_after: str | None = None
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.status == 200

    @property
    def seconds(self) -> float:
        return self.ended - self.started


@define
class DialogTraffic:
    """K client threads making dialog calls through the monolith at *base_url*.

    *sender* sends to *recipient*; one call in *list_every* is a list of the dialog between
    *lister* and *recipient* (a short one, so that lists stay cheap however many sends
    there were). Each client stops after *max_requests* calls, every client once
    *max_seconds* have passed since ``start()``, or all at ``stop()``. Texts are
    ``"{label}-{client}-{n}"``: unique in the run, so MySQL can be asked about each one.
    """

    base_url: str
    sender: ApiUser
    recipient: ApiUser
    lister: ApiUser
    clients: int = 4
    list_every: int = 5
    max_requests: int = 100_000
    max_seconds: float = 120.0
    timeout: float = 30.0
    """Client-side timeout of one call, in seconds (the monolith's deadline is shorter)."""
    label: str = field(factory=lambda: uuid.uuid4().hex[:10])
    started_at: float | None = field(default=None, init=False)
    _outcomes: list[Outcome] = field(factory=list, init=False)
    _lock: threading.Lock = field(factory=threading.Lock, init=False)
    _stop: threading.Event = field(factory=threading.Event, init=False)
    _threads: list[threading.Thread] = field(factory=list, init=False)

    def __attrs_post_init__(self) -> None:
        parts = urlsplit(self.base_url)
        if parts.hostname != "127.0.0.1" or parts.port is None:
            raise ValueError(f"{self.base_url}: traffic goes to http://127.0.0.1:PORT only")

    # Running.

    def start(self) -> DialogTraffic:
        self.started_at = time.monotonic()
        for client in range(self.clients):
            thread = threading.Thread(
                target=self._client, args=(client,), name=f"traffic-{client}", daemon=True
            )
            self._threads.append(thread)
            thread.start()
        return self

    def stop(self, timeout: float | None = None) -> None:
        """Tell every client to stop and wait for them (each ends its call in flight)."""
        self._stop.set()
        for thread in self._threads:
            thread.join(self.timeout + 5 if timeout is None else timeout)

    @property
    def running(self) -> bool:
        return any(thread.is_alive() for thread in self._threads)

    def __enter__(self) -> DialogTraffic:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def _client(self, client: int) -> None:
        parts = urlsplit(self.base_url)
        assert parts.hostname is not None and parts.port is not None
        connection = http.client.HTTPConnection(parts.hostname, parts.port, timeout=self.timeout)
        assert self.started_at is not None
        ends = self.started_at + self.max_seconds
        try:
            for n in range(self.max_requests):
                if self._stop.is_set() or time.monotonic() >= ends:
                    break
                if self.list_every > 0 and n % self.list_every == self.list_every - 1:
                    outcome = self._call(connection, "list", None)
                else:
                    outcome = self._call(connection, "send", f"{self.label}-{client}-{n}")
                with self._lock:
                    self._outcomes.append(outcome)
        finally:
            connection.close()

    def _call(self, connection: http.client.HTTPConnection, kind: str, text: str | None) -> Outcome:
        if kind == "send":
            method, path = "POST", f"/dialog/{self.recipient.id}/send"
            body: bytes | None = json.dumps({"text": text}).encode()
            headers = {**self.sender.headers, "Content-Type": "application/json"}
        else:
            method, path = "GET", f"/dialog/{self.recipient.id}/list"
            body, headers = None, self.lister.headers
        started = time.monotonic()
        try:
            connection.request(method, path, body=body, headers=headers)
            response = connection.getresponse()
            response.read()
        except (OSError, http.client.HTTPException) as e:
            connection.close()  # the next request opens a new connection
            return Outcome(kind, started, time.monotonic(), 0, None, text, error=repr(e))
        ended = time.monotonic()
        if response.getheader("Connection", "").lower() == "close":
            connection.close()
        return Outcome(
            kind,
            started,
            ended,
            response.status,
            response.getheader(INSTANCE_HEADER),
            text,
            response.getheader("Retry-After"),
        )

    # Reading what happened.

    def outcomes(self, since: float | None = None, until: float | None = None) -> list[Outcome]:
        """The calls that ended so far, by start time; only those that started in
        [*since*, *until*) if given."""
        with self._lock:
            found = list(self._outcomes)
        found.sort(key=lambda o: o.started)
        return [
            o
            for o in found
            if (since is None or o.started >= since) and (until is None or o.started < until)
        ]

    def count(self, since: float | None = None) -> int:
        return len(self.outcomes(since))

    def wait_for(self, count: int, *, since: float | None = None, timeout: float = 30.0) -> None:
        """Wait until *count* calls (started after *since*) have ended."""

        def ended() -> bool:
            if self.count(since) >= count:
                return True
            if not self.running:
                raise RuntimeError(f"the clients stopped after {self.count(since)} calls")
            return False

        try:
            wait_until(ended, timeout, f"{count} calls", interval=0.02)
        except TimeoutError:
            message = f"only {self.count(since)} of {count} calls within {timeout}s"
            raise TimeoutError(message) from None

    def failures(self, since: float | None = None, until: float | None = None) -> list[Outcome]:
        """The calls not answered 200, with their times."""
        return [o for o in self.outcomes() if not o.ok and _ended_within(o, since, until)]

    def acknowledged_texts(self) -> list[str]:
        """The texts of the sends answered 200: each one must be in MySQL, once."""
        return [o.text for o in self.outcomes() if o.kind == "send" and o.ok and o.text]

    def time_to_recover(self, fault_time: float) -> float:
        """Seconds from *fault_time* to the end of the last failed call after it (0 if none)."""
        failed = self.failures(since=fault_time)
        return max(0.0, max(o.ended for o in failed) - fault_time) if failed else 0.0

    def throughput(self) -> float:
        """Calls answered 200 per second, from the first start to the last end."""
        done = self.outcomes()
        if not done:
            return 0.0
        seconds = max(o.ended for o in done) - min(o.started for o in done)
        return sum(1 for o in done if o.ok) / seconds if seconds > 0 else 0.0

    def slowest(self) -> float:
        """The longest call, in seconds."""
        return max((o.seconds for o in self.outcomes()), default=0.0)


def _ended_within(outcome: Outcome, since: float | None, until: float | None) -> bool:
    return (since is None or outcome.ended >= since) and (until is None or outcome.ended < until)


def stored_texts(chat_mysql_url: str, sender_id: str | int) -> dict[str, int]:
    """How many times each text of *sender_id* is stored in the chat service's MySQL."""
    rows = query(
        chat_mysql_url,
        "SELECT text, COUNT(*) FROM chat_messages WHERE sender_id = %s GROUP BY text",
        int(sender_id),
    )
    return {str(text): int(count) for text, count in rows}


def compare_with_mysql(
    chat_mysql_url: str, sender_id: str | int, acknowledged_texts: Iterable[str]
) -> tuple[list[str], list[str]]:
    """(duplicated, lost): texts of *sender_id* stored more than once, and acknowledged texts
    that MySQL does not hold."""
    stored = stored_texts(chat_mysql_url, sender_id)
    duplicated = sorted(text for text, count in stored.items() if count > 1)
    lost = sorted(text for text in set(acknowledged_texts) if text not in stored)
    return duplicated, lost


# --- what each chat instance served, from its own /metrics -----------------------------------


def metric_value(url: str, name: str, timeout: float = 2.0, **labels: str) -> float | None:
    """The sum of the samples *name* whose labels include *labels*, from ``{url}/metrics``
    (a monolith's or a chat instance's); 0 if there is none, None if no answer."""
    try:
        status, body = http_get(f"{url}/metrics", timeout=timeout)
    except OSError:
        return None
    if status != 200:
        return None
    total = 0.0
    for family in text_string_to_metric_families(body.decode("utf-8", "replace")):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                total += float(sample.value)
    return total


def wait_for_instances(admin_url: str, count: int, timeout: float = 10.0) -> None:
    """Wait until the monolith whose admin listener is *admin_url* lists *count* healthy chat
    instances."""
    wait_until(
        lambda: metric_value(admin_url, "snet_chat_instances_healthy") == count,
        timeout,
        f"the monolith to list {count} chat instances",
        interval=0.05,
    )


def _request_counts(chat_url: str, timeout: float) -> list[tuple[str, str, str, float]] | None:
    """(method, route, status, count) of ``snet_http_requests_total``, and a ("BATCHED",
    send route, status, count) for each status of the sends answered in batch calls
    (``snet_chat_batched_send_results_total``); None if no answer."""
    try:
        status, body = http_get(f"{chat_url}/metrics", timeout=timeout)
    except OSError:
        return None
    if status != 200:
        return None
    counts = []
    for family in text_string_to_metric_families(body.decode("utf-8", "replace")):
        for sample in family.samples:
            labels: Mapping[str, str] = sample.labels
            if sample.name == "snet_http_requests_total":
                counts.append(
                    (labels["method"], labels["route"], labels["status"], float(sample.value))
                )
            elif sample.name == "snet_chat_batched_send_results_total":
                counts.append(("BATCHED", SEND_ROUTE, labels["status"], float(sample.value)))
    return counts


_STORED = {("POST", SEND_ROUTE, "201"), ("BATCHED", SEND_ROUTE, "201")}


def served_sends(chat_url: str, timeout: float = 2.0) -> int | None:
    """Sends the chat instance at *chat_url* stored (answered 201 on the send route or in a
    batch call), from its ``/metrics``; None if it does not answer."""
    counts = _request_counts(chat_url, timeout)
    if counts is None:
        return None
    return int(sum(n for m, r, s, n in counts if (m, r, s) in _STORED))


def served_requests(chat_url: str, timeout: float = 2.0) -> int | None:
    """Dialog calls the chat instance at *chat_url* served: sends answered 201 (alone or in
    batch calls) and lists answered 200, from its ``/metrics``; None if it does not answer."""
    counts = _request_counts(chat_url, timeout)
    if counts is None:
        return None
    served = {*_STORED, ("GET", LIST_ROUTE, "200")}
    return int(sum(n for m, r, s, n in counts if (m, r, s) in served))


def api_requests(chat_url: str, timeout: float = 2.0) -> int | None:
    """Requests of any ``/v1`` route that reached the chat instance's HTTP layer, whatever
    their answer (401 and 403 included), from its ``/metrics``; None if it does not answer."""
    counts = _request_counts(chat_url, timeout)
    if counts is None:
        return None
    return int(sum(n for m, route, _, n in counts if route.startswith("/v1") and m != "BATCHED"))


def spread(counts: Mapping[str, int], among: Iterable[str] | None = None) -> int:
    """max - min of *counts* (over the keys *among*, if given)."""
    keys = list(counts) if among is None else [k for k in among if k in counts]
    values = [counts[k] for k in keys]
    return max(values) - min(values) if values else 0


@frozen
class Pickup:
    """How a new chat instance was taken into use (``time.monotonic()`` times)."""

    instance_id: str
    url: str
    started: float
    """When its process was started."""
    passing: float
    """When Consul's health API first listed it as passing."""
    first_served: float
    """When its ``/metrics`` first showed a served dialog call."""

    @property
    def seconds_to_first_request(self) -> float:
        """From passing in Consul to its first served request."""
        return self.first_served - self.passing


def measure_pickup(fleet: ChatFleet, *, timeout: float = 30.0, interval: float = 0.005) -> Pickup:
    """Start one more instance of *fleet* while traffic flows, and time its pick-up.

    Polls Consul's health API (``passing=true``) and then the instance's ``/metrics`` every
    *interval* seconds.
    """
    port = free_port()
    process = fleet.add_instance_at(port)
    instance_id = fleet.instance_id(len(fleet.instances) - 1)
    url = fleet.admin_url(len(fleet.instances) - 1)
    started = time.monotonic()
    process.start(ready_timeout=None)

    def passing() -> bool:
        if not process.running():
            raise RuntimeError(f"{process} exited:\n{process.log_tail()}")
        return instance_id in fleet.passing_ids()

    passing_at = wait_until(
        timed(passing), timeout, f"{instance_id} passing in Consul", interval=interval
    )
    first = wait_until(
        timed(lambda: (served_requests(url, timeout=1.0) or 0) > 0),
        timeout,
        f"{instance_id} to serve a request",
        interval=interval,
    )
    return Pickup(instance_id, url, started, passing_at, first)


def admin_urls(fleet: ChatFleet) -> dict[str, str]:
    """Instance id -> admin listener URL (its ``/metrics``), for every instance started."""
    return {fleet.instance_id(i): fleet.admin_url(i) for i in range(len(fleet.instances))}


def read_served(urls: Mapping[str, str], ids: Sequence[str] | None = None) -> dict[str, int]:
    """Sends served so far by each instance (those that answer), by instance id."""
    found = {}
    for instance_id in ids if ids is not None else list(urls):
        count = served_sends(urls[instance_id], timeout=1.0)
        if count is not None:
            found[instance_id] = count
    return found
