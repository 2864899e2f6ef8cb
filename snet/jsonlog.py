"""JSON log lines on stdout for containers: ``twistd --logger=snet.jsonlog.observer``.

Each event at or above ``SNET_LOG_LEVEL`` (debug, info, warn, error, critical; default info)
becomes one JSON object on one line: ``time`` (ISO 8601, UTC), ``level``,
``namespace``, ``message`` (the event's format filled in), ``traceback`` for failures, and
the event's own named fields (``service_id``, ``count``, ...), so that a log collector can
filter on them. Installed into the image's site-packages by docker/Dockerfile.

:class:`LevelFilteredLogger` applies the same ``SNET_LOG_LEVEL`` where the events are made,
for whatever observer twistd runs: its default text observer has no level filter and would
format and write every event (a debug line for each health probe included).
"""

from __future__ import annotations

import json
import os
import sys
from datetime import UTC, datetime
from typing import IO, Any

from twisted.logger import (
    FilteringLogObserver,
    ILogObserver,
    InvalidLogLevelError,
    Logger,
    LogLevel,
    LogLevelFilterPredicate,
    formatEvent,
)
from zope.interface import implementer

# Keys of legacy (twisted.python.log) events that say nothing a reader needs twice.
_LEGACY_KEYS = frozenset({"message", "format", "system", "time", "isError", "why", "failure"})


_SCALARS = frozenset({str, int, float, bool, type(None)})


def _field(value: Any) -> Any:
    """A value as it can appear in JSON: itself if it encodes, else its repr."""
    if type(value) in _SCALARS:  # most fields: no trial encoding
        return value
    try:
        json.dumps(value)
    except (TypeError, ValueError):
        return repr(value)
    return value


def event_as_record(event: dict[str, Any]) -> dict[str, Any]:
    """The JSON object logged for one twisted.logger event."""
    level = event.get("log_level")
    record: dict[str, Any] = {
        "time": datetime.fromtimestamp(event.get("log_time") or 0.0, UTC).isoformat(
            timespec="milliseconds"
        ),
        "level": level.name if level is not None else "info",
        "namespace": event.get("log_namespace", event.get("system", "-")),
        "message": formatEvent(event),
    }
    failure = event.get("log_failure")
    if failure is not None:
        record["traceback"] = failure.getTraceback()
    for key, value in event.items():
        if not key.startswith("log_") and key not in _LEGACY_KEYS and key not in record:
            record[key] = _field(value)
    return record


@implementer(ILogObserver)
class JSONLinesObserver:
    """Writes each event as one line of JSON and flushes, for ``docker logs``."""

    def __init__(self, out: IO[str]) -> None:
        self.out = out

    def __call__(self, event: dict[str, Any]) -> None:
        try:
            line = json.dumps(event_as_record(event), ensure_ascii=False)
        except Exception as e:  # a log line must never take the service down
            line = json.dumps({"level": "error", "message": f"unloggable event: {e!r}"})
        self.out.write(line + "\n")
        self.out.flush()


def log_level(name: str) -> LogLevel:
    """The level named by SNET_LOG_LEVEL (``warning`` is taken for ``warn``)."""
    name = name.strip().lower() or "info"
    try:
        level: LogLevel = LogLevel.levelWithName("warn" if name == "warning" else name)
    except InvalidLogLevelError:
        raise SystemExit(
            f"SNET_LOG_LEVEL={name!r}: not one of debug, info, warn, error, critical"
        ) from None
    return level


def configured_level(environ: Any = None) -> LogLevel:
    """The level of ``SNET_LOG_LEVEL`` in *environ* (default: the process's environment)."""
    return log_level((os.environ if environ is None else environ).get("SNET_LOG_LEVEL", "info"))


class LevelFilteredLogger(Logger):
    """A ``Logger`` that drops events below *level* (default: ``SNET_LOG_LEVEL``, read when
    the logger is made) before it builds them, so that no observer formats or writes them."""

    def __init__(
        self,
        namespace: str | None = None,
        source: object | None = None,
        observer: ILogObserver | None = None,
        level: LogLevel | None = None,
    ) -> None:
        super().__init__(namespace, source, observer)
        self.level = level if level is not None else configured_level()

    def emit(self, level: LogLevel, format: str | None = None, **kwargs: object) -> None:
        if level < self.level:
            return
        super().emit(level, format, **kwargs)


def observer() -> ILogObserver:
    """The observer factory twistd's ``--logger`` calls: JSON lines on the real stdout."""
    predicate = LogLevelFilterPredicate(defaultLogLevel=configured_level())
    return FilteringLogObserver(JSONLinesObserver(sys.__stdout__ or sys.stdout), [predicate])
