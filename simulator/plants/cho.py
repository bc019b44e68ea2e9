"""The controller's own CHO model as a plant: the simulator's default, and the only plant whose truth the NMPC's oracle can use."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from controller.config import BatchConfig
from plant_models.cho import OUTPUT_INDEX, STATE_INDEX, STATES, CultureModel
from plant_models.parameters import PARAMETER_NAMES, CultureParameters, parameter_vector, scaled_parameters
from simulator.plants.base import EquationPlant

_STATE_OBSERVABLES = ("viable_cells", "glucose", "glutamine", "lactate", "ammonia", "titer", "volume", "temperature", "base_added")
_OUTPUT_OBSERVABLES = ("viability", "galactosylated_fraction", "osmolality", "our", "cer", "capacitance")


class ChoPlant(EquationPlant):
    """``plant_models.cho`` integrated with "true" parameters: the same structure as the controller's model.

    Its parameter names are the model's without the ``culture.`` prefix
    (``growth.mu_max_per_h``, ``media.nutrient_feed_strength``), as the
    simulation configs have always written them.
    """

    name = "cho"
    description = "the controller's own CHO model (plant_models.cho) with the simulation's true parameters"
    states = STATES
    parameter_names = tuple(name.removeprefix("culture.") for name in PARAMETER_NAMES)
    feed_strength_parameter = "media.nutrient_feed_strength"

    def __init__(self, kinetics: CultureParameters, model: CultureModel | None = None) -> None:
        self.kinetics = kinetics
        self.culture_model = model or CultureModel()

    def equations(self, t: Any, x: Any, u: Any, p: Any) -> tuple[list[Any], Mapping[str, Any]]:
        dx = self.culture_model.rhs(t, x, u, p)
        y = self.culture_model.outputs(t, x, u, p)
        observed = {name: x[STATE_INDEX[name]] for name in _STATE_OBSERVABLES}
        observed.update({name: y[OUTPUT_INDEX[name]] for name in _OUTPUT_OBSERVABLES})
        return [dx[i] for i in range(self.n_states)], observed

    def initial_state(self, batch: BatchConfig) -> np.ndarray:
        return batch.inoculation.initial_state()

    def nominal_parameters(self, batch: BatchConfig) -> np.ndarray:
        return parameter_vector(self.kinetics, batch.media)

    def true_parameters(self, batch: BatchConfig, factors: Mapping[str, float]) -> np.ndarray:
        """Culture factors go through the kinetics' validation again, so a perturbation cannot give an invalid set silently."""
        culture = {name: f for name, f in factors.items() if not name.startswith("media.")}
        vector = parameter_vector(scaled_parameters(self.kinetics, culture) if culture else self.kinetics, batch.media)
        for name, factor in factors.items():
            if name.startswith("media."):
                vector[self.parameter_index(name)] *= factor
        return vector
