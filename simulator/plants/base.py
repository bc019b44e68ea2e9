"""What the simulated PLC needs from a plant: its own states, integrated, and the quantities a plant shows.

The simulated PLC, the lab and the KPIs never look at a plant's states. They
read its *observables*: the quantities a probe, an assay or a harvest record
measures (:data:`OBSERVABLES`). Each plant model maps its own state vector to
them. So plants that differ in structure (more nutrients, metabolic phases,
product degradation, another probe physics) are served by the same PLC, lab
and KPI code, and the controller sees only what it would see on a real plant.

A plant model is a CasADi function of ``(t, x, u, p)`` like the controller's
model, with the same three inputs (nutrient feed L/h, glucose feed L/h,
temperature setpoint °C). :class:`EquationPlant` builds the functions from one
``equations`` method; :mod:`simulator.plants` lists the plants by name.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping
from functools import cached_property
from typing import Any, ClassVar, Generic, TypeVar

import casadi as ca
import numpy as np

from controller.config import BatchConfig
from plant_models.cho import INPUTS, Signal, rk4
from plant_models.config_loading import FrozenConfig
from plant_models.parameters import PARAMETER_NAMES, MediaComposition, flat_values

OBSERVABLES: tuple[Signal, ...] = (
    Signal("viable_cells", "1e6 cells/mL", "viable cell density (what the lab's cell counter reports)"),
    Signal("viability", "%", "viable fraction of all cells"),
    Signal("glucose", "g/L", "glucose"),
    Signal("glutamine", "mM", "glutamine"),
    Signal("lactate", "g/L", "lactate"),
    Signal("ammonia", "mM", "ammonia"),
    Signal("titer", "g/L", "product (antibody) concentration, as the titer assay reports it"),
    Signal("galactosylated_fraction", "-", "quality attribute: galactosylated fraction of the product"),
    Signal("osmolality", "mOsm/kg", "culture osmolality"),
    Signal("volume", "L", "working volume"),
    Signal("temperature", "degC", "culture temperature"),
    Signal("base_added", "L", "base added for pH control since inoculation"),
    Signal("our", "mmol/L/h", "oxygen uptake rate (off-gas)"),
    Signal("cer", "mmol/L/h", "CO2 evolution rate (off-gas)"),
    Signal("capacitance", "pF/cm", "permittivity probe reading"),
)
"""What a plant shows the PLC, the lab and the KPIs, in this order."""

OBSERVABLE_INDEX: dict[str, int] = {signal.name: i for i, signal in enumerate(OBSERVABLES)}

MEDIA_PARAMETER_NAMES: tuple[str, ...] = tuple(name for name in PARAMETER_NAMES if name.startswith("media."))
"""The batch's media as plant parameters, named as the CHO plant names them (``media.nutrient_feed_strength``)."""


def media_vector(media: MediaComposition) -> list[float]:
    """The batch's media in :data:`MEDIA_PARAMETER_NAMES` order."""
    return [value for _, value in flat_values(media)]


def q10_factor(q10: Any, temperature: Any, reference: Any) -> Any:
    """Rate ratio at ``temperature`` relative to ``reference`` for a Q10 coefficient."""
    return q10 ** ((temperature - reference) / 10.0)


