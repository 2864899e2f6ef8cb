"""Traffic and checks for tests/e2e/compose.sh, with the standard library only.

It talks to the monolith on 127.0.0.1:8080 and to Consul's HTTP API on 127.0.0.1:8500
(SNET_HTTP_PORT and SNET_CONSUL_PORT change the ports) and to nothing else
(``stop-during-stream`` also runs ``docker stop`` on the container it is given). Each
command prints what it did and exits non-zero when a check fails:

    traffic.py users --state S               register and log in users, write them to S
    traffic.py wait --instances N [--absent ADDR]
                                              until Consul lists N passing chat instances
                                              (none at ADDR) and the monolith uses N
    traffic.py even --state S --sends K --instances N [--must-include ADDR]
                                              K sequential sends: N instances, counts within 1
    traffic.py stop-during-stream --state S --container NAME --address ADDR --instances N
                                              a steady stream of sends while NAME stops: no
                                              failed request, ADDR gone from Consul, the N
                                              others share the traffic
    traffic.py verify --state S               every acknowledged send is in its dialog
    traffic.py consul-acl --instances N       Consul refuses anonymous reads and writes, and
                                              each role's token only what its role needs
    traffic.py rogue-dialogs --state S --addresses A,B,...
                                              (run inside a throwaway container on the compose
                                              network) no chat instance gives it dialog data

Instances are told apart by the monolith's ``X-Snet-Chat-Instance`` header (a Consul service
id, or HOST:PORT); Consul's catalogue says at which address each one runs. Consul runs with
ACLs (default deny): Consul calls send the token in CONSUL_HTTP_TOKEN (the operator's);
``consul-acl`` also takes SNET_E2E_CHAT_TOKEN and SNET_E2E_SERVER_TOKEN, the services' tokens.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import ssl
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

SERVER = f"http://127.0.0.1:{os.environ.get('SNET_HTTP_PORT') or 8080}"
ADMIN = f"http://127.0.0.1:{os.environ.get('SNET_ADMIN_PORT') or 8081}"
"""The monolith's admin listener: its /metrics."""
CONSUL = f"http://127.0.0.1:{os.environ.get('SNET_CONSUL_PORT') or 8500}"
SERVICE = "snet-chat"
TIMEOUT = 10.0
INSTANCE_HEADER = "X-Snet-Chat-Instance"


class CheckFailed(Exception):
    """A check of the end-to-end test failed; the message says which and why."""


def say(message: str) -> None:
    print(f"traffic: {message}", flush=True)


def call(
    method: str,
    url: str,
    body: Any = None,
    headers: dict[str, str] | None = None,
    timeout: float = TIMEOUT,
) -> tuple[int, dict[str, str], Any]:
    """One HTTP call: (status, headers, decoded JSON body or text). Raises OSError."""
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, method=method, headers=dict(headers or {}))
    if data is not None:
        request.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            status, answer_headers, raw = response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as e:
        status, answer_headers, raw = e.code, dict(e.headers), e.read()
    try:
        return status, answer_headers, json.loads(raw) if raw else None
    except ValueError:
        return status, answer_headers, raw.decode("utf-8", "replace")


# Consul and the monolith's view


def consul_headers(token: str | None) -> dict[str, str]:
    return {"X-Consul-Token": token} if token else {}


def consul_instances(passing: bool, token: str | None = None) -> dict[str, str]:
    """Consul's chat instances as *token* (default: CONSUL_HTTP_TOKEN) sees them:
    service id -> HOST:PORT."""
    query = "?passing=true" if passing else ""
    if token is None:
        token = os.environ.get("CONSUL_HTTP_TOKEN", "")
    status, _, entries = call(
        "GET", f"{CONSUL}/v1/health/service/{SERVICE}{query}", headers=consul_headers(token)
    )
    if status != 200:
        raise OSError(f"Consul answered {status}")
    return {
        e["Service"]["ID"]: f"{e['Service']['Address']}:{e['Service']['Port']}" for e in entries
    }


def monolith_instances() -> int | None:
    """The number of chat instances the monolith balances over, from its /metrics."""
    status, _, text = call("GET", f"{ADMIN}/metrics")
    if status != 200 or not isinstance(text, str):
        return None
    for line in text.splitlines():
        if line.startswith("snet_chat_instances_healthy "):
            return int(float(line.split()[1]))
    return None


