"""The monolith's schema (``schema.sql``: users and their tokens, friendships and posts),
shared by ``Accounts`` and ``Social`` and applied at start-up by every instance under a
MySQL user lock."""

from __future__ import annotations

from importlib.resources import files

from twisted.enterprise import adbapi
from twisted.internet.defer import Deferred

from snet.storage import apply_schema

SCHEMA_LOCK = "snet.server.schema"
"""The MySQL user lock held while the monolith's schema is applied."""


def schema_sql() -> str:
    """The text of ``schema.sql``, shipped inside the package."""
    return files("snet.server").joinpath("schema.sql").read_text(encoding="utf-8")


def apply_server_schema(pool: adbapi.ConnectionPool) -> Deferred[None]:
    """Create the monolith's tables if they do not exist (safe with many instances at once)."""
    return apply_schema(pool, schema_sql(), SCHEMA_LOCK)
