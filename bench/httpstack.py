"""The CPU one request costs in each layer of snet's HTTP stack, measured alone.

One trivial JSON route (``POST /v1/echo/<peer>``: read the body, answer 201 with two
fields) served, each in a ``python bench/httpstack.py --serve LAYER`` process of its own on
a free 127.0.0.1 port, by:

- ``minimal``: a Twisted protocol that parses just this request: the floor;
- ``site``: Twisted's ``Site`` as the services run it (``LimitedSite``), a plain resource;
- ``klein``: the same routed by Klein, inside ``ObservedResource`` (request id, in flight,
  metrics, log line), as every route but the sends is served;
- ``direct``: the same with the route run by ``ObservedResource`` itself
  (``snet.web.direct``), as the sends are served (docs/performance.md, step 13).

The same closed-loop load (8 keep-alive clients) goes to each in turn, round after round;
it prints the server's CPU (user + system, /proc) per request and the throughput:

    python bench/httpstack.py [--requests 20000] [--rounds 2]

Figures only: compare the layers of one run, not runs of different days.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

LAYERS = ("minimal", "site", "klein", "direct")


def serve(layer: str) -> None:
    """Serve the echo route in *layer* (see the module docstring) and print the port."""
    import prometheus_client
    from twisted.internet import reactor
    from twisted.internet.protocol import Factory, Protocol
    from twisted.web.iweb import IRequest
    from twisted.web.resource import Resource

    from snet.web.draining import InFlight
    from snet.web.limits import LimitedSite
    from snet.web.metrics import HTTPMetrics
    from snet.web.requests import json_response
    from snet.web.service import RoutedKlein, ServiceApp

    def answer(request: IRequest, peer: str) -> bytes:
        text = json.loads(request.content.read())["text"]
        return json_response(request, {"peer": peer, "text": text}, 201)

    class Echo(ServiceApp):
        app = RoutedKlein()
        direct_endpoints = frozenset({"echo"}) if layer == "direct" else frozenset()

        @app.route("/v1/echo/<peer>", methods=["POST"])
        def echo(self, request: IRequest, peer: str) -> bytes:
            return answer(request, peer)

    class Plain(Resource):
        isLeaf = True

        def render_POST(self, request: IRequest) -> bytes:
            return answer(request, request.path.rsplit(b"/", 1)[1].decode())

    class Minimal(Protocol):
        """Just enough HTTP/1.1 for this request: no limits, no checks."""

        buffer = b""

        def dataReceived(self, data: bytes) -> None:
            self.buffer += data
            while True:
                head, found, rest = self.buffer.partition(b"\r\n\r\n")
                if not found:
                    return
                lines = head.split(b"\r\n")
                target = lines[0].split(b" ")[1]
                length = 0
                for line in lines[1:]:
                    name, _, value = line.partition(b":")
                    if name.strip().lower() == b"content-length":
                        length = int(value)
                if len(rest) < length:
                    return
                body, self.buffer = rest[:length], rest[length:]
                answer = json.dumps(
                    {"peer": target.rsplit(b"/", 1)[1].decode(), "text": json.loads(body)["text"]}
                ).encode()
                self.transport.write(  # type: ignore[union-attr]
                    b"HTTP/1.1 201 Created\r\nContent-Type: application/json\r\n"
                    b"Content-Length: %d\r\n\r\n%s" % (len(answer), answer)
                )

    factory: Any
    if layer == "minimal":
        factory = Factory.forProtocol(Minimal)
    elif layer == "site":
        factory = LimitedSite(Plain(), reactor=reactor)  # type: ignore[no-untyped-call]
    else:
        api = Echo(
            in_flight=InFlight(),
            metrics=HTTPMetrics(prometheus_client.CollectorRegistry()),
            version="bench",
        )
        factory = LimitedSite(api.resource(), reactor=reactor)
    port = reactor.listenTCP(0, factory, interface="127.0.0.1")
    print(port.getHost().port, flush=True)  # type: ignore[attr-defined]
    reactor.run()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--serve", choices=LAYERS, help=argparse.SUPPRESS)
    parser.add_argument("--requests", type=int, default=20000)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--concurrency", type=int, default=8)
    args = parser.parse_args()
    if args.serve:
        serve(args.serve)
        return 0

    from cpu import cpu_seconds
    from load import json_body, run_load

    def make(worker: int, n: int) -> tuple[str, str, bytes, dict[str, str]]:
        return (
            "POST",
            f"/v1/echo/{worker}",
            json_body({"text": f"hello {worker}-{n}"}),
            {"Content-Type": "application/json", "X-Request-ID": f"bench-{worker}-{n}"},
        )

    print(f"one JSON route, {args.requests} requests from {args.concurrency} keep-alive clients")
    print(f"{'layer':8} {'round':>5} {'us CPU/request':>15} {'req/s':>8} {'failed':>7}")
    for round_ in range(1, args.rounds + 1):
        for layer in LAYERS:
            server = subprocess.Popen(  # noqa: S603 (this file, with a layer of its own list)
                [sys.executable, __file__, "--serve", layer], stdout=subprocess.PIPE, text=True
            )
            try:
                assert server.stdout is not None
                base = f"http://127.0.0.1:{int(server.stdout.readline())}"
                load = {"concurrency": args.concurrency, "label": f"{layer} {round_}"}
                run_load(base, make, total=max(args.requests // 10, 200), **load)  # warm-up
                before = cpu_seconds(server.pid) or 0.0
                result = run_load(base, make, total=args.requests, **load)
                used = (cpu_seconds(server.pid) or before) - before
            finally:
                server.terminate()
                server.wait()
            print(
                f"{layer:8} {round_:>5} {used / result.requests * 1e6:>15.0f}"
                f" {result.requests / result.seconds:>8.0f} {result.failures:>7}",
                flush=True,
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