def wait_for(instances: int, absent: str | None, timeout: float) -> dict[str, str]:
    """Wait until Consul passes exactly *instances* chat instances, none at *absent*, and
    the monolith uses that many; return Consul's list."""
    deadline = time.monotonic() + timeout
    seen: Any = None
    while time.monotonic() < deadline:
        try:
            passing = consul_instances(passing=True)
            everything = consul_instances(passing=False)
            used = monolith_instances()
            seen = (sorted(passing.values()), used)
            gone = absent is None or all(
                not a.startswith(f"{absent}:") for a in everything.values()
            )
            if len(passing) == instances and used == instances and gone:
                return passing
        except OSError as e:
            seen = repr(e)
        time.sleep(0.2)
    raise CheckFailed(
        f"after {timeout:.0f} s, wanted {instances} passing instances"
        + (f" and none at {absent}" if absent else "")
        + f"; last seen (Consul passing, monolith's count): {seen}"
    )


# Users and sends


def load_state(path: str) -> dict[str, Any]:
    with open(path) as f:
        state: dict[str, Any] = json.load(f)
    return state


def save_state(path: str, state: dict[str, Any]) -> None:
    with open(path, "w") as f:
        json.dump(state, f, indent=1)


def call_when_ready(
    method: str, url: str, body: Any = None, patience: float = 60.0
) -> tuple[int, dict[str, str], Any]:
    """:func:`call`, asked again while the answer is a 503 with Retry-After (a back end still
    starting: Swarm starts services in no order, and the monolith's /health checks only
    MySQL), for at most *patience* seconds. Such a 503 changed nothing, so asking again is
    safe; any other answer is returned as it is."""
    deadline = time.monotonic() + patience
    while True:
        status, headers, answer = call(method, url, body)
        retry_after = headers.get("Retry-After")
        if status != 503 or retry_after is None or time.monotonic() >= deadline:
            return status, headers, answer
        message = answer.get("message") if isinstance(answer, dict) else answer
        say(f"{method} {url}: 503 ({message}); asking again in {retry_after} s")
        try:
            time.sleep(min(max(float(retry_after), 0.1), 2.0))
        except ValueError:  # an HTTP date: not what snet sends, but a valid Retry-After
            time.sleep(1.0)


def make_users(count: int) -> list[dict[str, str]]:
    users = []
    for number in range(count):
        password = uuid.uuid4().hex
        status, _, body = call_when_ready(
            "POST",
            f"{SERVER}/user/register",
            {
                "first_name": f"E2e{number}",
                "second_name": "Compose",
                "birthdate": "1990-01-0" + str(1 + number % 9),
                "city": "Docker",
                "password": password,
            },
        )
        if status != 200:
            raise CheckFailed(f"register: {status} {body}")
        user_id = body["user_id"]
        status, _, body = call_when_ready(
            "POST", f"{SERVER}/login", {"id": user_id, "password": password}
        )
        if status != 200:
            raise CheckFailed(f"login: {status} {body}")
        users.append({"id": user_id, "token": body["token"]})
    return users


@dataclass
class Sender:
    """Sends dialog messages from the first user to the others in turn, counting answers."""

    state: dict[str, Any]
    lock: threading.Lock = field(default_factory=threading.Lock)
    turn: int = 0

    def send(self) -> tuple[bool, str, str]:
        """One send: (acknowledged, instance header or error, detail)."""
        users = self.state["users"]
        with self.lock:
            self.turn += 1
            peer = users[1 + self.turn % (len(users) - 1)]
        key = f"e2e-{uuid.uuid4().hex}"
        try:
            status, headers, body = call(
                "POST",
                f"{SERVER}/dialog/{peer['id']}/send",
                {"text": f"hello {key}"},
                {"Authorization": f"Bearer {users[0]['token']}", "Idempotency-Key": key},
            )
        except OSError as e:
            return False, "", f"{type(e).__name__}: {e}"
        instance = headers.get(INSTANCE_HEADER, "")
        if status != 200:
            return False, instance, f"{status} {body}"
        with self.lock:
            sent = self.state.setdefault("acknowledged", {})
            sent[peer["id"]] = sent.get(peer["id"], 0) + 1
            self.state.setdefault("keys", {}).setdefault(str(peer["id"]), []).append(key)
        return True, instance, ""


