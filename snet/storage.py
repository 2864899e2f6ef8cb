"""Connections to MySQL (adbapi over pymysql) and Redis (txredisapi), set up so that a dead or
slow server makes calls fail within seconds instead of hanging a request, plus schema setup
and ``is_unavailable``, which tells a back end that cannot be reached now from a bug.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from typing import Any, Concatenate, NoReturn, ParamSpec, TypeVar

import pymysql
import txredisapi
from twisted.enterprise import adbapi
from twisted.internet import defer, error
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import HostnameEndpoint
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from snet.config import MySQLConfig, RedisConfig
from snet.rediswire import RedisUnavailable

P = ParamSpec("P")
T = TypeVar("T")

log = Logger(namespace="snet.storage")

CONNECT_TIMEOUT = 3
"""Seconds to open a MySQL connection."""
IO_TIMEOUT = 10
"""Seconds a MySQL read or write may block: a dead server never holds a thread longer."""
LOCK_WAIT_TIMEOUT = 1
"""Seconds a statement waits for a row lock before it fails (MySQL's default is 50)."""


def mysql_pool(
    config: MySQLConfig,
    *,
    reactor: Any = None,
    min: int = 1,
    max: int = 10,
    connect_timeout: int = CONNECT_TIMEOUT,
    io_timeout: int = IO_TIMEOUT,
    lock_wait_timeout: int = LOCK_WAIT_TIMEOUT,
    autocommit: bool = False,
) -> adbapi.ConnectionPool:
    """An adbapi pool of pymysql connections (``snet.dbapi``) to *config*'s database.

    utf8mb4, session time zone UTC, connect/read/write timeouts, and a short InnoDB lock
    wait: a row locked by a frozen peer (a SIGSTOPped instance in the middle of a
    transaction) fails a request in *lock_wait_timeout* seconds (503) instead of holding a
    pool thread for 50.
    ``cp_reconnect`` replaces a connection found dead, but the call that found it still
    fails: use ``run_with_retry`` for that. The caller closes the pool (``pool.close()``).

    With *autocommit* off (the default) each ``runInteraction`` is one transaction, ended by
    adbapi's COMMIT. With it on, each statement commits by itself and no COMMIT is sent
    unless the interaction opened a transaction (``begin_snapshot``): a one-statement write
    costs one statement and one round trip instead of two. Interactions that read several
    times and need one view of the data then start with ``begin_snapshot(txn)``.
    """
    extra: dict[str, Any] = {}
    if reactor is not None:
        extra["cp_reactor"] = reactor
    return adbapi.ConnectionPool(  # type: ignore[no-untyped-call]
        "snet.dbapi",
        host=config.host,
        port=config.port,
        user=config.user,
        password=config.password,
        database=config.database,
        charset="utf8mb4",
        autocommit=autocommit,
        connect_timeout=connect_timeout,
        read_timeout=io_timeout,
        write_timeout=io_timeout,
        init_command=(
            f"SET time_zone = '+00:00', innodb_lock_wait_timeout = {int(lock_wait_timeout)}"
        ),
        cp_reconnect=True,
        cp_min=min,
        cp_max=max,
        cp_noisy=False,
        **extra,
    )


DEAD_CONNECTION_CODES = frozenset({2006, 2013, 2055})
"""MySQL gone away / lost connection during query / lost connection (extended)."""


DEADLOCK = 1213
"""InnoDB rolled the whole transaction back to break a deadlock."""

QUICK_DEATH = 1.0
"""Seconds from a call's first attempt within which dead pooled connections are taken for
the left-overs of a MySQL restart or a network cut, and passed over one after another."""


def begin_snapshot(txn: adbapi.Transaction) -> None:
    """Open a read-only transaction with a consistent snapshot, so that the interaction's
    reads see the data of one moment; needed on an autocommit pool, harmless on another
    (nothing has run yet at the start of an interaction). adbapi's COMMIT ends it."""
    txn.execute("START TRANSACTION WITH CONSISTENT SNAPSHOT, READ ONLY")


def _gone(failure: Failure) -> str | None:
    """Why the transaction of *failure* is gone rather than refused, if it is: ``"dead"`` (its
    connection died) or ``"deadlock"``; then running the interaction again is safe."""
    exc = failure.value
    if isinstance(exc, pymysql.err.InterfaceError):
        # pymysql's "the connection is already closed"
        return "dead"
    if isinstance(exc, pymysql.err.OperationalError) and exc.args:
        if exc.args[0] in DEAD_CONNECTION_CODES:
            return "dead"
        if exc.args[0] == DEADLOCK:
            return "deadlock"
    return None


MYSQL_UNAVAILABLE_CODES = frozenset(
    {
        1040,  # too many connections
        1053,  # server shutdown in progress
        1205,  # lock wait timeout
        1213,  # deadlock, transaction rolled back
        1290,  # --read-only (a fail-over in progress)
        1927,  # connection killed
        4031,  # MySQL 8: disconnected by the server (idle)
    }
)
"""Server-side MySQL error numbers that mean "try again shortly"; all 2xxx (client) are too."""

CONNECTION_ERRORS: tuple[type[BaseException], ...] = (
    pymysql.err.InterfaceError,
    adbapi.ConnectionLost,
    error.ConnectionRefusedError,
    error.ConnectionLost,
    error.ConnectionDone,
    error.TimeoutError,
    defer.TimeoutError,
    TimeoutError,
    txredisapi.ConnectionError,
    RedisUnavailable,
)
"""Exceptions that mean a back end is unreachable or too slow (the web layer answers 503)."""


def is_unavailable(exc: BaseException) -> bool:
    """Whether *exc* says a back end cannot be reached now (rather than a bug)."""
    if isinstance(exc, pymysql.err.OperationalError):
        number = exc.args[0] if exc.args and isinstance(exc.args[0], int) else 0
        return 2000 <= number < 3000 or number in MYSQL_UNAVAILABLE_CODES
    return isinstance(exc, CONNECTION_ERRORS)


def run_with_retry(
    pool: adbapi.ConnectionPool,
    interaction: Callable[Concatenate[adbapi.Transaction, P], T],
    *args: P.args,
    **kwargs: P.kwargs,
) -> Deferred[T]:
    """``pool.runInteraction(interaction, ...)``, run again if its connection was dead.

    Retried only when the error came from inside *interaction* (so COMMIT was never sent and
    the server has rolled the transaction back) and says the connection died or InnoDB broke
    a deadlock. An error during COMMIT is never retried: the commit may have happened.
    *interaction* must therefore touch nothing but the database. On an autocommit pool (the
    chat's) a statement commits by itself, so one that ran before the error may have
    committed: its interactions must be safe to run twice (the chat's writes are: unique
    idempotency keys, read marks that only grow, repair marks settled however many).

    A deadlock, or a dead connection, is retried once. After MySQL restarted, or a network
    cut, every pooled connection is dead, and each fails once before adbapi replaces it: so
    while the dead connections fail fast (within ``QUICK_DEATH`` of the first attempt, as a
    connection the server closed does), a dead connection is retried again, up to the
    pool's size, until a live or new one runs the interaction (one retry left the first few
    calls, a health check among them, failing). A connection that dies slowly (a read
    timeout) is retried once only, so a call never waits for more than two of them; a new
    connection that cannot reach MySQL fails with another error, which ends the attempts.
    """
    most = int(getattr(pool, "max", 1)) + 1
    started = time.monotonic()

    def may_retry(why: str, number: int) -> bool:
        if number < 2:
            return True
        quick = time.monotonic() - started < QUICK_DEATH
        return why == "dead" and number < most and quick

    def attempt(number: int) -> Deferred[T]:
        reached_commit = [False]

        def run(txn: adbapi.Transaction) -> T:
            result = interaction(txn, *args, **kwargs)
            reached_commit[0] = True
            return result

        d: Deferred[T] = pool.runInteraction(run)  # type: ignore[no-untyped-call]

        def maybe_retry(failure: Failure) -> Deferred[T] | Failure:
            why = _gone(failure)
            if why is not None and not reached_commit[0] and may_retry(why, number):
                log.info(
                    "retrying {interaction} after {error}",
                    interaction=getattr(interaction, "__name__", repr(interaction)),
                    error=f"{type(failure.value).__name__}: {failure.value}",
                )
                return attempt(number + 1)
            return failure

        retried: Deferred[T] = d.addErrback(maybe_retry)  # type: ignore[call-overload]
        return retried

    return attempt(1)


def split_statements(sql_text: str) -> list[str]:
    """The statements of a schema file: ``--`` comment lines dropped, split at ``;``.

    Enough for DDL files that keep ``;`` out of strings and comments.
    """
    lines = [line for line in sql_text.splitlines() if not line.lstrip().startswith("--")]
    return [s.strip() for s in "\n".join(lines).split(";") if s.strip()]


class SchemaLockTimeoutError(RuntimeError):
    """Another process held the schema lock for longer than we were willing to wait."""


LOCK_NAME = re.compile(r"[A-Za-z0-9._:-]{1,64}")


def apply_schema(
    pool: adbapi.ConnectionPool, sql_text: str, lock_name: str, *, wait: int = 5
) -> Deferred[None]:
    """Run the statements of *sql_text* (``CREATE TABLE IF NOT EXISTS ...``) while holding
    the MySQL user lock *lock_name*, so that instances starting together apply it one after
    another.

    :param wait: seconds to wait for the lock (keep it below the pool's read timeout).
    :raises SchemaLockTimeoutError: (in the Deferred) if the lock is not had in time.
    """
    if LOCK_NAME.fullmatch(lock_name) is None:
        raise ValueError(f"lock name {lock_name!r}: 1-64 characters of [A-Za-z0-9._:-]")
    statements = split_statements(sql_text)

    def apply(connection: Any) -> None:
        cursor = connection.cursor()
        try:
            cursor.execute("SELECT GET_LOCK(%s, %s)", (lock_name, wait))
            (granted,) = cursor.fetchone()
            if granted != 1:
                raise SchemaLockTimeoutError(f"could not take lock {lock_name!r} within {wait}s")
            try:
                for statement in statements:
                    cursor.execute(statement)
                connection.commit()
            finally:
                cursor.execute("SELECT RELEASE_LOCK(%s)", (lock_name,))
                cursor.fetchall()
        finally:
            cursor.close()

    d: Deferred[None] = pool.runWithConnection(apply)  # type: ignore[no-untyped-call]

    def applied(result: None) -> None:
        log.info(
            "schema applied under lock {lock_name} ({count} statements)",
            lock_name=lock_name,
            count=len(statements),
        )

    return d.addCallback(applied)


# --- Redis ----------------------------------------------------------------------------------

REDIS_TIMEOUT = 2.0
"""Seconds a Redis call may take, waiting for a connection included."""


class RedisPool:
    """A txredisapi lazy connection pool whose calls fail instead of waiting for ever.

    txredisapi queues a call until a connection exists, so with Redis down a bare call
    never fires. Here every call fails with ``txredisapi.TimeoutError`` (a
    ``txredisapi.ConnectionError``) after *timeout* seconds.
    """

    def __init__(self, handler: Any, *, clock: IReactorTime, timeout: float) -> None:
        self.handler = handler
        self.clock = clock
        self.timeout = timeout

    def call(self, command: str, *args: object, **kwargs: object) -> Deferred[Any]:
        """Run txredisapi's method *command* (``"hincrby"``, ``"eval"``, ...) on a pooled
        connection."""
        d: Deferred[Any] = defer.maybeDeferred(getattr(self.handler, command), *args, **kwargs)
        return d.addTimeout(self.timeout, self.clock, onTimeoutCancel=self._timed_out)

    def _timed_out(self, result: object, timeout: float) -> NoReturn:
        raise txredisapi.TimeoutError(f"Redis did not answer within {timeout:g}s")

    def disconnect(self) -> Deferred[None]:
        """Stop reconnecting and close every connection."""
        d: Deferred[None] = self.handler.disconnect()
        return d


def redis_pool(
    config: RedisConfig,
    *,
    reactor: Any = None,
    poolsize: int = 4,
    timeout: float = REDIS_TIMEOUT,
) -> RedisPool:
    """A lazy txredisapi pool for *config*: connects in the background, reconnects by
    itself, and fails calls after *timeout* seconds while Redis is unreachable.

    *reactor* (``IReactorTCP`` and ``IReactorTime``; the global reactor by default) makes
    the connections and times the calls. This is txredisapi's ``lazyConnectionPool``, but
    with the endpoint built on *reactor* (txredisapi's own builds it on the global one).
    """
    if reactor is None:
        from twisted.internet import reactor
    factory = txredisapi.RedisFactory(
        f"{config.host}:{config.port}",
        config.db,
        poolsize,
        isLazy=True,
        password=config.password,
        username=config.username,
        replyTimeout=timeout,
    )
    factory.startConnecting(HostnameEndpoint(reactor, config.host, config.port, timeout=timeout))
    return RedisPool(factory.handler, clock=reactor, timeout=timeout)
