"""The CHO culture model: pure CasADi/numpy/pydantic, importing nothing else of this project."""

from plant_models.cho import INPUTS, OUTPUTS, STATES, CultureModel, Signal
from plant_models.errors import BioreactorMPCError, ConfigError, NonPhysicalStateError
from plant_models.parameters import PARAMETER_NAMES, CultureParameters, MediaComposition, parameter_vector

__all__ = [
    "INPUTS",
    "OUTPUTS",
    "PARAMETER_NAMES",
    "STATES",
    "BioreactorMPCError",
    "ConfigError",
    "CultureModel",
    "CultureParameters",
    "MediaComposition",
    "NonPhysicalStateError",
    "Signal",
    "parameter_vector",
]