def at(address: str, instances: Iterable[str], names: dict[str, str]) -> set[str]:
    """The instances (header values: service ids, or HOST:PORT) that run at *address*."""
    return {i for i in instances if names.get(i, i).startswith(f"{address}:")}


def spread(counts: Iterable[int]) -> int:
    values = list(counts)
    return max(values) - min(values) if values else 0


def show(counts: collections.Counter[str]) -> str:
    return ", ".join(f"{name}: {count}" for name, count in sorted(counts.items()))


def check_even(counts: collections.Counter[str], instances: int, tolerance: int, what: str) -> None:
    say(f"{what}: {sum(counts.values())} sends over {len(counts)} instances: {show(counts)}")
    if len(counts) != instances:
        raise CheckFailed(f"{what}: {len(counts)} instances answered, wanted {instances}")
    if spread(counts.values()) > tolerance:
        raise CheckFailed(f"{what}: uneven share (counts differ by more than {tolerance})")


# Commands


def cmd_users(args: argparse.Namespace) -> None:
    users = make_users(args.count)
    save_state(args.state, {"users": users, "acknowledged": {}})
    say(f"registered and logged in {len(users)} users: {[u['id'] for u in users]}")


def cmd_wait(args: argparse.Namespace) -> None:
    started = time.monotonic()
    passing = wait_for(args.instances, args.absent, args.timeout)
    say(
        f"Consul passes {len(passing)} chat instances ({', '.join(sorted(passing.values()))}), "
        f"the monolith uses {args.instances} (waited {time.monotonic() - started:.1f} s)"
    )


def cmd_even(args: argparse.Namespace) -> None:
    state = load_state(args.state)
    sender = Sender(state)
    counts: collections.Counter[str] = collections.Counter()
    failures = []
    for _ in range(args.sends):
        ok, instance, detail = sender.send()
        if ok:
            counts[instance] += 1
        else:
            failures.append(detail)
    save_state(args.state, state)
    if failures:
        raise CheckFailed(f"{len(failures)} of {args.sends} sends failed: {failures[:5]}")
    check_even(counts, args.instances, 1, f"{args.sends} sequential sends")
    if args.must_include:
        passing = consul_instances(passing=True)
        current = at(args.must_include, passing, passing)
        if not current & set(counts):
            raise CheckFailed(f"the instance at {args.must_include} got no traffic")
        say(f"the instance at {args.must_include} ({', '.join(current)}) got its share")


@dataclass
class Record:
    started: float
    ok: bool
    instance: str
    detail: str


def stream(sender: Sender, stop: threading.Event, records: list[Record]) -> None:
    while not stop.is_set():
        started = time.monotonic()
        ok, instance, detail = sender.send()
        records.append(Record(started, ok, instance, detail))


def cmd_stop_during_stream(args: argparse.Namespace) -> None:
    state = load_state(args.state)
    names = consul_instances(passing=False)
    sender = Sender(state)
    stop = threading.Event()
    records: list[Record] = []
    workers = [
        threading.Thread(target=stream, args=(sender, stop, records), daemon=True)
        for _ in range(args.workers)
    ]
    began = time.monotonic()
    for worker in workers:
        worker.start()
    try:
        time.sleep(args.warmup)
        say(f"{len(records)} sends so far from {args.workers} concurrent senders")
        stop_started = time.monotonic()
        say(f"docker stop {args.container} (at {args.address}) during the stream")
        subprocess.run(["docker", "stop", args.container], check=True, capture_output=True)
        stopped = time.monotonic()
        say(f"{args.container} stopped after {stopped - stop_started:.1f} s")
        wait_for(args.instances, args.address, args.timeout)
        settled = time.monotonic()
        say(f"Consul no longer lists {args.address} ({settled - stop_started:.1f} s after stop)")
        time.sleep(args.after)
    finally:
        stop.set()
        for worker in workers:
            worker.join(TIMEOUT + 5)
    failures = [r for r in records if not r.ok]
    say(
        f"{len(records)} sends in {time.monotonic() - began:.1f} s, "
        f"{sum(1 for r in records if stop_started <= r.started < stopped)} of them "
        f"while {args.container} stopped; {len(failures)} failed"
    )
    victim = at(args.address, names, names)
    before: collections.Counter[str] = collections.Counter(
        r.instance for r in records if r.ok and r.started < stop_started
    )
    after: collections.Counter[str] = collections.Counter(
        r.instance for r in records if r.ok and r.started >= settled
    )
    say(f"before the stop: {show(before)}")
    if failures:
        for r in failures[:10]:
            say(f"failed send: {r.instance or '-'} {r.detail}")
        raise CheckFailed(f"{len(failures)} sends failed while {args.container} stopped")
    save_state(args.state, state)
    if not victim & set(before):
        raise CheckFailed(f"{args.address} got no traffic before it stopped")
    if victim & set(after):
        raise CheckFailed(f"{args.address} still got traffic after Consul dropped it")
    # Concurrent senders may cut a round at each end of the window.
    check_even(after, args.instances, args.workers, "after the stop")


