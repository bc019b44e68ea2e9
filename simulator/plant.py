"""The culture in the reactor: a plant model (:mod:`simulator.plants`) integrated with "true" parameters.

The plant lives on a 1-minute grid (the plant resolution). Inputs are held
constant between events, so each stretch between events is integrated in one
CasADi call (an RK4 step accumulated over the stretch) rather than minute by
minute from Python: a 15-day batch takes well under a second.
"""

from __future__ import annotations

from dataclasses import dataclass

import casadi as ca
import numpy as np

from plant_models.cho import Signal
from plant_models.errors import NonPhysicalStateError
from simulator.plants.base import OBSERVABLE_INDEX, EquationPlant

MINUTES_PER_HOUR = 60
NEGATIVE_TOLERANCE = 1e-6
"""A state below -tolerance is non-physical; above it, rounding of a depleted substrate."""


@dataclass(frozen=True)
class SampleRemoval:
    """Culture taken out of the reactor (an offline sample)."""

    minute: int
    volume_l: float
    state: np.ndarray


@dataclass(frozen=True)
class PlantTrajectory:
    """True states and observables on the plant grid. Row i holds the state at ``time_h[i]`` and the input applied up to it.

    ``states`` are the plant model's own (described by ``state_signals``);
    ``observables`` are what every plant shows (:data:`~simulator.plants.base.OBSERVABLES`).
    """

    time_h: np.ndarray
    states: np.ndarray
    inputs: np.ndarray
    observables: np.ndarray
    removals: tuple[SampleRemoval, ...]
    state_signals: tuple[Signal, ...]

    def state(self, name: str) -> np.ndarray:
        names = [signal.name for signal in self.state_signals]
        if name not in names:
            raise KeyError(f"the plant has no state {name!r}; its states are {', '.join(names)}")
        return self.states[:, names.index(name)]

    def observable(self, name: str) -> np.ndarray:
        return self.observables[:, OBSERVABLE_INDEX[name]]


