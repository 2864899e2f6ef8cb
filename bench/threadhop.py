"""The CPU of one hand-off to a thread pool and back, as adbapi makes one for every query.

A chat instance hands each send's MySQL work to adbapi's thread pool
(``deferToThreadPool``: Twisted's ``ThreadPool``, its team and a ``queue.Queue`` per worker)
and gets the result back through ``callFromThread``. py-spy's GIL profile of an instance
puts much of its time in ``Condition.notify`` there; this measures what one hop costs on
its own, side by side with a lean pool (C ``SimpleQueue``, fixed threads) doing the same:

    python bench/threadhop.py [--hops 20000] [--rounds 3]

It prints the process's CPU (user + system) and the wall time per hop for each pool,
alternating them. Figures only.
"""

from __future__ import annotations

import argparse
import os
import queue
import threading
import time
from collections.abc import Callable
from typing import Any

from twisted.internet import reactor, threads
from twisted.python.threadpool import ThreadPool


class LeanPool:
    """Fixed threads taking work from one ``SimpleQueue``: the least a hand-off can be."""

    def __init__(self, size: int) -> None:
        self._work: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._threads = [threading.Thread(target=self._run, daemon=True) for _ in range(size)]

    def start(self) -> None:
        for thread in self._threads:
            thread.start()

    def stop(self) -> None:
        for _ in self._threads:
            self._work.put(None)

    def _run(self) -> None:
        while (item := self._work.get()) is not None:
            on_result, func, args, kwargs = item
            try:
                result, ok = func(*args, **kwargs), True
            except BaseException as error:  # handed back, as ThreadPool does
                result, ok = error, False
            on_result(ok, result)

    def callInThreadWithCallback(
        self,
        on_result: Callable[[bool, object], None],
        func: Callable[..., object],
        *a: Any,
        **k: Any,
    ) -> None:
        self._work.put((on_result, func, a, k))


def measure(pool: Any, label: str, hops: int, done: Callable[[], None]) -> None:
    pool.start()
    cpu0, wall0 = os.times(), time.perf_counter()

    def hop(n: int) -> None:
        if n == hops:
            cpu1 = os.times()
            cpu = cpu1.user + cpu1.system - cpu0.user - cpu0.system
            wall = time.perf_counter() - wall0
            per_hop = f"{cpu / hops * 1e6:7.1f} us CPU per hop {wall / hops * 1e6:7.1f} us wall"
            print(f"{label:<8} {per_hop}")
            pool.stop()
            done()
            return
        threads.deferToThreadPool(reactor, pool, int).addCallback(lambda _: hop(n + 1))

    hop(0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hops", type=int, default=20000)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    runs: list[tuple[Callable[[], Any], str]] = [
        (lambda: ThreadPool(3, 5), "twisted"),
        (lambda: LeanPool(5), "lean"),
    ] * args.rounds

    def next_run() -> None:
        if not runs:
            reactor.stop()
            return
        make, label = runs.pop(0)
        reactor.callLater(0.2, measure, make(), label, args.hops, next_run)

    reactor.callWhenRunning(next_run)
    reactor.run()


if __name__ == "__main__":
    main()
