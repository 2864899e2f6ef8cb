"""The blocking poller that process-level tests and benchmarks wait with."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from snet.testing.waiting import timed, wait_until


def test_wait_until_returns_the_first_true_value() -> None:
    answers = iter([None, 0, "ready"])
    assert wait_until(lambda: next(answers), 5, "an answer", interval=0.001) == "ready"


def test_wait_until_timeout_names_what_it_waited_for_and_shows_the_log(tmp_path: Path) -> None:
    log = tmp_path / "server.log"
    log.write_text("".join(f"line {n}\n" for n in range(100)))
    with pytest.raises(TimeoutError) as raised:
        wait_until(lambda: False, 0.05, "the server to answer", log_path=log, log_lines=3)
    message = str(raised.value)
    assert "waiting for the server to answer" in message
    assert "line 97\nline 98\nline 99" in message
    assert "line 96" not in message


def test_timed_gives_the_moment_the_successful_check_started() -> None:
    checks: list[float] = []

    def second_check_passes() -> bool:
        checks.append(time.monotonic())
        return len(checks) == 2

    at = wait_until(timed(second_check_passes), 5, "the second check", interval=0.001)
    assert checks[0] < at <= checks[1]
