"""Dialog sends through the monolith against the same sends made straight to one chat instance.

Starts its own Consul dev agent, MariaDB, Redis, three ``twistd snet-chat`` instances and one
``twistd snet-server`` on free 127.0.0.1 ports, then in one run measures, with the same
closed-loop load (N requests from C keep-alive clients):

- A: ``POST /dialog/{id}/send`` through the monolith (bearer auth, discovery, round-robin,
  one forwarded call per send);
- B: ``POST /v1/dialogs/{id}/messages`` straight to one chat instance.

It does so twice, on the same servers: over Consul Connect (the default: mutual TLS between
the monolith and the instances, B with a ``snet-server`` client certificate) and with
``--insecure-plaintext`` on both ends, and prints requests per second, latency percentiles,
the ratio A/B of each, the cost of TLS (Connect over plaintext, for A and for B) and how the
monolith's sends spread over the instances. Figures only: nothing here passes or fails on a
time. ``--only connect`` (or ``plaintext``) measures one of the two.

    python bench/dialogs.py --requests 3000 --concurrency 8
"""

from __future__ import annotations

import argparse
import json
import sys
import uuid
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from load import LoadResult, json_body, run_load

from snet.testing.fleet import ChatFleet, monolith
from snet.testing.servers import ConsulAgent, MariaDB, Redis
from snet.testing.traffic import register_user

MODES = ("connect", "plaintext")


def line(name: str, result: LoadResult) -> str:
    return (
        f"{name:<34} {result.rate:>8.0f} req/s   p50 {result.percentile(0.5) * 1000:6.1f} ms   "
        f"p99 {result.percentile(0.99) * 1000:6.1f} ms   failed {result.failures}"
    )


@dataclass
class Measured:
    mode: str
    through: LoadResult
    straight: LoadResult

    @property
    def ratio(self) -> float:
        return self.through.rate / self.straight.rate if self.straight.rate else 0.0


def measure(
    consul: ConsulAgent, mariadb: MariaDB, redis: Redis, args: argparse.Namespace, mode: str
) -> Measured:
    """A fresh fleet and monolith in *mode* (``connect`` or ``plaintext``), A then B."""
    plaintext = mode == "plaintext"
    print(f"starting the fleet ({mode}) ...", file=sys.stderr)
    fleet = ChatFleet(
        consul_url=consul.url,
        mysql_url=mariadb.create_database(f"bench_chat_{mode}"),
        redis_url=redis.url,
        count=args.instances,
        plaintext=plaintext,
    )
    server = monolith(
        consul_url=consul.url,
        mysql_url=mariadb.create_database(f"bench_server_{mode}"),
        redis_url=redis.url.replace("/0", "/1"),
        chat_service=fleet.service,
        plaintext=plaintext,
    )
    try:
        fleet.wait_all_passing()
        server.start()
        assert server.health_url is not None
        base = server.health_url.removesuffix("/health")
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

        chat_base, tls = fleet.url(0), fleet.caller_tls
        load = {"concurrency": args.concurrency}
        run_load(base, via_monolith, total=warmup, label="warm-up", **load)
        run_load(chat_base, direct, total=warmup, label="warm-up", tls=tls, **load)
        through = run_load(base, via_monolith, total=args.requests, label=f"{mode} A", **load)
        straight = run_load(
            chat_base, direct, total=args.requests, label=f"{mode} B", tls=tls, **load
        )
    finally:
        server.stop()
        fleet.stop()
    return Measured(mode, through, straight)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=3000)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--instances", type=int, default=3)
    parser.add_argument(
        "--only", choices=MODES, help="measure one mode only (default: both, for the TLS cost)"
    )
    args = parser.parse_args()

    with ConsulAgent() as consul, MariaDB() as mariadb, Redis() as redis:
        results = [
            measure(consul, mariadb, redis, args, m) for m in MODES if args.only in (None, m)
        ]

    print()
    print(f"dialog sends: {args.requests} requests from {args.concurrency} keep-alive clients, "
          f"{args.instances} chat instances")  # fmt: skip
    for result in results:
        print(f"-- {result.mode}")
        print(line("A  through the monolith", result.through))
        print(line("B  straight to one chat instance", result.straight))
        print(f"A/B throughput ratio: {result.ratio:.2f}")
        counts = dict(sorted(result.through.instances.items()))
        spread = max(counts.values()) - min(counts.values()) if counts else 0
        print(f"monolith sends per instance: {json.dumps(counts)}  (max - min = {spread})")
    if len(results) == 2:
        connect, plain = results
        print("-- the cost of TLS (Connect / plaintext)")
        for name, c, p in (
            ("A  throughput", connect.through.rate, plain.through.rate),
            ("B  throughput", connect.straight.rate, plain.straight.rate),
            (
                "A  p50 latency",
                connect.through.percentile(0.5),
                plain.through.percentile(0.5),
            ),
            (
                "B  p50 latency",
                connect.straight.percentile(0.5),
                plain.straight.percentile(0.5),
            ),
        ):
            print(f"{name:<16} {c / p if p else 0.0:5.2f}")
    failed = sum(r.through.failures + r.straight.failures for r in results)
    return 0 if failed == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
