"""The closed-loop scenario set: recipe, NMPC and the perfect-knowledge oracle on the same seeded batches.

The NMPC runs twice on each batch: with the nominal kinetics and no
calibration (its trust region is the band around the recipe), and with the
kinetics calibrated on the plant's process-development batches
(:func:`development_calibration`; its trust region is the envelope of those
batches). Used by ``benchmarks/closed_loop_scenarios.py`` (which prints the
figures) and by the ``campaign`` tests (which assert the targets).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from controller.calibration import CalibrationResult, calibrate
from plant_models.parameters import CultureParameters, replaced_parameters
from simulator.batch import BatchResult, run_recipe_batch
from simulator.closed_loop import oracle_source, run_controlled_batch
from simulator.config import LoadedSimulation, load_simulation
from simulator.evaluation import estimator_with, gap_closed
from simulator.records import development_batches

PLATFORM = Path(__file__).resolve().parent.parent / "configs" / "simulate" / "platform.yaml"


def scenarios() -> list[tuple[str, dict[str, Any]]]:
    """At least 20 seeded batches: nominal, kinetic mismatch, weak feed lot, Bad probe, lab typo."""
    mismatch = {
        "growth+25%": {"growth.mu_max_per_h": 1.25},
        "growth-25%": {"growth.mu_max_per_h": 0.75},
        "qP+25%": {"product.q_product_pg_per_cell_day": 1.25},
        "qP-25%": {"product.q_product_pg_per_cell_day": 0.75},
        "yield_glc-20%": {"metabolism.yield_cells_per_glucose_1e9_per_g": 0.8},
        "yield_gln+20%": {"metabolism.yield_cells_per_glutamine_1e9_per_mmol": 1.2},
        "death+30%": {"death.kd_min_per_h": 1.3, "death.kd_ammonia_max_per_h": 1.3},
        "death-30%": {"death.kd_min_per_h": 0.7, "death.kd_ammonia_max_per_h": 0.7},
        "growth+20%,qP-20%": {"growth.mu_max_per_h": 1.2, "product.q_product_pg_per_cell_day": 0.8},
        "growth-20%,qP+20%": {"growth.mu_max_per_h": 0.8, "product.q_product_pg_per_cell_day": 1.2},
    }
    cases: list[tuple[str, dict[str, Any]]] = [(f"nominal seed {seed}", {"seed": seed}) for seed in (1, 2, 3, 4)]
    cases += [(name, {"seed": 10 + i, "true_parameter_factors": factors}) for i, (name, factors) in enumerate(mismatch.items())]
    cases += [
        ("random kinetics seed 31", {"seed": 31, "true_parameter_relative_sd": _RANDOM_SD}),
        ("random kinetics seed 32", {"seed": 32, "true_parameter_relative_sd": _RANDOM_SD}),
        ("feed lot 15% weaker", {"seed": 41, "faults": [{"kind": "feed_lot", "start_h": 96.0, "strength": 0.85}]}),
        ("capacitance probe Bad", {"seed": 42, "faults": [{"kind": "probe", "tag": "PV.Capacitance", "mode": "bad", "start_h": 100.0}]}),
        ("OUR probe NaN", {"seed": 43, "faults": [{"kind": "probe", "tag": "PV.OUR", "mode": "nan", "start_h": 60.0, "end_h": 140.0}]}),
        ("lab typo glucose x10", {"seed": 44, "faults": [{"kind": "lab_value", "draw_index": 5, "field": "glucose_g_per_l", "factor": 10.0}]}),
    ]
    return cases


_RANDOM_SD = {
    "growth.mu_max_per_h": 0.15,
    "product.q_product_pg_per_cell_day": 0.15,
    "metabolism.yield_cells_per_glucose_1e9_per_g": 0.1,
    "death.kd_min_per_h": 0.2,
}


@dataclass(frozen=True)
class ScenarioResult:
    name: str
    recipe_score: float
    nmpc_score: float
    oracle_score: float
    nmpc_titer: float
    nmpc_harvest_h: float
    nmpc_violation_h: float
    nmpc_wall_s: float
    nmpc_failures: int
    nmpc_cold_retries: int
    calibrated_score: float = float("nan")
    """The NMPC with the kinetics calibrated on the plant's development batches (NaN when not run)."""
    calibrated_violation_h: float = float("nan")
    truth_score: float = float("nan")
    """The NMPC given the plant's true kinetics, trust region and monitor as deployed (NaN when not run): what the caution costs when the model is right."""
    truth_violation_h: float = float("nan")

    @property
    def gap_closed(self) -> float:
        return self._gap(self.nmpc_score)

    @property
    def calibrated_gap_closed(self) -> float:
        return self._gap(self.calibrated_score)

    @property
    def truth_gap_closed(self) -> float:
        return self._gap(self.truth_score)

    def _gap(self, score: float) -> float:
        return gap_closed(score, self.recipe_score, self.oracle_score)


