"""The runtime over the network: I/O per cycle, a whole 15-day batch in lockstep, peak memory.

For each protocol, the simulated PLC (``bioreactor-mpc plc-sim --lockstep``)
runs in its own process on a free 127.0.0.1 port, and the runtime runs in
another (a fresh Python process, so its peak memory is its own) against it
in closed loop with the default runtime config of the protocol, exactly as
``bioreactor-mpc demo`` does. Printed per protocol: the batch's wall time
(target ≤ 60 s over OPC UA), the read and write request times per cycle from
the history (median / p95), the solve times, the runtime process's peak
resident memory (target ≤ 300 MB) and the batch's score. With
``--compare``, the same batch in-process (simulator.closed_loop, the same
control cycle) and the difference of the scores (target: within 1 %).

    python benchmarks/runtime_speed.py                 # OPC UA and Modbus
    python benchmarks/runtime_speed.py --protocol opcua
    python benchmarks/runtime_speed.py --protocol opcua --scenario configs/simulate/plant-cell-cycle.yaml --compare   # a plant of other structure
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parent.parent
SCENARIO = REPO / "configs" / "simulate" / "platform.yaml"
WALL_TARGET_S = 60.0
MEMORY_TARGET_MB = 300.0


def _run_runtime(protocol: str, endpoint: str, history: str, queue: Any) -> None:
    """The child process: the runtime for one batch; reports its wall time and peak memory."""
    from bioreactor_mpc.logging import configure_logging
    from bioreactor_mpc.runtime_cli import run_runtime
    from controller.runtime_config import load_runtime_config

    configure_logging(json=True, level=40)
    loaded = load_runtime_config(REPO / "configs" / "runtime" / f"reference-{protocol}.yaml", history=history)
    started = time.perf_counter()
    summary = asyncio.run(run_runtime(loaded, endpoint=endpoint, console=None))
    wall_s = time.perf_counter() - started
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
    queue.put({"wall_s": wall_s, "peak_mb": peak_mb, "cycles": summary.cycles, "end": summary.end_reason, "failed": summary.writes_failed})


def measure(protocol: str, seed: int, workdir: Path, scenario: Path = SCENARIO) -> dict[str, Any]:
    from bioreactor_mpc.demo import free_port, wait_for_listener
    from controller.kpis import BatchKpis
    from interfaces.history import SqliteHistory

    port = free_port()
    endpoint = f"opc.tcp://127.0.0.1:{port}/bioreactor-mpc/" if protocol == "opcua" else f"127.0.0.1:{port}"
    history = workdir / f"{protocol}-history.sqlite"
    stem = f"bench-{protocol}"
    log_path = workdir / f"{protocol}-plc-sim.log"
    command = [sys.executable, "-m", "bioreactor_mpc", "--log-json", "plc-sim", "--protocol", protocol, "--lockstep", "--endpoint", endpoint]
    command += ["--scenario", str(scenario), "--seed", str(seed), "--report-dir", str(workdir), "--report-stem", stem, "--linger-s", "2"]
    with log_path.open("wb") as log_file:
        server = subprocess.Popen(command, stdout=log_file, stderr=subprocess.STDOUT)
        try:
            wait_for_listener(port, server, log_path)
            context = multiprocessing.get_context("spawn")
            queue = context.Queue()
            child = context.Process(target=_run_runtime, args=(protocol, endpoint, str(history), queue))
            child.start()
            figures = queue.get(timeout=900)
            child.join(timeout=60)
            server.wait(timeout=60)
        finally:
            if server.poll() is None:
                server.terminate()
                server.wait(timeout=10)
    report = json.loads((workdir / f"{stem}-kpis.json").read_text())
    store = SqliteHistory(history)
    cycles = store.table("cycles")
    store.close()
    figures["read_ms"] = np.array([1000.0 * c["read_time_s"] for c in cycles if c["read_time_s"] is not None])
    figures["write_ms"] = np.array([1000.0 * c["write_time_s"] for c in cycles if c["write_time_s"] is not None])
    figures["solve_ms"] = np.array([1000.0 * c["solve_time_s"] for c in cycles if c["solve_time_s"] is not None])
    figures["score"] = BatchKpis(**report["kpis"]).score_g_per_day
    return figures


def _median_p95(values: np.ndarray) -> str:
    return f"{np.median(values):6.1f} / {np.percentile(values, 95):6.1f}" if values.size else "     - /      -"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--protocol", choices=["opcua", "modbus", "both"], default="both")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--scenario", type=Path, default=SCENARIO, help="simulation config the PLC serves (default: the platform batch)")
    parser.add_argument("--compare", action="store_true", help="also run the batch in-process and compare the scores (target: within 1 %%)")
    args = parser.parse_args()
    protocols = ["opcua", "modbus"] if args.protocol == "both" else [args.protocol]
    print(f"runtime against the simulated PLC in lockstep, closed loop, seed {args.seed} (runtime and PLC in separate processes)")
    header = (
        f"{'protocol':8s} {'batch wall s':>12s} {'cycles':>6s} {'read ms med/p95':>16s} {'write ms med/p95':>17s} {'solve ms med/p95':>17s} {'peak MB':>8s} {'score g/day':>11s}"
    )
    print(header, flush=True)
    rows = []
    with tempfile.TemporaryDirectory(prefix="runtime-bench-") as tmp:
        for protocol in protocols:
            f = measure(protocol, args.seed, Path(tmp), args.scenario)
            rows.append((protocol, f))
            print(
                f"{protocol:8s} {f['wall_s']:12.1f} {f['cycles']:6d} {_median_p95(f['read_ms']):>16s} {_median_p95(f['write_ms']):>17s} "
                f"{_median_p95(f['solve_ms']):>17s} {f['peak_mb']:8.0f} {f['score']:11.1f}",
                flush=True,
            )
    for protocol, f in rows:
        io = f["read_ms"] + f["write_ms"] if f["read_ms"].size == f["write_ms"].size else np.array([])
        verdicts = [
            f"batch {f['wall_s']:.1f} s (target ≤ {WALL_TARGET_S:.0f} s over OPC UA): {'met' if f['wall_s'] <= WALL_TARGET_S else 'MISSED'}"
            if protocol == "opcua"
            else f"batch {f['wall_s']:.1f} s",
            f"peak memory {f['peak_mb']:.0f} MB (target ≤ {MEMORY_TARGET_MB:.0f} MB): {'met' if f['peak_mb'] <= MEMORY_TARGET_MB else 'MISSED'}",
            f"I/O per cycle (read + writes before the heartbeat) median {np.median(io):.1f} ms, p95 {np.percentile(io, 95):.1f} ms" if io.size else "",
            f"ended: {f['end']}, failed writes {f['failed']}",
        ]
        print(f"{protocol}: " + "; ".join(v for v in verdicts if v))
    if args.compare:
        in_process = _in_process_score(args.scenario, args.seed)
        for protocol, f in rows:
            difference = f["score"] / in_process - 1.0
            print(
                f"{protocol}: score {f['score']:.1f} g/day, in-process {in_process:.1f} g/day: {100 * difference:+.2f} % "
                f"(target within 1 %: {'met' if abs(difference) <= 0.01 else 'MISSED'})"
            )


def _in_process_score(scenario: Path, seed: int) -> float:
    """The same batch through the same control cycle in-process (the runtime config's settings, no network)."""
    from bioreactor_mpc.logging import configure_logging
    from controller.runtime_config import load_runtime_config
    from simulator.closed_loop import estimator_source, run_controlled_batch
    from simulator.config import load_simulation

    configure_logging(json=True, level=40)
    loaded = load_simulation(scenario)
    loaded = loaded.model_copy(update={"simulation": loaded.simulation.model_copy(update={"seed": seed})})
    settings = load_runtime_config(REPO / "configs" / "runtime" / "reference-opcua.yaml").config
    return run_controlled_batch(loaded, make_source=estimator_source, settings=settings).batch.kpis.score_g_per_day


if __name__ == "__main__":
    main()
