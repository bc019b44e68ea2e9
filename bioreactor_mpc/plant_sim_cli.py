"""``bioreactor-mpc soft-plc`` and ``bioreactor-mpc plant-sim``: hardware-in-the-loop (docs/hil.md).

``soft-plc`` runs the reference PLC's logic as a process of its own: the
reference interface to the runtime (OPC UA or Modbus TCP, the servers of
``plc-sim``) and its field I/O to ``plant-sim`` (OPC UA or Modbus TCP, as the
I/O map's ``protocol`` says).
``plant-sim`` is the plant behind a PLC's field I/O: the soft PLC's, or a
real PLC's.
"""

from __future__ import annotations

import argparse
import asyncio
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rich.console import Console

from bioreactor_mpc.report import write_batch_files
from bioreactor_mpc.resources import reference_config
from plant_models.errors import BioreactorMPCError

if TYPE_CHECKING:
    from simulator.io_map import ModbusIoMap, OpcUaIoMap

DEFAULT_SIMULATION = reference_config("simulate", "platform.yaml")
DEFAULT_IO_MAP = reference_config("io", "soft-plc-opcua.yaml")


def add_parsers(commands: Any) -> None:
    """The ``soft-plc`` and ``plant-sim`` subcommands."""
    soft = commands.add_parser("soft-plc", help="the reference PLC's logic alone: the reference interface to the runtime, field I/O to plant-sim (docs/hil.md)")
    soft.add_argument("--protocol", choices=["opcua", "modbus"], default="opcua", help="the reference interface's protocol (default: opcua)")
    soft.add_argument("--scenario", type=Path, default=DEFAULT_SIMULATION, help=f"simulation config: the batch and the PLC's settings (default: {DEFAULT_SIMULATION})")
    soft.add_argument("--tag-map", type=Path, default=None, help="tag map of the reference interface (default: configs/plc/reference-<protocol>.yaml)")
    soft.add_argument("--endpoint", default=None, help="override the tag map's endpoint (opc.tcp://… or host:port for Modbus)")
    soft.add_argument(
        "--io",
        type=Path,
        default=DEFAULT_IO_MAP,
        help=f"I/O map of the field I/O it serves to plant-sim, over the map's protocol (OPC UA or Modbus TCP; default: {DEFAULT_IO_MAP})",
    )
    soft.add_argument("--io-endpoint", default=None, help="override the I/O map's endpoint (opc.tcp://… or host:port for Modbus)")
    clock = soft.add_mutually_exclusive_group()
    clock.add_argument("--lockstep", action="store_true", help="virtual time: pause at every cycle boundary until MPC.Heartbeat moves, step the plant in between (the default)")
    clock.add_argument("--time-scale", type=float, default=None, help="run free, this many plant seconds per wall second")
    soft.add_argument("--scan-period-s", type=float, default=0.05, help="free-running: wall seconds between scans (default 0.05)")
    soft.add_argument("--lockstep-timeout-s", type=float, default=30.0, help="wall seconds a lockstep pause waits for the heartbeat (default 30)")
    soft.add_argument(
        "--plant-timeout-s",
        type=float,
        default=10.0,
        help="lockstep: wall seconds a scan waits for plant-sim's answer before it counts as missed; free-running: how long the batch waits for plant-sim to start (default 10)",
    )
    soft.add_argument("--local", action="store_true", help="the operator's switch in local: the PLC runs its own recipe")
    soft.add_argument("--linger-s", type=float, default=3.0, help="keep serving this long after harvest (default 3)")
    soft.add_argument("--summary", type=Path, default=None, help="write scans, missed scans and scan times as JSON here at the end")

    plant = commands.add_parser("plant-sim", help="the plant as an I/O simulator: writes a PLC's sensor inputs, reads its actuator outputs (docs/hil.md)")
    plant.add_argument("--io", type=Path, default=None, help=f"I/O map of the PLC's field I/O (default: {DEFAULT_IO_MAP})")
    plant.add_argument("--io-endpoint", default=None, help="override the I/O map's endpoint (opc.tcp://… or host:port for Modbus)")
    plant.add_argument("--scenario", type=Path, default=DEFAULT_SIMULATION, help=f"simulation config: truth, noise, sampling (default: {DEFAULT_SIMULATION})")
    plant.add_argument("--seed", type=int, default=None, help="override the scenario's seed")
    plant.add_argument(
        "--time-scale", type=float, default=None, help="run on its own clock, this many plant seconds per wall second (1: real time); default: the I/O map's virtual clock"
    )
    plant.add_argument("--exchange-period-s", type=float, default=0.1, help="free-running: wall seconds between I/O exchanges (default 0.1)")
    plant.add_argument("--fault", action="append", default=[], help="an I/O fault KIND:CHANNEL[:VALUE]@START_H[-END_H], e.g. wire_break:temperature_degc:3.6@100-120 (repeatable)")
    plant.add_argument("--faults", type=Path, default=None, help="a scenario file of I/O faults (faults: [...])")
    plant.add_argument("--wall-timeout-s", type=float, default=3600.0, help="give up after this many wall seconds (default 3600)")
    plant.add_argument("--report-dir", type=Path, default=None, help="at the end, write the true trajectories, KPIs, plot and the run's timing here")
    plant.add_argument("--report-stem", default=None, help="file name stem of the report (default: <batch>-seed<seed>-plant-sim)")


