"""The plants of other structure (simulator.plants): observables, balances, a physical recipe-like batch, and how each differs from the CHO model.

The recipe-like runs here are a hand-written approximation of the platform
recipe (nutrient feed at 3 % of the initial volume per day from 72 h, glucose
fed hourly towards 4 g/L, a shift at 120 h), integrated with 1-minute RK4
steps; the simulator's whole-batch runs live in hil_tests.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import TypeVar

import casadi as ca
import numpy as np
import pytest
from pydantic import BaseModel

from controller.config import BatchConfig
from plant_models.cho import LACTATE_G_PER_MOL, Signal
from plant_models.errors import ConfigError
from plant_models.parameters import CultureParameters
from simulator.plants import OBSERVABLES, PLANTS, EquationPlant, make_plant
from simulator.plants.amino_acid import AminoAcidPlant
from simulator.plants.apoptosis import ApoptosisPlant
from simulator.plants.biovolume import BiovolumeKinetics, BiovolumePlant
from simulator.plants.cell_cycle import CellCyclePlant
from simulator.plants.cho import ChoPlant
from simulator.plants.clonal import INTERNALS as CLONAL_INTERNALS
from simulator.plants.clonal import ClonalKinetics, ClonalPlant
from simulator.plants.inhibitor import InhibitorPlant
from simulator.plants.oxygen import INTERNALS as OXYGEN_INTERNALS
from simulator.plants.oxygen import OxygenKinetics, OxygenPlant
from simulator.plants.pco2 import INTERNALS as PCO2_INTERNALS
from simulator.plants.pco2 import Pco2Kinetics, Pco2Plant

REPO = Path(__file__).resolve().parent.parent
BATCH = BatchConfig.from_yaml(REPO / "configs" / "batch" / "platform.yaml")
NOMINAL = CultureParameters.from_yaml(REPO / "configs" / "model" / "cho_nominal.yaml")
OTHER_PLANTS = ("amino_acid", "cell_cycle", "biovolume", "inhibitor", "apoptosis", "pco2", "clonal", "oxygen")
PCO2_INTERNAL_INDEX = {signal.name: i for i, signal in enumerate(PCO2_INTERNALS)}


@cache
def plant_named(name: str) -> EquationPlant:
    return make_plant(name, NOMINAL)


def state_of(name: str, start: dict[str, float], values: dict[str, float]) -> np.ndarray:
    """The plant's initial state with ``start``, then ``values``, set by state name."""
    plant = plant_named(name)
    x = plant.initial_state(BATCH)
    for state, value in (start | values).items():
        x[plant.state_index(state)] = value
    return x


KineticsT = TypeVar("KineticsT", bound=BaseModel)


def kinetics_with(nominal: KineticsT, changes: dict[str, dict[str, float]]) -> KineticsT:
    """``nominal`` with fields of its groups changed: ``{"death": {"bubble_per_h": 0.0}}``."""
    return nominal.model_copy(update={group: getattr(nominal, group).model_copy(update=fields) for group, fields in changes.items()})


def internals_of(plant: ClonalPlant | OxygenPlant | Pco2Plant, signals: tuple[Signal, ...], x: np.ndarray, u: np.ndarray, p: np.ndarray | None) -> dict[str, float]:
    """The plant's internal quantities at ``x`` and ``u`` by name (its nominal parameters unless ``p``)."""
    y = np.asarray(plant.internals(0.0, x, u, plant.nominal_parameters(BATCH) if p is None else p)).ravel()
    return {signal.name: float(y[i]) for i, signal in enumerate(signals)}


@cache
def hour_map(name: str) -> ca.Function:
    """60 one-minute RK4 steps with the inputs held: one hour."""
    return plant_named(name).rk4_step(1.0 / 60.0).mapaccum("hour", 60, [0, 1], [0, 1])


def observe(plant: EquationPlant, t: float, x: np.ndarray, u: np.ndarray, p: np.ndarray) -> dict[str, float]:
    y = np.asarray(plant.observables(t, x, u, p)).ravel()
    return {signal.name: float(y[i]) for i, signal in enumerate(OBSERVABLES)}


def integrate(name: str, x: np.ndarray, u: np.ndarray, p: np.ndarray, hours: int, t0_h: float = 0.0) -> np.ndarray:
    step = hour_map(name)
    for h in range(hours):
        _, xs = step(t0_h + h, x, u, p)
        x = np.asarray(xs)[:, -1]
    return x


@dataclass(frozen=True)
class Run:
    time_h: np.ndarray
    states: np.ndarray  # one row per hour
    observed: dict[str, np.ndarray]
    lowest_nonnegative_state: float


@cache
def recipe_like_run(name: str, shift_to_degc: float = 33.0, feed_fraction_per_day: float = 0.03) -> Run:
    """14 days under an approximation of the platform recipe; the glucose feed replaces, each hour, what was consumed in the last hour plus a 24 h correction towards 4 g/L.

    ``feed_fraction_per_day``: the nutrient feed per day as a fraction of the initial volume (the recipe's 3 %).
    """
    plant = plant_named(name)
    p = plant.nominal_parameters(BATCH)
    x = plant.initial_state(BATCH)
    media = BATCH.media
    step = hour_map(name)
    nonnegative = [plant.state_index(n) for n in plant.nonnegative_states]
    lowest = float(np.min(x[nonnegative]))
    times, states, rows = [], [], []
    glucose_feed_lph = 0.0
    glucose_before, glucose_in_g = None, 0.0
    for h in range(336):
        feed_lph = feed_fraction_per_day * BATCH.inoculation.volume_l / 24.0 if h >= 72 else 0.0
        setpoint = BATCH.inoculation.temperature_degc if h < 120 else shift_to_degc
        now = observe(plant, float(h), x, np.array([feed_lph, glucose_feed_lph, setpoint]), p)
        if glucose_before is not None:
            consumed_g = (glucose_before - now["glucose"]) * now["volume"] + glucose_in_g
            wanted_g = consumed_g + (4.0 - now["glucose"]) * now["volume"] / 24.0 - feed_lph * media.nutrient_feed_glucose_g_per_l
            glucose_feed_lph = min(max(wanted_g / media.glucose_feed_g_per_l, 0.0), 2.0)
        glucose_in_g = feed_lph * media.nutrient_feed_glucose_g_per_l + glucose_feed_lph * media.glucose_feed_g_per_l
        glucose_before = now["glucose"]
        u = np.array([feed_lph, glucose_feed_lph, setpoint])
        times.append(float(h))
        states.append(x)
        rows.append(observe(plant, float(h), x, u, p))
        _, xs = step(float(h), x, u, p)
        trajectory = np.asarray(xs)
        lowest = min(lowest, float(np.min(trajectory[nonnegative, :])))
        x = trajectory[:, -1]
    times.append(336.0)
    states.append(x)
    rows.append(observe(plant, 336.0, x, np.array([0.0, 0.0, shift_to_degc]), p))
    observed = {signal.name: np.array([row[signal.name] for row in rows]) for signal in OBSERVABLES}
    return Run(np.array(times), np.array(states), observed, lowest)


def cell_free_state(plant: EquationPlant) -> np.ndarray:
    """The inoculation state with (almost) no cells: what remains is feeding, dilution and chemistry."""
    x = plant.initial_state(BATCH).copy()
    for name in ("viable_cells", "dead_cells", "cycling_cells", "arrested_cells", "viable_biovolume", "healthy_cells", "apoptotic_cells", "producer_cells", "nonproducer_cells"):
        if any(s.name == name for s in plant.states):
            x[plant.state_index(name)] *= 1e-9
    return x


# --- registry and observables -------------------------------------------------------------------


@pytest.mark.parametrize("name", OTHER_PLANTS)
def test_each_plant_is_registered_under_its_name_and_ignores_the_cho_kinetics(name: str) -> None:
    plant = make_plant(name, NOMINAL)
    assert plant.name == name
    assert name in PLANTS
    assert not isinstance(plant, ChoPlant)
    assert {"volume", "temperature"} <= {s.name for s in plant.states}
    assert plant.feed_strength_parameter in plant.parameter_names
    assert len(set(plant.parameter_names)) == plant.n_parameters


@pytest.mark.parametrize("name", OTHER_PLANTS)
def test_observables_at_inoculation_are_what_the_batch_record_says(name: str) -> None:
    plant = plant_named(name)
    inoculum = BATCH.inoculation
    x = plant.initial_state(BATCH)
    y = observe(plant, 0.0, x, np.array([0.0, 0.0, inoculum.temperature_degc]), plant.nominal_parameters(BATCH))
    assert set(y) == {s.name for s in OBSERVABLES}
    assert all(np.isfinite(v) for v in y.values())
    assert y["viable_cells"] == pytest.approx(inoculum.viable_cell_density_1e6_per_ml)
    assert y["viability"] == pytest.approx(inoculum.viability_pct)
    assert y["glucose"] == pytest.approx(inoculum.glucose_g_per_l)
    assert y["glutamine"] == pytest.approx(inoculum.glutamine_mm)
    assert y["osmolality"] == pytest.approx(inoculum.osmolality_mosm_per_kg)
    assert y["volume"] == pytest.approx(inoculum.volume_l)
    assert y["temperature"] == pytest.approx(inoculum.temperature_degc)
    assert y["titer"] == pytest.approx(inoculum.titer_g_per_l)
    assert y["base_added"] == 0.0
    assert y["our"] > 0.0 and y["cer"] > 0.0 and y["capacitance"] > 0.0


