"""Plant models the simulated PLC can serve, by name (``plant:`` in a simulation config).

``cho`` is the controller's own model. The others differ from it in
structure; they exist to validate the controller, the estimator and the
calibration on plants their model has never seen, and nothing outside the
simulator imports them (an import-linter contract). Their equations and
sources are in ``docs/plants.md``.
"""

from __future__ import annotations

from collections.abc import Callable

from plant_models.cho import CultureModel
from plant_models.parameters import CultureParameters
from simulator.plants.amino_acid import AminoAcidPlant
from simulator.plants.apoptosis import ApoptosisPlant
from simulator.plants.base import OBSERVABLE_INDEX, OBSERVABLES, EquationPlant
from simulator.plants.biovolume import BiovolumePlant
from simulator.plants.cell_cycle import CellCyclePlant
from simulator.plants.cho import ChoPlant
from simulator.plants.clonal import ClonalPlant
from simulator.plants.inhibitor import InhibitorPlant
from simulator.plants.oxygen import OxygenPlant
from simulator.plants.pco2 import Pco2Plant

PlantFactory = Callable[[CultureParameters, CultureModel | None], EquationPlant]


def _cho(kinetics: CultureParameters, model: CultureModel | None) -> EquationPlant:
    return ChoPlant(kinetics, model)


def _amino_acid(kinetics: CultureParameters, model: CultureModel | None) -> EquationPlant:
    return AminoAcidPlant()


def _cell_cycle(kinetics: CultureParameters, model: CultureModel | None) -> EquationPlant:
    return CellCyclePlant()


def _biovolume(kinetics: CultureParameters, model: CultureModel | None) -> EquationPlant:
    return BiovolumePlant()


def _inhibitor(kinetics: CultureParameters, model: CultureModel | None) -> EquationPlant:
    return InhibitorPlant()


def _apoptosis(kinetics: CultureParameters, model: CultureModel | None) -> EquationPlant:
    return ApoptosisPlant()


def _pco2(kinetics: CultureParameters, model: CultureModel | None) -> EquationPlant:
    return Pco2Plant()


def _clonal(kinetics: CultureParameters, model: CultureModel | None) -> EquationPlant:
    return ClonalPlant()


def _oxygen(kinetics: CultureParameters, model: CultureModel | None) -> EquationPlant:
    return OxygenPlant()


PLANTS: dict[str, PlantFactory] = {
    "cho": _cho,
    "amino_acid": _amino_acid,
    "cell_cycle": _cell_cycle,
    "biovolume": _biovolume,
    "inhibitor": _inhibitor,
    "apoptosis": _apoptosis,
    "pco2": _pco2,
    "clonal": _clonal,
    "oxygen": _oxygen,
}
"""Plant name → factory(the simulation's CHO kinetics, a CHO model to reuse). Plants of other structure ignore both."""


def make_plant(name: str, kinetics: CultureParameters, model: CultureModel | None = None) -> EquationPlant:
    try:
        factory = PLANTS[name]
    except KeyError:
        raise KeyError(f"unknown plant {name!r}; expected one of {', '.join(sorted(PLANTS))}") from None
    return factory(kinetics, model)


__all__ = ["OBSERVABLES", "OBSERVABLE_INDEX", "PLANTS", "EquationPlant", "make_plant"]