class Plant:
    """Integrates a plant model forward on the minute grid and records what happened."""

    def __init__(self, model: EquationPlant, initial_state: np.ndarray, parameters: np.ndarray) -> None:
        if initial_state.shape != (model.n_states,):
            raise ValueError(f"initial state must have {model.n_states} entries, got shape {initial_state.shape}")
        self._model = model
        self._volume_index = model.state_index("volume")
        self._nonnegative = [model.state_index(name) for name in model.nonnegative_states]
        self._step = model.rk4_step(1.0 / MINUTES_PER_HOUR)
        self._accumulators: dict[int, ca.Function] = {}
        self._parameters = np.asarray(parameters, dtype=float).copy()
        self.minute = 0
        self.state = np.asarray(initial_state, dtype=float).copy()
        self._check_physical(self.state[None, :], first_minute=0)
        self.feed_total_l = 0.0
        self.glucose_feed_total_l = 0.0
        self._minutes: list[np.ndarray] = [np.array([0])]
        self._states: list[np.ndarray] = [self.state[None, :].copy()]
        self._inputs: list[np.ndarray] = [np.zeros((1, model.n_inputs))]
        self._removals: list[SampleRemoval] = []

    @property
    def process_time_h(self) -> float:
        return self.minute / MINUTES_PER_HOUR

    @property
    def model(self) -> EquationPlant:
        return self._model

    @property
    def volume_l(self) -> float:
        return float(self.state[self._volume_index])

    def observables_now(self, inputs: np.ndarray) -> dict[str, float]:
        """What the plant shows now (VCD, titer, OUR, capacitance, …), by observable name."""
        values = np.asarray(self._model.observables(self.process_time_h, self.state, inputs, self._parameters)).ravel()
        return {name: float(values[i]) for name, i in OBSERVABLE_INDEX.items()}

    @property
    def parameters(self) -> np.ndarray:
        return self._parameters.copy()

    def set_parameters(self, parameters: np.ndarray) -> None:
        """Change the true parameters from now on (a new feed lot, for example)."""
        self._parameters = np.asarray(parameters, dtype=float).copy()

    def _accumulator(self, n_minutes: int) -> ca.Function:
        function = self._accumulators.get(n_minutes)
        if function is None:
            t, x, u, p = ca.MX.sym("t"), ca.MX.sym("x", self._model.n_states), ca.MX.sym("u", self._model.n_inputs), ca.MX.sym("p", self._model.n_parameters)
            step = ca.Function("step", [ca.vertcat(t, x), u, p], [ca.vertcat(*self._step(t, x, u, p))])
            accumulated = step.mapaccum("plant_stretch", n_minutes, [0], [0])
            function = accumulated
            self._accumulators[n_minutes] = function
        return function

    def integrate(self, n_minutes: int, inputs: np.ndarray) -> None:
        """Advance ``n_minutes`` with the inputs (feed L/h, glucose L/h, temperature setpoint °C) held."""
        if n_minutes <= 0:
            return
        inputs = np.asarray(inputs, dtype=float)
        if inputs.shape != (self._model.n_inputs,) or not np.all(np.isfinite(inputs)):
            raise ValueError(f"plant inputs must be {self._model.n_inputs} finite numbers, got {inputs!r}")
        augmented = np.concatenate([[self.process_time_h], self.state])
        trajectory = np.asarray(self._accumulator(n_minutes)(augmented, np.tile(inputs[:, None], (1, n_minutes)), np.tile(self._parameters[:, None], (1, n_minutes))))
        states = trajectory[1:, :].T
        self._check_physical(states, first_minute=self.minute + 1)
        self.feed_total_l += inputs[0] * n_minutes / MINUTES_PER_HOUR
        self.glucose_feed_total_l += inputs[1] * n_minutes / MINUTES_PER_HOUR
        self._minutes.append(np.arange(self.minute + 1, self.minute + n_minutes + 1))
        self._states.append(states)
        self._inputs.append(np.tile(inputs, (n_minutes, 1)))
        self.minute += n_minutes
        self.state = states[-1].copy()

    def remove_sample(self, volume_l: float) -> SampleRemoval:
        """Take culture out: volume falls, concentrations stay."""
        volume_index = self._volume_index
        if not 0.0 <= volume_l < self.state[volume_index]:
            raise ValueError(f"cannot remove {volume_l} L from {self.state[volume_index]:.3f} L")
        removal = SampleRemoval(minute=self.minute, volume_l=volume_l, state=self.state.copy())
        self.state[volume_index] -= volume_l
        self._removals.append(removal)
        self._states[-1][-1, volume_index] = self.state[volume_index]
        return removal

    def _check_physical(self, states: np.ndarray, *, first_minute: int) -> None:
        finite = np.isfinite(states)
        if not finite.all():
            row, column = np.argwhere(~finite)[0]
            self._raise(first_minute + row, column, states[row, column], "is not finite (integration failed)")
        for column in self._nonnegative:
            negative = np.flatnonzero(states[:, column] < -NEGATIVE_TOLERANCE)
            if negative.size:
                row = negative[0]
                self._raise(first_minute + row, column, states[row, column], "fell below zero")

    def _raise(self, minute: int, column: int, value: float, what: str) -> None:
        signal = self._model.states[column]
        time_h = minute / MINUTES_PER_HOUR
        raise NonPhysicalStateError(
            f"simulation went non-physical at process time {time_h:.2f} h: state '{signal.name}' = {value:.6g} {signal.unit} {what}; check the parameters and inputs",
            process_time_h=time_h,
            state=signal.name,
            value=float(value),
        )

    def trajectory(self) -> PlantTrajectory:
        minutes = np.concatenate(self._minutes)
        states = np.concatenate(self._states)
        inputs = np.concatenate(self._inputs)
        inputs[0] = inputs[1] if len(inputs) > 1 else inputs[0]
        time_h = minutes / MINUTES_PER_HOUR
        n = minutes.size
        # Observables do not depend on the feed strength, the only parameter that changes mid-batch.
        observables = np.asarray(self._model.observables.map(n)(time_h[None, :], states.T, inputs.T, np.tile(self._parameters[:, None], (1, n)))).T
        return PlantTrajectory(
            time_h=time_h,
            states=states,
            inputs=inputs,
            observables=observables,
            removals=tuple(self._removals),
            state_signals=self._model.states,
        )
