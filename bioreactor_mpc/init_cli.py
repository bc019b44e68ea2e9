"""``bioreactor-mpc init DIR``: a site's own, editable copy of the reference configs.

It writes the runtime config, the PLC's tag map, the batch template, the
kinetics, a simulation config for trying the set against the simulated PLC,
and a README saying what to edit. The files are the reference configs shipped
with the package, with the runtime config's paths pointing at their
neighbours (``plc.yaml``, ``batch.yaml``, ``model.yaml``) and its history
where ``--history`` says. Existing files are left alone unless ``--force``.
"""

from __future__ import annotations

import argparse
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.console import Console

from bioreactor_mpc.resources import reference_config
from plant_models.errors import BioreactorMPCError

RUNTIME_FILE = "runtime.yaml"
TAG_MAP_FILE = "plc.yaml"
BATCH_FILE = "batch.yaml"
MODEL_FILE = "model.yaml"
SIMULATION_FILE = "simulate.yaml"
README_FILE = "README.md"
_PLAIN = re.compile(r"[A-Za-z0-9_/][A-Za-z0-9_./-]*")
"""A path YAML reads as the same string unquoted."""
DEFAULT_HISTORY = "history.sqlite"
"""The history beside the config: right for a trial; a deployment names one under /var/lib (docs/deployment.md)."""


@dataclass(frozen=True)
class SiteFile:
    """One file of a site's config set and what it is for."""

    name: str
    text: str
    purpose: str


def add_parser(commands: Any) -> None:
    """The ``init`` subcommand."""
    init = commands.add_parser("init", help="write an editable config set for a site into DIR: runtime config, tag map, batch template, kinetics, and a README on what to edit")
    init.add_argument("directory", type=Path, metavar="DIR", help="where the files go (made if missing)")
    init.add_argument(
        "--protocol", choices=["opcua", "modbus"], default="opcua", help="the PLC's protocol: which reference tag map and runtime config to start from (default: opcua)"
    )
    init.add_argument(
        "--history",
        type=Path,
        default=None,
        help=f"the history file the runtime config names, written as an absolute path (default: {DEFAULT_HISTORY} beside the config; a service: /var/lib/bioreactor-mpc/history.sqlite)",
    )
    init.add_argument("--force", action="store_true", help="overwrite files of the set that exist")


def run_init(args: argparse.Namespace, console: Console) -> int:
    directory: Path = args.directory
    history = str(args.history.absolute()) if args.history is not None else DEFAULT_HISTORY
    files = site_files(args.protocol, history)
    if directory.exists() and not directory.is_dir():
        raise BioreactorMPCError(f"{directory}: exists and is not a directory")
    existing = [f.name for f in files if (directory / f.name).exists()]
    if existing and not args.force:
        raise BioreactorMPCError(f"{directory}: {', '.join(existing)} exist{'s' if len(existing) == 1 else ''}; nothing written (--force replaces them)")
    directory.mkdir(parents=True, exist_ok=True)
    for site_file in files:
        (directory / site_file.name).write_text(site_file.text, encoding="utf-8")
        console.print(f"{directory / site_file.name!s:40s} {site_file.purpose}", highlight=False, soft_wrap=True)
    console.print(f"edit them as {directory / README_FILE} says; then: bioreactor-mpc run --config {directory / RUNTIME_FILE}", highlight=False, soft_wrap=True)
    return 0


def site_files(protocol: str, history: str) -> list[SiteFile]:
    """The files of a site's config set, from the reference configs of ``protocol``; the runtime's history at ``history`` (relative to the set, or absolute)."""
    runtime = _with_paths(
        _reference("runtime", f"reference-{protocol}.yaml"),
        {"tag_map": TAG_MAP_FILE, "batch": BATCH_FILE, "model": MODEL_FILE, "history": history},
    )
    simulation = _with_paths(_reference("simulate", "platform.yaml"), {"model": MODEL_FILE, "batch": BATCH_FILE})
    return [
        SiteFile(RUNTIME_FILE, _header("runtime config: what the runtime reads and where it writes") + runtime, "runtime config"),
        SiteFile(TAG_MAP_FILE, _header(f"PLC tag map ({protocol})") + _reference("plc", f"reference-{protocol}.yaml"), f"tag map ({protocol})"),
        SiteFile(BATCH_FILE, _header("batch template: inoculum, media, equipment, recipe, limits") + _reference("batch", "platform.yaml"), "batch template"),
        SiteFile(MODEL_FILE, _header("kinetics, for the estimator and the MPC") + _reference("model", "cho_nominal.yaml"), "kinetics"),
        SiteFile(SIMULATION_FILE, _header("simulated plant, to try this set before the real PLC") + simulation, "simulation config (trials)"),
        SiteFile(README_FILE, _readme(protocol, history), "what to edit"),
    ]


