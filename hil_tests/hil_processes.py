"""Three processes on 127.0.0.1: the runtime (``run``), the soft PLC (``soft-plc``) and the plant (``plant-sim``), as docs/hil.md wires them.

:func:`run_three_processes` starts them in that order of dependence (the soft
PLC first, then the plant and the runtime against it), waits for the batch to
end, and kills whatever still runs in its ``finally``; every process writes
its log beside the run's files.
"""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from bioreactor_mpc.demo import free_port, wait_for_listener

REPO = Path(__file__).resolve().parent.parent
PLATFORM_BATCH = REPO / "configs" / "batch" / "platform.yaml"
NOMINAL_MODEL = REPO / "configs" / "model" / "cho_nominal.yaml"
RUNTIME_CONFIGS = {protocol: REPO / "configs" / "runtime" / f"reference-{protocol}.yaml" for protocol in ("opcua", "modbus")}
IO_MAPS = {protocol: REPO / "configs" / "io" / f"soft-plc-{protocol}.yaml" for protocol in ("opcua", "modbus")}
"""The soft PLC's field I/O towards plant-sim by protocol: a small OPC UA server, or a Modbus TCP I/O device."""


def scenario(directory: Path, *, seed: int = 1, name: str = "platform") -> Path:
    """A copy of ``configs/simulate/<name>.yaml`` in ``directory`` with its files named absolutely and ``seed``.

    The batch stays the platform's: the runtime's NLP is compiled per batch
    (and cached), and a batch of its own would cost the first run minutes of C compilation.
    """
    config = yaml.safe_load((REPO / "configs" / "simulate" / f"{name}.yaml").read_text())
    config.update(model=str(NOMINAL_MODEL), batch=str(PLATFORM_BATCH), seed=seed)
    path = directory / "simulation.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def _latest_cycle_h(history: Path) -> float:
    if not history.exists():
        return -1.0
    try:
        with sqlite3.connect(f"file:{history}?mode=ro", uri=True, timeout=1.0) as db:
            row = db.execute("SELECT MAX(process_time_h) FROM cycles").fetchone()
    except sqlite3.OperationalError:  # the runtime has not made its tables yet, or holds a write lock
        return -1.0
    return float(row[0]) if row and row[0] is not None else -1.0


@dataclass(frozen=True)
class HilRun:
    plant: dict[str, Any] | None
    """plant-sim's KPIs (of the true trajectory), timing and faults; None for a batch stopped before harvest."""
    soft_plc: dict[str, Any] | None
    """The soft PLC's scans, missed scans and scan times; None for a batch stopped before harvest."""
    history: Path
    directory: Path


