"""A small closed-loop HTTP load generator for the benchmarks (standard library only).

Each worker thread keeps one keep-alive connection and sends its share of requests one after
another, so concurrency is the number of workers. Only 127.0.0.1 is ever contacted.
"""

from __future__ import annotations

import http.client
import json
import ssl
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from urllib.parse import urlsplit

Request = tuple[str, str, bytes | None, dict[str, str]]
"""method, path, body, headers"""


@dataclass
class LoadResult:
    requests: int = 0
    failures: int = 0
    seconds: float = 0.0
    statuses: Counter[int] = field(default_factory=Counter)
    instances: Counter[str] = field(default_factory=Counter)
    latencies: list[float] = field(default_factory=list)

    @property
    def rate(self) -> float:
        return self.requests / self.seconds if self.seconds else 0.0

    def percentile(self, p: float) -> float:
        ordered = sorted(self.latencies)
        return ordered[min(len(ordered) - 1, int(p * len(ordered)))] if ordered else 0.0


def run_load(
    base: str,
    make_request: Callable[[int, int], Request],
    *,
    total: int,
    concurrency: int,
    ok: frozenset[int] = frozenset({200, 201}),
    label: str = "",
    tls: ssl.SSLContext | None = None,
) -> LoadResult:
    """Send *total* requests to *base* from *concurrency* workers; make_request(worker, n).

    An ``https://`` *base* is called with *tls* (a Connect client certificate, for a chat
    instance's ``/v1`` routes)."""
    parts = urlsplit(base)
    assert parts.hostname == "127.0.0.1", "benchmarks only talk to this machine"
    result = LoadResult()
    lock = threading.Lock()
    per_worker = [
        total // concurrency + (1 if i < total % concurrency else 0) for i in range(concurrency)
    ]
    done = [0]
    finished_at = [0.0] * concurrency

    def worker(index: int) -> None:
        connection = (
            http.client.HTTPSConnection(parts.hostname, parts.port, timeout=30, context=tls)
            if parts.scheme == "https"
            else http.client.HTTPConnection(parts.hostname, parts.port, timeout=30)
        )
        for n in range(per_worker[index]):
            method, path, body, headers = make_request(index, n)
            started = time.perf_counter()
            try:
                connection.request(method, path, body=body, headers=headers)
                response = connection.getresponse()
                response.read()
                status, instance = response.status, response.getheader("X-Snet-Chat-Instance")
                if response.getheader("Connection", "").lower() == "close":
                    connection.close()
            except (OSError, http.client.HTTPException):
                connection.close()
                status, instance = 0, None
            elapsed = time.perf_counter() - started
            with lock:
                result.requests += 1
                result.statuses[status] += 1
                result.latencies.append(elapsed)
                if status not in ok:
                    result.failures += 1
                if instance:
                    result.instances[instance] += 1
                done[0] += 1
        connection.close()
        finished_at[index] = time.perf_counter()

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(concurrency)]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    while any(t.is_alive() for t in threads):
        time.sleep(0.5)
        print(f"\r  {label} {done[0]}/{total} requests", end="", file=sys.stderr, flush=True)
    for thread in threads:
        thread.join()
    print(file=sys.stderr)
    # The last worker's end, not the poll's: the progress line wakes every half second.
    result.seconds = max(finished_at) - started
    return result


def json_body(value: object) -> bytes:
    return json.dumps(value).encode()