def _io_map(path: Path, endpoint: str | None) -> OpcUaIoMap | ModbusIoMap:
    """The I/O map at ``path`` (either protocol), its endpoint replaced by ``endpoint`` (``opc.tcp://…``, or ``host:port`` for a Modbus map) when given."""
    from simulator.io_map import ModbusIoMap, load_io_map

    io_map = load_io_map(path)
    if endpoint is None:
        return io_map
    if isinstance(io_map, ModbusIoMap):
        from interfaces.modbus_port import parse_endpoint

        host, port = parse_endpoint(endpoint)
        return io_map.model_copy(update={"host": host, "port": port})
    return io_map.model_copy(update={"endpoint": endpoint})


def run_soft_plc(args: argparse.Namespace, console: Console) -> int:
    from interfaces.tagmap import ModbusTagMap, OpcUaTagMap, load_tag_map
    from simulator.config import load_simulation
    from simulator.io_map import OpcUaIoMap
    from simulator.soft_plc import FieldIoServer, IoServer, SoftPlc, SoftPlcRunner

    if args.time_scale is not None and not args.time_scale > 0.0:
        raise BioreactorMPCError(f"--time-scale must be positive, got {args.time_scale}")
    tag_map_path = args.tag_map or reference_config("plc", f"reference-{args.protocol}.yaml")
    tag_map = load_tag_map(tag_map_path)
    if not isinstance(tag_map, OpcUaTagMap if args.protocol == "opcua" else ModbusTagMap):
        raise BioreactorMPCError(f"{tag_map_path}: protocol is '{tag_map.protocol}', --protocol {args.protocol} needs a {args.protocol} tag map")
    io_map = _io_map(args.io, args.io_endpoint)
    if args.time_scale is None and io_map.clock is None:
        raise BioreactorMPCError(f"{args.io}: lockstep needs the I/O map's clock section (virtual time with plant-sim); or give --time-scale")
    loaded = load_simulation(args.scenario)
    plc = SoftPlc(batch=loaded.batch, simulation=loaded.simulation, io_map=io_map)
    if args.local:
        plc.set_operator_remote(False)

    async def serve() -> SoftPlcRunner:
        served = SoftPlcRunner.served(plc)
        if args.protocol == "opcua":
            from simulator.opcua_server import OpcUaPlcServer

            reference: Any = OpcUaPlcServer(served, tag_map, endpoint=args.endpoint, batch=loaded.batch)  # type: ignore[arg-type]  # checked above: an OPC UA map
        else:
            from interfaces.modbus_port import parse_endpoint
            from simulator.modbus_server import ModbusPlcServer

            host, port = parse_endpoint(args.endpoint) if args.endpoint is not None else (None, None)
            reference = ModbusPlcServer(served, tag_map, host=host, port=port)  # type: ignore[arg-type]  # checked above: a Modbus map
        if isinstance(io_map, OpcUaIoMap):
            io_server: FieldIoServer = IoServer(io_map)
        else:
            from simulator.modbus_server import ModbusIoServer

            io_server = ModbusIoServer(io_map)
        runner = SoftPlcRunner(plc, reference, io_server)
        await io_server.start()
        try:
            await reference.start()
            try:
                clock = "lockstep (virtual time)" if args.time_scale is None else f"x{args.time_scale:g}"
                console.print(f"soft PLC: reference interface on {reference.endpoint}, field I/O on {io_server.endpoint} ({clock}); Ctrl-C stops it", soft_wrap=True)
                if args.time_scale is None:
                    await runner.run_lockstep(wall_timeout_s=args.lockstep_timeout_s, plant_timeout_s=args.plant_timeout_s)
                else:
                    await runner.run_free(time_scale=args.time_scale, scan_period_s=args.scan_period_s, plant_timeout_s=args.plant_timeout_s)
                console.print(f"batch ended at {plc.process_time_h:.2f} h: {plc.harvest_reason}; scans {runner.scans}, missed {runner.missed_scans}")
                await asyncio.sleep(max(0.0, args.linger_s))
            finally:
                await reference.stop()
        finally:
            await io_server.stop()
        return runner

    try:
        runner = asyncio.run(serve())
    except KeyboardInterrupt:
        console.print("stopped")
        return 0
    if args.summary is not None:
        args.summary.parent.mkdir(parents=True, exist_ok=True)
        args.summary.write_text(json.dumps(runner.summary(), indent=2) + "\n", encoding="utf-8")
    return 0


