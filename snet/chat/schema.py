"""The chat service's schema (``schema.sql``: ``chat_messages`` and ``chat_reads``), applied
at start-up by every chat instance under a MySQL user lock."""

from __future__ import annotations

from importlib.resources import files

from twisted.enterprise import adbapi
from twisted.internet.defer import Deferred

from snet.storage import apply_schema

SCHEMA_LOCK = "snet.chat.schema"
"""The MySQL user lock held while the chat schema is applied."""


def schema_sql() -> str:
    """The text of ``schema.sql``, shipped inside the package."""
    return files("snet.chat").joinpath("schema.sql").read_text(encoding="utf-8")


def apply_chat_schema(pool: adbapi.ConnectionPool) -> Deferred[None]:
    """Create the chat tables if they do not exist (safe with many instances at once)."""
    return apply_schema(pool, schema_sql(), SCHEMA_LOCK)
