"""The JSON log lines containers write: one parseable object per event, fields kept."""

from __future__ import annotations

import io
import json

import pytest
from twisted.logger import Logger, LogLevel
from twisted.python.failure import Failure

from snet.jsonlog import JSONLinesObserver, LevelFilteredLogger, configured_level, log_level


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
