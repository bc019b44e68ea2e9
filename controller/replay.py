"""The model run again from an earlier estimate with the inputs the plant was actually given: the trust region's long-lead evidence.

The performance monitor (:mod:`controller.trust`) holds each lab result
against the plan in force a day before its draw. Three days ahead, the plan
in force then is no test of the model: the plans of the days between changed
the inputs (above all the glucose feed, which follows every lab result). So
the controller keeps, for the last days, the estimate of every cycle and the
setpoints the plant ran, and runs the model from the estimate ``lead_h``
before a lab result's draw to the draw with those setpoints. What it
predicts there is what the model claims three days ahead, with nothing but
the model and that estimate to blame.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass

import casadi as ca
import numpy as np

from plant_models.cho import CultureModel


@dataclass(frozen=True)
class _Cycle:
    time_h: float
    applied_before: np.ndarray
    """The setpoints the plant ran from the previous cycle to this one (feed L/h, glucose feed L/h, temperature °C)."""
    state: np.ndarray
    parameters: np.ndarray


class ReplayMemory:
    """The estimates and applied setpoints of the last ``keep_h`` hours, and the model run from one of them to a later time."""

    def __init__(self, model: CultureModel, *, keep_h: float, max_gap_h: float, step_h: float = 1.0, substeps: int = 4) -> None:
        """``max_gap_h``: cycles further apart than this leave the inputs between unknown (a restart, a stopped runtime): the memory starts again."""
        if not (keep_h > 0.0 and max_gap_h > 0.0 and step_h > 0.0 and substeps >= 1):
            raise ValueError(f"keep_h, max_gap_h and step_h must be > 0 and substeps >= 1, got {keep_h}, {max_gap_h}, {step_h}, {substeps}")
        self._keep_h = keep_h
        self._max_gap_h = max_gap_h
        self._step_h = step_h
        self._cycles: deque[_Cycle] = deque()
        t, dt = ca.SX.sym("t"), ca.SX.sym("dt")
        x, u, p = ca.SX.sym("x", model.n_states), ca.SX.sym("u", model.n_inputs), ca.SX.sym("p", model.n_parameters)
        _, x_next = model.rk4(t, x, u, p, dt, substeps)
        self._step = ca.Function("replay_step", [t, x, u, p, dt], [x_next])

    def record(self, time_h: float, applied_before: np.ndarray, state: np.ndarray, parameters: np.ndarray, *, bridge_h: float | None = None) -> None:
        """One cycle: the setpoints the plant ran since the previous cycle (read back now), and the estimate made now.

        The same time again is the same cycle run again (abandoned before its writes): no time passed, and the first read-back is kept.
        ``bridge_h``: a longer gap since the previous cycle that ``applied_before`` stands for than ``max_gap_h`` (never a shorter one):
        the caller gives it when the rates are averages over the gap (from flow totals), not a read-back of now. A longer gap than
        both starts the memory again.
        """
        if self._cycles and time_h == self._cycles[-1].time_h:
            return
        if self._cycles and not 0.0 < time_h - self._cycles[-1].time_h <= max(self._max_gap_h, bridge_h or 0.0):
            self._cycles.clear()
        if not (np.all(np.isfinite(applied_before)) and np.all(np.isfinite(state)) and np.all(np.isfinite(parameters))):
            self._cycles.clear()  # an input or an estimate unknown: nothing before it can be replayed through it
            return
        self._cycles.append(_Cycle(float(time_h), np.array(applied_before, dtype=float), np.array(state, dtype=float), np.array(parameters, dtype=float)))
        while len(self._cycles) > 1 and self._cycles[1].time_h <= time_h - self._keep_h:
            self._cycles.popleft()

    def replay(self, from_at_or_before_h: float, to_h: float) -> tuple[float, np.ndarray] | None:
        """(when the estimate started from was made, the model's state at ``to_h``) from the latest estimate at or before ``from_at_or_before_h``; None when none is kept or the setpoints up to ``to_h`` are not yet known."""
        cycles = list(self._cycles)
        starts = [i for i, cycle in enumerate(cycles) if cycle.time_h <= from_at_or_before_h + 1e-9]
        if not starts or cycles[-1].time_h < to_h - 1e-9:
            return None
        first = cycles[starts[-1]]
        x, t = first.state, first.time_h
        for cycle in cycles[starts[-1] + 1 :]:
            end_h = min(cycle.time_h, to_h)
            while t < end_h - 1e-9:
                dt = min(self._step_h, end_h - t)
                x = np.asarray(self._step(t, x, cycle.applied_before, first.parameters, dt)).ravel()
                t += dt
            if t >= to_h - 1e-9:
                break
        if not np.all(np.isfinite(x)) or not math.isfinite(t):
            return None
        return first.time_h, x