def cmd_verify(args: argparse.Namespace) -> None:
    state = load_state(args.state)
    users = state["users"]
    total = checked = 0
    for peer_id, acknowledged in sorted(state.get("acknowledged", {}).items()):
        status, _, body = call(
            "GET",
            f"{SERVER}/dialog/{peer_id}/list",
            headers={"Authorization": f"Bearer {users[0]['token']}"},
        )
        if status != 200:
            raise CheckFailed(f"dialog list with {peer_id}: {status} {body}")
        if len(body) != acknowledged:
            raise CheckFailed(
                f"dialog with {peer_id}: {len(body)} messages stored, {acknowledged} acknowledged"
            )
        keys = state.get("keys", {}).get(str(peer_id))
        if keys is not None:
            # Each acknowledged send by its key: stored once, none lost, none twice.
            stored = collections.Counter(
                str(m.get("text", "")).removeprefix("hello ") for m in body
            )
            lost = [k for k in keys if stored[k] == 0]
            twice = [k for k, n in stored.items() if n > 1]
            if lost or twice:
                raise CheckFailed(
                    f"dialog with {peer_id}: {len(lost)} acknowledged sends not stored"
                    f" ({lost[:3]}), {len(twice)} stored more than once ({twice[:3]})"
                )
            checked += len(keys)
        total += acknowledged
    say(
        f"all {total} acknowledged messages are stored, in {len(users) - 1} dialogs"
        + (f"; {checked} checked by key: 0 lost, 0 stored twice" if checked else "")
    )


def cmd_consul_acl(args: argparse.Namespace) -> None:
    """Without a token nothing; with a service's token only what its role needs."""
    chat = os.environ["SNET_E2E_CHAT_TOKEN"]
    server = os.environ["SNET_E2E_SERVER_TOKEN"]
    operator = os.environ.get("CONSUL_HTTP_TOKEN", "")
    # Each token is known (after a restart: once Consul's ACL system is back).
    deadline = time.monotonic() + args.timeout
    unknown = ["?"]
    while unknown and time.monotonic() < deadline:
        unknown = [
            name
            for name, token in (("chat", chat), ("monolith", server), ("operator", operator))
            if call("GET", f"{CONSUL}/v1/acl/token/self", headers=consul_headers(token))[0] != 200
        ]
        if unknown:
            time.sleep(0.2)
    if unknown:
        raise CheckFailed(f"Consul does not know these tokens: {unknown}")
    seen = consul_instances(passing=True)
    if len(seen) != args.instances:
        raise CheckFailed(f"the operator's token sees {len(seen)} instances, not {args.instances}")
    anonymous = consul_instances(passing=False, token="")
    if anonymous:
        raise CheckFailed(f"an anonymous request read the chat instances: {anonymous}")
    say(f"instance list: the operator's token sees {len(seen)}, an anonymous request 0")
    if len(consul_instances(passing=True, token=server)) != args.instances:
        raise CheckFailed("the monolith's token does not see the chat instances")

    def register(token: str, name: str) -> int:
        body = {"Name": name, "ID": f"e2e-rogue-{uuid.uuid4().hex[:8]}", "Address": "192.0.2.1"}
        status, _, _ = call(
            "PUT", f"{CONSUL}/v1/agent/service/register", body, consul_headers(token)
        )
        if status == 200:  # a failed check: leave nothing behind
            deregister = f"{CONSUL}/v1/agent/service/deregister/{body['ID']}"
            call("PUT", deregister, headers=consul_headers(os.environ.get("CONSUL_HTTP_TOKEN")))
        return status

    refused = {
        "anonymous as snet-chat": register("", SERVICE),
        "the monolith's token as snet-chat": register(server, SERVICE),
        "the chat token as snet-server": register(chat, "snet-server"),
        "the chat token as another service": register(chat, "e2e-other"),
    }
    allowed = [what for what, status in refused.items() if status != 403]
    if allowed:
        raise CheckFailed(f"registration not refused (403) for: {allowed} ({refused})")
    say(f"registrations refused with 403: {', '.join(refused)}")
    status, _, _ = call("GET", f"{CONSUL}/v1/agent/services", headers=consul_headers(chat))
    if status != 200:
        raise CheckFailed(f"the chat token cannot read its agent's services ({status})")
    status, _, answer = call("GET", f"{CONSUL}/v1/acl/tokens", headers=consul_headers(chat))
    if status != 403:
        raise CheckFailed(f"the chat token listed ACL tokens: {status} {answer}")
    say("the chat token cannot list ACL tokens (403)")


