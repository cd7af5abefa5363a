"""The outcome table: total over every (fault, status, flushed, retries left), and each rule."""

from __future__ import annotations

import itertools

import pytest

from sglang_dp.router.outcomes import RETRY_STATUSES, Action, Fault, Verdict, decide
from sglang_dp.router.proxy import fault_of, relayed_headers
from sglang_dp.router.upstream import (
    ConnectError,
    ConnectTimeout,
    LocalResourceError,
    ProtocolError,
    UpstreamClosed,
    UpstreamError,
    UpstreamTimeout,
)

STATUSES = [0, 200, 400, 404, 408, 413, 429, 500, 501, 502, 503, 504]
CASES = list(itertools.product(Fault, STATUSES, [False, True], [0, 1, 2]))


def expected(fault: Fault, status: int, flushed: bool, left: int) -> Verdict:
    """The table of the module docstring, written as a lookup of its own."""
    if flushed:
        return Verdict(Action.BREAK, 0, fault != Fault.LOCAL)
    table = {
        Fault.LOCAL: Verdict(Action.ANSWER, 503, False),
        Fault.TIMEOUT: Verdict(Action.ANSWER, 504, True),
    }
    if fault in table:
        return table[fault]
    if fault == Fault.STATUS:
        if status in RETRY_STATUSES and left:
            return Verdict(Action.RETRY, 0, True)
        return Verdict(Action.RELAY, status, status >= 500)
    return Verdict(Action.RETRY, 0, True) if left else Verdict(Action.ANSWER, 502, True)


@pytest.mark.parametrize(("fault", "status", "flushed", "left"), CASES)
def test_every_case_matches_the_table(fault: Fault, status: int, flushed: bool, left: int) -> None:
    assert decide(fault, status, flushed, left) == expected(fault, status, flushed, left)


def test_nothing_is_retried_or_answered_anew_once_bytes_reached_the_client() -> None:
    for fault, status, _, left in CASES:
        verdict = decide(fault, status, True, left)
        assert verdict.action is Action.BREAK and verdict.status == 0


def test_the_router_own_resource_limits_never_blame_a_worker() -> None:
    for _, status, flushed, left in CASES:
        assert not decide(Fault.LOCAL, status, flushed, left).blame


def test_no_retry_without_retries_left_nor_after_a_timeout() -> None:
    for fault, status, flushed, left in CASES:
        action = decide(fault, status, flushed, left).action
        if left == 0 or fault in (Fault.TIMEOUT, Fault.LOCAL):
            assert action is not Action.RETRY


def test_an_answer_always_carries_an_error_status() -> None:
    for fault, status, flushed, left in CASES:
        verdict = decide(fault, status, flushed, left)
        if verdict.action is Action.ANSWER:
            assert verdict.status in (502, 503, 504)
        if verdict.action is Action.RELAY:
            assert verdict.status == status


@pytest.mark.parametrize(
    ("error", "fault"),
    [
        (ConnectError("refused"), Fault.CONNECT),
        (ConnectTimeout("slow connect"), Fault.TIMEOUT),
        (UpstreamTimeout("no head"), Fault.TIMEOUT),
        (LocalResourceError("EMFILE"), Fault.LOCAL),
        (UpstreamClosed("reset"), Fault.CLOSED),
        (ProtocolError("garbage"), Fault.PROTOCOL),
    ],
)
def test_every_upstream_error_has_its_fault(error: UpstreamError, fault: Fault) -> None:
    assert fault_of(error) is fault


def test_relayed_headers_drop_hop_by_hop_and_framing_ones() -> None:
    content_type, lines = relayed_headers(
        [
            (b"content-type", b"text/event-stream"),
            (b"x-own", b"1"),
            (b"connection", b"keep-alive"),
            (b"transfer-encoding", b"chunked"),
            (b"content-length", b"5"),
            (b"keep-alive", b"timeout=5"),
            (b"x-request-id", b"theirs"),
            (b"date", b"today"),
        ]
    )
    assert content_type == b"text/event-stream"
    assert lines == b"x-own: 1\r\ndate: today\r\n"
