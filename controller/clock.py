"""The batch clock as the runtime sees it: when a cycle is due, and what it does when the PLC's clock cannot be trusted.

A cycle runs when ``Status.ProcessTime`` reaches the next multiple of the
cycle period (docs/runtime.md). The PLC's clock can fail in three ways, and
none of them may stall the runtime silently:

- **Unusable** (Bad, NaN, outside its plausible range): a *fault cycle* at
  once, then one every ``lost_cycle_every_s`` wall seconds while it lasts. A
  fault cycle writes no setpoints and moves no estimate; it records the scan,
  raises the alarm and moves the heartbeat (until the fault hand-over
  withholds it, docs/runtime.md section 7).
- **Backwards** (earlier than the last cycle: a PLC restarted, its clock
  reset): a fault cycle at once and at every boundary of the new clock, until
  it passes the last cycle again. The estimate cannot be moved back in time;
  an engineer decides (docs/runtime.md, section 8).
- **Frozen** (a Good reading that stays the same for ``frozen_after_s`` wall
  seconds after cycles have run: a PLC whose clock task stopped): fault
  cycles as for an unusable clock. Any change of the reading, either way,
  counts as moving.
- **Forwards by more than one period** (a boundary skipped): taken only when
  the next reading confirms it (a later scan at or beyond the jump); a single
  reading that jumps and comes back is a glitch, reported with the next cycle.
  A link outage also looks like this, and costs one extra scan.

The clock holds no I/O: the runtime and the in-process loop feed it readings.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from enum import Enum

from controller.ports import ScannedValue, good_number

TIME_TOLERANCE_H = 1e-6


def process_time_of(readings: Mapping[str, ScannedValue]) -> float:
    """The batch clock of a scan; NaN when it is missing, Bad or not a number."""
    return good_number(readings, "Status.ProcessTime")


class Tick(str, Enum):
    WAIT = "wait"
    """Not yet at the next boundary: nothing to do."""
    CYCLE = "cycle"
    """A control cycle at this reading's process time."""
    FAULT = "fault"
    """A cycle that controls nothing: the clock cannot be trusted (:attr:`ClockVerdict.problem` says why)."""


@dataclass(frozen=True)
class ClockVerdict:
    tick: Tick
    process_time_h: float
    """The time to run and record the cycle at (finite for CYCLE and FAULT)."""
    problem: str = ""
    """Why the clock cannot be trusted (FAULT), or what happened to it since the last cycle (CYCLE)."""