@pytest.mark.parametrize("name", OTHER_PLANTS)
def test_the_feeds_carry_what_the_batch_file_says(name: str) -> None:
    plant = plant_named(name)
    p = plant.nominal_parameters(BATCH)
    for field, value in BATCH.media.model_dump().items():
        assert p[plant.parameter_index(f"media.{field}")] == value


def test_amino_acid_plant_refuses_an_inoculation_whose_osmolality_cannot_hold_its_medium() -> None:
    inoculum = BATCH.inoculation.model_dump() | {"glucose_g_per_l": 30.0, "glutamine_mm": 30.0, "osmolality_mosm_per_kg": 200.0}
    batch = BatchConfig.model_validate(BATCH.model_dump() | {"inoculation": inoculum})
    with pytest.raises(ConfigError, match="osmolality_mosm_per_kg"):
        plant_named("amino_acid").initial_state(batch)


# --- balances -------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", OTHER_PLANTS)
def test_volume_rises_by_both_feeds_and_the_base(name: str) -> None:
    plant = plant_named(name)
    p = plant.nominal_parameters(BATCH)
    # From 60 h of an unfed batch: glucose is still above 3 g/L, so every plant is making lactate and the base pump runs
    # (by 96 h the unfed apoptosis plant has run out of glucose and turned to consuming lactate).
    start_h = 60
    x0 = integrate(name, plant.initial_state(BATCH), np.array([0.0, 0.0, 36.5]), p, hours=start_h)
    feed_lph, glucose_lph = 2.0, 0.3
    x1 = integrate(name, x0, np.array([feed_lph, glucose_lph, 36.5]), p, hours=24, t0_h=float(start_h))
    before, after = observe(plant, float(start_h), x0, np.zeros(3), p), observe(plant, start_h + 24.0, x1, np.zeros(3), p)
    base_l = after["base_added"] - before["base_added"]
    assert base_l > 0.05
    assert after["volume"] - before["volume"] == pytest.approx((feed_lph + glucose_lph) * 24.0 + base_l, rel=1e-9)


@pytest.mark.parametrize("name", OTHER_PLANTS)
def test_without_cells_glucose_and_osmoles_are_what_was_there_plus_what_was_fed(name: str) -> None:
    """A different glucose feed and a weak feed lot in the batch file reach the culture; osmoles survive glutamine's cyclisation (one for one)."""
    plant = plant_named(name)
    media = BATCH.media.model_copy(update={"glucose_feed_g_per_l": 300.0, "nutrient_feed_strength": 0.8})
    batch = BATCH.model_copy(update={"media": media})
    p = plant.nominal_parameters(batch)
    x0 = cell_free_state(plant)
    feed_lph, glucose_lph, hours = 3.0, 0.5, 48
    x1 = integrate(name, x0, np.array([feed_lph, glucose_lph, 36.5]), p, hours=hours)
    before, after = observe(plant, 0.0, x0, np.zeros(3), p), observe(plant, float(hours), x1, np.zeros(3), p)
    feed_l, glucose_feed_l = feed_lph * hours, glucose_lph * hours
    glucose_fed_g = feed_l * 0.8 * media.nutrient_feed_glucose_g_per_l + glucose_feed_l * 300.0
    assert after["glucose"] * after["volume"] == pytest.approx(before["glucose"] * before["volume"] + glucose_fed_g, rel=1e-6)
    extra_feed_osmoles_mm = sum(p[plant.parameter_index(n)] for n in ("medium.feed_asparagine_mm", "medium.feed_glutamate_mm") if n in plant.parameter_names)
    feed_osmolality = 0.8 * (
        media.nutrient_feed_glucose_g_per_l * 1000.0 / 180.156 + media.nutrient_feed_glutamine_mm + media.nutrient_feed_other_osmolytes_mosm_per_kg + extra_feed_osmoles_mm
    )
    glucose_feed_osmolality = 300.0 * 1000.0 / 180.156
    # The smoothed pump idles at a trickle. A plant that tracks bicarbonate keeps the base's anion too: with no acid to take it, it stays.
    anion_osmoles_per_mol = 1.0 if "bicarbonate" in {s.name for s in plant.states} else 0.0
    base_osmoles = (after["base_added"] - before["base_added"]) * media.base_mol_per_l * (media.base_osmoles_per_mol + anion_osmoles_per_mol) * 1000.0
    expected_osmoles = before["osmolality"] * before["volume"] + feed_l * feed_osmolality + glucose_feed_l * glucose_feed_osmolality + base_osmoles
    assert after["osmolality"] * after["volume"] == pytest.approx(expected_osmoles, rel=1e-6)


def test_clipping_moves_product_from_intact_to_clipped_without_losing_any() -> None:
    plant = plant_named("biovolume")
    p = plant.nominal_parameters(BATCH)
    x0 = cell_free_state(plant)
    x0[plant.state_index("titer")] = 2.0
    x0[plant.state_index("galactosylated_titer")] = 1.2
    x0[plant.state_index("enzyme_activity")] = 20.0
    x1 = integrate("biovolume", x0, np.array([1.0, 0.0, 36.5]), p, hours=48)
    mass_g = [x[plant.state_index("volume")] * (x[plant.state_index("titer")] + x[plant.state_index("clipped_product")]) for x in (x0, x1)]
    assert x1[plant.state_index("titer")] * x1[plant.state_index("volume")] < 0.95 * 2.0 * x0[plant.state_index("volume")]
    assert mass_g[1] == pytest.approx(mass_g[0], rel=1e-9)
    assert x1[plant.state_index("galactosylated_titer")] / x1[plant.state_index("titer")] < 1.2 / 2.0


# --- a recipe-like batch ------------------------------------------------------------------------------


@pytest.mark.parametrize("name", OTHER_PLANTS)
def test_a_recipe_like_batch_stays_physical_and_plausible(name: str) -> None:
    run = recipe_like_run(name)
    y = run.observed
    assert run.lowest_nonnegative_state > -1e-6
    assert np.all(np.isfinite(run.states))
    assert 10.0 <= y["viable_cells"].max() <= 30.0
    assert 2.0 <= y["titer"][-1] <= 7.0
    assert y["titer"][-1] == pytest.approx(y["titer"].max(), rel=0.05)  # no collapse before harvest
    assert 60.0 <= y["viability"][-1] <= 95.0
    assert y["viability"][-1] < y["viability"].max() - 5.0  # viability declines late
    assert y["glucose"][run.time_h >= 24].min() > 0.5
    assert y["osmolality"].max() < 480.0
    assert y["volume"][-1] <= BATCH.equipment.max_working_volume_l
    assert y["temperature"][-1] == pytest.approx(33.0, abs=0.01)
    assert 0.3 < y["galactosylated_fraction"][-1] < 0.8


# --- structure that differs from the CHO model ------------------------------------------------------


def titer_after_shift(name: str, shift_to_degc: float) -> float:
    return float(recipe_like_run(name, shift_to_degc).observed["titer"][-1])


def test_the_cho_model_gains_titer_from_every_degree_colder() -> None:
    """The reference the other plants contradict: the controller's model rewards a colder shift."""
    titers = [titer_after_shift("cho", t) for t in (36.5, 34.5, 33.0, 31.0)]
    assert titers == sorted(titers)
    assert titers[2] > 1.3 * titers[0]


def test_amino_acid_plant_loses_titer_when_shifted_cold() -> None:
    titers = [titer_after_shift("amino_acid", t) for t in (36.5, 34.5, 33.0, 31.0)]
    assert titers == sorted(titers, reverse=True)
    assert titers[2] < 0.9 * titers[0]


def test_amino_acid_plant_consumes_ammonia_by_glutamine_synthetase_once_glutamine_is_gone() -> None:
    """The CHO model never consumes ammonia; here growing cells without glutamine fix it onto glutamate."""
    plant = plant_named("amino_acid")
    p = plant.nominal_parameters(BATCH)
    x = plant.initial_state(BATCH)
    for name, value in (("viable_cells", 8.0), ("glutamine", 0.0), ("glutamate", 3.0), ("ammonia", 5.0), ("asparagine", 3.0), ("glucose", 4.0)):
        x[plant.state_index(name)] = value
    dx = np.asarray(plant.rhs(100.0, x, [0.0, 0.0, 36.5], p)).ravel()
    assert dx[plant.state_index("ammonia")] < -0.01
    x[plant.state_index("glutamine")] = 4.0
    dx = np.asarray(plant.rhs(100.0, x, [0.0, 0.0, 36.5], p)).ravel()
    assert dx[plant.state_index("ammonia")] > 0.0


def test_amino_acid_plant_consumes_lactate_at_the_glucose_target_once_growth_has_slowed() -> None:
    run = recipe_like_run("amino_acid")
    lactate = run.observed["lactate"]
    assert lactate[-1] < 0.3 * lactate.max()
    assert run.observed["glucose"][-1] > 3.0
    assert run.states[-1, plant_named("amino_acid").state_index("metabolic_phase")] > 0.8


