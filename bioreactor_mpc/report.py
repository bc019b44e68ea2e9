"""Batch reports: the KPI table, the trajectories file and the plot; for a controlled batch, the NMPC's trust region."""

from __future__ import annotations

import csv
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
from rich.table import Table

from controller.config import BatchConfig
from controller.kpis import BatchKpis
from controller.trust import RegionSource
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


@dataclass(frozen=True)
class TrustCheck:
    """A lab result held against the plan in force before its draw (:class:`controller.trust.LabCheck`, as the cycle record describes it)."""

    checked_at_h: float
    """The cycle that received the lab result."""
    description: str
    confirmed: bool
    width_after: float
    shadow: bool = False
    """Made while the NMPC stood down, against the model run with the recipe's inputs: evidence for an engineer, no verdict on a plan."""


@dataclass(frozen=True)
class TrustTimeline:
    """The NMPC's trust region cycle by cycle (``TrustRegion.summary`` of each cycle record), for the report."""

    time_h: np.ndarray
    source: RegionSource
    width: np.ndarray
    reach_scale: np.ndarray
    """The earned reach scale (1 in records made before it existed)."""
    misses: np.ndarray
    stood_down: np.ndarray
    temperature_degc: np.ndarray
    """(cycles, 2): the lower and upper bound; NaN where the region is off."""
    feed_rate_lph: np.ndarray
    glucose_min_g_per_l: np.ndarray
    glucose_error_g_per_l: np.ndarray
    """One day-ahead glucose error the floor keeps two of above the limit (NaN in records made before it existed)."""
    harvest_h: np.ndarray
    checks: tuple[TrustCheck, ...]
    endgame: np.ndarray
    """Per cycle: the plan held to what the batch had run (the end-game; False in records made before it existed)."""
    held: bool = False
    """The band was held at its start (a calibrated model not shown to rank its records' outcomes right; ``TrustRegion.widens``)."""

    @classmethod
    def from_records(cls, time_h: Sequence[float], summaries: Sequence[Mapping[str, Any]]) -> TrustTimeline | None:
        """From the cycle times and each cycle's ``trust`` record; None when no cycle recorded one."""
        rows = [(float(t), summary) for t, summary in zip(time_h, summaries, strict=True) if summary]
        if not rows:
            return None

        def pair(summary: Mapping[str, Any], key: str) -> list[float]:
            value = summary.get(key)
            return [float(value[0]), float(value[1])] if value is not None else [math.nan, math.nan]

        checks: list[TrustCheck] = []
        previous = None
        for t, summary in rows:
            last = summary.get("last_check")
            if last is not None and last != previous:
                # A new lab check: its verdict as recorded; in records made before it was, a confirmation reset the misses to 0.
                confirmed = bool(summary.get("last_check_confirmed", int(summary["misses"]) == 0))
                checks.append(TrustCheck(t, str(last), confirmed, float(summary["width"]), bool(summary.get("last_check_shadow", False))))
            previous = last
        return cls(
            time_h=np.array([t for t, _ in rows]),
            source=RegionSource(rows[-1][1]["source"]),
            width=np.array([float(summary["width"]) for _, summary in rows]),
            reach_scale=np.array([float(summary.get("reach_scale", 1.0)) for _, summary in rows]),
            misses=np.array([int(summary["misses"]) for _, summary in rows]),
            stood_down=np.array([bool(summary["stood_down"]) for _, summary in rows]),
            temperature_degc=np.array([pair(summary, "temperature_degc") for _, summary in rows]),
            feed_rate_lph=np.array([pair(summary, "feed_rate_lph") for _, summary in rows]),
            glucose_min_g_per_l=np.array([float(summary.get("glucose_min_g_per_l", math.nan)) for _, summary in rows]),
            glucose_error_g_per_l=np.array([float(summary.get("glucose_error_g_per_l", math.nan)) for _, summary in rows]),
            harvest_h=np.array([pair(summary, "harvest_h") for _, summary in rows]),
            checks=tuple(checks),
            endgame=np.array([bool(summary.get("endgame", False)) for _, summary in rows]),
            held=rows[-1][1].get("widens") is False,
        )

    @property
    def stood_down_at_h(self) -> float | None:
        """The first cycle the NMPC stood down at, or None."""
        down = np.flatnonzero(self.stood_down)
        return float(self.time_h[down[0]]) if down.size else None

    def describe(self) -> list[str]:
        """The report's lines: where the region came from, its width over the batch, the lab checks and any stand-down."""
        if self.source is RegionSource.OFF:
            return ["trust region: off (the NMPC plans anywhere in the equipment's range)"]
        source = (
            "the calibration envelope plus a margin, and the band around the platform recipe"
            if self.source is RegionSource.CALIBRATION_ENVELOPE
            else "a band around the platform recipe"
            + (", held at its start (a calibrated model not shown to rank its records' outcomes right: no result widens it or earns reach)" if self.held else "")
        )
        planned = [check for check in self.checks if not check.shadow]
        confirmed = sum(check.confirmed for check in planned)
        shadow = [check for check in self.checks if check.shadow]
        stood_down = f"; {len(shadow)} while stood down, against the model run with the recipe's inputs ({sum(c.confirmed for c in shadow)} within tolerance)" if shadow else ""
        lines = [
            f"trust region: {source}; width {100 * self.width[0]:.0f} % at the first cycle, {100 * self.width.min():.0f}-{100 * self.width.max():.0f} % "
            f"over the batch, {100 * self.width[-1]:.0f} % at the last; reach earned by results a plan predicted days ahead: x{self.reach_scale.max():.2f} at most, "
            f"x{self.reach_scale[-1]:.2f} at the last cycle; lab checks: {len(planned)} ({confirmed} confirmed, {len(planned) - confirmed} missed){stood_down}"
        ]
        lines += [f"  day {check.checked_at_h / 24:5.2f}: {check.description} -> width {100 * check.width_after:.0f} %" for check in self.checks]
        endgame = np.flatnonzero(self.endgame)
        if endgame.size:
            from_h = float(self.time_h[endgame[0]])
            lines.append(f"end-game from {from_h:.0f} h (day {from_h / 24:.2f}): temperature and feed held within what the batch ran since the shift")
        down_h = self.stood_down_at_h
        if down_h is not None:
            back = np.flatnonzero(~self.stood_down & (self.time_h > down_h))
            until = f"until {self.time_h[back[0]]:.0f} h" if back.size else "for the rest of the batch"
            lines.append(f"the NMPC STOOD DOWN at {down_h:.0f} h (day {down_h / 24:.2f}) after {self.misses[self.stood_down][0]} misses in a row: the platform recipe ran {until}")
        return lines


