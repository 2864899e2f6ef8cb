"""Dialog sends through the monolith, straight to one chat instance, and through HAProxy, with
the CPU each process spends per send.

Starts its own Consul dev agent, MariaDB, Redis, three ``twistd snet-chat`` instances and
``--monoliths`` ``twistd snet-server`` processes (more than one share the public port with
``--reuse-port``) on free 127.0.0.1 ports, then in one run measures, with the same
closed-loop load (N requests from C keep-alive clients):

- A: ``POST /dialog/{id}/send`` through the monolith (bearer auth, discovery, round-robin,
  the sends to an instance that come while a call to it is out sent together in a batch
  call: ``snet.server.sendbatch``);
- S: the same through a second set of monolith processes started with ``--no-batch-sends``
  (every send a call of its own), to see what the batches save in the same run;
- B: ``POST /v1/dialogs/{id}/messages`` straight to one chat instance;
- H: the same chat calls to HAProxy (Debian's package, fed by Consul's DNS as in
  ``bench/faults.py``, ``bench/haproxy-consul.cfg``), which makes the hop to the instances
  in the monolith's place: plaintext only (HAProxy checks and forwards plain HTTP), and only
  where ``haproxy`` is installed.

For each set-up it prints requests per second, latency percentiles, the CPU milliseconds per
request of every process (each monolith, each chat instance, HAProxy, MariaDB, Redis,
Consul, the load generator; user + system from /proc/<pid>/stat, read before and after the
phase), how many sends of A and S went in batch calls, MariaDB statements per request (its
``Questions`` counter) and the machine's CPU steal during the phase. It does so over Consul
Connect (mutual TLS between the monolith and the instances; B with a ``snet-server`` client
certificate) and with ``--insecure-plaintext`` on both ends, unless ``--only`` names one.
Figures only: nothing here passes or fails on a time.

    python bench/dialogs.py --requests 3000 --concurrency 8
    python bench/dialogs.py --only plaintext --monoliths 2
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from cpu import CPUMeter
from load import LoadResult, json_body, run_load

from snet.testing.fleet import ChatFleet, monolith
from snet.testing.processes import TwistdProcess, http_get
from snet.testing.servers import ConsulAgent, MariaDB, Redis, free_port
from snet.testing.traffic import register_user
from snet.testing.waiting import wait_until

MODES = ("connect", "plaintext")


@dataclass
class Phase:
    """One measured set-up: its load result, CPU per request and statements per request."""

    name: str
    load: LoadResult
    cpu_ms: dict[str, float]
    statements: float
    steal: float

    def line(self) -> str:
        r = self.load
        return (
            f"{self.name:<34} {r.rate:>7.0f} req/s   p50 {r.percentile(0.5) * 1000:6.1f} ms   "
            f"p99 {r.percentile(0.99) * 1000:6.1f} ms   failed {r.failures}"
        )


@dataclass
class Measured:
    mode: str
    phases: list[Phase] = field(default_factory=list)
    batches: dict[str, tuple[float, float]] = field(default_factory=dict)
    """Per phase through the monolith: (batch calls, sends in them) made during it."""


BATCH_METRICS = ("snet_chat_send_batch_calls_total", "snet_chat_sends_in_batch_calls_total")


def batch_counts(servers: list[TwistdProcess]) -> tuple[float, float]:
    """The batch calls the monoliths made so far, and the sends in them (their metrics)."""
    totals = [0.0, 0.0]
    for server in servers:
        status, body = http_get(f"{server.admin_url}/metrics", timeout=5)
        if status != 200:
            continue
        for line in body.decode().splitlines():
            name, _, value = line.partition(" ")
            if name in BATCH_METRICS:
                totals[BATCH_METRICS.index(name)] += float(value)
    return totals[0], totals[1]


class MariaDBStatements:
    """MariaDB's ``Questions`` counter (every statement a client sent), minus its own reads."""

    def __init__(self, mariadb: MariaDB) -> None:
        self.connection = mariadb.connect()

    def count(self) -> int:
        with self.connection.cursor() as cursor:
            cursor.execute("SHOW GLOBAL STATUS LIKE 'Questions'")
            row = cursor.fetchone()
        return int(row[1]) if row else 0

    def close(self) -> None:
        self.connection.close()


def haproxy_binary() -> str | None:
    return shutil.which("haproxy") or shutil.which("haproxy", path="/usr/sbin")