def test_cell_cycle_plant_makes_most_at_an_intermediate_shift_temperature() -> None:
    titers = {t: titer_after_shift("cell_cycle", t) for t in (36.5, 34.5, 33.0, 31.0)}
    assert titers[34.5] > 1.1 * titers[33.0]
    assert titers[34.5] > 1.1 * titers[36.5]
    assert titers[31.0] < 0.8 * titers[33.0]


def test_cell_cycle_plant_stops_dividing_within_days_of_a_cold_shift() -> None:
    plant = plant_named("cell_cycle")
    run = recipe_like_run("cell_cycle")
    cycling = run.states[:, plant.state_index("cycling_cells")]
    arrested = run.states[:, plant.state_index("arrested_cells")]
    at_shift, three_days_later = 120, 192
    assert cycling[at_shift] / (cycling[at_shift] + arrested[at_shift]) > 0.6
    assert cycling[three_days_later] / (cycling[three_days_later] + arrested[three_days_later]) < 0.25


def test_cell_cycle_plant_productivity_follows_temperature_with_a_lag() -> None:
    plant = plant_named("cell_cycle")
    run = recipe_like_run("cell_cycle", shift_to_degc=34.5)
    capacity = run.states[:, plant.state_index("secretory_capacity")]
    target = capacity[-1]
    assert target > 1.2
    assert capacity[126] - 1.0 < 0.25 * (target - 1.0)  # six hours after the setpoint change: mostly not there
    assert capacity[120 + 96] - 1.0 > 0.8 * (target - 1.0)  # four days on: mostly there


def test_biovolume_plant_capacitance_per_viable_cell_rises_while_the_cho_model_keeps_it_constant() -> None:
    for name, low, high in (("cho", 0.999, 1.001), ("biovolume", 1.6, 3.0)):
        y = recipe_like_run(name).observed
        per_cell = y["capacitance"] / y["viable_cells"]
        assert low <= per_cell[-1] / per_cell[0] <= high, name


def test_biovolume_plant_cells_grow_larger_when_they_stop_dividing() -> None:
    plant = plant_named("biovolume")
    growth = BiovolumeKinetics().growth

    def cell_volume_pl(run: Run) -> np.ndarray:
        return run.states[:, plant.state_index("viable_biovolume")] / run.states[:, plant.state_index("viable_cells")]

    shifted, warm = cell_volume_pl(recipe_like_run("biovolume")), cell_volume_pl(recipe_like_run("biovolume", 36.5))
    assert shifted[48] == pytest.approx(growth.inoculum_cell_volume_pl, rel=0.03)  # balanced growth: size constant
    assert shifted[-1] > 1.5 * shifted[48]  # stationary phase and cold: larger
    assert shifted[192] > 1.1 * warm[192]  # the cold shift enlarges them sooner
    assert shifted.max() <= growth.max_cell_volume_pl


def test_biovolume_plant_loses_product_to_clipping_during_the_batch() -> None:
    plant = plant_named("biovolume")
    final = recipe_like_run("biovolume").states[-1]
    clipped, intact = final[plant.state_index("clipped_product")], final[plant.state_index("titer")]
    assert 0.02 < clipped / (clipped + intact) < 0.15


def test_inhibitor_plant_grows_less_when_fed_more_because_it_makes_more_inhibitor() -> None:
    """Twice the recipe's feed: more precursor amino acids, more of their catabolites, fewer cells; the CHO model grows more on it."""
    plant = plant_named("inhibitor")
    recipe, double = recipe_like_run("inhibitor"), recipe_like_run("inhibitor", feed_fraction_per_day=0.06)
    inhibitor, precursor = plant.state_index("inhibitor"), plant.state_index("precursor_amino_acids")
    day_8 = 192
    assert double.states[day_8, inhibitor] > 1.4 * recipe.states[day_8, inhibitor]
    assert double.states[72:, precursor].min() > recipe.states[72:, precursor].min()  # richer, not starved
    assert double.observed["viable_cells"].max() < 0.9 * recipe.observed["viable_cells"].max()
    assert double.observed["titer"][-1] < recipe.observed["titer"][-1]
    cho_recipe, cho_double = recipe_like_run("cho"), recipe_like_run("cho", feed_fraction_per_day=0.06)
    assert cho_double.observed["viable_cells"].max() >= cho_recipe.observed["viable_cells"].max()


def test_inhibitor_plant_makes_lactate_from_glycolysis_beyond_the_oxidative_capacity() -> None:
    """Growing cells make more lactate at more glucose while their oxygen uptake stays at the capacity; cells that stop growing consume lactate."""
    plant = plant_named("inhibitor")
    p = plant.nominal_parameters(BATCH)
    u = np.array([0.0, 0.0, 36.5])

    def rates(glucose_g_per_l: float, inhibitor_mm: float) -> tuple[float, float, float]:
        """Lactate change [g/(L·h)], glucose uptake [g/(L·h)] and OUR per cell at 5e6 cells/mL, amino acids and glutamine ample."""
        x = plant.initial_state(BATCH)
        for name, value in (("viable_cells", 5.0), ("glucose", glucose_g_per_l), ("glutamine", 4.0), ("precursor_amino_acids", 3.0), ("inhibitor", inhibitor_mm), ("lactate", 1.5)):
            x[plant.state_index(name)] = value
        dx = np.asarray(plant.rhs(100.0, x, u, p)).ravel()
        return float(dx[plant.state_index("lactate")]), float(-dx[plant.state_index("glucose")]), observe(plant, 100.0, x, u, p)["our"] / 5.0

    lactate_3, glucose_3, our_3 = rates(3.0, inhibitor_mm=0.0)
    lactate_6, glucose_6, our_6 = rates(6.0, inhibitor_mm=0.0)
    assert lactate_6 > 1.3 * lactate_3 > 0.0
    assert glucose_6 > 1.15 * glucose_3
    assert our_6 == pytest.approx(our_3, rel=0.01)
    lactate_arrested, _, _ = rates(4.0, inhibitor_mm=20.0)
    assert lactate_arrested < 0.0


def test_inhibitor_plant_productivity_falls_as_the_cells_age_where_the_cho_model_keeps_it() -> None:
    def specific_productivity(run: Run, hour: int) -> float:
        """Product made per viable cell around ``hour`` (from the product mass, so dilution does not count) [g/(1e9 cells·h)]."""
        y = run.observed
        mass_g = y["titer"] * y["volume"]
        return float((mass_g[hour + 12] - mass_g[hour - 12]) / 24.0 / (y["viable_cells"][hour] * y["volume"][hour]))

    day_7, day_13 = 168, 312  # both after the shift, at 33 °C and 4 g/L glucose
    run, cho = recipe_like_run("inhibitor"), recipe_like_run("cho")
    age = run.states[:, plant_named("inhibitor").state_index("mean_cell_age")]
    assert age[day_13] > 1.8 * age[day_7]
    assert specific_productivity(run, day_13) < 0.8 * specific_productivity(run, day_7)
    assert specific_productivity(cho, day_13) == pytest.approx(specific_productivity(cho, day_7), rel=0.02)


def test_inhibitor_plant_loses_titer_below_a_moderate_shift() -> None:
    """The productivity gain of cold saturates while growth falls towards the cardinal minimum: 31 °C makes less than 33 °C."""
    titers = {t: titer_after_shift("inhibitor", t) for t in (36.5, 33.0, 31.0)}
    assert titers[33.0] > 1.15 * titers[36.5]
    assert titers[31.0] < 0.9 * titers[33.0]


def apoptosis_state(**values: float) -> np.ndarray:
    """The apoptosis plant mid-growth (5e6 healthy cells/mL, glucose and glutamine ample, high-flux), with ``values`` set by state name."""
    start = {"healthy_cells": 5.0, "apoptotic_cells": 0.1, "dead_cells": 0.2, "glucose": 6.0, "glutamine": 4.0, "lactate": 1.5, "ammonia": 3.0}
    return state_of("apoptosis", start, values)


def test_apoptosis_plant_osmolality_raises_productivity_slows_growth_and_after_a_delay_drives_apoptosis() -> None:
    """120 mOsm/kg more (a hyperosmotic feed's worth): more product per cell, less of it galactosylated, slower division at once; apoptosis only once the signal has built up."""
    plant = plant_named("apoptosis")
    p = plant.nominal_parameters(BATCH)
    u = np.array([0.0, 0.0, 36.5])
    index = plant.state_index
    adapted = apoptosis_state()
    hyperosmotic = apoptosis_state(other_osmolytes=float(adapted[index("other_osmolytes")]) + 120.0)
    assert observe(plant, 0.0, hyperosmotic, u, p)["osmolality"] == pytest.approx(observe(plant, 0.0, adapted, u, p)["osmolality"] + 120.0)
    now = {name: np.asarray(plant.rhs(0.0, x, u, p)).ravel() for name, x in (("adapted", adapted), ("hyperosmotic", hyperosmotic))}
    assert now["hyperosmotic"][index("titer")] > 1.2 * now["adapted"][index("titer")]
    galactosylated_share = {name: dx[index("galactosylated_titer")] / dx[index("titer")] for name, dx in now.items()}
    assert galactosylated_share["hyperosmotic"] < galactosylated_share["adapted"] - 0.03
    assert now["hyperosmotic"][index("healthy_cells")] < 0.7 * now["adapted"][index("healthy_cells")]
    assert now["hyperosmotic"][index("apoptotic_cells")] == pytest.approx(
        now["adapted"][index("apoptotic_cells")], rel=0.01
    )  # same signal, no more apoptosis yet (the base dilutes a little differently)
    later = {name: integrate("apoptosis", x, u, p, hours=36) for name, x in (("adapted", adapted), ("hyperosmotic", hyperosmotic))}

    def apoptotic_fraction(x: np.ndarray) -> float:
        return float(x[index("apoptotic_cells")] / (x[index("healthy_cells")] + x[index("apoptotic_cells")]))

    assert apoptotic_fraction(later["hyperosmotic"]) > 3.0 * apoptotic_fraction(later["adapted"])
    assert later["hyperosmotic"][index("apoptotic_signal")] > 2.0 * later["adapted"][index("apoptotic_signal")]


