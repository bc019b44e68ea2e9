"""The batch clock: cycles at boundaries, and every way the PLC's clock can fail ends in a fault cycle or a confirmed jump, never a silent stall."""

from __future__ import annotations

import math

import pytest

from controller.clock import BatchClock, Tick


def _run(clock: BatchClock, now_h: float, wall_s: float = 0.0) -> Tick:
    verdict = clock.read(now_h, wall_s=wall_s)
    if verdict.tick is not Tick.WAIT:
        clock.cycle_done(verdict)
    return verdict.tick


def test_a_cycle_at_every_boundary_and_none_between():
    clock = BatchClock(1.0)
    ticks = [_run(clock, t) for t in (0.0, 0.5, 0.99, 1.0, 1.0, 1.7, 2.0)]
    assert ticks == [Tick.CYCLE, Tick.WAIT, Tick.WAIT, Tick.CYCLE, Tick.WAIT, Tick.WAIT, Tick.CYCLE]


def test_an_unusable_clock_gives_a_fault_cycle_at_once_then_one_per_interval_and_recovers():
    clock = BatchClock(1.0, lost_cycle_every_s=60.0)
    assert _run(clock, 0.0) is Tick.CYCLE
    verdicts = [clock.read(math.nan, wall_s=s) for s in (100.0, 130.0, 159.0, 160.0, 170.0)]
    assert [v.tick for v in verdicts] == [Tick.FAULT, Tick.WAIT, Tick.WAIT, Tick.FAULT, Tick.WAIT]
    assert "unusable" in verdicts[0].problem and verdicts[0].process_time_h == 0.0
    assert _run(clock, 1.0, wall_s=200.0) is Tick.CYCLE  # a good reading again: control resumes


def test_a_one_scan_jump_far_ahead_is_a_glitch_reported_with_the_next_cycle():
    clock = BatchClock(1.0)
    for t in (0.0, 1.0, 2.0):
        _run(clock, t)
    assert clock.read(2.5e3, wall_s=0.0).tick is Tick.WAIT  # pending confirmation
    verdict = clock.read(3.0, wall_s=1.0)
    assert verdict.tick is Tick.CYCLE and "ignored" in verdict.problem and "2500.00" in verdict.problem
    clock.cycle_done(verdict)
    assert clock.next_cycle_h == 4.0  # the schedule never took the glitch


def test_a_jump_confirmed_by_the_next_scan_is_taken_and_reported():
    clock = BatchClock(1.0)
    for t in (0.0, 1.0):
        _run(clock, t)
    assert clock.read(25.0, wall_s=0.0).tick is Tick.WAIT
    verdict = clock.read(25.0, wall_s=1.0)
    assert verdict.tick is Tick.CYCLE and "jumped forward" in verdict.problem
    clock.cycle_done(verdict)
    assert clock.next_cycle_h == 26.0


def test_a_clock_that_goes_back_faults_at_every_boundary_of_the_new_clock_until_it_passes_the_last_cycle():
    clock = BatchClock(1.0)
    for t in range(0, 12):
        _run(clock, float(t))
    ticks = [_run(clock, t) for t in (0.0, 0.5, 1.0, 2.0, 10.9, 11.0, 12.0)]
    assert ticks == [Tick.FAULT, Tick.WAIT, Tick.FAULT, Tick.FAULT, Tick.FAULT, Tick.WAIT, Tick.CYCLE]
    assert clock.last_cycle_h == 12.0


@pytest.mark.parametrize("period", [0.0, -1.0, math.nan, math.inf])
def test_a_period_that_is_not_a_positive_number_is_refused(period):
    with pytest.raises(ValueError, match="cycle period"):
        BatchClock(period)


def test_a_jump_of_exactly_one_period_is_a_plain_cycle():
    clock = BatchClock(1.0)
    for t in (0.0, 1.0):
        _run(clock, t)
    assert clock.read(3.0, wall_s=0.0).tick is Tick.CYCLE  # the 2-h boundary was missed, the 3-h one is the next plus one period


def test_a_nan_after_the_clock_went_back_is_still_a_fault_and_the_reset_clock_goes_on_faulting():
    clock = BatchClock(1.0, lost_cycle_every_s=10.0)
    for t in range(0, 6):
        _run(clock, float(t))
    assert _run(clock, 0.0, wall_s=0.0) is Tick.FAULT
    assert _run(clock, math.nan, wall_s=1.0) is Tick.FAULT
    assert _run(clock, 1.0, wall_s=2.0) is Tick.FAULT
    assert clock.last_cycle_h == 5.0


def test_a_good_clock_that_stops_advancing_is_a_fault_after_the_frozen_time():
    clock = BatchClock(1.0, lost_cycle_every_s=60.0, frozen_after_s=5400.0)
    _run(clock, 0.0, wall_s=0.0)
    _run(clock, 1.0, wall_s=3600.0)
    assert clock.read(1.2, wall_s=4000.0).tick is Tick.WAIT
    assert clock.read(1.2, wall_s=9000.0).tick is Tick.WAIT  # 1.2 h was last seen to advance at 4000 s
    verdict = clock.read(1.2, wall_s=9500.0)
    assert verdict.tick is Tick.FAULT and "stopped" in verdict.problem
    assert clock.read(1.2, wall_s=9520.0).tick is Tick.WAIT  # then once a minute while it lasts
    assert clock.read(2.0, wall_s=9600.0).tick is Tick.CYCLE  # moving again: control resumes


def test_a_jump_ahead_that_comes_back_is_never_taken_for_a_stopped_clock():
    """The stopped-clock check watches the reading, not the highest time ever read (a review found the latter)."""
    clock = BatchClock(1.0, frozen_after_s=5400.0)
    _run(clock, 0.0, wall_s=0.0)
    assert clock.read(500.0, wall_s=10.0).tick is Tick.WAIT  # one Good scan far ahead, in range
    wall_s, t = 10.0, 0.0
    ticks = []
    while t < 6.0:  # the real clock goes on at one process hour per wall hour, read once a minute
        wall_s += 60.0
        t += 1.0 / 60.0
        verdict = clock.read(t, wall_s=wall_s)
        if verdict.tick is not Tick.WAIT:
            clock.cycle_done(verdict)
            ticks.append(verdict.tick)
    assert ticks and set(ticks) == {Tick.CYCLE}, ticks


def test_a_reset_clock_that_advances_faults_once_per_boundary_not_as_stopped():
    clock = BatchClock(1.0, lost_cycle_every_s=60.0, frozen_after_s=5400.0)
    for k in range(4):
        _run(clock, float(k), wall_s=3600.0 * k)
    wall_s, t, problems = 3600.0 * 4, 0.0, []
    while t < 3.0:  # the PLC restarted: its clock runs again from 0, read once a minute
        wall_s += 60.0
        t += 1.0 / 60.0
        verdict = clock.read(t, wall_s=wall_s)
        if verdict.tick is not Tick.WAIT:
            clock.cycle_done(verdict)
            problems.append(verdict.problem)
    assert 3 <= len(problems) <= 4 and all("went back" in p for p in problems), problems