def run_plant_sim(args: argparse.Namespace, console: Console) -> int:
    from simulator.batch import kpis_of
    from simulator.config import load_simulation
    from simulator.io_faults import load_fault_scenario, parse_fault
    from simulator.plant_io import PlantSimulator, run_plant_io

    if args.time_scale is not None and not args.time_scale > 0.0:
        raise BioreactorMPCError(f"--time-scale must be positive, got {args.time_scale}")
    io_path = args.io or DEFAULT_IO_MAP
    io_map = _io_map(io_path, args.io_endpoint)
    if args.time_scale is None and io_map.clock is None:
        raise BioreactorMPCError(f"{io_path}: no clock section (a real PLC's I/O): give --time-scale (1 for real time)")
    faults = [*(load_fault_scenario(args.faults).faults if args.faults is not None else []), *(parse_fault(spec) for spec in args.fault)]
    loaded = load_simulation(args.scenario, seed=args.seed)
    simulator = PlantSimulator(loaded, io_map, faults)
    clock = "virtual time" if args.time_scale is None else f"x{args.time_scale:g}"
    console.print(f"plant-sim: {loaded.batch.batch_id} seed {loaded.simulation.seed} against {io_map.endpoint} ({clock}); {len(faults)} I/O fault(s)", soft_wrap=True)
    try:
        report = asyncio.run(run_plant_io(simulator, io_map, time_scale=args.time_scale, exchange_period_s=args.exchange_period_s, wall_timeout_s=args.wall_timeout_s))
    except KeyboardInterrupt:
        console.print("stopped")
        return 0
    except BioreactorMPCError:  # the I/O device's own refusal or silence, already named (IoDeviceError)
        raise
    except OSError as error:
        raise BioreactorMPCError(f"{io_map.endpoint}: cannot reach the PLC's I/O ({error})") from error
    trajectory = simulator.plant.trajectory()
    kpis = kpis_of(trajectory, loaded.batch)
    walls = sorted(report.exchange_wall_s)
    timing = {
        "exchanges": report.exchanges,
        "missed_exchanges": report.missed_exchanges,
        "worst_overrun_s": round(report.worst_overrun_s, 4),
        "exchange_wall_s_median": walls[len(walls) // 2] if walls else None,
        "exchange_wall_s_max": walls[-1] if walls else None,
        "wall_s": round(report.wall_s, 2),
        "ended": report.ended,
        "io_error": report.io_error or None,
    }
    console.print(
        f"plant ended at {simulator.plant.process_time_h:.2f} h ({report.ended}): score {kpis.score_g_per_day:.1f} g/day; "
        f"{report.exchanges} exchanges, {report.missed_exchanges} missed, {report.wall_s:.1f} s",
        soft_wrap=True,
    )
    if args.report_dir is not None:
        stem = args.report_stem or f"{loaded.batch.batch_id}-seed{loaded.simulation.seed}-plant-sim"
        files = write_batch_files(args.report_dir, stem, trajectory, tuple(simulator.released), loaded.batch, title=f"{stem}: score {kpis.score_g_per_day:.0f} g/day")
        summary = {
            "kpis": kpis.as_dict(),
            "timing": timing,
            "faults": [fault.model_dump() for fault in faults],
            "unusable_outputs": {channel: record.as_dict() for channel, record in simulator.unusable_outputs.items()},
            "files": {kind: str(path) for kind, path in files.items()},
        }
        (args.report_dir / f"{stem}-kpis.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    if report.io_error:  # the plant to this point is reported above; the run itself failed
        kept = f"; the plant to {simulator.plant.process_time_h:.2f} h is reported in {args.report_dir}" if args.report_dir is not None else ""
        raise BioreactorMPCError(f"{report.io_error}{kept}")
    return 0