def test_apoptosis_plant_viability_falls_days_after_starvation_where_the_cho_model_loses_it_within_hours() -> None:
    """Glucose gone at 10e6 cells/mL: early-apoptotic cells still count as viable, so the lab sees the loss a day or more later; the capacitance per viable cell falls first."""
    plant = plant_named("apoptosis")
    p = plant.nominal_parameters(BATCH)
    u = np.array([0.0, 0.0, 36.5])
    starved = apoptosis_state(healthy_cells=10.0, apoptotic_cells=0.2, dead_cells=0.3, glucose=0.02)
    y = {hours: observe(plant, float(hours), integrate("apoptosis", starved, u, p, hours=hours) if hours else starved, u, p) for hours in (0, 6, 24, 72)}
    assert y[0]["viability"] - y[6]["viability"] < 1.0
    assert y[0]["viability"] - y[72]["viability"] > 15.0
    capacitance_per_cell = {hours: v["capacitance"] / v["viable_cells"] for hours, v in y.items()}
    assert capacitance_per_cell[72] < 0.97 * capacitance_per_cell[0]
    cho = plant_named("cho")
    p_cho = cho.nominal_parameters(BATCH)
    x_cho = cho.initial_state(BATCH)
    for name, value in (("viable_cells", 10.0), ("dead_cells", 0.3), ("glucose", 0.02), ("glutamine", 4.0)):
        x_cho[cho.state_index(name)] = value
    cho_before, cho_after = observe(cho, 0.0, x_cho, u, p_cho), observe(cho, 6.0, integrate("cho", x_cho, u, p_cho, hours=6), u, p_cho)
    assert cho_before["viability"] - cho_after["viability"] > 10.0


def test_apoptosis_plant_lactate_switch_leaves_production_at_low_glucose_and_remembers_its_state() -> None:
    """Growing cells at low glucose leave the lactate-producing state; at the recipe's glucose both states hold themselves (the switch is bistable)."""
    plant = plant_named("apoptosis")
    p = plant.nominal_parameters(BATCH)
    u = np.array([0.0, 0.0, 36.5])
    index = plant.state_index

    def rates(glucose_g_per_l: float, high_flux_fraction: float) -> tuple[float, float]:
        """Change of the high-flux fraction [1/h] and of lactate [g/(L·h)]."""
        dx = np.asarray(plant.rhs(0.0, apoptosis_state(glucose=glucose_g_per_l, high_flux_fraction=high_flux_fraction), u, p)).ravel()
        return float(dx[index("high_flux_fraction")]), float(dx[index("lactate")])

    producing_at_low, _ = rates(0.5, 0.9)
    assert producing_at_low < -0.02  # low glucose: the producers leave within a day
    producing_at_target, producing_lactate = rates(4.0, 0.9)
    consuming_at_target, consuming_lactate = rates(4.0, 0.1)
    assert producing_at_target > 0.0 and producing_lactate > 0.01  # stays a producer
    assert consuming_at_target < 0.0 and consuming_lactate < -0.005  # stays a consumer at the same glucose
    run = recipe_like_run("apoptosis")
    lactate, high_flux = run.observed["lactate"], run.states[:, index("high_flux_fraction")]
    assert lactate[-1] < 0.1 * lactate.max()
    assert run.observed["glucose"][-72:].min() > 3.0 and high_flux[-72:].max() < 0.05  # glucose back at 4 g/L, production does not return


def test_apoptosis_plant_cold_shift_slows_division_only_as_the_cells_adapt_and_keeps_them_alive_longer() -> None:
    """The culture follows its setpoint within hours; division and apoptotic induction follow the adapted temperature, a day later; the shifted batch ends more viable."""
    plant = plant_named("apoptosis")
    p = plant.nominal_parameters(BATCH)
    index = plant.state_index
    start = apoptosis_state(glucose=9.0)

    def healthy_gain(setpoint_degc: float, hours: int) -> float:
        x = integrate("apoptosis", start, np.array([0.0, 0.0, setpoint_degc]), p, hours=hours)
        return float(x[index("healthy_cells")] / start[index("healthy_cells")])

    assert healthy_gain(33.0, 6) == pytest.approx(healthy_gain(36.5, 6), rel=0.01)
    assert healthy_gain(33.0, 48) < 0.9 * healthy_gain(36.5, 48)
    shifted, warm = recipe_like_run("apoptosis"), recipe_like_run("apoptosis", 36.5)
    temperature, adapted = shifted.observed["temperature"], shifted.states[:, index("adapted_temperature")]
    shift_h = 120
    assert temperature[shift_h + 8] < 33.1 and adapted[shift_h + 8] > 35.0
    assert adapted[shift_h + 72] < 33.2
    assert shifted.observed["viability"][-1] > warm.observed["viability"][-1] + 5.0


def pco2_state(**values: float) -> np.ndarray:
    """The pCO2 plant mid-growth (10e6 cells/mL, glucose and glutamine ample, bicarbonate plentiful so the base pump rests), with ``values`` set by state name."""
    start = {"viable_cells": 10.0, "dead_cells": 0.5, "glucose": 4.0, "glutamine": 4.0, "lactate": 1.5, "ammonia": 3.0, "bicarbonate": 40.0, "sensed_pco2": 40.0, "volume": 1500.0}
    return state_of("pco2", start, values)


def pco2_internals(x: np.ndarray, u: np.ndarray) -> dict[str, float]:
    plant = plant_named("pco2")
    assert isinstance(plant, Pco2Plant)
    return internals_of(plant, PCO2_INTERNALS, x, u, None)


def test_pco2_plant_dissolved_co2_rises_with_cell_density_and_with_the_fill_volume() -> None:
    """Respiration makes the CO2; stripping at a fixed gas flow and liquid surface weakens as the working volume rises, so the same cells hold more CO2 in a fuller vessel."""
    u = np.array([0.0, 0.0, 36.5])
    gas_mmhg = Pco2Kinetics().stripping.gas_pco2_mmhg
    pco2 = {(cells, volume): pco2_internals(pco2_state(viable_cells=cells, volume=volume), u)["pco2"] for cells in (5.0, 15.0) for volume in (1400.0, 2000.0)}
    assert pco2[(5.0, 1400.0)] > gas_mmhg
    assert pco2[(15.0, 1400.0)] - gas_mmhg == pytest.approx(3.0 * (pco2[(5.0, 1400.0)] - gas_mmhg), rel=0.02)  # in proportion to the cells
    assert pco2[(15.0, 2000.0)] - gas_mmhg > 1.3 * (pco2[(15.0, 1400.0)] - gas_mmhg)
    assert 100.0 < pco2[(15.0, 2000.0)] < 250.0  # the range reported for production reactors
    run = recipe_like_run("pco2")
    plant = plant_named("pco2")
    p = plant.nominal_parameters(BATCH)
    assert isinstance(plant, Pco2Plant)
    stripping = np.array([float(np.asarray(plant.internals(0.0, x, np.zeros(3), p))[PCO2_INTERNAL_INDEX["stripping_coefficient"], 0]) for x in run.states])
    assert stripping[-1] < 0.8 * stripping[0]  # the reactor filled from 1400 L


def test_pco2_plant_base_answers_co2_as_well_as_lactic_acid_and_each_mol_adds_sodium_and_bicarbonate() -> None:
    """Cell-free, bicarbonate below what pH 6.95 needs at the gas's pCO2: the pump adds sodium bicarbonate until pH is back, two osmoles per mol (Na+ and HCO3-, no acid to take it)."""
    plant = plant_named("pco2")
    p = plant.nominal_parameters(BATCH)
    u = np.array([0.0, 0.0, 36.5])
    x0 = cell_free_state(plant)
    x0[plant.state_index("bicarbonate")] = 2.0
    assert pco2_internals(x0, u)["ph"] < 6.5
    x1 = integrate("pco2", x0, u, p, hours=24)
    before, after = observe(plant, 0.0, x0, u, p), observe(plant, 24.0, x1, u, p)
    base_mmol = (after["base_added"] - before["base_added"]) * BATCH.media.base_mol_per_l * 1000.0
    assert base_mmol / after["volume"] > 4.0
    assert 6.93 < pco2_internals(x1, u)["ph"] < 7.0  # back at the loop's limit (the smoothed pump creeps on a little)
    osmoles_per_mol = BATCH.media.base_osmoles_per_mol + 1.0
    assert after["osmolality"] * after["volume"] - before["osmolality"] * before["volume"] == pytest.approx(osmoles_per_mol * base_mmol, rel=1e-6)


