"""``bioreactor-mpc report``: one self-contained HTML page for a batch, from its runtime history alone.

The page works for any run, against a real PLC (``bioreactor-mpc run``) or
the simulated one (``demo``, ``plc-sim`` + ``run``): it reads only the
history (:func:`interfaces.history_export.read_history_batch`, read-only).
Figures are PNGs inline as base64 and the style sheet is inline: the file
can be mailed, archived or opened offline, and names no other file or URL.

Sections (docs/export-and-report.md): the batch and its runs; KPIs against
the plan and the recipe; measured against predicted (lab VCD, titer,
glucose and the volume against the estimate ± sd); setpoints and the trust
region; the trust region's lab checks; alarms; states and writes; the model
and the configuration in force (their digests, from the audit trail's
``config_loaded`` records).
"""

from __future__ import annotations

import base64
import html
import io
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np

from bioreactor_mpc.report import TrustTimeline, plot_trust
from controller.config import BatchConfig
from controller.kpis import batch_score_g_per_day
from controller.version import tool_version
from interfaces.audit import AuditRecord
from interfaces.history_export import ExportError, HistoryBatch, Table

SECTIONS = (
    ("batch", "Batch and runs"),
    ("kpis", "KPIs against the plan and the recipe"),
    ("measured-vs-predicted", "Measured against predicted"),
    ("setpoints", "Setpoints and the trust region"),
    ("trust", "Trust region: lab checks of the plan"),
    ("alarms", "Alarms"),
    ("states-writes", "States and PLC writes"),
    ("configuration", "Model and configuration in force"),
)
"""The report's sections, in order: (anchor, heading)."""