def start_monoliths(
    count: int,
    *,
    consul: ConsulAgent,
    mysql_url: str,
    redis: Redis,
    fleet: ChatFleet,
    extra_args: tuple[str, ...] = (),
) -> list[TwistdProcess]:
    """*count* monolith processes on one public port (``--reuse-port`` when more than one),
    each with its own admin port; returns once every one answers its admin ``/health``."""
    port = free_port()
    extra = ("--reuse-port", *extra_args) if count > 1 else extra_args
    servers = [
        monolith(
            consul_url=consul.url,
            mysql_url=mysql_url,
            redis_url=redis.url.replace("/0", "/1"),
            chat_service=fleet.service,
            port=port,
            extra_args=extra,
            plaintext=fleet.plaintext,
        )
        for _ in range(count)
    ]
    for server in servers:
        server.start(ready_timeout=None)
    for server in servers:
        admin = server.admin_url
        wait_until(
            lambda admin=admin: _answers(f"{admin}/health"), 30, f"{server} healthy", interval=0.1
        )
    return servers


def _answers(url: str) -> bool:
    try:
        return http_get(url, timeout=1)[0] == 200
    except OSError:
        return False


def measure(
    consul: ConsulAgent, mariadb: MariaDB, redis: Redis, args: argparse.Namespace, mode: str
) -> Measured:
    """A fresh fleet and monoliths in *mode* (``connect`` or ``plaintext``): A, B (and H)."""
    plaintext = mode == "plaintext"
    print(f"starting the fleet ({mode}) ...", file=sys.stderr)
    fleet = ChatFleet(
        consul_url=consul.url,
        mysql_url=mariadb.create_database(f"bench_chat_{mode}"),
        redis_url=redis.url,
        count=args.instances,
        plaintext=plaintext,
    )
    servers: list[TwistdProcess] = []
    haproxy = None
    statements = MariaDBStatements(mariadb)
    measured = Measured(mode)
    try:
        fleet.wait_all_passing()
        server_db = mariadb.create_database(f"bench_server_{mode}")
        servers = start_monoliths(
            args.monoliths, consul=consul, mysql_url=server_db, redis=redis, fleet=fleet
        )
        # The same, each send in a call of its own (no batch calls), for the S phase.
        one_by_one = start_monoliths(
            args.monoliths,
            consul=consul,
            mysql_url=server_db,
            redis=redis,
            fleet=fleet,
            extra_args=("--no-batch-sends",),
        )
        servers += one_by_one
        base = servers[0].base_url
        sender_user = register_user(base, "Sender")
        sender, token = sender_user.id, sender_user.token
        recipient = register_user(base, "Recipient").id
        run = uuid.uuid4().hex[:8]
        warmup = max(args.concurrency * 20, 200)

        def via_monolith(worker: int, n: int) -> tuple[str, str, bytes, dict[str, str]]:
            return (
                "POST",
                f"/dialog/{recipient}/send",
                json_body({"text": f"bench {worker}-{n}"}),
                {"Authorization": f"Bearer {token}", "Content-Type": "application/json"},
            )

        def direct(worker: int, n: int) -> tuple[str, str, bytes, dict[str, str]]:
            return (
                "POST",
                f"/v1/dialogs/{recipient}/messages",
                json_body({"text": f"bench {worker}-{n}"}),
                {
                    "X-Snet-User-Id": sender,
                    "Idempotency-Key": f"{run}-{worker}-{n}-{uuid.uuid4().hex[:6]}",
                    "Content-Type": "application/json",
                },
            )

        pids: dict[str, int | None] = {
            **{
                f"monolith-{i}" if len(servers) > 2 else "monolith": s.pid
                for i, s in enumerate(servers[: len(servers) - len(one_by_one)])
            },
            **{
                f"monolith-{i} 1by1" if len(one_by_one) > 1 else "monolith 1by1": s.pid
                for i, s in enumerate(one_by_one)
            },
            **{f"chat-{i}": p.pid for i, p in enumerate(fleet.instances)},
            "mariadb": mariadb.pid,
            "redis": redis.pid,
            "consul": consul.pid,
            "load generator": os.getpid(),
        }
        binary = haproxy_binary() if plaintext and not args.no_haproxy else None
        if binary is not None:
            from faults import HAProxy

            haproxy = HAProxy(binary, dns_port=consul.dns_port, service=fleet.service)
            wait_until(lambda: haproxy.servers_up() == args.instances, 20, "HAProxy", interval=0.05)
            pids["haproxy"] = haproxy.process.pid

        chat_base, tls = fleet.url(0), fleet.caller_tls
        load = {"concurrency": args.concurrency}
        setups = [
            ("A  through the monolith", base, via_monolith, None),
            ("S  the same, sends one by one", one_by_one[0].base_url, via_monolith, None),
            ("B  straight to one chat instance", chat_base, direct, tls),
        ]
        if haproxy is not None:
            setups.append(("H  HAProxy -> the chat instances", haproxy.url, direct, None))
        for name, url, make, context in setups:
            run_load(url, make, total=warmup, label=f"warm-up {name[:1]}", tls=context, **load)
        for name, url, make, context in setups:
            time.sleep(0.5)
            questions = statements.count()
            batched = batch_counts(servers)
            meter = CPUMeter(pids)
            result = run_load(
                url, make, total=args.requests, label=f"{mode} {name[:1]}", tls=context, **load
            )
            meter.stop()
            if make is via_monolith:
                calls, sends = batch_counts(servers)
                measured.batches[name[:1]] = (calls - batched[0], sends - batched[1])
            sent = statements.count() - questions - 1  # the count itself is a statement
            measured.phases.append(
                Phase(
                    name,
                    result,
                    meter.per_request(result.requests),
                    sent / result.requests if result.requests else 0.0,
                    meter.steal,
                )
            )
    finally:
        statements.close()
        for server in servers:
            server.stop()
        if haproxy is not None:
            haproxy.stop()
        fleet.stop()
    return measured