def test_pco2_plant_conserves_charge_bicarbonate_plus_lactate_less_sodium_from_the_base() -> None:
    """Lactic acid takes bicarbonate, the base gives it back, lactate consumption returns it: bicarbonate + lactate − base equivalents stays what the medium brought."""
    plant = plant_named("pco2")
    run = recipe_like_run("pco2")
    states = run.states
    volume = states[:, plant.state_index("volume")]
    charge_mmol = (
        states[:, plant.state_index("bicarbonate")] * volume
        + states[:, plant.state_index("lactate")] * volume * 1000.0 / LACTATE_G_PER_MOL
        - states[:, plant.state_index("base_added")] * BATCH.media.base_mol_per_l * 1000.0
    )
    assert np.allclose(charge_mmol, charge_mmol[0], rtol=1e-7)
    assert states[-1, plant.state_index("base_added")] > 20.0


def test_pco2_plant_lactate_consumption_gives_back_ph_room() -> None:
    """While lactate is made the pump runs; once the shift turns the cells to consuming it, bicarbonate comes back and the pump rests to harvest."""
    plant = plant_named("pco2")
    run = recipe_like_run("pco2")
    lactate = run.observed["lactate"]
    base_l = run.observed["base_added"]
    bicarbonate = run.states[:, plant.state_index("bicarbonate")]
    peak = int(np.argmax(lactate))
    assert base_l[peak] > 0.5 * base_l[-1]
    day_8 = 192
    assert lactate[day_8] < 0.6 * lactate[peak]
    assert bicarbonate[day_8] > bicarbonate[peak] + 5.0
    assert base_l[-1] - base_l[day_8] < 0.05 * base_l[-1]


def test_pco2_plant_pco2_and_osmolality_slow_growth_together_more_than_apart() -> None:
    """After deZengotita et al.: each alone slows growth, the two together more than the product of their separate effects; pCO2 also lowers productivity and, steeply, survival."""
    plant = plant_named("pco2")
    p = plant.nominal_parameters(BATCH)
    u = np.array([0.0, 0.0, 36.5])
    index = plant.state_index
    control = pco2_state()
    other_osmolytes = float(control[index("other_osmolytes")])
    osmolality = observe(plant, 0.0, control, u, p)["osmolality"]

    def rates(sensed_pco2_mmhg: float, osmolality_mosm_per_kg: float) -> tuple[float, float]:
        """Net specific growth rate of the viable cells [1/h] and product made per cell [g/(1e9 cells·h)]."""
        x = pco2_state(sensed_pco2=sensed_pco2_mmhg, other_osmolytes=other_osmolytes + osmolality_mosm_per_kg - osmolality)
        dx = np.asarray(plant.rhs(0.0, x, u, p)).ravel()
        return float(dx[index("viable_cells")] / x[index("viable_cells")]), float(dx[index("titer")] / x[index("viable_cells")])

    (growth_0, product_0), (growth_c, product_c), (growth_o, _), (growth_both, _) = (rates(*c) for c in ((40.0, 320.0), (195.0, 320.0), (40.0, 415.0), (195.0, 415.0)))
    assert growth_c < 0.8 * growth_0 and growth_o < 0.9 * growth_0
    assert growth_both < growth_c * growth_o / growth_0  # synergy
    assert product_c < 0.85 * product_0
    death = {pco2: -rates(pco2, 450.0)[0] for pco2 in (195.0, 300.0)}
    assert death[300.0] > 0.02 and death[300.0] > 2.0 * max(death[195.0], 1e-3)


def test_pco2_plant_cold_shift_cuts_respiration_and_pco2_within_hours_but_raises_productivity_only_over_days() -> None:
    """Respiration (and so pCO2) follows the culture temperature; specific productivity follows a cold-inducible factor that takes days."""
    plant = plant_named("pco2")
    p = plant.nominal_parameters(BATCH)
    index = plant.state_index

    def at(start: np.ndarray, setpoint_degc: float, hours: int) -> tuple[float, float, float]:
        """pCO2, OUR per cell and product made per cell, ``hours`` after the setpoint was set."""
        u = np.array([0.0, 0.0, setpoint_degc])
        x = integrate("pco2", start, u, p, hours=hours)
        y = observe(plant, float(hours), x, u, p)
        dx = np.asarray(plant.rhs(float(hours), x, u, p)).ravel()
        return pco2_internals(x, u)["pco2"], y["our"] / y["viable_cells"], float(dx[index("titer")] / x[index("viable_cells")])

    dense = pco2_state(glucose=8.0, glutamine=6.0, bicarbonate=10.0, sensed_pco2=100.0)
    (warm_pco2, warm_our, _), (cold_pco2, cold_our, _) = at(dense, 36.5, 6), at(dense, 33.0, 6)
    assert cold_our < 0.85 * warm_our
    assert cold_pco2 < warm_pco2 - 5.0
    # Few cells: pCO2 stays below its threshold, so only the cold factor moves productivity.
    sparse = pco2_state(viable_cells=2.0, glucose=8.0, glutamine=6.0, sensed_pco2=40.0)
    threshold_mmhg = Pco2Kinetics().stress.pco2_threshold_mmhg
    (_, _, warm_6), (pco2_6, _, cold_6), (pco2_72, _, cold_72) = at(sparse, 36.5, 6), at(sparse, 33.0, 6), at(sparse, 33.0, 72)
    assert max(pco2_6, pco2_72) < threshold_mmhg
    assert cold_6 < 1.06 * warm_6  # the cold factor has hardly begun
    assert cold_72 > 1.15 * cold_6


def test_pco2_plant_off_gas_cer_is_the_co2_stripped_not_a_fixed_multiple_of_the_our() -> None:
    """Neutralised lactic acid leaves as CO2: the apparent RQ is above the respiratory one while lactate is made and below it while lactate is consumed; in the CHO model it is constant."""
    rq = Pco2Kinetics().respiration.respiratory_quotient
    run = recipe_like_run("pco2")
    apparent_rq = run.observed["cer"] / run.observed["our"]
    lactate = run.observed["lactate"]
    making, consuming = np.diff(lactate) > 0.005, np.diff(lactate) < -0.005
    assert np.all(apparent_rq[:-1][making] > rq)
    assert np.all(apparent_rq[:-1][consuming] < rq)
    cho = recipe_like_run("cho").observed
    assert np.ptp(cho["cer"] / cho["our"]) < 1e-9


EXTREME_INPUTS = [(0.0, 0.0, 36.5), (0.0, 0.0, 30.0), (10.0, 2.0, 37.0), (10.0, 2.0, 30.0), (10.0, 0.0, 38.0), (0.0, 2.0, 37.0)]
"""(nutrient feed L/h, glucose feed L/h, temperature setpoint °C) held for two weeks: none, both pumps at their maximum, hot and cold."""


def run_extreme_inputs(name: str, u: np.ndarray) -> tuple[EquationPlant, np.ndarray, dict[str, float]]:
    """Two weeks on the minute grid at the constant inputs ``u``: every state finite and non-negative at every minute. The plant, its last state and what it shows then."""
    plant = plant_named(name)
    p = plant.nominal_parameters(BATCH)
    nonnegative = [plant.state_index(n) for n in plant.nonnegative_states]
    x = plant.initial_state(BATCH)
    step = hour_map(name)
    for h in range(336):
        _, xs = step(float(h), x, u, p)
        trajectory = np.asarray(xs)
        assert np.all(np.isfinite(trajectory))
        assert trajectory[nonnegative, :].min() > -1e-6
        x = trajectory[:, -1]
    return plant, x, observe(plant, 336.0, x, u, p)


@pytest.mark.parametrize(("feed_lph", "glucose_lph", "setpoint_degc"), EXTREME_INPUTS)
def test_pco2_plant_stays_finite_and_physical_over_14_days_of_extreme_inputs(feed_lph: float, glucose_lph: float, setpoint_degc: float) -> None:
    u = np.array([feed_lph, glucose_lph, setpoint_degc])
    _, x, y = run_extreme_inputs("pco2", u)
    internals = pco2_internals(x, u)
    assert all(np.isfinite(v) for v in (*y.values(), *internals.values()))
    assert 0.0 <= y["viability"] <= 100.0
    assert 0.0 < internals["pco2"] < 400.0


@pytest.mark.parametrize("name", ["pco2", "clonal", "oxygen"])
def test_plant_has_no_fast_mode_three_hour_rk4_steps_follow_the_minute_grid(name: str) -> None:
    """One 3 h RK4 step (the oracle's longest) lands where 180 one-minute steps do, to 1 % of each state's size, all along a recipe-like batch.
    (`pco2`: its pCO2 is quasi-steady, and the pH loop and the sensing lag act over hours; `oxygen`: its dissolved oxygen is quasi-steady.)"""
    plant = plant_named(name)
    p = plant.nominal_parameters(BATCH)
    run = recipe_like_run(name)
    coarse = plant.rk4_step(3.0)
    scale = np.maximum(np.abs(run.states).max(axis=0), 1e-2)  # each state's size over the batch
    worst = 0.0
    for h in range(0, 333, 3):
        u = np.array([0.03 * BATCH.inoculation.volume_l / 24.0 if h >= 72 else 0.0, 0.0, 36.5 if h < 120 else 33.0])
        x = run.states[h]
        _, x_coarse = coarse(float(h), x, u, p)
        x_fine = integrate(name, x, u, p, hours=3, t0_h=float(h))
        worst = max(worst, float(np.max(np.abs(np.asarray(x_coarse).ravel() - x_fine) / scale)))
    assert worst < 0.01


