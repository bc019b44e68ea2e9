"""``bioreactor-mpc export`` and ``bioreactor-mpc report``: a batch's history out as tables, or as one HTML page (docs/export-and-report.md).

Both read the history read-only, so they run beside a runtime that is
writing it, and on an archived copy. Bad input (no such file, not a history,
no runs, no such run or batch) ends with a message naming the file and what
is wrong, exit status 2.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

from rich.console import Console

from interfaces.history_export import ExportFormat, export_batch, read_history_batch


def add_parsers(commands: Any) -> None:
    """The ``export`` and ``report`` subcommands."""
    export = commands.add_parser("export", help="write a batch's history as time-aligned tables with units in the column names, CSV or Parquet, and a manifest")
    export.add_argument("--history", type=Path, required=True, help="the runtime's history file (opened read-only)")
    export.add_argument("--format", choices=[f.value for f in ExportFormat], default=ExportFormat.CSV.value, help="csv (default) or parquet")
    export.add_argument("--out", type=Path, default=None, help="directory to write into (default: <history name>-<format>/ in the current directory)")
    _selection(export)

    report = commands.add_parser("report", help="write a self-contained HTML report of a batch from its history (measured and predicted, setpoints, alarms, KPIs, digests)")
    report.add_argument("--history", type=Path, required=True, help="the runtime's history file (opened read-only)")
    report.add_argument("--out", type=Path, default=None, help="the HTML file (default: <history name>-report.html in the current directory)")
    _selection(report)


def _selection(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--batch", default=None, help="the batch to take (default: the batch of the history's last run)")
    parser.add_argument("--run", type=int, action="append", default=[], help="only this run of the batch (repeatable; default: every run of the batch)")


def run_export(args: argparse.Namespace, console: Console) -> int:
    started = time.monotonic()
    export_format = ExportFormat(args.format)
    batch = read_history_batch(args.history, batch_id=args.batch, run_ids=args.run)
    out = args.out or Path(f"{args.history.stem}-{export_format.value}")
    manifest = export_batch(batch, out, export_format)
    runs = ", ".join(str(n) for n in batch.run_ids)
    console.print(
        f"batch {batch.batch_id}, run{'s' if len(batch.run_ids) > 1 else ''} {runs}, exported to {out} in {time.monotonic() - started:.1f} s:", highlight=False, soft_wrap=True
    )
    for table in manifest["tables"].values():
        console.print(f"  {table['file']:18s} {table['rows']:>7d} rows, {len(table['columns'])} columns", highlight=False)
    console.print(f"  {'manifest.json':18s} batch, runs, time range, row counts, units, the history's sha256 {batch.history_sha256[:16]}…", highlight=False)
    return 0


def run_report(args: argparse.Namespace, console: Console) -> int:
    from bioreactor_mpc.history_report import write_history_report

    started = time.monotonic()
    batch = read_history_batch(args.history, batch_id=args.batch, run_ids=args.run)
    out = args.out or Path(f"{args.history.stem}-report.html")
    size = write_history_report(batch, out)
    console.print(f"report of batch {batch.batch_id}: {out} ({size / 1024:.0f} kB, {time.monotonic() - started:.1f} s)", highlight=False, soft_wrap=True)
    return 0