def load_scenario(overrides: dict[str, Any]) -> LoadedSimulation:
    """The platform simulation with a scenario's overrides (seed, true-parameter factors, faults)."""
    base = load_simulation(PLATFORM)
    simulation = base.simulation.model_validate({**base.simulation.model_dump(), **overrides})
    return base.model_copy(update={"simulation": simulation})


DEVELOPMENT_BATCHES = 5
DEVELOPMENT_SEED = 500


def development_calibration(plant: str = "cho", *, batches: int = DEVELOPMENT_BATCHES, seed: int = DEVELOPMENT_SEED) -> CalibrationResult:
    """The nominal kinetics calibrated on ``batches`` process-development batches of ``plant`` (other recipes, their own seeds; simulator.records)."""
    nominal = load_scenario({"plant": plant}).nominal
    records = development_batches(load_scenario({"plant": plant, "seed": seed}), batches, seed, id_prefix=f"{plant[:6].upper()}")
    return calibrate(records, nominal, cross_validate=False, based_on=f"nominal kinetics, development batches of {plant}")


def true_kinetics(loaded: LoadedSimulation, recipe: BatchResult) -> CultureParameters:
    """The culture parameters the simulated plant really ran with (``recipe``: any batch of ``loaded``); the media stay the batch's, as a controller knows them.

    Only for a plant of the controller's own structure: a plant of other structure has no such parameters (:class:`ValueError` naming it).
    """
    truth = {name: value for name, value in recipe.true_parameters.items() if not name.startswith("media.")}
    try:
        return replaced_parameters(loaded.nominal, truth)
    except KeyError as error:
        raise ValueError(
            f"plant {loaded.simulation.plant!r}: its true parameters are not the controller model's ({error.args[0]}); a truth arm needs the own (cho) plant"
        ) from None


def run_scenario(case: tuple[str, dict[str, Any]], calibrated: CultureParameters | None = None, *, truth_arm: bool = False) -> ScenarioResult:
    """Recipe, NMPC (nominal kinetics; and ``calibrated`` ones when given, with their envelope) and oracle on one seeded batch.

    ``truth_arm``: also the NMPC given the plant's true kinetics (no envelope: the recipe band, as for the nominal model), with the
    estimator, trust region and monitor as deployed. What it leaves of the gap is the caution's cost, not the model's error.
    """
    name, overrides = case
    loaded = load_scenario(overrides)
    recipe = run_recipe_batch(loaded)
    truth_kinetics = true_kinetics(loaded, recipe) if truth_arm else None  # refused here, before any batch runs, if the plant's truth is not the model's
    started = time.perf_counter()
    nmpc = run_controlled_batch(loaded, make_source=estimator_with(loaded.nominal), envelope=loaded.nominal.envelope, fitted=loaded.nominal.calibrated)
    wall = time.perf_counter() - started
    tuned = run_controlled_batch(loaded, make_source=estimator_with(calibrated), envelope=calibrated.envelope, fitted=calibrated.calibrated) if calibrated is not None else None
    oracle = run_controlled_batch(loaded, make_source=oracle_source)
    truth = run_controlled_batch(loaded, make_source=estimator_with(truth_kinetics)) if truth_kinetics is not None else None
    return ScenarioResult(
        name=name,
        recipe_score=recipe.kpis.score_g_per_day,
        nmpc_score=nmpc.batch.kpis.score_g_per_day,
        oracle_score=oracle.batch.kpis.score_g_per_day,
        nmpc_titer=nmpc.batch.kpis.titer_g_per_l,
        nmpc_harvest_h=nmpc.batch.kpis.harvest_time_h,
        nmpc_violation_h=nmpc.batch.kpis.violation_h,
        nmpc_wall_s=wall,
        nmpc_failures=nmpc.solver_failures,
        nmpc_cold_retries=nmpc.solver_cold_retries,
        calibrated_score=tuned.batch.kpis.score_g_per_day if tuned is not None else float("nan"),
        calibrated_violation_h=tuned.batch.kpis.violation_h if tuned is not None else float("nan"),
        truth_score=truth.batch.kpis.score_g_per_day if truth is not None else float("nan"),
        truth_violation_h=truth.batch.kpis.violation_h if truth is not None else float("nan"),
    )