def clonal_state(**values: float) -> np.ndarray:
    """The clonal plant early in a batch (2e6 cells/mL, 10 % non-producers, glucose and glutamine ample, seed-culture ER and mitochondria), with ``values`` set by state name."""
    start = {"producer_cells": 1.8, "nonproducer_cells": 0.2, "dead_cells": 0.05, "glucose": 6.0, "glutamine": 6.0, "lactate": 0.5, "ammonia": 1.0}
    return state_of("clonal", start, values)


def clonal_internals(x: np.ndarray, u: np.ndarray, p: np.ndarray | None = None) -> dict[str, float]:
    plant = plant_named("clonal")
    assert isinstance(plant, ClonalPlant)
    return internals_of(plant, CLONAL_INTERNALS, x, u, p)


def clonal_parameters(**changes: dict[str, float]) -> np.ndarray:
    """The clonal plant's parameters with fields of its kinetics groups changed (``instability={"reversion_per_division": 0.0}``)."""
    return ClonalPlant(kinetics_with(ClonalKinetics(), changes)).nominal_parameters(BATCH)


def test_clonal_plant_reverts_per_division_so_the_cold_makes_fewer_revertants() -> None:
    """Revertants per hour (the non-producers' rate with and without reversion) follow the producers' division: fewer at 33 °C than at 36.5 °C, none without division."""
    plant = plant_named("clonal")
    index = plant.state_index
    without = clonal_parameters(instability={"reversion_per_division": 0.0})

    def revertants_per_h(temperature_degc: float, glutamine_mm: float = 6.0) -> float:
        x = clonal_state(temperature=temperature_degc, glutamine=glutamine_mm)
        u = np.array([0.0, 0.0, temperature_degc])
        with_reversion = np.asarray(plant.rhs(0.0, x, u, plant.nominal_parameters(BATCH))).ravel()
        return float(with_reversion[index("nonproducer_cells")] - np.asarray(plant.rhs(0.0, x, u, without)).ravel()[index("nonproducer_cells")])

    warm, cold = revertants_per_h(36.5), revertants_per_h(33.0)
    division = {t: clonal_internals(clonal_state(temperature=t), np.array([0.0, 0.0, t]))["producer_division_per_h"] for t in (36.5, 33.0)}
    reversion = ClonalKinetics().instability.reversion_per_division
    assert warm == pytest.approx(reversion * division[36.5] * clonal_state()[index("producer_cells")], rel=1e-9)
    assert cold < 0.7 * warm
    assert cold / warm == pytest.approx(division[33.0] / division[36.5], rel=1e-9)
    assert revertants_per_h(36.5, glutamine_mm=0.0) < 0.01 * warm


def test_clonal_plant_non_producers_take_over_as_the_cells_divide_and_more_slowly_when_cold_without_selection() -> None:
    """With reversion alone (no burden, no ER-stress death) the non-producer share rises with the divisions, so more slowly in the cold; the nominal plant adds selection: the share rises through a batch and never falls."""
    plant = plant_named("clonal")
    reversion_only = clonal_parameters(growth={"burden_per_er_capacity": 0.0}, death={"er_stress_per_h": 0.0})
    start = clonal_state()
    fraction_0 = clonal_internals(start, np.zeros(3))["nonproducer_fraction"]

    def after_48_h(setpoint_degc: float, p: np.ndarray) -> float:
        u = np.array([0.0, 0.0, setpoint_degc])
        return clonal_internals(integrate("clonal", start, u, p, hours=48), u, p)["nonproducer_fraction"]

    warm, cold = after_48_h(36.5, reversion_only), after_48_h(33.0, reversion_only)
    assert warm > fraction_0 + 0.01
    assert fraction_0 < cold < fraction_0 + 0.75 * (warm - fraction_0)
    nominal = plant.nominal_parameters(BATCH)
    assert after_48_h(36.5, nominal) > warm  # the producers' burden adds selection
    u = np.array([0.0, 0.0, 36.5])
    status = clonal_internals(start, u)
    assert status["nonproducer_division_per_h"] > 1.05 * status["producer_division_per_h"]
    run = recipe_like_run("clonal")
    shares = [clonal_internals(x, u)["nonproducer_fraction"] for x in run.states[::24]]
    assert shares == sorted(shares)
    assert shares[-1] > 2.0 * ClonalKinetics().instability.inoculum_nonproducer_fraction


def test_clonal_plant_reversion_moves_cells_between_the_populations_without_making_any() -> None:
    plant = plant_named("clonal")
    u = np.array([0.0, 0.0, 36.5])
    x = clonal_state()

    def rates(reversion_per_division: float) -> np.ndarray:
        return np.asarray(plant.rhs(0.0, x, u, clonal_parameters(instability={"reversion_per_division": reversion_per_division}))).ravel()

    none, some = rates(0.0), rates(0.1)
    producers, nonproducers = plant.state_index("producer_cells"), plant.state_index("nonproducer_cells")
    assert some[nonproducers] > none[nonproducers] + 1e-3
    assert some[producers] + some[nonproducers] == pytest.approx(none[producers] + none[nonproducers], rel=1e-12)


def test_clonal_plant_specific_productivity_saturates_with_er_capacity_and_quality_falls_with_the_unfolded_load() -> None:
    """A producer secretes no more than its demand however large its ER; below the demand more ER gives more product, with diminishing returns, and better galactosylated product."""
    plant = plant_named("clonal")
    p = plant.nominal_parameters(BATCH)
    u = np.array([0.0, 0.0, 36.5])
    index = plant.state_index
    capacities = (0.5, 1.0, 2.0, 4.0, 8.0, 16.0)
    rows = [clonal_internals(clonal_state(er_capacity=e, glutamine=0.0), u) for e in capacities]  # arrested: the demand is the same for all
    qp = np.array([row["producer_qp_pg_per_cell_day"] for row in rows])
    demand = rows[0]["producer_demand_pg_per_cell_day"]
    assert all(row["producer_demand_pg_per_cell_day"] == pytest.approx(demand, rel=1e-6) for row in rows)
    assert np.all(np.diff(qp) > 0.0)
    gains = np.diff(qp) / np.diff(capacities)
    assert np.all(np.diff(gains) < 0.0)  # diminishing returns
    assert all(row["producer_qp_pg_per_cell_day"] < row["producer_demand_pg_per_cell_day"] for row in rows)
    assert qp[-1] > 0.95 * rows[-1]["producer_demand_pg_per_cell_day"]
    loads = [row["unfolded_load"] for row in rows]
    assert loads == sorted(loads, reverse=True)

    def new_galactosylated_fraction(er_capacity: float) -> float:
        dx = np.asarray(plant.rhs(0.0, clonal_state(er_capacity=er_capacity, glutamine=0.0, nonproducer_cells=1e-6), u, p)).ravel()
        return float(dx[index("galactosylated_titer")] / dx[index("titer")])

    assert new_galactosylated_fraction(4.0) > new_galactosylated_fraction(1.0) + 0.05


def test_clonal_plant_cold_raises_productivity_only_as_the_er_expands_and_too_cold_damages_it() -> None:
    """The demand rises within hours of a shift to 33 °C, the ER capacity and with it what producers secrete over days; at 30 °C the ER capacity is lost."""
    plant = plant_named("clonal")
    p = plant.nominal_parameters(BATCH)
    index = plant.state_index
    # Slow, fed producers (as after a shift): glutamine limits their division.
    start = clonal_state(glutamine=0.15, er_capacity=1.5, mitochondrial_capacity=1.5)

    def at(setpoint_degc: float, hours: int) -> tuple[dict[str, float], float]:
        u = np.array([0.0, 0.0, setpoint_degc])
        x = integrate("clonal", start, u, p, hours=hours)
        return clonal_internals(x, u), float(x[index("er_capacity")])

    (warm_6, _), (cold_6, _), (cold_72, er_cold_72), (_, er_warm_72), (too_cold_72, er_too_cold_72) = (
        at(36.5, 6),
        at(33.0, 6),
        at(33.0, 72),
        at(36.5, 72),
        at(30.0, 72),
    )
    assert cold_6["producer_demand_pg_per_cell_day"] > 1.2 * warm_6["producer_demand_pg_per_cell_day"]
    assert cold_6["unfolded_load"] > warm_6["unfolded_load"]  # pushed past capacity at once
    assert cold_72["producer_qp_pg_per_cell_day"] > 1.1 * cold_6["producer_qp_pg_per_cell_day"]  # the ER catches up over days
    assert er_cold_72 > 1.5 and er_too_cold_72 < 0.8 * er_cold_72
    assert too_cold_72["producer_qp_pg_per_cell_day"] < cold_72["producer_qp_pg_per_cell_day"]
    assert er_warm_72 > 1.5