class BatchClock:
    """Decides, reading by reading, whether a cycle is due; :meth:`cycle_done` moves the schedule on."""

    def __init__(self, period_h: float, *, lost_cycle_every_s: float = 60.0, frozen_after_s: float | None = None) -> None:
        if not (math.isfinite(period_h) and period_h > 0.0):
            raise ValueError(f"cycle period must be a positive number of hours, got {period_h!r}")
        self.period_h = period_h
        self.lost_cycle_every_s = lost_cycle_every_s
        self.frozen_after_s = frozen_after_s
        """A clock that has not advanced for this long (wall s) after cycles ran is frozen; None: never judged frozen (simulation)."""
        self._reading_h = math.nan
        self._reading_since_s: float | None = None
        """The last Good reading and since when (wall s) the clock has read it."""
        self.last_cycle_h = math.nan
        """Process time of the last control cycle (NaN before the first)."""
        self.next_cycle_h = 0.0
        self._jump_h: float | None = None
        self._glitches: list[str] = []
        self._lost_fault_wall_s: float | None = None
        self._back_next_h: float | None = None

    def boundary_after(self, t_h: float) -> float:
        return (math.floor(t_h / self.period_h + TIME_TOLERANCE_H) + 1) * self.period_h

    def resume_after(self, last_cycle_h: float) -> None:
        """Carry on a batch whose last cycle ran at ``last_cycle_h`` (a restart)."""
        self.last_cycle_h = last_cycle_h
        self.next_cycle_h = self.boundary_after(last_cycle_h)

    def start_at(self, now_h: float) -> None:
        """Take over a running batch at ``now_h``: the first cycle runs now."""
        self.next_cycle_h = math.floor(now_h / self.period_h + TIME_TOLERANCE_H) * self.period_h

    def read(self, now_h: float, *, wall_s: float) -> ClockVerdict:
        """Judge one reading of the batch clock (NaN when the scan's clock failed its checks); ``wall_s`` is a monotonic wall clock."""
        if not math.isfinite(now_h):
            return self._lost(wall_s, "the batch clock (Status.ProcessTime) is unusable: Bad, not a number or out of range")
        if self._reading_since_s is None or not math.isclose(now_h, self._reading_h, rel_tol=0.0, abs_tol=TIME_TOLERANCE_H):
            self._reading_h, self._reading_since_s = now_h, wall_s  # it moved (either way): not stopped
        elif self.frozen_after_s is not None and math.isfinite(self.last_cycle_h) and wall_s - self._reading_since_s > self.frozen_after_s:
            return self._lost(wall_s, f"the batch clock has read {now_h:.2f} h for {wall_s - self._reading_since_s:.0f} s of wall time: the PLC's clock has stopped")
        self._lost_fault_wall_s = None
        if math.isfinite(self.last_cycle_h) and now_h < self.last_cycle_h - TIME_TOLERANCE_H:
            return self._backwards(now_h)
        self._back_next_h = None
        if self._jump_h is not None:
            jumped_h, self._jump_h = self._jump_h, None
            if now_h >= jumped_h - TIME_TOLERANCE_H:
                return ClockVerdict(Tick.CYCLE, now_h, f"the batch clock jumped forward from {self._last_label()} to {jumped_h:.2f} h, confirmed by the next scan")
            self._glitches.append(f"one scan read the batch clock at {jumped_h:.2f} h, the next {now_h:.2f} h: ignored")
        if now_h < self.next_cycle_h - TIME_TOLERANCE_H:
            return ClockVerdict(Tick.WAIT, now_h)
        if now_h > self.next_cycle_h + self.period_h + TIME_TOLERANCE_H and math.isfinite(self.last_cycle_h):
            self._jump_h = now_h  # a boundary skipped: wait for the next scan to confirm
            return ClockVerdict(Tick.WAIT, now_h, "jump pending confirmation")
        problem = "; ".join(self._glitches)
        self._glitches.clear()
        return ClockVerdict(Tick.CYCLE, now_h, problem)

    def cycle_done(self, verdict: ClockVerdict) -> None:
        """A cycle ran for ``verdict``: schedule the next."""
        if verdict.tick is Tick.CYCLE:
            self.last_cycle_h = verdict.process_time_h
            self.next_cycle_h = self.boundary_after(verdict.process_time_h)

    def _lost(self, wall_s: float, problem: str) -> ClockVerdict:
        if self._lost_fault_wall_s is not None and wall_s - self._lost_fault_wall_s < self.lost_cycle_every_s:
            return ClockVerdict(Tick.WAIT, math.nan)
        self._lost_fault_wall_s = wall_s
        at_h = self.last_cycle_h if math.isfinite(self.last_cycle_h) else 0.0
        return ClockVerdict(Tick.FAULT, at_h, problem)

    def _backwards(self, now_h: float) -> ClockVerdict:
        if self._back_next_h is not None and now_h < self._back_next_h - TIME_TOLERANCE_H:
            return ClockVerdict(Tick.WAIT, now_h)
        self._back_next_h = self.boundary_after(now_h)
        return ClockVerdict(
            Tick.FAULT,
            now_h,
            f"the batch clock went back from {self.last_cycle_h:.2f} h to {now_h:.2f} h (a PLC restart?): no control until it passes "
            f"{self.last_cycle_h:.2f} h again or an engineer restarts the runtime on a new history",
        )

    def _last_label(self) -> str:
        return f"{self.last_cycle_h:.2f} h" if math.isfinite(self.last_cycle_h) else "the start"
