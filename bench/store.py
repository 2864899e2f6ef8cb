"""The CPU of the chat store's send (``snet.chat.store._send``) without HTTP around it.

Starts its own MariaDB (``snet.testing.servers.MariaDB``) on a free 127.0.0.1 port, applies
the chat schema, and stores N messages each way, printing this process's CPU (user +
system) and the wall time per send:

- pymysql alone on one connection, autocommit off: the INSERT ... RETURNING and a COMMIT;
- pymysql alone, autocommit on: the INSERT ... RETURNING only;
- through adbapi, the pool of ``snet.storage.mysql_pool`` (autocommit off, COMMIT after
  each interaction) and the chat's own (``chat_pool``: autocommit, no empty COMMIT), with 1
  and with 8 sends in flight (8 is the load of ``bench/dialogs.py``'s clients).

    python bench/store.py [--sends 3000]

docs/performance.md (step 6) quotes it. Figures only.
"""

from __future__ import annotations

import argparse
import time
import uuid
from collections.abc import Callable
from typing import Any

import pymysql
from twisted.enterprise import adbapi
from twisted.internet import defer, reactor

from snet.chat.schema import schema_sql
from snet.chat.store import _send, chat_pool
from snet.config import MySQLConfig
from snet.storage import mysql_pool, split_statements
from snet.testing.servers import MariaDB


class Cursor:
    """What ``_send`` uses of an adbapi ``Transaction``, over a plain pymysql connection."""

    def __init__(self, connection: pymysql.Connection) -> None:
        self.connection = connection
        self._cursor = connection.cursor()

    def execute(self, *args: Any) -> Any:
        return self._cursor.execute(*args)

    def fetchone(self) -> Any:
        return self._cursor.fetchone()

    @property
    def lastrowid(self) -> Any:
        return self._cursor.lastrowid


def report(label: str, sends: int, cpu: float, wall: float) -> None:
    print(f"{label:<44} {cpu / sends * 1e6:6.0f} us CPU  {wall / sends * 1e6:6.0f} us wall")


def alone(config: MySQLConfig, sends: int, autocommit: bool) -> None:
    connection = pymysql.connect(
        host=config.host, port=config.port, user=config.user, password=config.password,
        database=config.database, charset="utf8mb4", autocommit=autocommit,
        init_command="SET time_zone = '+00:00'",
    )  # fmt: skip
    try:
        cursor = Cursor(connection)
        cpu, wall = time.process_time(), time.perf_counter()
        for _ in range(sends):
            _send(cursor, 1, 2, "hello there", uuid.uuid4().hex)
            if not autocommit:
                connection.commit()
        label = "pymysql alone, " + ("autocommit" if autocommit else "INSERT and COMMIT")
        report(label, sends, time.process_time() - cpu, time.perf_counter() - wall)
    finally:
        connection.close()


@defer.inlineCallbacks
def through(label: str, pool: adbapi.ConnectionPool, sends: int, in_flight: int) -> Any:
    yield pool.runInteraction(_send, 1, 2, "warm", uuid.uuid4().hex)
    left = [sends]

    def one() -> defer.Deferred[None]:
        if left[0] <= 0:
            return defer.succeed(None)
        left[0] -= 1
        d = pool.runInteraction(_send, 1, 2, "hello there", uuid.uuid4().hex)
        return d.addCallback(lambda _: one())

    cpu, wall = time.process_time(), time.perf_counter()
    yield defer.gatherResults([one() for _ in range(in_flight)])
    report(f"{label}, {in_flight} in flight", sends, time.process_time() - cpu,
           time.perf_counter() - wall)  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sends", type=int, default=3000)
    args = parser.parse_args()
    server = MariaDB().start()
    try:
        config = MySQLConfig.from_url(server.create_database("bench_store"))
        setup = server.connect(config.database)
        with setup.cursor() as cursor:
            for statement in split_statements(schema_sql()):
                cursor.execute(statement)
        setup.close()
        alone(config, args.sends, autocommit=False)
        alone(config, args.sends, autocommit=True)
        pools: list[tuple[str, Callable[..., adbapi.ConnectionPool]]] = [
            ("adbapi, mysql_pool (COMMIT)", mysql_pool),
            ("adbapi, chat_pool (autocommit)", chat_pool),
        ]

        @defer.inlineCallbacks
        def run() -> Any:
            try:
                for label, make in pools:
                    pool = make(config, reactor=reactor)
                    try:
                        for in_flight in (1, 8):
                            yield through(label, pool, args.sends, in_flight)
                    finally:
                        pool.close()
            finally:
                reactor.stop()

        reactor.callWhenRunning(run)
        reactor.run()
    finally:
        server.stop()


if __name__ == "__main__":
    main()