def test_clonal_plant_division_lowers_the_producers_demand() -> None:
    """The growth–production trade-off: the same producers make more when glutamine stops their division."""
    u = np.array([0.0, 0.0, 36.5])
    dividing, arrested = clonal_internals(clonal_state(glutamine=6.0), u), clonal_internals(clonal_state(glutamine=0.02), u)
    assert dividing["producer_division_per_h"] > 5.0 * arrested["producer_division_per_h"]
    assert arrested["producer_demand_pg_per_cell_day"] > 1.5 * dividing["producer_demand_pg_per_cell_day"]


def test_clonal_plant_glucose_uptake_per_cell_falls_as_mitochondria_build_up_and_spare_capacity_takes_lactate_back() -> None:
    """Glucose uptake is not proportional to the cells: once division slows, mitochondrial capacity builds up, the glycolytic program and the transport it sets fall, and lactate is consumed."""
    plant = plant_named("clonal")
    p = plant.nominal_parameters(BATCH)
    u = np.array([0.0, 0.0, 36.5])
    index = plant.state_index
    seed, mature = clonal_state(lactate=3.0), clonal_state(lactate=3.0, mitochondrial_capacity=2.5, glycolytic_program=0.35)
    assert clonal_internals(mature, u)["glucose_uptake_g_per_1e9_cells_h"] < 0.5 * clonal_internals(seed, u)["glucose_uptake_g_per_1e9_cells_h"]
    assert float(np.asarray(plant.rhs(0.0, seed, u, p))[index("lactate"), 0]) > 0.0
    assert float(np.asarray(plant.rhs(0.0, mature, u, p))[index("lactate"), 0]) < 0.0
    run = recipe_like_run("clonal")
    uptake = np.array([clonal_internals(x, u)["glucose_uptake_g_per_1e9_cells_h"] for x in run.states[::24]])
    assert uptake[-1] < 0.6 * uptake[2]
    lactate = run.observed["lactate"]
    assert lactate[-1] < 0.7 * lactate.max()
    assert run.states[-1, index("mitochondrial_capacity")] > 1.5 * run.states[48, index("mitochondrial_capacity")]


@pytest.mark.parametrize(("feed_lph", "glucose_lph", "setpoint_degc"), EXTREME_INPUTS)
def test_clonal_plant_stays_finite_and_physical_over_14_days_of_extreme_inputs(feed_lph: float, glucose_lph: float, setpoint_degc: float) -> None:
    u = np.array([feed_lph, glucose_lph, setpoint_degc])
    plant, x, y = run_extreme_inputs("clonal", u)
    internals = clonal_internals(x, u)
    assert all(np.isfinite(v) for v in (*y.values(), *internals.values()))
    assert 0.0 <= y["viability"] <= 100.0
    assert 0.0 <= internals["nonproducer_fraction"] <= 1.0
    assert 0.0 < x[plant.state_index("er_capacity")] <= ClonalKinetics().secretion.er_max


def oxygen_state(**values: float) -> np.ndarray:
    """The oxygen plant mid-batch (10e6 cells/mL, glucose and glutamine ample, lactate 2 g/L, no hypoxic program), with ``values`` set by state name."""
    start = {"viable_cells": 10.0, "dead_cells": 0.5, "glucose": 4.0, "glutamine": 4.0, "lactate": 2.0, "ammonia": 3.0, "volume": 1600.0}
    return state_of("oxygen", start, values)


def oxygen_internals(x: np.ndarray, u: np.ndarray, p: np.ndarray | None = None) -> dict[str, float]:
    plant = plant_named("oxygen")
    assert isinstance(plant, OxygenPlant)
    return internals_of(plant, OXYGEN_INTERNALS, x, u, p)


def oxygen_parameters(**changes: dict[str, float]) -> np.ndarray:
    """The oxygen plant's parameters with fields of its kinetics groups changed (``death={"bubble_per_h": 0.0}``)."""
    return OxygenPlant(kinetics_with(OxygenKinetics(), changes)).nominal_parameters(BATCH)


def oxygen_transfer_limit_mmol_per_l_h(temperature_degc: float = 36.5) -> float:
    """The most the cascade can transfer at all (its top, with the DO at zero)."""
    kinetics = OxygenKinetics()
    transfer = kinetics.transfer
    saturation = transfer.air_saturation_mm * (1.0 + transfer.solubility_per_degc * (kinetics.temperature.reference_degc - temperature_degc))
    return transfer.kla_max_per_h * saturation * transfer.max_o2_fraction / 0.2095


def test_oxygen_plant_cascade_holds_the_do_until_its_top_then_the_our_stops_following_the_cells() -> None:
    """Few cells: DO at its setpoint, OUR in proportion to the cells. Past the cascade's top the DO falls and the OUR stays below what the vessel can transfer; the CHO model's OUR keeps following the cells."""
    plant = plant_named("oxygen")
    p = plant.nominal_parameters(BATCH)
    u = np.array([0.0, 0.0, 36.5])
    setpoint = OxygenKinetics().transfer.do_setpoint_pct
    cells = (2.0, 5.0, 10.0, 25.0, 40.0)
    our = {c: observe(plant, 0.0, oxygen_state(viable_cells=c), u, p)["our"] for c in cells}
    status = {c: oxygen_internals(oxygen_state(viable_cells=c), u) for c in cells}
    assert status[2.0]["dissolved_oxygen_pct"] > 0.99 * setpoint and status[5.0]["dissolved_oxygen_pct"] > 0.99 * setpoint
    assert our[5.0] / our[2.0] == pytest.approx(2.5, rel=1e-3)
    dos = [status[c]["dissolved_oxygen_pct"] for c in cells]
    assert dos == sorted(dos, reverse=True)
    assert status[40.0]["cascade_load"] == pytest.approx(1.0, abs=1e-6) and dos[-1] < 0.5 * setpoint
    assert status[40.0]["oxygen_demand"] > 1.2 * our[40.0]
    assert our[40.0] < oxygen_transfer_limit_mmol_per_l_h()
    assert our[40.0] / our[25.0] < 1.1  # 60 % more cells
    cho = plant_named("cho")
    p_cho = cho.nominal_parameters(BATCH)

    def cho_our(cells_1e6_per_ml: float) -> float:
        x = cho.initial_state(BATCH)
        for name, value in (("viable_cells", cells_1e6_per_ml), ("glucose", 4.0), ("glutamine", 4.0), ("lactate", 2.0), ("ammonia", 3.0), ("volume", 1600.0)):
            x[cho.state_index(name)] = value
        return observe(cho, 0.0, x, u, p_cho)["our"]

    assert cho_our(40.0) / cho_our(25.0) == pytest.approx(1.6, rel=1e-6)


def test_oxygen_plant_pasteur_effect_raises_glycolysis_and_lactate_at_once_and_stops_lactate_consumption() -> None:
    """Non-dividing cells with lactate to take back: oxygenated they consume it; with oxygen short (many cells) they take up more glucose per cell, make more lactate per glucose and consume none."""
    plant = plant_named("oxygen")
    p = plant.nominal_parameters(BATCH)
    u = np.array([0.0, 0.0, 36.5])
    index = plant.state_index
    oxygenated, starved = oxygen_state(viable_cells=5.0, glutamine=0.0, lactate=3.0), oxygen_state(viable_cells=40.0, glutamine=0.0, lactate=3.0)
    fed, short = oxygen_internals(oxygenated, u), oxygen_internals(starved, u)
    assert fed["oxygen_supply_fraction"] > 0.98 and short["oxygen_supply_fraction"] < 0.7
    assert short["dissolved_oxygen_pct"] < 2.0
    assert short["glucose_uptake_g_per_1e9_cells_h"] > 1.3 * fed["glucose_uptake_g_per_1e9_cells_h"]
    assert short["lactate_yield_g_per_g"] > fed["lactate_yield_g_per_g"] + 0.2
    assert float(np.asarray(plant.rhs(0.0, oxygenated, u, p))[index("lactate"), 0]) < 0.0
    assert float(np.asarray(plant.rhs(0.0, starved, u, p))[index("lactate"), 0]) > 0.0


