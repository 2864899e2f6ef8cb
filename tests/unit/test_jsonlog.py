"""The JSON log lines containers write: one parseable object per event, fields kept."""

from __future__ import annotations

import io
import json
from datetime import UTC, datetime

import pytest
from hypothesis import given
from hypothesis import strategies as st
from twisted.logger import Logger, LogLevel, formatEvent, formatEventAsClassicLogText
from twisted.python.failure import Failure

from snet.jsonlog import (
    JSONLinesObserver,
    LevelFilteredLogger,
    TextLinesObserver,
    classic_text,
    configured_level,
    event_as_record,
    format_message,
    log_level,
)


def lines_of(emit: object) -> list[dict[str, object]]:
    out = io.StringIO()
    log = Logger(namespace="snet.test", observer=JSONLinesObserver(out))
    emit(log)  # type: ignore[operator]
    return [json.loads(line) for line in out.getvalue().splitlines()]


def test_an_event_becomes_one_json_line_with_its_named_fields() -> None:
    [record] = lines_of(
        lambda log: log.info("[{request_id}] sent {count}", request_id="r-1", count=3)
    )
    assert record["message"] == "[r-1] sent 3"
    assert record["level"] == "info"
    assert record["namespace"] == "snet.test"
    assert record["request_id"] == "r-1" and record["count"] == 3
    assert str(record["time"]).endswith("+00:00")


def test_a_failure_carries_its_traceback_and_odd_values_their_repr() -> None:
    def emit(log: Logger) -> None:
        try:
            1 / 0  # noqa: B018
        except ZeroDivisionError:
            log.failure("broke on {thing}", Failure(), thing=object())

    [record] = lines_of(emit)
    assert record["level"] == "critical"
    assert "ZeroDivisionError" in str(record["traceback"])
    assert str(record["thing"]).startswith("<object object")


def test_log_levels_are_read_from_their_names() -> None:
    assert log_level("WARNING") is LogLevel.warn
    assert log_level("") is LogLevel.info
    with pytest.raises(SystemExit, match="SNET_LOG_LEVEL"):
        log_level("loud")


def test_a_level_filtered_logger_drops_events_below_its_level_before_any_observer() -> None:
    seen: list[dict[str, object]] = []
    log = LevelFilteredLogger(namespace="snet.test", observer=seen.append, level=LogLevel.info)
    log.debug("probe {n}", n=1)
    log.info("request {n}", n=2)
    log.warn("problem {n}", n=3)
    assert [event["n"] for event in seen] == [2, 3]


def test_a_level_filtered_logger_keeps_debug_events_at_debug_level() -> None:
    seen: list[dict[str, object]] = []
    log = LevelFilteredLogger(observer=seen.append, level=LogLevel.debug)
    log.debug("probe")
    assert len(seen) == 1


def test_the_configured_level_comes_from_snet_log_level_and_defaults_to_info() -> None:
    assert configured_level({}) == LogLevel.info
    assert configured_level({"SNET_LOG_LEVEL": "debug"}) == LogLevel.debug
    assert configured_level({"SNET_LOG_LEVEL": "warning"}) == LogLevel.warn


# The faster formatting must write what Twisted's formatters write, byte for byte.

times = st.floats(min_value=0, max_value=4e9, allow_nan=False, allow_infinity=False)


@given(when=times)
def test_json_time_stamps_are_datetimes_isoformat_to_the_millisecond(when: float) -> None:
    expected = datetime.fromtimestamp(when, UTC).isoformat(timespec="milliseconds")
    assert event_as_record({"log_time": when, "log_format": "x"})["time"] == expected


EVENTS: list[dict[str, object]] = [
    {"log_format": "[{request_id}] {method} {route} {status} in {ms} ms",
     "request_id": "r-1", "method": "POST", "route": "/v1/x", "status": 201, "ms": 3.5},
    {"log_format": "{value!r} and {value!s:>8} and {n:05d}", "value": "a'b", "n": 42},
    {"log_format": "{thing.real} {things[0]} {mapping[k]}", "thing": 3,
     "things": [1, 2], "mapping": {"k": "v"}},
    {"log_format": "called: {f()}", "f": lambda: "yes"},
    {"log_format": "missing {nothing}"},
    {"log_format": "positional {}"},
    {"log_format": "two\nlines {x}", "x": 1},
    {"log_format": ""},
    {"log_format": b"bytes {x}", "x": 1},
    {"log_format": "system {x}", "x": 1, "log_system": "-"},
    {"message": ("legacy",), "log_format": None},
]  # fmt: skip


@given(fields=st.sampled_from(EVENTS), when=times)
def test_messages_and_text_lines_are_what_twisted_writes(
    fields: dict[str, object], when: float
) -> None:
    event = {"log_time": when, "log_namespace": "snet.test", "log_level": LogLevel.info}
    event.update(fields)
    assert format_message(event) == formatEvent(event)
    assert classic_text(event) == formatEventAsClassicLogText(event)


def test_a_failure_line_and_an_untimed_line_are_twisteds_own() -> None:
    try:
        1 / 0  # noqa: B018
    except ZeroDivisionError:
        failure = Failure()
    event = {"log_format": "broke", "log_failure": failure, "log_time": 1.5e9}
    assert classic_text(event) == formatEventAsClassicLogText(event)
    assert "ZeroDivisionError" in str(classic_text(event))
    untimed = {"log_format": "no time"}
    assert classic_text(untimed) == formatEventAsClassicLogText(untimed) == "- [-#-] no time\n"


def test_the_text_observer_writes_a_line_and_drops_events_with_no_text() -> None:
    out = io.StringIO()
    log = Logger(namespace="snet.test", observer=TextLinesObserver(out))
    log.info("hello {who}", who="you")
    log.info("")
    [line] = out.getvalue().splitlines()
    assert line.endswith(" [snet.test#info] hello you")