_CSS = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1200px; color: #222; }
h1 { font-size: 1.5em; } h2 { font-size: 1.2em; border-bottom: 1px solid #ccc; margin-top: 2em; }
table { border-collapse: collapse; margin: 0.5em 0; font-size: 0.9em; }
th, td { border: 1px solid #ddd; padding: 0.25em 0.6em; text-align: left; vertical-align: top; }
th { background: #f3f3f3; } td.n { text-align: right; font-variant-numeric: tabular-nums; }
code { font-size: 0.85em; word-break: break-all; } img { max-width: 100%; }
p.note { color: #555; font-size: 0.9em; } nav a { margin-right: 1em; }
"""


def write_history_report(batch: HistoryBatch, out: Path) -> int:
    """Write the report of ``batch`` to ``out`` (not the history itself); its size in bytes."""
    if out.resolve() == batch.path.resolve():
        raise ExportError(f"{out}: the report would replace the history it reports on: give another --out")
    page = render_history_report(batch).encode("utf-8")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_bytes(page)
    except OSError as error:
        raise ExportError(f"{out}: cannot write the report: {error.strerror or error}") from error
    return len(page)


def render_history_report(batch: HistoryBatch) -> str:
    """The report as one HTML document."""
    config = _batch_config(batch)
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>Batch report {_e(batch.batch_id)}</title><style>{_CSS}</style></head><body>",
        f"<h1>Batch report: {_e(batch.batch_id)}</h1>",
        "<nav>" + "".join(f'<a href="#{anchor}">{_e(title)}</a>' for anchor, title in SECTIONS) + "</nav>",
    ]
    builders: dict[str, Callable[[], str]] = {
        "batch": lambda: _batch_section(batch),
        "kpis": lambda: _kpi_section(batch, config),
        "measured-vs-predicted": lambda: _measured_section(batch),
        "setpoints": lambda: _setpoint_section(batch, config),
        "trust": lambda: _trust_section(batch),
        "alarms": lambda: _alarm_section(batch),
        "states-writes": lambda: _states_writes_section(batch),
        "configuration": lambda: _configuration_section(batch),
    }
    for anchor, title in SECTIONS:
        parts.append(f'<section id="{anchor}"><h2>{_e(title)}</h2>{builders[anchor]()}</section>')
    parts.append(f'<p class="note">Made by bioreactor-mpc {_e(tool_version())} on {datetime.now(UTC).isoformat(timespec="seconds")} from the history alone.</p>')
    parts.append("</body></html>")
    return "\n".join(parts)


# ---------------------------------------------------------------------- helpers


def _e(value: Any) -> str:
    return html.escape(str(value))


def _num(value: Any, digits: int = 2, unit: str = "") -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "—"
    text = f"{float(value):.{digits}f}"
    return f"{text} {unit}" if unit else text


def _html_table(header: Sequence[str] | None, rows: Sequence[Sequence[Any]], numeric: Sequence[int] = ()) -> str:
    """A table; ``numeric``: the columns to right-align; without ``header``, the first column's cells are headings."""
    if header is None:
        body = "".join(f"<tr><th>{_e(row[0])}</th>" + "".join(f"<td>{_e(c)}</td>" for c in row[1:]) + "</tr>" for row in rows)
        return f"<table>{body}</table>"
    head = "".join(f"<th>{_e(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f'<td class="n">{_e(c)}</td>' if i in numeric else f"<td>{_e(c)}</td>" for i, c in enumerate(row)) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _png(draw: Callable[[io.BytesIO], None], alt: str) -> str:
    """A figure drawn into a PNG, inline as base64."""
    buffer = io.BytesIO()
    draw(buffer)
    data = base64.b64encode(buffer.getvalue()).decode("ascii")
    return f'<img alt="{_e(alt)}" src="data:image/png;base64,{data}">'


def _save(fig: Any, target: io.BytesIO) -> None:
    fig.tight_layout()
    fig.savefig(target, format="png", dpi=90)
    plt.close(fig)


def _batch_config(batch: HistoryBatch) -> BatchConfig | None:
    """The batch file the runtime recorded with the run; None when it has none or one this version cannot read."""
    data = batch.batch_config
    if data is None:
        return None
    try:
        return BatchConfig.model_validate(data)
    except ValueError:  # pydantic's ValidationError: a batch file of another version
        return None


def _days(values: Sequence[float]) -> np.ndarray:
    return np.asarray(values, dtype=float) / 24.0


# ---------------------------------------------------------------------- sections


def _batch_section(batch: HistoryBatch) -> str:
    cycles = batch.tables["cycles"]
    span = batch.time_range_h()
    states: dict[str, int] = {}
    for state in cycles.column("state"):
        states[state] = states.get(state, 0) + 1
    facts = [
        ("batch", batch.batch_id),
        ("history", str(batch.path)),
        ("history sha256", batch.history_sha256 + (f" (and its -wal file: {batch.wal_sha256})" if batch.wal_sha256 else "")),
        ("process time", f"{span[0]:.1f}–{span[1]:.1f} h (day {span[0] / 24:.2f}–{span[1] / 24:.2f})" if span else "no scans recorded"),
        ("cycles", f"{cycles.rows}: " + ", ".join(f"{n} {s}" for s, n in states.items()) if cycles.rows else "0"),
        ("lab results", str(batch.tables["lab"].rows)),
    ]
    runs = [(r.run_id, r.requested_mode, r.started_utc, r.ended_utc or "running (or stopped without an end)", r.end_reason or "—") for r in batch.runs]
    return _html_table(None, facts) + _html_table(["run", "mode requested", "started (UTC)", "ended (UTC)", "end"], runs)


@dataclass(frozen=True)
class _Outcome:
    """The batch's outcome as the history measured it: the last lab result and the last scan."""

    harvest_h: float | None
    titer_g_per_l: float | None
    titer_drawn_h: float | None
    volume_l: float | None
    peak_vcd_1e6_per_ml: float | None
    viability_pct: float | None
    glucose_low_samples: int | None

    @property
    def product_mass_g(self) -> float | None:
        return self.titer_g_per_l * self.volume_l if self.titer_g_per_l is not None and self.volume_l is not None else None


def _outcome(batch: HistoryBatch, config: BatchConfig | None) -> _Outcome:
    lab, online = batch.tables["lab"], batch.tables["online"]

    def last(table: Table, column: str) -> tuple[float | None, int | None]:
        if column not in table.data:
            return None, None
        found = [(i, v) for i, v in enumerate(table.column(column)) if v is not None]
        return (float(found[-1][1]), found[-1][0]) if found else (None, None)

    titer, titer_row = last(lab, "titer_g_per_l")
    volume, _ = last(online, "pv_volume_l")
    viability, _ = last(lab, "viability_pct")
    times = [t for t in online.column("process_time_h") if t is not None] if online.rows else []
    vcd = [v for v in lab.column("vcd_1e6_per_ml") if v is not None]
    glucose = [v for v in lab.column("glucose_g_per_l") if v is not None]
    return _Outcome(
        harvest_h=max(times) if times else None,
        titer_g_per_l=titer,
        titer_drawn_h=lab.column("draw_time_h")[titer_row] if titer_row is not None else None,
        volume_l=volume,
        peak_vcd_1e6_per_ml=max(vcd) if vcd else None,
        viability_pct=viability,
        glucose_low_samples=sum(g < config.limits.glucose_min_g_per_l for g in glucose) if config is not None else None,
    )


def _recipe_forecasts(audit: Sequence[AuditRecord]) -> list[Mapping[str, Any]]:
    """The recommendations signed in the batch (advisory mode), which carry the recipe's forecast beside the plan's."""
    found = []
    for record in audit:
        recommendation = record.details.get("recommendation") if record.action.startswith("recommendation_") else None
        if isinstance(recommendation, Mapping):
            found.append(recommendation)
    return found


@dataclass(frozen=True)
class _RecipeForecast:
    """The recipe's outcome as the model forecast it: where it comes from, and its harvest, titer and score (with sds where recorded)."""

    label: str
    harvest_h: float | None
    titer_g_per_l: float | None
    titer_sd_g_per_l: float | None
    score_g_per_day: float | None
    score_sd_g_per_day: float | None


def _recipe_forecast(batch: HistoryBatch, config: BatchConfig | None) -> _RecipeForecast | None:
    """The recipe's forecast at the first cycle that recorded one (every cycle does since they are recorded); else, for an older
    history, the one of the last signed recommendation (advisory mode); None when neither is there."""
    cycles = batch.tables["cycles"]
    if "recipe_forecast_titer_g_per_l" in cycles.data:
        for i, titer in enumerate(cycles.column("recipe_forecast_titer_g_per_l")):
            if titer is not None:
                row = {name: cycles.column(name)[i] for name in cycles.data if name.startswith("recipe_forecast_") or name == "process_time_h"}
                return _RecipeForecast(
                    f"recipe, forecast at {_num(row['process_time_h'], 1)} h (± 1 sd)",
                    row["recipe_forecast_harvest_time_h"],
                    titer,
                    row["recipe_forecast_titer_sd_g_per_l"],
                    row["recipe_forecast_score_g_per_day"],
                    row["recipe_forecast_score_sd_g_per_day"],
                )
    signed = _recipe_forecasts(batch.audit)
    if not signed:
        return None
    last = signed[-1]
    made_at = last.get("made_at_h")
    return _RecipeForecast(
        f"recipe, forecast with the recommendation signed at {_num(made_at, 1)} h",
        config.recipe.harvest_h if config is not None else None,
        last.get("recipe_titer_g_per_l"),
        None,
        last.get("recipe_score_g_per_day"),
        None,
    )


def _simulated(batch: HistoryBatch) -> tuple[Mapping[str, Any], Mapping[str, Any]] | None:
    """The simulator's true KPIs of this batch and of the recipe on the same batch (the last :data:`SIMULATION_REFERENCE` record), if simulated."""
    for record in reversed(batch.simulation):
        this, recipe = record.details.get("batch_kpis"), record.details.get("recipe_kpis")
        if isinstance(this, Mapping) and isinstance(recipe, Mapping):
            return this, recipe
    return None


def _with_sd(value: Any, sd: Any, digits: int) -> str:
    text = _num(value, digits)
    return f"{text} ± {_num(sd, digits)}" if text != "—" and sd is not None else text


def _kpi_section(batch: HistoryBatch, config: BatchConfig | None) -> str:
    outcome = _outcome(batch, config)
    cycles = batch.tables["cycles"]
    planned = [
        (h, t, s)
        for h, t, s in zip(cycles.column("planned_harvest_time_h"), cycles.column("predicted_titer_g_per_l"), cycles.column("predicted_score_g_per_day"), strict=True)
        if s is not None
    ]
    first_plan, last_plan = (planned[0], planned[-1]) if planned else ((None, None, None), (None, None, None))
    turnaround = config.economics.turnaround_days if config is not None else None
    mass = outcome.product_mass_g
    score = batch_score_g_per_day(mass, outcome.harvest_h, turnaround) if mass is not None and outcome.harvest_h and turnaround is not None else None
    recipe = _recipe_forecast(batch, config) or _RecipeForecast("recipe, forecast", config.recipe.harvest_h if config is not None else None, None, None, None, None)
    simulated = _simulated(batch)
    rows: list[list[str]] = [
        ["harvest (last scan) [h]", _num(outcome.harvest_h, 1), _num(first_plan[0], 1), _num(last_plan[0], 1), _num(recipe.harvest_h, 1)],
        ["titer at harvest [g/L]", _num(outcome.titer_g_per_l, 2), _num(first_plan[1], 2), _num(last_plan[1], 2), _with_sd(recipe.titer_g_per_l, recipe.titer_sd_g_per_l, 2)],
        ["volume at the last scan [L]", _num(outcome.volume_l, 0), "", "", ""],
        ["product mass [kg]", _num(mass / 1000 if mass is not None else None, 3), "", "", ""],
        ["score: product per occupied day [g/day]", _num(score, 1), _num(first_plan[2], 1), _num(last_plan[2], 1), _with_sd(recipe.score_g_per_day, recipe.score_sd_g_per_day, 1)],
        ["peak VCD, lab [1e6 cells/mL]", _num(outcome.peak_vcd_1e6_per_ml, 1), "", "", ""],
        ["viability, last lab result [%]", _num(outcome.viability_pct, 1), "", "", ""],
        ["lab results below the glucose limit", "—" if outcome.glucose_low_samples is None else str(outcome.glucose_low_samples), "", "", ""],
    ]
    header = ["KPI", "this batch, measured", "plan at the first cycle (forecast)", "plan at the last cycle (forecast)", recipe.label]
    if simulated is not None:
        header += ["this batch, simulated truth", "recipe on the same batch, simulated truth"]
        keys = ("harvest_time_h", "titer_g_per_l", None, "product_mass_g", "score_g_per_day", "peak_vcd_1e6_per_ml", "viability_at_harvest_pct", None)
        digits = (1, 2, 0, 3, 1, 1, 1, 0)
        scale = (1.0, 1.0, 1.0, 1e-3, 1.0, 1.0, 1.0, 1.0)
        for row, key, n, k in zip(rows, keys, digits, scale, strict=True):
            row += ["", ""] if key is None else [_num(_scaled(part.get(key), k), n) for part in simulated]
    notes = [
        f"Measured: the last lab titer (drawn at {_num(outcome.titer_drawn_h, 1)} h) times PV.Volume at the last scan; the score divides the product by the days "
        f"from inoculation to the last scan plus the turnaround ({_num(turnaround, 1, 'days')}) of the batch file recorded with the run.",
        "Plan: the NMPC's forecast at the first and at the last cycle that made a plan (its harvest, the titer then and its score); the plan records no sd.",
        _recipe_note(recipe),
    ]
    if simulated is not None:
        notes.append(
            "Simulated truth: the simulator's own plant, not a measurement and not a forecast: this batch's true outcome, and the platform recipe "
            "run by the simulator on the same batch (the same plant, seed and inoculum). A real plant has neither."
        )
    numeric = tuple(range(1, len(header)))
    return _html_table(header, rows, numeric=numeric) + "".join(f'<p class="note">{_e(n)}</p>' for n in notes)


def _scaled(value: Any, factor: float) -> float | None:
    return float(value) * factor if isinstance(value, int | float) else None


def _recipe_note(recipe: _RecipeForecast) -> str:
    if recipe.label.startswith("recipe, forecast at"):
        return (
            "Recipe: a forecast, not a measurement (a batch runs one policy; what the recipe would have given is never measured). The model runs the "
            "platform recipe from the estimate of the first cycle that forecast it (at inoculation, before any control) to the recipe's harvest, with "
            "the estimator's uncertainty carried forward: ± 1 sd. Compare it with the plan at the first cycle, forecast from the same estimate. Every "
            "cycle's forecast of the recipe from its own estimate is in the export (cycles: recipe_forecast_…)."
        )
    if recipe.titer_g_per_l is not None:
        return "Recipe: its harvest from the batch file; its titer and score as forecast with the last signed recommendation (advisory mode; a history recorded before the cycles recorded the recipe's forecast)."
    return "Recipe: its harvest from the batch file; no cycle of this batch recorded a forecast of the recipe (a history recorded before they did, or no cycle had an estimate)."


_MEASURED_PANELS = (
    ("viable cells [1e6/mL]", "vcd_1e6_per_ml", "estimate_viable_cells_1e6_per_ml", "estimate_viable_cells_sd_1e6_per_ml"),
    ("titer [g/L]", "titer_g_per_l", "estimate_titer_g_per_l", "estimate_titer_sd_g_per_l"),
    ("glucose [g/L]", "glucose_g_per_l", "estimate_glucose_g_per_l", "estimate_glucose_sd_g_per_l"),
    ("volume [L]", None, "estimate_volume_l", "estimate_volume_sd_l"),
)
"""(title, lab column, estimate column, its sd column): what the estimator predicted against what was measured."""


def _measured_section(batch: HistoryBatch) -> str:
    cycles, lab, online = batch.tables["cycles"], batch.tables["lab"], batch.tables["online"]
    panels = [panel for panel in _MEASURED_PANELS if panel[2] in cycles.data and panel[3] in cycles.data]
    if not cycles.rows or not panels:
        return '<p class="note">No cycle recorded an estimate (the runtime ran without its estimator, or no cycle ran).</p>'
    t_h = np.asarray(cycles.numbers("process_time_h"))
    draw_h = np.asarray(lab.numbers("draw_time_h"))

    def draw(target: io.BytesIO) -> None:
        fig, axes = plt.subplots(1, len(panels), figsize=(4.5 * len(panels), 4.2), squeeze=False)
        for ax, (title, lab_column, estimate, sd) in zip(axes[0], panels, strict=True):
            mean, spread = np.asarray(cycles.numbers(estimate)), np.asarray(cycles.numbers(sd))
            ax.plot(t_h / 24, mean, color="tab:blue", lw=1.3, label="estimate")
            ax.fill_between(t_h / 24, mean - spread, mean + spread, color="tab:blue", alpha=0.2, label="± 1 sd")
            if lab_column is not None and lab.rows:
                ax.plot(draw_h / 24, lab.numbers(lab_column), "o", color="tab:orange", ms=4, label="lab (at draw)")
            elif lab_column is None and "pv_volume_l" in online.data:
                ax.plot(_days(online.numbers("process_time_h")), online.numbers("pv_volume_l"), color="tab:gray", lw=0.8, ls=":", label="PV.Volume")
            ax.set_title(title, fontsize=10)
            ax.set_xlabel("process time [day]")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
        _save(fig, target)

    rows = []
    for title, lab_column, estimate, sd in panels:
        if lab_column is None or not lab.rows:
            continue
        measured = np.asarray(lab.numbers(lab_column))
        predicted = np.interp(draw_h, t_h, np.asarray(cycles.numbers(estimate)), left=np.nan, right=np.nan)
        spread = np.interp(draw_h, t_h, np.asarray(cycles.numbers(sd)), left=np.nan, right=np.nan)
        ok = np.isfinite(measured) & np.isfinite(predicted) & np.isfinite(spread) & (spread > 0)
        if not ok.any():
            continue
        error = measured[ok] - predicted[ok]
        inside = np.abs(error) <= 2 * spread[ok]
        rows.append((title, int(ok.sum()), _num(float(np.mean(error)), 3), _num(float(np.sqrt(np.mean(error**2))), 3), f"{100 * inside.mean():.0f} %"))
    table = _html_table(["quantity", "lab results", "mean error (lab − estimate)", "rms error", "within ± 2 sd"], rows, numeric=(1, 2, 3, 4)) if rows else ""
    note = (
        '<p class="note">The estimate at each lab result\'s draw time, as the cycles recorded it before the result came back: '
        "a prediction, not a fit. The band is the estimator's ± 1 standard deviation.</p>"
    )
    return _png(draw, "measured against predicted") + table + note


def _setpoint_section(batch: HistoryBatch, config: BatchConfig | None) -> str:
    cycles, online = batch.tables["cycles"], batch.tables["online"]
    if not cycles.rows:
        return '<p class="note">No cycle recorded.</p>'
    t_day = _days(cycles.numbers("process_time_h"))
    scan_day = _days(online.numbers("process_time_h")) if online.rows else np.array([])
    panels = (
        ("nutrient feed [L/h]", "applied_feed_rate_lph", "sp_feed_rate_lph", ("trust_feed_rate_low_lph", "trust_feed_rate_high_lph"), None),
        ("glucose feed [L/h]", "applied_glucose_rate_lph", "sp_glucose_rate_lph", None, None),
        ("temperature [°C]", "applied_temperature_degc", "sp_temperature_degc", ("trust_temperature_low_degc", "trust_temperature_high_degc"), "pv_temperature_degc"),
        ("planned harvest [day]", "planned_harvest_time_h", None, ("trust_harvest_earliest_h", "trust_harvest_latest_h"), None),
    )

    def series(table: Table, column: str | None) -> np.ndarray | None:
        return np.asarray(table.numbers(column)) if column is not None and column in table.data else None

    def draw(target: io.BytesIO) -> None:
        fig, axes = plt.subplots(2, 2, figsize=(15, 7.5), sharex=True)
        for ax, (title, applied, plc, band, measured) in zip(axes.flat, panels, strict=True):
            scale = 24.0 if applied == "planned_harvest_time_h" else 1.0
            values = series(cycles, applied)
            if values is not None:
                ax.step(t_day, values / scale, where="post", color="tab:blue", lw=1.3, label="decided (after the safety filter)" if scale == 1.0 else "plan's harvest")
            read_back = series(online, plc)
            if read_back is not None:
                ax.step(scan_day, read_back, where="post", color="black", lw=0.8, ls="--", label="PLC setpoint (read back)")
            pv = series(online, measured)
            if pv is not None:
                ax.plot(scan_day, pv, color="tab:red", lw=0.7, alpha=0.7, label="PV.Temperature")
            low, high = (series(cycles, band[0]), series(cycles, band[1])) if band is not None else (None, None)
            if low is not None and high is not None and np.isfinite(low).any():
                ax.fill_between(t_day, low / scale, high / scale, step="post", color="tab:green", alpha=0.15, label="trust region")
            if scale != 1.0 and config is not None:
                ax.axhline(config.recipe.harvest_h / 24.0, color="tab:gray", ls=":", lw=1, label="recipe's harvest")
            ax.set_title(title, fontsize=10)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8, loc="best")
        for ax in axes[-1]:
            ax.set_xlabel("process time [day]")
        _save(fig, target)

    return _png(draw, "setpoints and the trust region") + (
        '<p class="note">Decided: the setpoints of each cycle after the safety filter (written in closed loop, recommended in advisory mode); '
        "PLC setpoint: what the PLC reported at each scan. The green band is the trust region the plan had to stay in.</p>"
    )


def _trust_section(batch: HistoryBatch) -> str:
    timeline = TrustTimeline.from_records([t for t, _ in batch.trust], [summary for _, summary in batch.trust])
    if timeline is None:
        return '<p class="note">No cycle recorded a trust region.</p>'
    lines = "".join(f"<li>{_e(line.strip())}</li>" for line in timeline.describe())
    return f"<ul>{lines}</ul>" + _png(lambda target: plot_trust(target, timeline, f"{batch.batch_id}: trust region of the NMPC"), "trust region")


def _alarm_section(batch: HistoryBatch) -> str:
    alarms = batch.tables["alarms"]
    if not alarms.rows:
        return "<p>No alarm was raised.</p>"
    rows: list[list[Any]] = []
    open_rows: dict[str, list[Any]] = {}
    for t_h, code, event, message in zip(alarms.column("process_time_h"), alarms.column("code"), alarms.column("event"), alarms.column("message"), strict=True):
        if event == "raised":
            row = [code, _num(t_h, 1), "still active at the end", message]
            rows.append(row)
            open_rows[code] = row
        elif code in open_rows:
            open_rows.pop(code)[2] = _num(t_h, 1)
    return _html_table(["alarm", "raised at [h]", "cleared at [h]", "message"], rows, numeric=(1, 2))


def _states_writes_section(batch: HistoryBatch) -> str:
    states, writes = batch.tables["states"], batch.tables["writes"]
    state_rows = list(zip(states.column("process_time_h"), states.column("previous"), states.column("state"), states.column("reason"), strict=True))
    counts: dict[str, int] = {}
    for outcome in writes.column("outcome"):
        counts[outcome] = counts.get(outcome, 0) + 1
    failed = [
        (_num(t, 1), w, outcome, detail or "")
        for t, w, outcome, detail in zip(writes.column("process_time_h"), writes.column("write_id"), writes.column("outcome"), writes.column("detail"), strict=True)
        if outcome != "ok"
    ]
    parts = [_html_table(["at [h]", "from", "to", "why"], [(_num(t, 1), a, b, r) for t, a, b, r in state_rows], numeric=(0,))]
    parts.append(f"<p>PLC writes: {writes.rows} (" + ", ".join(f"{n} {o}" for o, n in sorted(counts.items())) + ").</p>")
    if failed:
        shown = failed[:50]
        parts.append(_html_table(["at [h]", "write", "outcome", "detail"], shown, numeric=(0, 1)))
        if len(failed) > len(shown):
            parts.append(f'<p class="note">{len(failed) - len(shown)} more writes not ok: the export\'s writes table has them all.</p>')
    return "".join(parts)


def _configuration_section(batch: HistoryBatch) -> str:
    loaded = [r for r in batch.audit if r.action == "config_loaded"]
    if not loaded:
        return '<p class="note">The audit trail has no config_loaded record for these runs (a history written without its audit trail).</p>'
    fields = (
        ("start", lambda d: d.get("start", "")),
        ("mode", lambda d: f"{d.get('mode', '')} (from the {d.get('mode_from', '?')})"),
        ("model file", lambda d: (d.get("model_file") or {}).get("path", "")),
        ("model file sha256", lambda d: (d.get("model_file") or {}).get("sha256", "")),
        ("calibrated model approved at audit seq", lambda d: (d.get("model_file") or {}).get("approval_seq") or "— (not calibrated)"),
        ("nominal parameters sha256", lambda d: d.get("nominal_parameters_sha256", "")),
        ("runtime settings sha256", lambda d: d.get("settings_sha256", "")),
        ("batch file sha256", lambda d: d.get("batch_sha256", "")),
        ("estimator config sha256", lambda d: d.get("estimator_config_sha256", "")),
    )
    header = ["", *(f"audit seq {r.seq}, {_num(r.process_time_h, 1)} h" for r in loaded)]
    rows = [(name, *(value(r.details) for r in loaded)) for name, value in fields]
    text = _html_table(header, rows)
    approvals = [(r.seq, r.actor, r.subject, r.details.get("sha256", "")) for r in batch.audit if r.action == "model_approved"]
    if approvals:
        text += "<p>Models approved during the batch:</p>" + _html_table(["audit seq", "engineer", "file", "sha256"], approvals, numeric=(0,))
    return text + '<p class="note">From the audit trail\'s config_loaded records, one per start of the runtime on this batch.</p>'
