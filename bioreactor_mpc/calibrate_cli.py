"""``bioreactor-mpc calibrate``: fit the culture model to a site's batch records and write the calibrated parameter file and its report.

Records are batch directories in the CSV layout of ``docs/batch-records.md``,
directories of them, or the runtime's history files. The output is a
parameter file in the format of ``configs/model/*.yaml`` with its provenance
(inputs and their hashes, fit statistics, each parameter's 95 % interval, the
parameters the data could not determine) and the operating envelope the data
covered, plus a report directory: ``report.md``, one plot per batch of measured
against fitted (and nominal), and ``fit.csv``. The workflow is in
``docs/calibration.md``.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml
from rich.console import Console
from rich.table import Table

from bioreactor_mpc.resources import reference_config
from plant_models.errors import BioreactorMPCError
from plant_models.parameters import CultureParameters, ParameterEstimate, is_additive

if TYPE_CHECKING:
    from controller.calibration import CalibrationResult
    from controller.config import BatchTemplate
    from controller.mpc import MpcConfig
    from controller.recipe_proposal import RecipeProposal

    SubParsers = argparse._SubParsersAction[argparse.ArgumentParser]

DEFAULT_MODEL = reference_config("model", "cho_nominal.yaml")
LABELS = {
    "vcd_1e6_per_ml": "viable cells [1e6/mL]",
    "viability_pct": "viability [%]",
    "glucose_g_per_l": "glucose [g/L]",
    "lactate_g_per_l": "lactate [g/L]",
    "glutamine_mm": "glutamine [mM]",
    "ammonia_mm": "ammonia [mM]",
    "titer_g_per_l": "titer [g/L]",
    "osmolality_mosm_per_kg": "osmolality [mOsm/kg]",
    "capacitance_pf_per_cm": "capacitance [pF/cm]",
    "our_mmol_per_l_h": "OUR [mmol/L/h]",
}


PROPOSED_BATCH_FILE = "proposed-batch.yaml"


class CalibrateCommandError(BioreactorMPCError, ValueError):
    """``calibrate`` cannot run as given (an output that exists, a settings file that does not validate)."""


def add_parser(subparsers: SubParsers) -> None:
    calibrate_parser = subparsers.add_parser("calibrate", help="fit the model to batch records; write a calibrated parameter file and a report (docs/calibration.md)")
    calibrate_parser.add_argument("records", nargs="+", type=Path, help="batch directories (CSV layout), directories of them, or history files")
    calibrate_parser.add_argument("--model", type=Path, default=DEFAULT_MODEL, help="the parameter file the fit starts from (default: the nominal CHO kinetics)")
    calibrate_parser.add_argument("--output", type=Path, required=True, help="the calibrated parameter file to write (YAML)")
    calibrate_parser.add_argument("--report-dir", type=Path, default=None, help="where the report goes (default: next to --output, <name>-report/)")
    calibrate_parser.add_argument("--batch", type=Path, action="append", default=[], help="the batch file of a batch in a history file (repeatable)")
    calibrate_parser.add_argument("--settings", type=Path, default=None, help="calibration settings (YAML): which parameters, priors, phases (docs/calibration.md)")
    calibrate_parser.add_argument("--no-cross-validation", action="store_true", help="skip leave-one-batch-out cross-validation")
    calibrate_parser.add_argument("--force", action="store_true", help="overwrite an existing output file")
    calibrate_parser.add_argument(
        "--propose-recipe",
        type=Path,
        default=None,
        metavar="BATCH_FILE",
        help=(
            "also propose the next batch's recipe for this batch file (or process template): the calibrated model's best near the recipes the"
            " records ran or within the trust region's recipe band, if it ranks their outcomes right (docs/calibration.md §7); written as proposed-batch.yaml in the report directory, for review"
        ),
    )
    calibrate_parser.add_argument(
        "--runtime-config",
        type=Path,
        default=None,
        help=(
            "with --propose-recipe: the runtime config whose NMPC harvest specifications (nmpc.mpc) the proposal keeps and whose recipe band"
            " (nmpc.trust) it may search (default: the NMPC's defaults)"
        ),
    )
    calibrate_parser.add_argument(
        "--strict", action="store_true", help="exit 1 when the fit has review warnings (the file and report are still written: a pipeline stops, nothing is lost)"
    )


def run_calibrate(args: argparse.Namespace, console: Console) -> int:
    from controller.calibration import CalibrationSettings, calibrate
    from controller.config import BatchTemplate
    from controller.mpc import MpcConfig
    from controller.recipe_proposal import envelope_withheld_text, misranking, propose_recipe, with_reach_earned
    from controller.runtime_config import load_runtime_config
    from interfaces.batch_records import read_records
    from plant_models.config_loading import load_yaml_model

    if args.output.exists() and not args.force:
        raise CalibrateCommandError(f"{args.output} exists; give --force to overwrite it, or another --output")
    settings = load_yaml_model(args.settings, CalibrationSettings) if args.settings is not None else CalibrationSettings()
    next_template = BatchTemplate.from_yaml(args.propose_recipe) if args.propose_recipe is not None else None
    if args.runtime_config is not None and next_template is None:
        raise CalibrateCommandError("--runtime-config is read for --propose-recipe only; give both, or neither")
    nmpc = load_runtime_config(args.runtime_config).config.nmpc if args.runtime_config is not None else None
    mpc = nmpc.mpc if nmpc is not None else MpcConfig()
    report_dir = args.report_dir or args.output.with_name(f"{args.output.stem}-report")
    stale = report_dir / PROPOSED_BATCH_FILE
    if stale.exists() and not args.force:
        raise CalibrateCommandError(f"{stale} exists (an earlier proposal, perhaps under review); give --force to replace it, or another --report-dir")
    nominal = CultureParameters.from_yaml(args.model)
    records = read_records(args.records, batch_files=args.batch)
    console.print(f"calibrating on {len(records)} batches: {', '.join(r.batch_id for r in records)}")
    result = calibrate(records, nominal, settings=settings, based_on=str(args.model), cross_validate=not args.no_cross_validation)
    next_batch = next_template.for_batch() if next_template is not None else None
    proposal = propose_recipe(records, result, next_batch, mpc=mpc, trust=nmpc.trust if nmpc is not None else None) if next_batch is not None else None
    # A model not shown to rank its records' outcomes right keeps no envelope (docs/calibration.md §7): every group of comparable records is ranked.
    misranked = misranking(records, result, [next_batch] if next_batch is not None else [])
    parameters = with_reach_earned(result.parameters, misranked)
    if misranked is not None:
        result = dataclasses.replace(result, warnings=(*result.warnings, envelope_withheld_text(misranked)))  # reviewed, and counted by --strict
    write_parameter_file(args.output, parameters)
    write_report(report_dir, result, args.output, proposal=proposal, next_template=next_template, mpc=mpc)
    console.print(parameter_table(result))
    statistics = result.fit_statistics
    console.print(f"reduced χ²: {statistics['reduced_chi2_nominal']:.2f} nominal → {statistics['reduced_chi2']:.2f} calibrated; {result.wall_s:.1f} s")
    if result.not_identifiable:
        console.print(f"not identifiable from these batches (kept at nominal): {', '.join(result.not_identifiable)}")
    if result.cross_validation:
        console.print(cross_validation_table(result.cross_validation))
    for warning in result.warnings:
        console.print(f"[bold yellow]review:[/] {warning}")
    if proposal is not None and next_template is not None:
        console.print(proposal_text(proposal, next_template, report_dir / PROPOSED_BATCH_FILE))
    console.print(f"wrote {args.output} and {report_dir / 'report.md'}")
    if args.strict and result.warnings:
        console.print(f"[bold red]--strict:[/] {len(result.warnings)} review warning(s); exit status 1")
        return 1
    return 0


def write_parameter_file(path: Path, parameters: CultureParameters) -> None:
    """The calibrated set in the format of ``configs/model/*.yaml``; it loads with CultureParameters.from_yaml (checked here)."""
    data = parameters.model_dump(mode="json")  # not exclude_none: a parameter that was not identifiable has no interval (None), and says so
    header = (
        "# Calibrated by bioreactor-mpc calibrate: provenance and envelope at the end (an empty envelope: the model was not shown to rank its"
        " records right, see the provenance's warnings). Review the report before deploying.\n"
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(header + yaml.safe_dump(data, sort_keys=False, allow_unicode=True), encoding="utf-8")
    CultureParameters.from_yaml(path)


def change(name: str, estimate: ParameterEstimate) -> str:
    """The fit's change of one parameter: the amount added to a parameter fitted additively (a correction, a temperature sensitivity), else a factor of its nominal."""
    if is_additive(name) or estimate.nominal == 0.0:
        return f"{estimate.value - estimate.nominal:+.4g}"
    return f"×{estimate.value / estimate.nominal:.3f}"


def parameter_table(result: CalibrationResult) -> Table:
    table = Table(title="calibrated parameters (95 % interval)")
    for column in ("parameter", "nominal", "calibrated", "95 % interval", "change"):
        table.add_column(column, justify="left" if column == "parameter" else "right", overflow="fold", no_wrap=column != "parameter")
    for name, estimate in result.estimates.items():
        interval = f"[{estimate.ci95_low:.4g}, {estimate.ci95_high:.4g}]" if estimate.identifiable else "not identifiable"
        table.add_row(name.removeprefix("culture."), f"{estimate.nominal:.4g}", f"{estimate.value:.4g}", interval, change(name, estimate))
    return table


def cross_validation_table(cv: dict[str, float]) -> Table:
    table = Table(title="batches left out, predicted by a fit on the others (relative RMSE)")
    for column in ("quantity", "nominal model", "calibrated model"):
        table.add_column(column, justify="left" if column == "quantity" else "right")
    for quantity in sorted({key.rsplit("_", 1)[0] for key in cv}):
        table.add_row(quantity, f"{cv[f'{quantity}_nominal']:.3f}", f"{cv[f'{quantity}_calibrated']:.3f}")
    return table


def write_report(
    directory: Path,
    result: CalibrationResult,
    parameter_file: Path,
    *,
    proposal: RecipeProposal | None = None,
    next_template: BatchTemplate | None = None,
    mpc: MpcConfig | None = None,
) -> None:
    """report.md (parameters, identifiability, fit statistics, cross-validation, envelope, the proposed recipe), a plot per batch, fit.csv;
    with a ``proposal`` of a recipe, also ``proposed-batch.yaml`` (``next_template`` with the proposed recipe)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    from controller.calibration import LAB_MODEL, ONLINE_MODEL

    directory.mkdir(parents=True, exist_ok=True)
    names = [*LAB_MODEL, *ONLINE_MODEL]
    for fit in result.batches:
        fig, axes = plt.subplots(2, 5, figsize=(20, 7), sharex=True)
        for ax, name in zip(axes.flat, names, strict=True):
            ax.plot(fit.time_h / 24.0, fit.nominal[name], color="tab:gray", ls="--", lw=1, label="nominal model")
            ax.plot(fit.time_h / 24.0, fit.fitted[name], color="tab:blue", lw=1.5, label="calibrated model")
            if name in fit.observations:
                times, values = fit.observations[name]
                ax.plot(times / 24.0, values, "o", color="tab:orange", ms=3, label="measured")
            ax.set_title(LABELS[name], fontsize=10)
            ax.grid(alpha=0.3)
        axes.flat[0].legend(fontsize=8)
        for ax in axes[-1]:
            ax.set_xlabel("process time [day]")
        fig.suptitle(f"batch {fit.batch_id}: measured against fitted")
        fig.tight_layout()
        fig.savefig(directory / f"{_slug(fit.batch_id)}.png", dpi=90)
        plt.close(fig)
    with (directory / "fit.csv").open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["batch_id", "quantity", "process_time_h", "measured", "fitted", "nominal"])
        for fit in result.batches:
            for name, (times, values) in fit.observations.items():
                fitted = np.interp(times, fit.time_h, fit.fitted[name])
                nominal = np.interp(times, fit.time_h, fit.nominal[name])
                for t, v, f, n in zip(times, values, fitted, nominal, strict=True):
                    writer.writerow([fit.batch_id, name, f"{t:.4f}", f"{v:.6g}", f"{f:.6g}", f"{n:.6g}"])
    proposed = directory / PROPOSED_BATCH_FILE
    proposed.unlink(missing_ok=True)  # a proposal of an earlier run in this directory is not this calibration's (run_calibrate asks for --force)
    if proposal is not None and next_template is not None:
        write_proposed_batch(proposed, next_template, proposal)
    lines = _report_markdown(result, parameter_file)
    if proposal is not None and next_template is not None:
        lines += "\n" + proposal_markdown(proposal, next_template, mpc) + "\n"
    (directory / "report.md").write_text(lines, encoding="utf-8")


def _slug(text: str) -> str:
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in text)


def _settings_lines(settings: dict[str, Any]) -> list[str]:
    """The fit's settings where they differ from the defaults (all of them are in the parameter file's ``provenance.settings``)."""
    from controller.calibration import CalibrationSettings

    defaults = CalibrationSettings().model_dump(mode="json")
    changed = {name: value for name, value in settings.items() if defaults.get(name) != value}
    lines = ["## Settings", ""]
    if not changed:
        return [*lines, "The default calibration settings (docs/calibration.md §2); the whole set is in the parameter file's `provenance.settings`.", ""]
    lines += ["Where they differ from the defaults (the whole set is in the parameter file's `provenance.settings`):", "", "```yaml"]
    lines += yaml.safe_dump(changed, sort_keys=False, allow_unicode=True).splitlines()
    return [*lines, "```", ""]


def _report_markdown(result: CalibrationResult, parameter_file: Path) -> str:
    provenance = result.parameters.provenance
    lines = [f"# Calibration report: {parameter_file.name}", ""]
    if provenance is not None:
        lines += [f"Created {provenance.created_utc} by {provenance.tool} {provenance.tool_version}, starting from `{provenance.based_on}`.", ""]
        lines += _settings_lines(provenance.settings)
        lines += ["## Inputs", "", "| file | sha-256 |", "|---|---|"]
        lines += [f"| `{file}` | `{digest}` |" for file, digest in provenance.inputs]
        lines += [""]
    lines += ["## Parameters", "", "| parameter | nominal | calibrated | 95 % interval | change |", "|---|---:|---:|---:|---:|"]
    for name, e in result.estimates.items():
        interval = f"[{e.ci95_low:.4g}, {e.ci95_high:.4g}]" if e.identifiable else "**not identifiable: kept at nominal**"
        lines.append(f"| {name.removeprefix('culture.')} | {e.nominal:.4g} | {e.value:.4g} | {interval} | {change(name, e)} |")
    if result.not_identifiable:
        lines += ["", f"Not identifiable from these batches (their 95 % interval spanned more than the configured factor): {', '.join(result.not_identifiable)}."]
    if result.warnings:
        lines += ["", "## Review before deploying", ""]
        lines += [f"- **{warning}**" for warning in result.warnings]
    lines += ["", "## Fit", "", "| statistic | value |", "|---|---:|"]
    lines += [f"| {name} | {value:.4g} |" for name, value in result.fit_statistics.items()]
    if provenance is not None and provenance.batch_statistics:
        quantities = ("vcd_1e6_per_ml", "titer_g_per_l", "glucose_g_per_l")
        lines += [
            "",
            "### Per batch (a batch far worse than the others may not belong)",
            "",
            "| batch | reduced χ² | " + " | ".join(quantities) + " |",
            "|---|---:|" + "---:|" * len(quantities),
        ]
        for batch_id, row in provenance.batch_statistics.items():
            cells = " | ".join(f"{row[f'rel_rmse_{q}']:.3f}" if f"rel_rmse_{q}" in row else "–" for q in quantities)
            lines.append(f"| {batch_id} | {row['reduced_chi2']:.2f} | {cells} |")
    if result.cross_validation:
        lines += ["", "## Cross-validation (each batch left out, predicted by a fit on the others)", "", "| quantity | nominal model | calibrated model |", "|---|---:|---:|"]
        for quantity in sorted({key.rsplit("_", 1)[0] for key in result.cross_validation}):
            lines.append(f"| {quantity} | {result.cross_validation[f'{quantity}_nominal']:.3f} | {result.cross_validation[f'{quantity}_calibrated']:.3f} |")
        lines += ["", "Relative RMSE of the lab values of the batch left out, fitted on the others from nominal."]
    else:
        lines += ["", "## Cross-validation", "", "Not run (it needs at least 3 batches and is skipped with --no-cross-validation)."]
    lines += [
        "",
        "## Operating envelope the data covered",
        "",
        "| phase | h | temperature °C | feed L/(L·day) | glucose feed L/(L·day) | glucose g/L | batches |",
        "|---|---|---|---|---|---|---:|",
    ]
    for phase in result.parameters.envelope:
        lines.append(
            f"| {phase.phase} | {phase.start_h:g}–{phase.end_h:g} h | {phase.temperature_degc.low:.1f}–{phase.temperature_degc.high:.1f} | "
            f"{phase.feed_per_volume_per_day.low:.4f}–{phase.feed_per_volume_per_day.high:.4f} | "
            f"{phase.glucose_feed_per_volume_per_day.low:.4f}–{phase.glucose_feed_per_volume_per_day.high:.4f} | "
            f"{phase.glucose_g_per_l.low:.2f}–{phase.glucose_g_per_l.high:.2f} | {phase.batches} |"
        )
    lines += ["", "## Batches", ""]
    lines += [f"![{fit.batch_id}]({_slug(fit.batch_id)}.png)" for fit in result.batches]
    return "\n".join(lines) + "\n"


def write_proposed_batch(path: Path, template: BatchTemplate, proposal: RecipeProposal) -> None:
    """``template`` (a batch file, pinned or not) with the proposed recipe, if one was proposed: validated before it is written, and
    written whole or not at all."""
    from controller.config import BatchTemplate

    if proposal.recipe is None or proposal.best is None or proposal.baseline is None:
        return
    # For a batch not yet started: a batch id the given file was pinned to (perhaps a batch long harvested) is not carried over.
    proposed = BatchTemplate.model_validate({**template.model_dump(), "batch_id": None, "recipe": proposal.recipe.model_dump()})
    header = (
        f"# Proposed by bioreactor-mpc calibrate (docs/calibration.md §7): the calibrated model's best recipe, {proposal.region}.\n"
        f"# Forecast score {proposal.best.score_g_per_day:.1f} g/day against {proposal.baseline.score_g_per_day:.1f} for the batch's own recipe;"
        f" rank correlation {proposal.ranking.correlation:+.2f} on the records. Review it under the site's change control before use.\n"
        + (
            f"# A process template: the batch id {template.batch_id!r} is not carried over; pin the next batch's (batch_id) or let the runtime follow the PLC's.\n"
            if template.batch_id
            else ""
        )
    )
    partial = path.with_name(path.name + ".partial")
    partial.write_text(header + yaml.safe_dump(proposed.model_dump(mode="json", exclude_none=True), sort_keys=False, allow_unicode=True), encoding="utf-8")
    BatchTemplate.from_yaml(partial)
    partial.replace(path)


def _correlation(value: float) -> str:
    return "n/a" if math.isnan(value) else f"{value:+.2f}"


def proposal_markdown(proposal: RecipeProposal, batch: BatchTemplate, mpc: MpcConfig | None = None) -> str:
    """The report's section on the proposed recipe: the ranking check, the forecasts, the changes, or why nothing is proposed."""
    from controller.mpc import MpcConfig

    mpc = mpc or MpcConfig()
    settings = proposal.settings
    ranking = proposal.ranking
    lines = ["## The next batch's recipe (docs/calibration.md §7)", ""]
    lines += ["How the calibrated model ranks the records' outcomes (product per day of occupancy at the last titer result):", ""]
    lines += ["| batch | measured g/day | fitted g/day |", "|---|---:|---:|"]
    lines += [f"| {o.batch_id} | {o.measured_score_g_per_day:.1f} | {o.fitted_score_g_per_day:.1f} |" for o in ranking.outcomes]
    lines += ["", *(f"- left out: {why}" for why in ranking.excluded)]
    lines += [
        "",
        f"Rank correlation: {_correlation(ranking.correlation)}. A model with no skill at ranking would reach the threshold over "
        f"{len(ranking.outcomes)} records by chance with probability {ranking.chance:.3f}.",
        "",
    ]
    best, baseline = proposal.best, proposal.baseline
    if proposal.recipe is None or best is None or baseline is None:
        lines += [f"**No recipe proposed:** {proposal.reason}."]
    else:
        lines += [
            f"**Proposed** (`{PROPOSED_BATCH_FILE}`): forecast score {best.score_g_per_day:.1f} g/day against "
            f"{baseline.score_g_per_day:.1f} for the batch's own recipe ({100 * proposal.predicted_gain_fraction:+.1f} %: the model's, "
            f"not the plant's), from {proposal.forecasts} forecasts. Review it under the site's change control before use: the recipe is "
            "also what the runtime stands down to, and the PLC's own recipe is programmed in the PLC."
        ]
    if proposal.forecasts:
        lines += [
            "",
            f"Each candidate kept, in the model's forecast: glucose {settings.glucose_margin_g_per_l:g} g/L above the starvation limit, "
            f"osmolality below its limit, viability at harvest at least {mpc.viability_at_harvest_min_pct + settings.viability_margin_pct:g} % "
            f"and galactosylated fraction at least {mpc.galactosylated_fraction_min + settings.quality_margin:g} (the NMPC's harvest "
            "specifications, of --runtime-config or the defaults, and the margins).",
        ]
    if best is not None:  # a search ran (not when the batch's own recipe broke a margin in the forecast)
        lines += ["", *_band_lines(proposal), "| recipe field | the batch's | proposed | grid searched |", "|---|---:|---:|---:|"]
        lines += [f"| {name} | {old} | {new} | {searched} |" for name, old, new, searched in _changes_rows(proposal, batch)]
    return "\n".join(lines)


def _band_lines(proposal: RecipeProposal) -> list[str]:
    band = proposal.band
    where = f" The proposed recipe lies {proposal.region}." if proposal.recipe is not None and proposal.region else ""
    if band is None or not (band.temperature_degc or band.feed_per_day or band.harvest_h):
        why = "" if band is None else " (the recipe band's reaches are all 0)"
        return [f"Searched: near the recipes the records ran{why}, within the margins and grid steps of docs/calibration.md §7.{where}", ""]
    return [
        "Searched: recipes near those the records ran, and whole recipes in the trust region's recipe band around the batch's recipe"
        f" (temperature within {band.temperature_degc:g} °C of its at every time, nutrient feed within {band.feed_per_day:g} of the initial"
        f" volume per day, harvest within {band.harvest_h:g} h): where the NMPC plans on a model no lab result has checked (the band of"
        f" --runtime-config or the defaults); never a mix of the two. The table's last column is, per field, the range the two searches covered between them (never combined).{where}",
        "",
    ]


def _changes_rows(proposal: RecipeProposal, batch: BatchTemplate) -> list[tuple[str, str, str, str]]:
    rows = []
    for name, (low, high) in proposal.bounds.items():
        old, new = getattr(batch.recipe, name), getattr(proposal.recipe, name) if proposal.recipe is not None else None
        rows.append((name, f"{old:g}", "–" if new is None or new == old else f"{new:g}", f"{low:g}–{high:g}"))
    return rows


def proposal_text(proposal: RecipeProposal, batch: BatchTemplate, path: Path) -> str:
    if proposal.recipe is None:
        return f"no recipe proposed: {proposal.reason}"
    changes = ", ".join(f"{name} {old:g} → {new:g}" for name, (old, new) in proposal.changes(batch.recipe).items())
    return (
        f"recipe proposed ({100 * proposal.predicted_gain_fraction:+.1f} % in the model's forecast, rank correlation {_correlation(proposal.ranking.correlation)}):"
        f" {changes}"
        + (f", {proposal.region}" if proposal.region else "")
        + f"; wrote {path}"
        + (f" (a process template: the batch id {batch.batch_id!r} is not carried over)" if batch.batch_id else "")
    )
