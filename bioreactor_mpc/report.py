"""Batch reports: the KPI table, the trajectories file and the plot."""

from __future__ import annotations

import csv
from collections.abc import Callable
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
from rich.table import Table

from controller.config import BatchConfig
from controller.kpis import BatchKpis
from controller.types import LabResult
from plant_models.cho import INPUTS
from simulator.plant import PlantTrajectory
from simulator.plants import OBSERVABLES


def kpi_table(columns: dict[str, BatchKpis], title: str) -> Table:
    """The batch KPIs, one column per run (for example the controller's beside the recipe's on the same batch)."""
    table = Table(title=title)
    table.add_column("KPI")
    for name in columns:
        table.add_column(name, justify="right")
    rows: list[tuple[str, Callable[[BatchKpis], str]]] = [
        ("harvest time", lambda k: f"{k.harvest_time_h:.1f} h (day {k.harvest_time_h / 24:.2f})"),
        ("titer at harvest", lambda k: f"{k.titer_g_per_l:.2f} g/L"),
        ("product mass", lambda k: f"{k.product_mass_g / 1000:.3f} kg"),
        ("peak viable cell density", lambda k: f"{k.peak_vcd_1e6_per_ml:.1f} 1e6 cells/mL"),
        ("viability at harvest", lambda k: f"{k.viability_at_harvest_pct:.1f} %"),
        ("galactosylated fraction", lambda k: f"{k.galactosylated_fraction:.3f}"),
        ("glucose < limit", lambda k: f"{k.glucose_low_h:.1f} h"),
        ("osmolality > limit", lambda k: f"{k.osmolality_high_h:.1f} h"),
        ("volume > maximum", lambda k: f"{k.volume_high_h:.1f} h"),
        ("score (product per occupied day)", lambda k: f"{k.score_g_per_day:.1f} g/day"),
    ]
    for name, cell in rows:
        table.add_row(name, *(cell(kpis) for kpis in columns.values()))
    return table


def write_trajectories_csv(path: Path, trajectory: PlantTrajectory, every_minutes: int) -> None:
    """The plant's true states, the inputs and the observables every ``every_minutes`` (and the harvest row)."""
    rows = np.arange(0, trajectory.time_h.size, every_minutes)
    if rows[-1] != trajectory.time_h.size - 1:
        rows = np.append(rows, trajectory.time_h.size - 1)
    header = (
        ["process_time_h"]
        + [f"state.{s.name}_{_unit_slug(s.unit)}" for s in trajectory.state_signals]
        + [f"{s.name}_{_unit_slug(s.unit)}" for s in INPUTS]
        + [f"{s.name}_{_unit_slug(s.unit)}" for s in OBSERVABLES]
    )
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        for i in rows:
            values = [trajectory.time_h[i], *trajectory.states[i], *trajectory.inputs[i], *trajectory.observables[i]]
            writer.writerow([f"{v:.6g}" for v in values])


def write_lab_results_csv(path: Path, results: tuple[LabResult, ...]) -> None:
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        names = list(LabResult.__dataclass_fields__)
        writer.writerow(names)
        for result in results:
            writer.writerow([getattr(result, name) for name in names])


def _unit_slug(unit: str) -> str:
    return unit.replace("1e6 cells/mL", "1e6_per_ml").replace("/", "_per_").replace(" ", "").replace("%", "pct").replace("-", "fraction")


