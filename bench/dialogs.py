"""Dialog sends through the monolith against the same sends made straight to one chat instance.

Starts its own Consul dev agent, MariaDB, Redis, three ``twistd snet-chat`` instances and one
``twistd snet-server`` on free 127.0.0.1 ports, then in one run measures, with the same
closed-loop load (N requests from C keep-alive clients):

- A: ``POST /dialog/{id}/send`` through the monolith (bearer auth, discovery, round-robin,
  one forwarded call per send);
- B: ``POST /v1/dialogs/{id}/messages`` straight to one chat instance.

It prints requests per second, latency percentiles, the ratio A/B and how the monolith's
sends spread over the instances. Figures only: nothing here passes or fails on a time.

    python bench/dialogs.py --requests 3000 --concurrency 8
"""

from __future__ import annotations

import argparse
import json
import sys
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from load import LoadResult, json_body, run_load

from snet.testing.fleet import ChatFleet, monolith
from snet.testing.servers import ConsulAgent, MariaDB, Redis
from snet.testing.traffic import register_user


def line(name: str, result: LoadResult) -> str:
    return (
        f"{name:<34} {result.rate:>8.0f} req/s   p50 {result.percentile(0.5) * 1000:6.1f} ms   "
        f"p99 {result.percentile(0.99) * 1000:6.1f} ms   failed {result.failures}"
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=3000)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--instances", type=int, default=3)
    args = parser.parse_args()

    with ConsulAgent() as consul, MariaDB() as mariadb, Redis() as redis:
        print("starting the fleet ...", file=sys.stderr)
        fleet = ChatFleet(
            consul_url=consul.url,
            mysql_url=mariadb.create_database("bench_chat"),
            redis_url=redis.url,
            count=args.instances,
        )
        server = monolith(
            consul_url=consul.url,
            mysql_url=mariadb.create_database("bench_server"),
            redis_url=redis.url.replace("/0", "/1"),
            chat_service=fleet.service,
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

            chat_base = fleet.url(0)
            run_load(
                base, via_monolith, total=warmup, concurrency=args.concurrency, label="warm-up"
            )
            run_load(chat_base, direct, total=warmup, concurrency=args.concurrency, label="warm-up")
            through = run_load(
                base, via_monolith, total=args.requests, concurrency=args.concurrency,
                label="monolith",
            )  # fmt: skip
            straight = run_load(
                chat_base, direct, total=args.requests, concurrency=args.concurrency,
                label="direct",
            )  # fmt: skip
        finally:
            server.stop()
            fleet.stop()

    print()
    print(f"dialog sends: {args.requests} requests from {args.concurrency} keep-alive clients, "
          f"{args.instances} chat instances")  # fmt: skip
    print(line("A  through the monolith", through))
    print(line("B  straight to one chat instance", straight))
    ratio = through.rate / straight.rate if straight.rate else 0.0
    print(f"A/B throughput ratio: {ratio:.2f}")
    counts = dict(sorted(through.instances.items()))
    spread = max(counts.values()) - min(counts.values()) if counts else 0
    print(f"monolith sends per instance: {json.dumps(counts)}  (max - min = {spread})")
    return 0 if through.failures == 0 and straight.failures == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
