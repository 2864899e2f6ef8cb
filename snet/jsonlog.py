"""JSON log lines on stdout for containers: ``twistd --logger=snet.jsonlog.observer``.

Each event at or above ``SNET_LOG_LEVEL`` (debug, info, warn, error, critical; default info)
becomes one JSON object on one line: ``time`` (ISO 8601, UTC), ``level``,
``namespace``, ``message`` (the event's format filled in), ``traceback`` for failures, and
the event's own named fields (``service_id``, ``count``, ...), so that a log collector can
filter on them. Installed into the image's site-packages by docker/Dockerfile.

:class:`LevelFilteredLogger` applies the same ``SNET_LOG_LEVEL`` where the events are made,
for whatever observer twistd runs: its default text observer has no level filter and would
format and write every event (a debug line for each health probe included).

``twistd --logger=snet.jsonlog.text_observer`` writes the lines of twistd's own text observer
(``TIME [NAMESPACE#LEVEL] MESSAGE``), byte for byte, for about a fifth of its CPU: most events
are formatted by ``str.format_map`` instead of Twisted's formatter written in Python, and the
time stamp is made once per second. The JSON observer formats its messages the same way.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable
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
    formatEventAsClassicLogText,
    formatTime,
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


def format_message(event: dict[str, Any]) -> str:
    """The event's message, as ``twisted.logger.formatEvent`` makes it, but by
    ``str.format_map`` (in C) when that gives the same text: a ``log_format`` whose fields
    are all in the event. Anything else (Twisted's ``{call()}`` fields, which are not keys of
    the event, a missing field, a flattened or bytes format) goes to ``formatEvent``, which
    also says what went wrong when an event cannot be formatted."""
    fmt = event.get("log_format")
    if type(fmt) is str and "log_flattened" not in event:
        try:
            return fmt.format_map(event)
        except Exception:  # noqa: S110 (formatEvent below says what failed)
            pass
    return formatEvent(event)


def _split_time(when: float) -> tuple[int, int]:
    """(second, microsecond) of a time stamp, rounded as ``datetime.fromtimestamp`` does."""
    second = int(when // 1)
    micros = round((when - second) * 1e6)
    if micros >= 1_000_000:
        second, micros = second + 1, micros - 1_000_000
    return second, micros


class _PerSecond:
    """A time stamp's text up to its second, made once per second: the time zone's offset
    and the date's formatting cost more than the line's message."""

    def __init__(self, render: Callable[[int], str]) -> None:
        self.render = render
        self.last: tuple[int, str] = (-1, "")  # one assignment: safe to read from any thread

    def __call__(self, second: int) -> str:
        known, text = self.last
        if second != known:
            text = self.render(second)
            self.last = (second, text)
        return text


_local_second = _PerSecond(formatTime)
"""twistd's text time stamp: RFC 3339 in the local time zone, to the second."""
_utc_second = _PerSecond(
    lambda second: datetime.fromtimestamp(second, UTC).strftime("%Y-%m-%dT%H:%M:%S")
)


def _utc_time(when: float) -> str:
    """``datetime.fromtimestamp(when, UTC).isoformat(timespec="milliseconds")``, faster."""
    second, micros = _split_time(when)
    return f"{_utc_second(second)}.{micros // 1000:03d}+00:00"


def classic_text(event: dict[str, Any]) -> str | None:
    """The line twistd's default text observer writes for *event*
    (``twisted.logger.formatEventAsClassicLogText`` with its RFC 3339 time stamps),
    made faster for the usual event: a message without a failure, at a known time."""
    when = event.get("log_time")
    if "log_failure" in event or type(when) is not float:
        return formatEventAsClassicLogText(event)
    message = format_message(event)
    if not message:
        return None
    system = event.get("log_system")
    if system is None:
        level = event.get("log_level")
        system = f"{event.get('log_namespace', '-')}#{level.name if level is not None else '-'}"
    else:
        try:
            system = str(system)
        except Exception:
            system = "UNFORMATTABLE"
    line = f"{_local_second(_split_time(when)[0])} [{system}] {message}"
    return line.replace("\n", "\n\t") + "\n"


def event_as_record(event: dict[str, Any]) -> dict[str, Any]:
    """The JSON object logged for one twisted.logger event."""
    level = event.get("log_level")
    record: dict[str, Any] = {
        "time": _utc_time(event.get("log_time") or 0.0),
        "level": level.name if level is not None else "info",
        "namespace": event.get("log_namespace", event.get("system", "-")),
        "message": format_message(event),
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


@implementer(ILogObserver)
class TextLinesObserver:
    """Writes each event as twistd's default text observer does (see :func:`classic_text`)
    and flushes."""

    def __init__(self, out: IO[str]) -> None:
        self.out = out

    def __call__(self, event: dict[str, Any]) -> None:
        text = classic_text(event)
        if text:
            self.out.write(text)
            self.out.flush()


def text_observer() -> ILogObserver:
    """The observer factory for ``twistd --logger=snet.jsonlog.text_observer``: twistd's
    text lines on the real stdout, at ``SNET_LOG_LEVEL`` and above, for less CPU."""
    predicate = LogLevelFilterPredicate(defaultLogLevel=configured_level())
    return FilteringLogObserver(TextLinesObserver(sys.__stdout__ or sys.stdout), [predicate])


def observer() -> ILogObserver:
    """The observer factory twistd's ``--logger`` calls: JSON lines on the real stdout."""
    predicate = LogLevelFilterPredicate(defaultLogLevel=configured_level())
    return FilteringLogObserver(JSONLinesObserver(sys.__stdout__ or sys.stdout), [predicate])