class EquationPlant(ABC):
    """A plant model written as one ``equations(t, x, u, p)`` method; the CasADi functions are built from it.

    Subclasses set :attr:`name`, :attr:`states`, :attr:`parameter_names` and
    :attr:`feed_strength_parameter`, and implement :meth:`equations`,
    :meth:`initial_state` and :meth:`nominal_parameters`. A state called
    ``volume`` is required (offline samples remove culture from it).
    """

    name: str
    """Registry name (``simulation.plant`` in a simulation config)."""
    description: str = ""
    states: tuple[Signal, ...]
    parameter_names: tuple[str, ...]
    feed_strength_parameter: str
    """The parameter a feed-lot fault multiplies (the nutrient feed's concentration relative to specification)."""
    inputs: tuple[Signal, ...] = INPUTS

    @abstractmethod
    def equations(self, t: Any, x: Any, u: Any, p: Any) -> tuple[list[Any], Mapping[str, Any]]:
        """State derivatives (in :attr:`states` order) and every observable by name."""

    @abstractmethod
    def initial_state(self, batch: BatchConfig) -> np.ndarray:
        """The state at inoculation, from the batch's inoculation record."""

    @abstractmethod
    def nominal_parameters(self, batch: BatchConfig) -> np.ndarray:
        """The plant's own parameter vector (in :attr:`parameter_names` order), with the batch's media."""

    @property
    def n_states(self) -> int:
        return len(self.states)

    @property
    def n_inputs(self) -> int:
        return len(self.inputs)

    @property
    def n_parameters(self) -> int:
        return len(self.parameter_names)

    @property
    def nonnegative_states(self) -> tuple[str, ...]:
        """States that must stay at or above zero (all but temperature)."""
        return tuple(s.name for s in self.states if s.name != "temperature")

    def true_parameters(self, batch: BatchConfig, factors: Mapping[str, float]) -> np.ndarray:
        """The nominal parameters with named entries multiplied by ``factors`` (a seeded batch's truth)."""
        vector = self.nominal_parameters(batch).copy()
        for name, factor in factors.items():
            vector[self.parameter_index(name)] *= factor
        return vector

    def state_index(self, name: str) -> int:
        for i, signal in enumerate(self.states):
            if signal.name == name:
                return i
        raise KeyError(f"plant {self.name!r} has no state {name!r}; its states are {', '.join(s.name for s in self.states)}")

    def parameter_index(self, name: str) -> int:
        try:
            return self.parameter_names.index(name)
        except ValueError:
            raise KeyError(f"plant {self.name!r} has no parameter {name!r}; its parameters are {', '.join(self.parameter_names)}") from None

    @cached_property
    def _symbolic(self) -> tuple[ca.SX, ca.SX, ca.SX, ca.SX, ca.SX, ca.SX]:
        t = ca.SX.sym("t")
        x = ca.SX.sym("x", self.n_states)
        u = ca.SX.sym("u", self.n_inputs)
        p = ca.SX.sym("p", self.n_parameters)
        dx, observed = self.equations(t, x, u, p)
        if len(dx) != self.n_states:
            raise ValueError(f"plant {self.name!r}: equations gave {len(dx)} derivatives for {self.n_states} states")
        missing = [s.name for s in OBSERVABLES if s.name not in observed]
        if missing:
            raise ValueError(f"plant {self.name!r}: equations do not give the observables {missing}")
        y = ca.vertcat(*[observed[s.name] for s in OBSERVABLES])
        return t, x, u, p, ca.vertcat(*dx), y

    @cached_property
    def rhs(self) -> ca.Function:
        t, x, u, p, dx, _ = self._symbolic
        return ca.Function(f"{self.name}_rhs", [t, x, u, p], [dx], ["t", "x", "u", "p"], ["dx"])

    @cached_property
    def observables(self) -> ca.Function:
        t, x, u, p, _, y = self._symbolic
        return ca.Function(f"{self.name}_observables", [t, x, u, p], [y], ["t", "x", "u", "p"], ["y"])

    def rk4_step(self, dt_h: float, substeps: int = 1) -> ca.Function:
        """A fixed-step RK4 map ``(t, x, u, p) -> (t + dt, x_next)`` with inputs held constant."""
        t, x, u, p = ca.SX.sym("t"), ca.SX.sym("x", self.n_states), ca.SX.sym("u", self.n_inputs), ca.SX.sym("p", self.n_parameters)
        tk, xk = rk4(self.rhs, t, x, u, p, dt_h, substeps)
        return ca.Function(f"{self.name}_rk4", [t, x, u, p], [tk, xk], ["t", "x", "u", "p"], ["t_next", "x_next"])


KineticsT = TypeVar("KineticsT", bound=FrozenConfig)


class KineticsPlant(EquationPlant, Generic[KineticsT]):
    """A plant whose parameters are one frozen kinetics model (dotted names, in field order) followed by the batch's media.

    Subclasses set :attr:`kinetics_type`; the parameter names, the constructor
    and the nominal parameter vector follow from it. :meth:`inoculated_state`
    fills the states every such plant shares from the inoculation record.
    """

    kinetics_type: ClassVar[type[FrozenConfig]]
    feed_strength_parameter = "media.nutrient_feed_strength"

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        cls.parameter_names = tuple(name for name, _ in flat_values(cls.kinetics_type())) + MEDIA_PARAMETER_NAMES

    def __init__(self, kinetics: KineticsT | None = None) -> None:
        self.kinetics: KineticsT = kinetics if kinetics is not None else self.kinetics_type()  # type: ignore[assignment]

    def nominal_parameters(self, batch: BatchConfig) -> np.ndarray:
        return np.asarray([value for _, value in flat_values(self.kinetics)] + media_vector(batch.media), dtype=float)

    def inoculated_state(self, batch: BatchConfig) -> np.ndarray:
        """A state vector with the shared states set from the inoculation record (dead cells from the viability); the rest zero."""
        inoculum = batch.inoculation
        viable = inoculum.viable_cell_density_1e6_per_ml
        x = np.zeros(self.n_states)
        index = self.state_index
        x[index("dead_cells")] = viable * (100.0 - inoculum.viability_pct) / inoculum.viability_pct
        x[index("glucose")] = inoculum.glucose_g_per_l
        x[index("glutamine")] = inoculum.glutamine_mm
        x[index("lactate")] = inoculum.lactate_g_per_l
        x[index("ammonia")] = inoculum.ammonia_mm
        x[index("other_osmolytes")] = inoculum.other_osmolytes_mosm_per_kg
        x[index("titer")] = inoculum.titer_g_per_l
        x[index("volume")] = inoculum.volume_l
        x[index("temperature")] = inoculum.temperature_degc
        return x