def write_trust_csv(path: Path, trust: TrustTimeline) -> None:
    """The trust region at every cycle: width, misses, whether the NMPC stood down, the bounds, and the lab check received then."""
    checks = {check.checked_at_h: check.description for check in trust.checks}
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(
            [
                "process_time_h",
                "source",
                "width",
                "reach_scale",
                "misses",
                "stood_down",
                "temperature_low_degc",
                "temperature_high_degc",
                "feed_rate_low_lph",
                "feed_rate_high_lph",
                "glucose_min_g_per_l",
                "glucose_error_g_per_l",
                "harvest_earliest_h",
                "harvest_latest_h",
                "lab_check",
            ]
        )
        for i, t in enumerate(trust.time_h):
            numbers = [trust.width[i], *trust.temperature_degc[i], *trust.feed_rate_lph[i], trust.glucose_min_g_per_l[i], trust.glucose_error_g_per_l[i], *trust.harvest_h[i]]
            width, t_low, t_high, f_low, f_high, glucose, glucose_error, h_low, h_high = (f"{v:.6g}" if math.isfinite(v) else "" for v in numbers)
            writer.writerow(
                [
                    f"{t:.6g}",
                    trust.source.value,
                    width,
                    f"{trust.reach_scale[i]:.6g}",
                    int(trust.misses[i]),
                    int(trust.stood_down[i]),
                    t_low,
                    t_high,
                    f_low,
                    f_high,
                    glucose,
                    glucose_error,
                    h_low,
                    h_high,
                    checks.get(float(t), ""),
                ]
            )