def report(result: Measured, args: argparse.Namespace) -> None:
    print(f"-- {result.mode}")
    for phase in result.phases:
        print(phase.line())
    names: list[str] = []
    for phase in result.phases:
        names += [n for n in phase.cpu_ms if n not in names]
    heads = [p.name[:1] for p in result.phases]
    print(f"{'CPU ms per request':<20}" + "".join(f"{h:>9}" for h in heads))
    for name in names:
        print(f"{name:<20}" + "".join(f"{p.cpu_ms.get(name, 0.0):9.2f}" for p in result.phases))
    chats = [n for n in names if n.startswith("chat-")]
    monoliths = [n for n in names if n.startswith("monolith")]
    rows = [("chat instances (sum)", chats)]
    if len(monoliths) > 1:
        rows.append(("monoliths (sum)", monoliths))
    rows.append(("all processes", names))
    for label, members in rows:
        print(
            f"{label:<20}"
            + "".join(f"{sum(p.cpu_ms.get(n, 0.0) for n in members):9.2f}" for p in result.phases)
        )
    print(f"{'statements/request':<20}" + "".join(f"{p.statements:9.2f}" for p in result.phases))
    print(
        f"{'CPU steal (s)':<20}" + "".join(f"{p.steal:9.2f}" for p in result.phases)
    )  # fmt: skip
    for head, (calls, sends) in result.batches.items():
        requests = next(p.load.requests for p in result.phases if p.name[:1] == head)
        mean = f"{sends / calls:.1f} sends each" if calls else "none"
        print(
            f"{head}: {sends:.0f} of {requests} sends went in {calls:.0f} batch calls ({mean});"
            f" chat calls per send {(requests - sends + calls) / requests:.2f}"
        )
    through = result.phases[0].load
    counts = dict(sorted(through.instances.items()))
    spread = max(counts.values()) - min(counts.values()) if counts else 0
    print(f"monolith sends per instance: {json.dumps(counts)}  (max - min = {spread})")


def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--requests", type=int, default=3000)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--instances", type=int, default=3)
    parser.add_argument(
        "--monoliths",
        type=int,
        default=1,
        help="monolith processes sharing the public port (--reuse-port when more than one)",
    )
    parser.add_argument(
        "--only", choices=MODES, help="measure one mode only (default: both, for the TLS cost)"
    )
    parser.add_argument("--no-haproxy", action="store_true", help="skip the HAProxy set-up")
    args = parser.parse_args()

    with ConsulAgent() as consul, MariaDB() as mariadb, Redis() as redis:
        results = [
            measure(consul, mariadb, redis, args, m) for m in MODES if args.only in (None, m)
        ]

    print()
    print(f"dialog sends: {args.requests} requests from {args.concurrency} keep-alive clients, "
          f"{args.instances} chat instances, {args.monoliths} monolith process(es)")  # fmt: skip
    for result in results:
        report(result, args)
    if len(results) == 2:
        connect, plain = results
        print("-- the cost of TLS (Connect / plaintext)")
        for index, name in ((0, "A"), (1, "B")):
            c, p = connect.phases[index].load, plain.phases[index].load
            print(f"{name}  throughput      {c.rate / p.rate if p.rate else 0.0:5.2f}")
            p50 = p.percentile(0.5)
            print(f"{name}  p50 latency     {c.percentile(0.5) / p50 if p50 else 0.0:5.2f}")
    failed = sum(p.load.failures for r in results for p in r.phases)
    return 0 if failed == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
