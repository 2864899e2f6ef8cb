"""The JSON log lines containers write: one parseable object per event, fields kept."""

from __future__ import annotations

import io
import json

import pytest
from twisted.logger import Logger, LogLevel
from twisted.python.failure import Failure

from snet.jsonlog import JSONLinesObserver, log_level


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
