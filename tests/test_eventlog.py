"""The event log: bounded, newest last, every line also in the log."""

import logging

import pytest

from sglang_dp.eventlog import EventLog


def test_keeps_the_newest_lines_and_shows_the_last_few() -> None:
    events = EventLog(size=3)
    for n in range(5):
        events.record(f"line {n}")
    assert list(events) == ["line 2", "line 3", "line 4"]
    assert events.recent(2) == ["line 3", "line 4"]
    assert events.recent(0) == []
    assert len(events) == 3


def test_every_line_goes_to_the_log_at_its_level(caplog: pytest.LogCaptureFixture) -> None:
    events = EventLog()
    with caplog.at_level(logging.INFO, logger="sglang_dp.router"):
        events.record("worker 0: healthy")
        events.record("discovery is stale", logging.WARNING)
    assert [(r.levelno, r.getMessage()) for r in caplog.records] == [
        (logging.INFO, "worker 0: healthy"),
        (logging.WARNING, "discovery is stale"),
    ]
