"""Admission control and circuit breakers (pure): drawn examples, then a property against a
brute-force model of the queue."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sglang_dp.router.admission import Admission, AdmissionConfig, LoadReports, Verdict
from sglang_dp.router.breaker import BreakerConfig, Breakers, State


def never() -> bool:
    return False


def always() -> bool:
    return True


def test_requests_under_the_cap_are_admitted_then_queued_then_refused() -> None:
    gate: Admission[str] = Admission(AdmissionConfig(max_concurrent_requests=2, queue_size=1))
    assert gate.enter("a", 0, never) is Verdict.ADMIT
    assert gate.enter("b", 0, never) is Verdict.ADMIT
    assert gate.enter("c", 0, never) is Verdict.QUEUED
    assert gate.enter("d", 0, never) is Verdict.QUEUE_FULL
    assert gate.leave(1) == "c"  # the freed slot goes to the oldest waiting
    assert gate.in_flight == 2 and gate.waiting == 0
    assert gate.leave(2) is None and gate.in_flight == 1


def test_a_saturated_cluster_refuses_at_once_when_the_wait_would_outlast_the_timeout() -> None:
    config = AdmissionConfig(max_concurrent_requests=1, queue_size=10, queue_timeout_secs=1)
    gate: Admission[str] = Admission(config)
    asked = []

    def saturated() -> bool:
        asked.append(1)
        return True

    assert gate.enter("a", 0, saturated) is Verdict.ADMIT
    assert not asked  # under the cap the shell is not asked to look at the workers
    assert gate.enter("b", 0, saturated) is Verdict.QUEUED  # no rate measured yet
    assert gate.leave(0) == "b"
    assert gate.enter("c", 4, saturated) is Verdict.OVERLOADED  # 1 ended in 4 s: 4 s to wait
    assert gate.estimated_wait(4) == 4
    assert gate.enter("d", 4, never) is Verdict.QUEUED  # a worker has room: worth waiting
    assert gate.waiting == 1 and gate.refused_overloaded == 1


def test_waiting_tickets_time_out_in_order_and_can_be_cancelled() -> None:
    config = AdmissionConfig(max_concurrent_requests=1, queue_size=5, queue_timeout_secs=10)
    gate: Admission[str] = Admission(config)
    gate.enter("a", 0, never)
    for i, ticket in enumerate("bcd"):
        assert gate.enter(ticket, float(i), never) is Verdict.QUEUED
    assert gate.cancel("c") and not gate.cancel("c")
    assert gate.next_deadline() == 10
    assert gate.expire(9.9) == []
    assert gate.expire(12) == ["b", "d"] and gate.timed_out == 2
    assert gate.leave(12) is None and gate.in_flight == 0


def test_no_cap_admits_everything_and_a_zero_queue_refuses_at_the_cap() -> None:
    free: Admission[int] = Admission(AdmissionConfig(max_concurrent_requests=0))
    assert all(free.enter(i, 0, always) is Verdict.ADMIT for i in range(10_000))
    strict: Admission[int] = Admission(AdmissionConfig(max_concurrent_requests=1, queue_size=0))
    strict.enter(1, 0, never)
    assert strict.enter(2, 0, never) is Verdict.QUEUE_FULL


@pytest.mark.parametrize(
    "fields",
    [
        {"max_concurrent_requests": -1},
        {"queue_size": -1},
        {"queue_timeout_secs": 0},
    ],
)
def test_bad_admission_settings_are_refused(fields: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        AdmissionConfig(**fields)  # type: ignore[arg-type]


events = st.lists(
    st.tuples(st.sampled_from(["enter", "enter", "leave", "expire", "cancel"]), st.booleans()),
    max_size=60,
)


@settings(max_examples=200, deadline=None)
@given(ops=events, cap=st.integers(1, 4), size=st.integers(0, 4))
def test_the_queue_agrees_with_a_brute_force_model(
    ops: list[tuple[str, bool]], cap: int, size: int
) -> None:
    config = AdmissionConfig(max_concurrent_requests=cap, queue_size=size, queue_timeout_secs=5)
    gate: Admission[int] = Admission(config)
    running: list[int] = []
    waiting: list[tuple[float, int]] = []  # (deadline, ticket), arrival order
    for now, (op, flag) in enumerate(ops):  # no rate measured (< 1 s): none refused at once
        if op == "enter":
            verdict = gate.enter(now, now / 1000, lambda flag=flag: flag)
            if len(running) < cap and not waiting:
                assert verdict is Verdict.ADMIT
                running.append(now)
            elif len(waiting) >= size:
                assert verdict is Verdict.QUEUE_FULL
            else:
                assert verdict is Verdict.QUEUED
                waiting.append((now / 1000 + 5.0, now))
        elif op == "leave" and running:
            running.pop(0)
            promoted = gate.leave(now / 1000)
            if waiting:
                assert promoted == waiting.pop(0)[1]
                running.append(promoted)
            else:
                assert promoted is None
        elif op == "expire":
            when = now / 1000 * 200  # some deadlines pass
            expected = [t for d, t in waiting if d <= when]
            waiting = [(d, t) for d, t in waiting if d > when]
            assert gate.expire(when) == expected
        elif op == "cancel" and waiting:
            assert gate.cancel(waiting.pop(len(waiting) // 2)[1])
        assert gate.in_flight == len(running) <= cap
        assert gate.waiting == len(waiting) <= size


# -- circuit breakers -------------------------------------------------------------------------


def test_consecutive_failures_open_the_breaker_for_its_cool_down() -> None:
    breakers = Breakers(BreakerConfig(cb_failure_threshold=3, cb_timeout_duration_secs=60))
    for now in range(2):
        breakers.failure("w", now)
    breakers.success("w", 2)  # a success resets the count
    for now in range(3, 5):
        breakers.failure("w", now)
    assert breakers.blocked(5) == frozenset()
    breakers.failure("w", 5)
    assert breakers.blocked(6) == {"w"} and breakers.state("w", 6) is State.OPEN
    assert breakers.blocked(64.9) == {"w"}
    assert breakers.blocked(65) == frozenset()  # cool-down over: half-open, routed again
    assert breakers.state("w", 65) is State.HALF_OPEN


def test_half_open_probes_close_it_or_open_it_again() -> None:
    config = BreakerConfig(
        cb_failure_threshold=1, cb_success_threshold=2, cb_timeout_duration_secs=10
    )
    breakers = Breakers(config)
    breakers.failure("w", 0)
    assert breakers.state("w", 10) is State.HALF_OPEN
    breakers.failure("w", 11)  # one failed probe: another cool-down
    assert breakers.blocked(20) == {"w"}
    assert breakers.blocked(21) == frozenset()
    breakers.success("w", 21)
    assert breakers.state("w", 22) is State.HALF_OPEN
    breakers.success("w", 22)
    assert breakers.state("w", 22) is State.CLOSED and breakers.opens("w") == 2
    breakers.forget("w")
    assert breakers.opens("w") == 0


def test_a_half_open_worker_takes_a_limited_number_of_probes() -> None:
    config = BreakerConfig(
        cb_failure_threshold=1, cb_success_threshold=2, cb_timeout_duration_secs=10
    )
    breakers = Breakers(config)
    breakers.routed("w", 0)  # closed: nothing counted
    breakers.failure("w", 0)
    assert breakers.blocked(10) == frozenset()  # half-open
    breakers.routed("w", 10)
    assert breakers.blocked(10) == frozenset()
    breakers.routed("w", 10)  # two probes out, unanswered: no third
    assert breakers.blocked(11) == {"w"} and breakers.state("w", 11) is State.HALF_OPEN
    breakers.success("w", 12)  # one answered: room for one more
    assert breakers.blocked(12) == frozenset()
    breakers.routed("w", 12)
    assert breakers.blocked(12) == {"w"}
    assert breakers.blocked(22) == frozenset()  # no answer for a cool-down: probe afresh
    breakers.routed("w", 22)
    breakers.success("w", 23)
    assert breakers.state("w", 23) is State.CLOSED and breakers.blocked(23) == frozenset()
    breakers.failure("w", 24)  # opens again, half-open at 34, probes out, then a failure
    assert breakers.blocked(34) == frozenset()
    breakers.routed("w", 34)
    breakers.routed("w", 34)
    breakers.failure("w", 35)
    assert breakers.blocked(36) == {"w"} and breakers.state("w", 36) is State.OPEN
    breakers.forget("w")
    assert breakers.blocked(36) == frozenset()


def test_a_disabled_breaker_never_opens() -> None:
    breakers = Breakers(BreakerConfig(cb_failure_threshold=1, disable_circuit_breaker=True))
    for now in range(100):
        breakers.failure("w", now)
    assert breakers.blocked(100) == frozenset()


@pytest.mark.parametrize(
    "fields",
    [{"cb_failure_threshold": 0}, {"cb_success_threshold": 0}, {"cb_timeout_duration_secs": 0}],
)
def test_bad_breaker_settings_are_refused(fields: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        BreakerConfig(**fields)  # type: ignore[arg-type]


def test_load_reports_age_out() -> None:
    loads = LoadReports(max_age_s=3)
    assert loads.waiting("w", 0) is None and not loads.queueing("w", 0)
    loads.record("w", 2, 10)
    assert loads.waiting("w", 13) == 2 and loads.queueing("w", 13)
    assert loads.waiting("w", 13.5) is None  # stale: not trusted
    loads.record("w", 0, 14)
    assert loads.waiting("w", 14) == 0 and not loads.queueing("w", 14)
    loads.forget("w")
    assert loads.waiting("w", 14) is None