def cmd_rogue_dialogs(args: argparse.Namespace) -> None:
    """From a container on the compose network that is not the monolith, ask every chat
    instance for the first user's dialogs as the chat API's callers do, over plaintext and
    over TLS without a client certificate: no answer may carry dialog data."""
    users = load_state(args.state)["users"]
    user, peer = users[0]["id"], users[1]["id"]
    path = f"/v1/dialogs/{peer}/messages"
    headers = {"X-Snet-User-Id": str(user)}
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    leaks = []
    for address in args.addresses.split(","):
        for scheme in ("http", "https"):
            url = f"{scheme}://{address}{path}"
            request = urllib.request.Request(url, headers=headers)
            try:
                opened = urllib.request.urlopen(
                    request, timeout=3, context=context if scheme == "https" else None
                )
                with opened as response:
                    status, body = response.status, response.read()
            except urllib.error.HTTPError as e:
                status, body = e.code, e.read()
            except (OSError, ssl.SSLError) as e:
                say(f"{url}: no answer ({type(e).__name__})")
                continue
            say(f"{url}: {status}, {len(body)} bytes")
            if status == 200 or b"hello e2e-" in body:
                leaks.append(f"{url} -> {status}")
    if leaks:
        raise CheckFailed(f"dialog data reached a container that is not the monolith: {leaks}")
    say("no chat instance gave dialog data to a container that is not the monolith")


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)

    users = commands.add_parser("users")
    users.add_argument("--state", required=True)
    users.add_argument("--count", type=int, default=4)
    users.set_defaults(run=cmd_users)

    wait = commands.add_parser("wait")
    wait.add_argument("--instances", type=int, required=True)
    wait.add_argument("--absent")
    wait.add_argument("--timeout", type=float, default=60.0)
    wait.set_defaults(run=cmd_wait)

    even = commands.add_parser("even")
    even.add_argument("--state", required=True)
    even.add_argument("--sends", type=int, required=True)
    even.add_argument("--instances", type=int, required=True)
    even.add_argument("--must-include")
    even.set_defaults(run=cmd_even)

    stop = commands.add_parser("stop-during-stream")
    stop.add_argument("--state", required=True)
    stop.add_argument("--container", required=True)
    stop.add_argument("--address", required=True)
    stop.add_argument("--instances", type=int, required=True, help="instances left after it")
    stop.add_argument("--workers", type=int, default=4)
    stop.add_argument("--warmup", type=float, default=3.0)
    stop.add_argument("--after", type=float, default=4.0)
    stop.add_argument("--timeout", type=float, default=60.0)
    stop.set_defaults(run=cmd_stop_during_stream)

    verify = commands.add_parser("verify")
    verify.add_argument("--state", required=True)
    verify.set_defaults(run=cmd_verify)

    acl = commands.add_parser("consul-acl")
    acl.add_argument("--instances", type=int, required=True)
    acl.add_argument("--timeout", type=float, default=30.0)
    acl.set_defaults(run=cmd_consul_acl)

    rogue = commands.add_parser("rogue-dialogs")
    rogue.add_argument("--state", required=True)
    rogue.add_argument("--addresses", required=True, help="HOST:PORT,... of the chat instances")
    rogue.set_defaults(run=cmd_rogue_dialogs)

    args = parser.parse_args(argv)
    try:
        args.run(args)
    except CheckFailed as e:
        say(f"FAILED: {e}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