def plot_batch(path: Path, trajectory: PlantTrajectory, lab_results: tuple[LabResult, ...], batch: BatchConfig, title: str) -> None:
    """A 3 × 3 grid of the main trajectories, lab results as markers, limits dashed."""
    t_day = trajectory.time_h / 24.0
    lab_day = np.array([r.taken_at_h / 24.0 for r in lab_results])

    def lab(name: str) -> np.ndarray:
        return np.array([getattr(r, name) for r in lab_results])

    out = trajectory.observable
    fig, axes = plt.subplots(3, 3, figsize=(15, 10), sharex=True)
    panels = [
        ("viable cells [1e6/mL]", out("viable_cells"), "vcd_1e6_per_ml", None),
        ("viability [%]", out("viability"), "viability_pct", batch.recipe.harvest_viability_pct),
        ("glucose [g/L]", out("glucose"), "glucose_g_per_l", batch.limits.glucose_min_g_per_l),
        ("lactate [g/L]", out("lactate"), "lactate_g_per_l", None),
        ("glutamine and ammonia [mM]", out("glutamine"), "glutamine_mm", None),
        ("osmolality [mOsm/kg]", out("osmolality"), "osmolality_mosm_per_kg", batch.limits.osmolality_max_mosm_per_kg),
        ("titer [g/L]", out("titer"), "titer_g_per_l", None),
        ("volume [L]", out("volume"), None, batch.equipment.max_working_volume_l),
        ("temperature [°C]", out("temperature"), None, None),
    ]
    for ax, (label, series, lab_field, limit) in zip(axes.flat, panels, strict=True):
        ax.plot(t_day, series, color="tab:blue", lw=1.5, label="true")
        if lab_field is not None and lab_results:
            ax.plot(lab_day, lab(lab_field), "o", color="tab:orange", ms=4, label="lab (at draw time)")
        if limit is not None:
            ax.axhline(limit, color="tab:red", ls="--", lw=1, label="limit")
        ax.set_title(label, fontsize=10)
        ax.grid(alpha=0.3)
    ammonia_ax = axes.flat[4]
    ammonia_ax.plot(t_day, out("ammonia"), color="tab:purple", lw=1.5, label="ammonia")
    if lab_results:
        ammonia_ax.plot(lab_day, lab("ammonia_mm"), "s", color="tab:purple", ms=3, alpha=0.7)
    quality_ax = axes.flat[6].twinx()
    quality_ax.plot(t_day, out("galactosylated_fraction"), color="tab:green", lw=1, label="galactosylated fraction")
    quality_ax.set_ylim(0, 1)
    quality_ax.set_ylabel("galactosylated fraction", color="tab:green", fontsize=9)
    temperature_ax = axes.flat[8]
    temperature_ax.plot(t_day, trajectory.inputs[:, 2], color="tab:gray", ls=":", lw=1, label="setpoint")
    feed_ax = axes.flat[7].twinx()
    feed_ax.step(t_day, trajectory.inputs[:, 0], where="post", color="tab:brown", lw=0.8, label="feed [L/h]")
    feed_ax.step(t_day, trajectory.inputs[:, 1], where="post", color="tab:olive", lw=0.8, label="glucose feed [L/h]")
    feed_ax.set_ylabel("pump rates [L/h]", fontsize=9)
    feed_ax.legend(loc="center right", fontsize=8)
    axes.flat[0].legend(loc="upper left", fontsize=8)
    for ax in axes[-1]:
        ax.set_xlabel("process time [day]")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_predictions(path: Path, trajectory: PlantTrajectory, snapshots: tuple[tuple[float, np.ndarray, np.ndarray], ...], title: str) -> None:
    """What the controller predicted (dashed, from the plans made at a few times) against what happened."""
    from plant_models.cho import STATE_INDEX

    panels = [("viable_cells", "viable cells [1e6/mL]"), ("glucose", "glucose [g/L]"), ("titer", "titer [g/L]"), ("volume", "volume [L]")]
    fig, axes = plt.subplots(1, len(panels), figsize=(18, 4.5))
    t_day = trajectory.time_h / 24.0
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, (state, label) in zip(axes, panels, strict=True):
        ax.plot(t_day, trajectory.observable(state), color="black", lw=1.8, label="actual (true)")
        for i, (made_h, times_h, states) in enumerate(snapshots):
            ax.plot(times_h / 24.0, states[STATE_INDEX[state]], ls="--", lw=1.2, color=colors[i % len(colors)], label=f"predicted on day {made_h / 24:.0f}")
        ax.set_title(label, fontsize=10)
        ax.set_xlabel("process time [day]")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_batch_files(
    output_dir: Path, stem: str, trajectory: PlantTrajectory, lab_results: tuple[LabResult, ...], batch: BatchConfig, *, title: str, csv_every_min: int = 15, plot: bool = True
) -> dict[str, Path]:
    """The trajectories and lab results as CSV and the plot, named ``<stem>-…``; the paths by kind."""
    output_dir.mkdir(parents=True, exist_ok=True)
    paths = {"trajectories": output_dir / f"{stem}-trajectories.csv", "lab results": output_dir / f"{stem}-lab.csv"}
    write_trajectories_csv(paths["trajectories"], trajectory, csv_every_min)
    write_lab_results_csv(paths["lab results"], lab_results)
    if plot:
        paths["plot"] = output_dir / f"{stem}.png"
        plot_batch(paths["plot"], trajectory, lab_results, batch, title)
    return paths
