"""The DB-API module snet's adbapi pools load (``adbapi.ConnectionPool("snet.dbapi", ...)``):
pymysql, whose connections skip a COMMIT that has nothing to commit.

adbapi ends every ``runInteraction`` and ``runWithConnection`` with ``connection.commit()``,
and pymysql sends ``COMMIT`` for it whatever the connection did: one more statement and
round trip per interaction. On a connection in autocommit mode every statement outside an
explicit transaction commits by itself, so such a COMMIT is empty; this connection sends it
only when the server's last answer said a transaction is open (``BEGIN`` or ``START
TRANSACTION`` in the interaction), and always when autocommit is off.
"""

from __future__ import annotations

from typing import Any

# What adbapi reads of a DB-API module, besides connect(); errors are pymysql.err's.
from pymysql import apilevel, paramstyle, threadsafety  # noqa: F401
from pymysql.connections import Connection as _Connection
from pymysql.constants import SERVER_STATUS


class Connection(_Connection):
    """A pymysql connection whose ``commit()`` is a no-op in autocommit mode outside a
    transaction."""

    def commit(self) -> None:
        if self.autocommit_mode and not self.in_transaction:
            return
        super().commit()

    @property
    def in_transaction(self) -> bool:
        """Whether the server's last answer said a transaction is open on this connection."""
        status: int | None = getattr(self, "server_status", None)  # set by every answer
        return bool((status or 0) & SERVER_STATUS.SERVER_STATUS_IN_TRANS)


def connect(*args: Any, **kwargs: Any) -> Connection:
    """``pymysql.connect``, with this module's connection."""
    return Connection(*args, **kwargs)
