"""Whole simulated batches in-process: the plant and its PLC, run on the virtual clock."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from controller.config import BatchConfig
from controller.kpis import BatchKpis, compute_kpis
from controller.types import LabResult
from plant_models.cho import CultureModel
from simulator.config import LoadedSimulation, SimulationConfig
from simulator.plant import PlantTrajectory
from simulator.plants import EquationPlant, make_plant
from simulator.plc import PHASE_RUNNING, SimulatedPlc


@dataclass(frozen=True)
class BatchResult:
    trajectory: PlantTrajectory
    lab_results: tuple[LabResult, ...]
    kpis: BatchKpis
    harvest_reason: str
    true_parameters: dict[str, float]
    """The plant's true parameters by the plant's own names."""


def true_parameter_factors(simulation: SimulationConfig, rng: np.random.Generator) -> dict[str, float]:
    """The simulator's truth as multipliers of the plant's nominal parameters: fixed factors times seeded log-normal draws."""
    factors = dict(simulation.true_parameter_factors)
    for name in sorted(simulation.true_parameter_relative_sd):
        sd = simulation.true_parameter_relative_sd[name]
        factors[name] = factors.get(name, 1.0) * float(np.exp(rng.normal(0.0, sd) - 0.5 * sd * sd))
    return factors


def plant_of(loaded: LoadedSimulation, model: CultureModel | None = None) -> EquationPlant:
    """The plant model the simulation names (``plant:``); ``model`` is reused by the CHO plant."""
    return make_plant(loaded.simulation.plant, loaded.nominal, model)


def build_simulated_plc(loaded: LoadedSimulation, model: CultureModel | None = None) -> tuple[SimulatedPlc, dict[str, float]]:
    """A simulated PLC in front of the plant of ``loaded``, with its seeded truth, noise and sampling; and the true parameters by name.

    Independent random streams (truth, sampling times, lab noise, online
    noise) come from one seed, so a batch is reproducible whatever reads it.
    """
    truth_rng, sampling_rng, lab_rng, online_rng = (np.random.default_rng(child) for child in np.random.SeedSequence(loaded.simulation.seed).spawn(4))
    plant = plant_of(loaded, model)
    truth = plant.true_parameters(loaded.batch, true_parameter_factors(loaded.simulation, truth_rng))
    plc = SimulatedPlc(
        model=plant,
        batch=loaded.batch,
        simulation=loaded.simulation,
        true_parameters=truth,
        rng_streams=(sampling_rng, lab_rng, online_rng),
    )
    return plc, dict(zip(plant.parameter_names, (float(v) for v in truth), strict=True))


def kpis_of(trajectory: PlantTrajectory, batch: BatchConfig) -> BatchKpis:
    return compute_kpis(
        time_h=trajectory.time_h,
        vcd_1e6_per_ml=trajectory.observable("viable_cells"),
        viability_pct=trajectory.observable("viability"),
        glucose_g_per_l=trajectory.observable("glucose"),
        osmolality_mosm_per_kg=trajectory.observable("osmolality"),
        volume_l=trajectory.observable("volume"),
        titer_g_per_l=trajectory.observable("titer"),
        galactosylated_fraction=trajectory.observable("galactosylated_fraction"),
        config=batch,
    )


def batch_result(plc: SimulatedPlc, truth: dict[str, float], batch: BatchConfig) -> BatchResult:
    """What a finished (or stopped) batch on ``plc`` left: the true trajectory, the published lab results, the KPIs, why it ended."""
    trajectory = plc.plant.trajectory()
    return BatchResult(
        trajectory=trajectory,
        lab_results=tuple(plc.published),
        kpis=kpis_of(trajectory, batch),
        harvest_reason=plc.harvest_reason or "",
        true_parameters=truth,
    )


def run_recipe_batch(
    loaded: LoadedSimulation,
    *,
    progress: Callable[[float], None] | None = None,
    model: CultureModel | None = None,
) -> BatchResult:
    """One batch under the platform recipe: the PLC in local control from inoculation to harvest."""
    plc, truth = build_simulated_plc(loaded, model)
    plc.set_operator_remote(False)
    while plc.phase == PHASE_RUNNING:
        plc.advance_to(plc.next_cycle_boundary_h())
        if progress is not None:
            progress(plc.process_time_h)
    return batch_result(plc, truth, loaded.batch)
