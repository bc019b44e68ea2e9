"""Whole simulated batches in-process: the plant and its PLC, run on the virtual clock."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from controller.config import BatchConfig
from controller.kpis import BatchKpis, compute_kpis
from controller.types import LabResult
from plant_models.cho import OUTPUT_INDEX, CultureModel
from plant_models.parameters import CultureParameters, parameter_vector, scaled_parameters
from simulator.config import LoadedSimulation, SimulationConfig
from simulator.plant import PlantTrajectory
from simulator.plc import PHASE_RUNNING, SimulatedPlc


@dataclass(frozen=True)
class BatchResult:
    trajectory: PlantTrajectory
    lab_results: tuple[LabResult, ...]
    kpis: BatchKpis
    harvest_reason: str
    true_culture: CultureParameters


def true_culture_parameters(nominal: CultureParameters, simulation: SimulationConfig, rng: np.random.Generator) -> CultureParameters:
    """The simulator's truth: nominal kinetics times fixed factors and seeded log-normal draws."""
    factors = dict(simulation.true_parameter_factors)
    for name in sorted(simulation.true_parameter_relative_sd):
        sd = simulation.true_parameter_relative_sd[name]
        factors[name] = factors.get(name, 1.0) * float(np.exp(rng.normal(0.0, sd) - 0.5 * sd * sd))
    return scaled_parameters(nominal, factors) if factors else nominal


def build_simulated_plc(loaded: LoadedSimulation, model: CultureModel | None = None) -> tuple[SimulatedPlc, CultureParameters]:
    """A simulated PLC with the seeded truth, noise and sampling of ``loaded``.

    Independent random streams (truth, sampling times, lab noise, online
    noise) come from one seed, so a batch is reproducible whatever reads it.
    """
    truth_rng, sampling_rng, lab_rng, online_rng = (np.random.default_rng(child) for child in np.random.SeedSequence(loaded.simulation.seed).spawn(4))
    truth = true_culture_parameters(loaded.nominal, loaded.simulation, truth_rng)
    plc = SimulatedPlc(
        model=model or CultureModel(),
        batch=loaded.batch,
        simulation=loaded.simulation,
        true_parameters=parameter_vector(truth, loaded.batch.media),
        rng_streams=(sampling_rng, lab_rng, online_rng),
    )
    return plc, truth


def kpis_of(trajectory: PlantTrajectory, batch: BatchConfig) -> BatchKpis:
    outputs = trajectory.outputs
    return compute_kpis(
        time_h=trajectory.time_h,
        vcd_1e6_per_ml=trajectory.state("viable_cells"),
        viability_pct=outputs[:, OUTPUT_INDEX["viability"]],
        glucose_g_per_l=trajectory.state("glucose"),
        osmolality_mosm_per_kg=outputs[:, OUTPUT_INDEX["osmolality"]],
        volume_l=trajectory.state("volume"),
        titer_g_per_l=trajectory.state("titer"),
        galactosylated_fraction=outputs[:, OUTPUT_INDEX["galactosylated_fraction"]],
        config=batch,
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
    trajectory = plc.plant.trajectory()
    return BatchResult(
        trajectory=trajectory,
        lab_results=tuple(plc.published),
        kpis=kpis_of(trajectory, loaded.batch),
        harvest_reason=plc.harvest_reason or "",
        true_culture=truth,
    )