def test_oxygen_plant_hypoxic_program_builds_within_a_day_lingers_for_days_and_lowers_demand_division_productivity_and_quality() -> None:
    plant = plant_named("oxygen")
    p = plant.nominal_parameters(BATCH)
    u = np.array([0.0, 0.0, 36.5])
    index = plant.state_index
    hypoxic = oxygen_state(viable_cells=40.0)
    assert oxygen_internals(hypoxic, u)["hypoxia_signal"] > 0.9
    program = {hours: float(integrate("oxygen", hypoxic, u, p, hours=hours)[index("hypoxic_program")]) for hours in (1, 24)}
    assert program[1] < 0.15 and program[24] > 0.8  # hours, not minutes
    reoxygenated = oxygen_state(viable_cells=3.0, hypoxic_program=0.8)
    assert oxygen_internals(reoxygenated, u)["hypoxia_signal"] < 0.01
    after_day = float(integrate("oxygen", reoxygenated, u, p, hours=24)[index("hypoxic_program")])
    assert 0.3 < after_day < 0.6  # lost over a day or two
    off, on = oxygen_state(viable_cells=3.0), oxygen_state(viable_cells=3.0, hypoxic_program=1.0)
    status_off, status_on = oxygen_internals(off, u), oxygen_internals(on, u)
    assert status_on["oxygen_demand"] < 0.75 * status_off["oxygen_demand"]  # PDK1: less oxygen wanted
    assert status_on["division_per_h"] < 0.45 * status_off["division_per_h"]
    assert status_on["qp_pg_per_cell_day"] == pytest.approx(0.5 * status_off["qp_pg_per_cell_day"], rel=1e-6)
    rates = {name: np.asarray(plant.rhs(0.0, x, u, p)).ravel() for name, x in (("off", off), ("on", on))}
    new_galactosylated = {name: dx[index("galactosylated_titer")] / dx[index("titer")] for name, dx in rates.items()}
    assert new_galactosylated["on"] < 0.8 * new_galactosylated["off"]
    # At the same (no) division: more glucose taken up per cell, more of it made into lactate.
    resting_off, resting_on = oxygen_state(viable_cells=3.0, glutamine=0.0, lactate=0.0), oxygen_state(viable_cells=3.0, glutamine=0.0, lactate=0.0, hypoxic_program=1.0)
    uptake = {name: oxygen_internals(x, u)["glucose_uptake_g_per_1e9_cells_h"] for name, x in (("off", resting_off), ("on", resting_on))}
    assert uptake["on"] / uptake["off"] == pytest.approx(1.0 + OxygenKinetics().metabolism.program_glycolysis_gain, rel=1e-3)
    lactate = {name: float(np.asarray(plant.rhs(0.0, x, u, p))[index("lactate"), 0]) for name, x in (("off", resting_off), ("on", resting_on))}
    assert lactate["on"] > 2.0 * lactate["off"] > 0.0


def test_oxygen_plant_cold_lowers_the_oxygen_demand_and_lifts_the_cap_but_barely_raises_productivity() -> None:
    """At the cascade's top at 36.5 °C, the same culture at 33 °C has its DO back; specific productivity gains about a tenth, where the CHO model's gains 60 %."""
    plant = plant_named("oxygen")
    p = plant.nominal_parameters(BATCH)
    warm, cold = oxygen_state(viable_cells=20.0), oxygen_state(viable_cells=20.0, temperature=33.0)
    status_warm, status_cold = oxygen_internals(warm, np.array([0.0, 0.0, 36.5])), oxygen_internals(cold, np.array([0.0, 0.0, 33.0]))
    assert status_warm["dissolved_oxygen_pct"] < 25.0 and status_warm["cascade_load"] > 0.999
    assert status_cold["dissolved_oxygen_pct"] > 30.0 and status_cold["cascade_load"] < 0.99
    assert status_cold["oxygen_demand"] < 0.8 * status_warm["oxygen_demand"]
    assert status_cold["transfer_capacity"] > 1.03 * status_warm["transfer_capacity"]  # oxygen dissolves better in the cold
    assert 1.05 < status_cold["qp_pg_per_cell_day"] / status_warm["qp_pg_per_cell_day"] < 1.15
    cho = plant_named("cho")
    p_cho = cho.nominal_parameters(BATCH)

    def cho_product_rate(temperature_degc: float) -> float:
        x = cho.initial_state(BATCH)
        for name, value in (("viable_cells", 5.0), ("glucose", 4.0), ("glutamine", 4.0), ("temperature", temperature_degc)):
            x[cho.state_index(name)] = value
        return float(np.asarray(cho.rhs(150.0, x, np.array([0.0, 0.0, temperature_degc]), p_cho))[cho.state_index("titer"), 0])

    assert cho_product_rate(33.0) > 1.5 * cho_product_rate(36.5)
    del p


def test_oxygen_plant_bubble_damage_kills_only_near_the_top_of_the_cascade() -> None:
    u = np.array([0.0, 0.0, 36.5])
    without = oxygen_parameters(death={"bubble_per_h": 0.0})
    bubble_per_h = OxygenKinetics().death.bubble_per_h

    def bubble_death(cells: float) -> tuple[float, float]:
        x = oxygen_state(viable_cells=cells)
        status = oxygen_internals(x, u)
        return status["death_per_h"] - oxygen_internals(x, u, without)["death_per_h"], status["cascade_load"]

    (low, low_load), (top, top_load) = bubble_death(4.0), bubble_death(30.0)
    assert low_load < 0.4 and top_load > 0.999
    assert low < 0.03 * bubble_per_h
    assert top == pytest.approx(bubble_per_h, rel=0.01)


def test_oxygen_plant_more_feed_cannot_raise_the_oxygen_uptake_past_the_cascade() -> None:
    """Unshifted, the recipe's culture reaches the top of the cascade; twice the feed adds few cells and no oxygen uptake, turns more of them hypoxic and ends with less product."""
    plant = plant_named("oxygen")
    recipe, double = recipe_like_run("oxygen", 36.5), recipe_like_run("oxygen", 36.5, feed_fraction_per_day=0.06)
    cap = oxygen_transfer_limit_mmol_per_l_h(36.5)
    assert recipe.observed["our"].max() > 0.85 * cap
    assert double.observed["our"].max() < cap and double.observed["our"].max() < 1.03 * recipe.observed["our"].max()
    assert double.observed["viable_cells"].max() < 1.1 * recipe.observed["viable_cells"].max()
    program = plant.state_index("hypoxic_program")
    assert double.states[:, program].max() > recipe.states[:, program].max() + 0.03
    assert double.observed["titer"][-1] < recipe.observed["titer"][-1]


def test_oxygen_plant_under_the_recipe_the_shift_keeps_the_cascade_just_below_its_top() -> None:
    """Shifted to 33 °C the culture runs close to the top of the cascade (bubble damage) but never hypoxic; unshifted the DO falls well below its setpoint."""
    u = np.array([0.0, 0.0, 33.0])
    shifted, warm = recipe_like_run("oxygen"), recipe_like_run("oxygen", 36.5)
    status = [oxygen_internals(x, u) for x in shifted.states[::6]]
    assert max(s["cascade_load"] for s in status) > 0.9
    assert min(s["dissolved_oxygen_pct"] for s in status) > 30.0
    assert shifted.states[:, plant_named("oxygen").state_index("hypoxic_program")].max() < 0.05
    warm_do = [oxygen_internals(x, np.array([0.0, 0.0, 36.5]))["dissolved_oxygen_pct"] for x in warm.states[::6]]
    assert min(warm_do) < 20.0


@pytest.mark.parametrize(("feed_lph", "glucose_lph", "setpoint_degc"), EXTREME_INPUTS)
def test_oxygen_plant_stays_finite_and_physical_over_14_days_of_extreme_inputs(feed_lph: float, glucose_lph: float, setpoint_degc: float) -> None:
    u = np.array([feed_lph, glucose_lph, setpoint_degc])
    plant, x, y = run_extreme_inputs("oxygen", u)
    internals = oxygen_internals(x, u)
    assert all(np.isfinite(v) for v in (*y.values(), *internals.values()))
    assert 0.0 <= y["viability"] <= 100.0
    assert 0.0 <= x[plant.state_index("hypoxic_program")] <= 1.0
    assert 0.0 < internals["dissolved_oxygen_pct"] <= OxygenKinetics().transfer.do_setpoint_pct
    assert 0.0 < internals["cascade_load"] <= 1.0 + 1e-9


def test_plants_are_independent_of_each_other_in_structure() -> None:
    assert isinstance(plant_named("amino_acid"), AminoAcidPlant)
    assert isinstance(plant_named("cell_cycle"), CellCyclePlant)
    assert isinstance(plant_named("biovolume"), BiovolumePlant)
    assert isinstance(plant_named("inhibitor"), InhibitorPlant)
    assert isinstance(plant_named("apoptosis"), ApoptosisPlant)
    assert isinstance(plant_named("pco2"), Pco2Plant)
    assert isinstance(plant_named("clonal"), ClonalPlant)
    assert isinstance(plant_named("oxygen"), OxygenPlant)
    state_sets = [frozenset(s.name for s in plant_named(name).states) for name in ("cho", *OTHER_PLANTS)]
    assert len(set(state_sets)) == len(state_sets)


# --- layering ----------------------------------------------------------------------------------------

_IMPORTS_SIMULATOR = re.compile(r"^\s*(from\s+simulator[.\s]|import\s+simulator\b)", re.MULTILINE)


@pytest.mark.parametrize("package", ["controller", "interfaces", "plant_models"])
def test_runtime_packages_never_import_the_simulator_or_its_plants(package: str) -> None:
    offenders = [str(path.relative_to(REPO)) for path in sorted((REPO / package).rglob("*.py")) if _IMPORTS_SIMULATOR.search(path.read_text(encoding="utf-8"))]
    assert offenders == []


def test_the_import_check_would_see_an_import_of_the_plants() -> None:
    assert _IMPORTS_SIMULATOR.search("from simulator.plants import PLANTS\n")
    assert _IMPORTS_SIMULATOR.search("    import simulator.plants.amino_acid\n")
    assert not _IMPORTS_SIMULATOR.search("from simulators_elsewhere import x\n")