def plot_trust(path: Path | IO[bytes], trust: TrustTimeline, title: str) -> None:
    """The region's width over the batch, each lab check (confirmed or missed) and the time the NMPC stood down, as a PNG file (or into a binary stream)."""
    fig, ax = plt.subplots(figsize=(12, 3.8))
    t_day = trust.time_h / 24.0
    ax.step(t_day, 100.0 * trust.width, where="post", color="tab:green", lw=1.5, label=f"width ({trust.source.value.replace('_', ' ')})")
    kinds = (
        (False, True, "o", "tab:green", "lab check confirmed"),
        (False, False, "x", "tab:red", "lab check missed"),
        (True, True, "o", "tab:gray", "stood down: within tolerance of the model run with the recipe's inputs"),
        (True, False, "x", "tab:gray", "stood down: beyond it"),
    )
    for shadow, confirmed, marker, colour, label in kinds:
        chosen = [check for check in trust.checks if check.shadow is shadow and check.confirmed is confirmed]
        if chosen:
            ax.plot([check.checked_at_h / 24.0 for check in chosen], [100.0 * check.width_after for check in chosen], marker, color=colour, ms=6, label=label)
    if trust.stood_down.any():
        ax.fill_between(t_day, 0, 100, where=trust.stood_down, step="post", color="tab:red", alpha=0.12, label="NMPC stood down: the recipe runs")
    ax.set_ylim(0, 105)
    ax.set_ylabel("trust region width [%]")
    ax.set_xlabel("process time [day]")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower left", fontsize=8)
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


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


def plot_batch(path: Path, trajectory: PlantTrajectory, lab_results: tuple[LabResult, ...], batch: BatchConfig, title: str, *, trust: TrustTimeline | None = None) -> None:
    """A 3 × 3 grid of the main trajectories, lab results as markers, limits dashed; the NMPC's trust region as a band on the temperature
    and the lowest glucose it allowed (``trust``)."""
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
    if trust is not None and np.isfinite(trust.temperature_degc).any():
        trust_day = trust.time_h / 24.0
        temperature_ax.fill_between(trust_day, trust.temperature_degc[:, 0], trust.temperature_degc[:, 1], step="post", color="tab:green", alpha=0.15, label="trust region")
        if trust.stood_down.any():
            temperature_ax.fill_between(
                trust_day, 0, 1, where=trust.stood_down, step="post", transform=temperature_ax.get_xaxis_transform(), color="tab:red", alpha=0.1, label="NMPC stood down"
            )
        temperature_ax.legend(loc="lower left", fontsize=8)
        axes.flat[2].step(trust_day, trust.glucose_min_g_per_l, where="post", color="tab:green", ls=":", lw=1, label="trust region: lowest glucose planned")
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
    output_dir: Path,
    stem: str,
    trajectory: PlantTrajectory,
    lab_results: tuple[LabResult, ...],
    batch: BatchConfig,
    *,
    title: str,
    csv_every_min: int = 15,
    plot: bool = True,
    trust: TrustTimeline | None = None,
) -> dict[str, Path]:
    """The trajectories and lab results as CSV and the plot, named ``<stem>-…`` (with ``trust``, the trust region's CSV and plot too); the paths by kind."""
    output_dir.mkdir(parents=True, exist_ok=True)
    paths = {"trajectories": output_dir / f"{stem}-trajectories.csv", "lab results": output_dir / f"{stem}-lab.csv"}
    write_trajectories_csv(paths["trajectories"], trajectory, csv_every_min)
    write_lab_results_csv(paths["lab results"], lab_results)
    if trust is not None:
        paths["trust region"] = output_dir / f"{stem}-trust.csv"
        write_trust_csv(paths["trust region"], trust)
    if plot:
        paths["plot"] = output_dir / f"{stem}.png"
        plot_batch(paths["plot"], trajectory, lab_results, batch, title, trust=trust)
        if trust is not None and trust.source is not RegionSource.OFF:
            paths["trust plot"] = output_dir / f"{stem}-trust.png"
            plot_trust(paths["trust plot"], trust, f"{title}: trust region of the NMPC")
    return paths