def _reference(*parts: str) -> str:
    return reference_config(*parts).read_text(encoding="utf-8").rstrip("\n") + "\n"


def _header(what: str) -> str:
    return f"# This site's {what}; written by bioreactor-mpc init from the reference configs (README.md beside it says what to edit).\n"


def _with_paths(text: str, paths: dict[str, str]) -> str:
    """``text`` (a reference config) without its leading comment, its top-level path keys set to ``paths``."""
    body = text.lstrip("\n")
    while body.startswith("#"):
        body = body.split("\n", 1)[1] if "\n" in body else ""
    for key, value in paths.items():
        scalar = value if _PLAIN.fullmatch(value) else json.dumps(value)  # a JSON string is a YAML scalar too
        body, count = re.subn(rf"^{re.escape(key)}:.*$", f"{key}: {scalar}", body, flags=re.MULTILINE)
        if count != 1:
            raise BioreactorMPCError(f"the reference config has {count} top-level '{key}:' lines, not one: this version of bioreactor-mpc cannot write a site set from it")
    return body


def _readme(protocol: str, history: str) -> str:
    insecure = (
        "- `allow_insecure: true` is only for the simulated PLC on 127.0.0.1: remove it and set up the OPC UA\n"
        "  certificates (docs/opcua-security.md) before connecting to a real PLC.\n"
        if protocol == "opcua"
        else ""
    )
    return f"""# A site's bioreactor-mpc config set

Written by `bioreactor-mpc init` from the reference configs of this version
of bioreactor-mpc ({protocol}). Every file here is yours to edit; paths in
`runtime.yaml` are relative to this folder unless absolute. Check an edit
with an editor that reads the JSON Schemas of `bioreactor-mpc schema`, or by
starting the runtime: a bad file stops it at once, naming the field.

## What to edit

`{BATCH_FILE}`: the batch template
- `batch_id` pins the runtime to one batch, the one the PLC reports in
  `Status.BatchId`; without it the runtime follows the PLC from batch to
  batch (docs/runtime.md).
- `inoculation`, `media`, `equipment`: your inoculum, feeds and bioreactor
  (working volume, pump ranges, temperature range).
- `recipe` and `limits`: your platform recipe and the limits the MPC keeps.

`{MODEL_FILE}`: the kinetics
- The nominal CHO kinetics. Replace them with a set calibrated on your
  cell line (`bioreactor-mpc calibrate`, then `bioreactor-mpc model approve`;
  docs/calibration.md).

`{TAG_MAP_FILE}`: the PLC's tag map
- The endpoint of your PLC and, for each signal, the node id (OPC UA) or the
  register (Modbus) your PLC uses, with its type (docs/plc-interface.md).

`{RUNTIME_FILE}`: the runtime
- `mode`: start a new site in `advisory`.
- `history`: now `{history}`. A service keeps it under
  /var/lib/bioreactor-mpc/ (docs/deployment.md).
- `poll_interval_s`: 0.02 suits the simulated PLC in lockstep; 1 s a real PLC.
{insecure}- A `screen` section serves the operator screen (docs/operator-screen.md).

`{SIMULATION_FILE}`: a simulated plant built from `{MODEL_FILE}` and `{BATCH_FILE}`,
for trials only; the runtime never reads it.

## Try the set

    bioreactor-mpc simulate --config {SIMULATION_FILE} --no-plot
    bioreactor-mpc plc-sim --protocol {protocol} --scenario {SIMULATION_FILE} --tag-map {TAG_MAP_FILE}
    bioreactor-mpc run --config {RUNTIME_FILE}          # in another terminal, against the simulated PLC

(from this folder; from elsewhere, give the paths to these files).
"""