def run_three_processes(
    directory: Path,
    simulation: Path,
    *,
    faults: tuple[str, ...] = (),
    timeout_s: float = 240.0,
    stop_at_h: float | None = None,
    protocol: str = "opcua",
    field_io: str = "opcua",
    nmpc_trust: dict[str, object] | None = None,
) -> HilRun:
    """One batch: runtime in closed loop ⇄ soft PLC (lockstep, virtual time) ⇄ plant-sim, each its own process (and process group).

    ``protocol``: the reference interface between the runtime and the soft
    PLC; ``field_io``: the soft PLC's field I/O towards plant-sim (its I/O
    map, :data:`IO_MAPS`), OPC UA or Modbus TCP.
    ``stop_at_h``: stop the runtime (SIGTERM, as an operator would) once its
    history holds that cycle, and end the batch there instead of at harvest.
    ``nmpc_trust``: the runtime config's ``nmpc.trust`` settings to change (the trust region's defaults otherwise).
    """
    reference_port, io_port = free_port(), free_port()
    reference_endpoint = f"opc.tcp://127.0.0.1:{reference_port}/bioreactor-mpc/" if protocol == "opcua" else f"127.0.0.1:{reference_port}"
    io_endpoint = f"opc.tcp://127.0.0.1:{io_port}/soft-plc-io/" if field_io == "opcua" else f"127.0.0.1:{io_port}"
    io_map = IO_MAPS[field_io]
    runtime_template = RUNTIME_CONFIGS[protocol]
    config = yaml.safe_load(runtime_template.read_text())
    for key in ("tag_map", "model"):
        config[key] = str((runtime_template.parent / config[key]).resolve())
    config.update(batch=str(PLATFORM_BATCH), history=str(directory / "history.sqlite"), poll_interval_s=0.01, monitoring={"port": 0})
    if nmpc_trust:
        nmpc = config.setdefault("nmpc", {})
        nmpc["trust"] = {**nmpc.get("trust", {}), **nmpc_trust}
    runtime_config = directory / "runtime.yaml"
    runtime_config.write_text(yaml.safe_dump(config))
    cli = [sys.executable, "-m", "bioreactor_mpc", "--log-json"]
    soft_plc = ["soft-plc", "--protocol", protocol, "--scenario", str(simulation), "--endpoint", reference_endpoint, "--io", str(io_map), "--io-endpoint", io_endpoint]
    soft_plc += ["--summary", str(directory / "soft-plc.json"), "--linger-s", "2"]
    plant_sim = ["plant-sim", "--io", str(io_map), "--io-endpoint", io_endpoint, "--scenario", str(simulation), "--report-dir", str(directory), "--report-stem", "plant"]
    plant_sim += ["--wall-timeout-s", str(timeout_s), *(argument for fault in faults for argument in ("--fault", fault))]
    commands = {"soft-plc": [*cli, *soft_plc], "plant-sim": [*cli, *plant_sim], "runtime": [*cli, "run", "--config", str(runtime_config), "--endpoint", reference_endpoint]}
    processes: dict[str, subprocess.Popen[bytes]] = {}
    logs = {name: (directory / f"{name}.log").open("wb") for name in commands}
    environment = {**os.environ, "PYTHONUNBUFFERED": "1"}
    try:
        processes["soft-plc"] = subprocess.Popen(commands["soft-plc"], stdout=logs["soft-plc"], stderr=subprocess.STDOUT, env=environment, start_new_session=True)
        wait_for_listener(reference_port, processes["soft-plc"], directory / "soft-plc.log")
        wait_for_listener(io_port, processes["soft-plc"], directory / "soft-plc.log")
        for name in ("plant-sim", "runtime"):
            processes[name] = subprocess.Popen(commands[name], stdout=logs[name], stderr=subprocess.STDOUT, env=environment, start_new_session=True)
        deadline = time.monotonic() + timeout_s
        if stop_at_h is not None:
            while _latest_cycle_h(directory / "history.sqlite") < stop_at_h:
                if time.monotonic() > deadline or any(process.poll() is not None for process in processes.values()):
                    raise AssertionError(f"the batch did not reach {stop_at_h} h; see the logs in {directory}")
                time.sleep(0.2)
            processes["runtime"].send_signal(signal.SIGTERM)
            status = processes["runtime"].wait(timeout=60)
            if status != 0:
                raise AssertionError(f"the runtime exited with {status} on SIGTERM; see {directory / 'runtime.log'}")
            return HilRun(plant=None, soft_plc=None, history=directory / "history.sqlite", directory=directory)
        for name in ("plant-sim", "soft-plc", "runtime"):
            status = processes[name].wait(timeout=max(1.0, deadline - time.monotonic()))
            if status != 0:
                raise AssertionError(f"{name} exited with {status}; see {directory / (name + '.log')}")
    finally:
        for process in processes.values():  # the whole group: a runtime's compiler child too
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait(timeout=30)
        for handle in logs.values():
            handle.close()
    return HilRun(
        plant=json.loads((directory / "plant-kpis.json").read_text()),
        soft_plc=json.loads((directory / "soft-plc.json").read_text()),
        history=directory / "history.sqlite",
        directory=directory,
    )
