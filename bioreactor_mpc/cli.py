"""The ``bioreactor-mpc`` command.

User errors (a bad config, a non-physical simulation) end with a message that
says what is wrong and where, and exit status 2; no stack trace.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import structlog
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

from bioreactor_mpc.logging import configure_logging
from bioreactor_mpc.report import kpi_table, plot_batch, plot_predictions, write_lab_results_csv, write_trajectories_csv
from plant_models.errors import BioreactorMPCError

if TYPE_CHECKING:
    from simulator.closed_loop import ControlledBatchResult

REPO_CONFIGS = Path(__file__).resolve().parent.parent / "configs"
DEFAULT_SIMULATION = REPO_CONFIGS / "simulate" / "platform.yaml"
EXIT_USER_ERROR = 2

log = structlog.get_logger("bioreactor_mpc")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="bioreactor-mpc", description="Model-predictive control runtime for fed-batch CHO bioreactors.")
    parser.add_argument("--log-json", action="store_true", help="log JSON lines even in a terminal")
    commands = parser.add_subparsers(dest="command", required=True)

    simulate = commands.add_parser("simulate", help="simulate one batch in-process and report its KPIs")
    simulate.add_argument("--config", type=Path, default=DEFAULT_SIMULATION, help=f"simulation config (default: {DEFAULT_SIMULATION})")
    simulate.add_argument("--seed", type=int, default=None, help="override the config's seed")
    simulate.add_argument("--parameters", type=Path, default=None, help="kinetics file to use as the nominal set (overrides the config's 'model')")
    simulate.add_argument(
        "--controller",
        choices=["recipe", "nmpc", "oracle"],
        default="recipe",
        help="who decides: the PLC's platform recipe, the NMPC with its estimator, or the NMPC with perfect knowledge (the oracle)",
    )
    simulate.add_argument("--output-dir", type=Path, default=Path("runs/simulate"), help="where trajectories and the plot go (default: runs/simulate)")
    simulate.add_argument("--csv-every-min", type=int, default=15, help="trajectory file resolution in minutes (plant resolution is 1 min)")
    simulate.add_argument("--no-plot", action="store_true", help="skip the PNG plot")

    schema = commands.add_parser("schema", help="write JSON Schemas of the config files, for editors that check YAML")
    schema.add_argument("--output-dir", type=Path, default=Path("runs/schema"), help="where the schemas go (default: runs/schema)")
    return parser


def _schema(args: argparse.Namespace, console: Console) -> int:
    import json

    from controller.config import BatchConfig
    from interfaces.tagmap import ModbusTagMap, OpcUaTagMap
    from plant_models.parameters import CultureParameters
    from simulator.config import SimulationConfig

    args.output_dir.mkdir(parents=True, exist_ok=True)
    models = (
        ("culture-parameters", CultureParameters),
        ("batch", BatchConfig),
        ("simulation", SimulationConfig),
        ("tag-map-opcua", OpcUaTagMap),
        ("tag-map-modbus", ModbusTagMap),
    )
    for name, model in models:
        path = args.output_dir / f"{name}.schema.json"
        path.write_text(json.dumps(model.model_json_schema(), indent=2) + "\n", encoding="utf-8")
        console.print(f"{path}")
    return 0


def _simulate(args: argparse.Namespace, console: Console) -> int:
    from simulator.batch import run_recipe_batch
    from simulator.closed_loop import estimator_source, oracle_source, run_controlled_batch
    from simulator.config import load_simulation

    if args.csv_every_min < 1:
        raise BioreactorMPCError(f"--csv-every-min must be at least 1, got {args.csv_every_min}")
    loaded = load_simulation(args.config, seed=args.seed, model=args.parameters)
    latest_h = loaded.batch.limits.latest_harvest_h
    log.info("batch_started", config=str(args.config), seed=loaded.simulation.seed, controller=args.controller, batch_id=loaded.batch.batch_id)
    with Progress(TextColumn("simulating"), BarColumn(), TextColumn("{task.completed:.0f}/{task.total:.0f} h"), TimeElapsedColumn(), console=console, transient=True) as progress:
        task = progress.add_task("batch", total=latest_h)

        def advance(t_h: float) -> None:
            progress.update(task, completed=t_h)

        controlled = None
        if args.controller == "recipe":
            result = run_recipe_batch(loaded, progress=advance)
        else:
            source = estimator_source if args.controller == "nmpc" else oracle_source
            controlled = run_controlled_batch(loaded, make_source=source, progress=advance)
            result = controlled.batch
    log.info("batch_harvested", process_time_h=round(result.kpis.harvest_time_h, 2), reason=result.harvest_reason)

    output_dir: Path = args.output_dir
    output_dir.mkdir(parents=True, exist_ok=True)
    stem = f"{loaded.batch.batch_id}-seed{loaded.simulation.seed}-{args.controller}"
    trajectories = output_dir / f"{stem}-trajectories.csv"
    lab = output_dir / f"{stem}-lab.csv"
    write_trajectories_csv(trajectories, result.trajectory, args.csv_every_min)
    write_lab_results_csv(lab, result.lab_results)
    columns = {args.controller: result.kpis}
    if controlled is not None:
        columns["recipe, same batch"] = run_recipe_batch(loaded).kpis
    console.print(kpi_table(columns, f"{loaded.batch.batch_id}, seed {loaded.simulation.seed}, {args.controller}; harvest: {result.harvest_reason}"))
    if controlled is not None:
        recipe_score = columns["recipe, same batch"].score_g_per_day
        gain = 100.0 * (result.kpis.score_g_per_day / recipe_score - 1.0)
        console.print(f"score: {args.controller} {result.kpis.score_g_per_day:.1f} g/day against the recipe's {recipe_score:.1f} g/day on the same batch ({gain:+.1f} %)")
    console.print(f"trajectories: {trajectories}")
    console.print(f"lab results:  {lab}")
    if not args.no_plot:
        plot = output_dir / f"{stem}.png"
        plot_batch(plot, result.trajectory, result.lab_results, loaded.batch, f"{stem}: score {result.kpis.score_g_per_day:.0f} g/day")
        console.print(f"plot:         {plot}")
    if controlled is not None:
        _report_controller(controlled, output_dir, stem, console, plot=not args.no_plot)
    return 0


def _report_controller(controlled: ControlledBatchResult, output_dir: Path, stem: str, console: Console, *, plot: bool) -> None:
    import numpy as np

    solves = np.asarray(controlled.solve_times_s)
    if solves.size:
        console.print(
            f"solver: {solves.size} solves, median {1000 * np.median(solves):.0f} ms, p95 {1000 * np.percentile(solves, 95):.0f} ms, "
            f"max {1000 * solves.max():.0f} ms; failures {controlled.solver_failures}; decisions {controlled.decisions_by_source}"
        )
    errors = controlled.harvest_titer_errors()
    if errors:
        actual = controlled.batch.kpis.titer_g_per_l
        for day in (3, 7, 10):
            at = [e for t, e in errors if t >= 24.0 * day]
            if at:
                console.print(f"harvest titer predicted on day {day:>2d}: {actual + at[0]:.2f} g/L (actual {actual:.2f}, error {100 * at[0] / actual:+.1f} %)")
    if plot and controlled.plan_snapshots:
        path = output_dir / f"{stem}-predictions.png"
        plot_predictions(path, controlled.batch.trajectory, controlled.plan_snapshots, f"{stem}: predicted vs actual")
        console.print(f"predictions:  {path}")


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    configure_logging(json=True if args.log_json else None)
    console = Console()
    try:
        if args.command == "simulate":
            return _simulate(args, console)
        if args.command == "schema":
            return _schema(args, console)
    except BioreactorMPCError as error:
        print(f"bioreactor-mpc {args.command}: error: {error}", file=sys.stderr)
        return EXIT_USER_ERROR
    raise AssertionError(f"unhandled command {args.command!r}")


if __name__ == "__main__":
    sys.exit(main())
