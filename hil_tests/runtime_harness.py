"""The runtime against the simulated PLC on 127.0.0.1, in one event loop, with the faults a test needs.

:func:`run_runtime_against` serves a simulated PLC over OPC UA or Modbus in
lockstep, runs :class:`~controller.runtime.Runtime` against it through a TCP
proxy (which a test can cut, like a pulled cable), and returns what happened:
the runtime's summary, the simulated PLC (its true trajectory) and the history.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bioreactor_mpc.demo import free_port
from controller.mpc import EconomicMpc
from controller.ports import Reading
from controller.runtime import CycleReport, RunSummary, Runtime
from controller.runtime_config import RuntimeSettings
from interfaces.history import SqliteHistory
from interfaces.opcua_port import OpcUaPort
from interfaces.tagmap import load_tag_map
from plant_models.parameters import parameter_vector
from simulator.batch import build_simulated_plc
from simulator.config import LoadedSimulation
from simulator.opcua_server import OpcUaPlcServer
from simulator.plc import SimulatedPlc

REPO = Path(__file__).resolve().parent.parent
TAG_MAPS = {protocol: load_tag_map(REPO / "configs" / "plc" / f"reference-{protocol}.yaml") for protocol in ("opcua", "modbus")}
TEST_SETTINGS = RuntimeSettings.model_validate(
    {"poll_interval_s": 0.01, "io_timeout_s": 2.0, "reconnect_initial_s": 0.05, "reconnect_max_s": 0.3, "safeguards": {"claim_watch_s": 0.2}}
)


class TcpProxy:
    """A TCP relay on 127.0.0.1 that a test can cut (every connection dropped, new ones refused) and restore."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.port = free_port()
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._relay, "127.0.0.1", self.port)

    async def cut(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None
        for writer in list(self._writers):
            writer.close()
        self._writers.clear()

    async def _relay(self, client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        try:
            server_reader, server_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        except OSError:
            client_writer.close()
            return
        self._writers |= {client_writer, server_writer}

        async def pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            with contextlib.suppress(OSError, asyncio.IncompleteReadError):
                while data := await reader.read(65536):
                    writer.write(data)
                    await writer.drain()
            writer.close()

        await asyncio.gather(pipe(client_reader, server_writer), pipe(server_reader, client_writer))
        self._writers -= {client_writer, server_writer}


class SimulatedPlant:
    """What a fault scenario can touch: the simulated PLC, the cable (the proxy) and the lockstep clock."""

    def __init__(self, plc: SimulatedPlc, server: Any, proxy: TcpProxy, lockstep_timeout_s: float) -> None:
        self.plc = plc
        self.proxy = proxy
        self._server = server
        self._lockstep = asyncio.create_task(server.run_lockstep(wall_timeout_s=lockstep_timeout_s))
        self.stop = asyncio.Event()
        """Set to stop the runtime (after its current cycle)."""

    def request_stop(self) -> None:
        self.stop.set()

    async def set_lockstep_timeout(self, seconds: float) -> None:
        """Restart the lockstep clock with another wall timeout (short: the plant runs on without the runtime)."""
        await self.stop_clock()
        self._lockstep = asyncio.create_task(self._server.run_lockstep(wall_timeout_s=seconds))

    async def publish(self) -> None:
        """Serve the PLC's current scan now (a change made to the simulated PLC while its clock is stopped)."""
        await self._server.publish()

    async def step(self, *, lockstep_timeout_s: float = 10.0) -> None:
        """With the clock stopped: advance to the next cycle boundary and go on in lockstep (the last heartbeat was already seen)."""
        await self.stop_clock()
        self.plc.advance_to(self.plc.next_cycle_boundary_h())
        self._lockstep = asyncio.create_task(self._server.run_lockstep(wall_timeout_s=lockstep_timeout_s))

    async def stop_clock(self) -> None:
        self._lockstep.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._lockstep


class TamperingPort:
    """A PLC port whose scans a test can change on the way in (a faulty PLC program, a mis-scaled tag, a clock that jumps); writes pass through."""

    def __init__(self, port: Any) -> None:
        self.port = port
        self.tamper: Callable[[dict[str, Reading]], dict[str, Reading]] | None = None

    @property
    def connected(self) -> bool:
        return bool(self.port.connected)

    async def connect(self) -> None:
        await self.port.connect()

    async def close(self) -> None:
        await self.port.close()

    async def read(self) -> dict[str, Reading]:
        readings: dict[str, Reading] = await self.port.read()
        return self.tamper(readings) if self.tamper is not None else readings

    async def write(self, values: Any) -> None:
        await self.port.write(values)


@dataclass
class RunResult:
    summary: RunSummary
    plc: SimulatedPlc
    history: SqliteHistory
    runtime: Runtime

    def rows(self, table: str) -> list[dict[str, Any]]:
        return self.history.table(table)


def _server(protocol: str, plc: SimulatedPlc, port: int) -> Any:
    if protocol == "opcua":
        return OpcUaPlcServer(plc, TAG_MAPS["opcua"], endpoint=f"opc.tcp://127.0.0.1:{port}/bioreactor-mpc/")
    from simulator.modbus_server import ModbusPlcServer

    return ModbusPlcServer(plc, TAG_MAPS["modbus"], host="127.0.0.1", port=port)


def _port(protocol: str, port: int) -> Any:
    if protocol == "opcua":
        return OpcUaPort(TAG_MAPS["opcua"], endpoint=f"opc.tcp://127.0.0.1:{port}/bioreactor-mpc/", timeout_s=TEST_SETTINGS.io_timeout_s, allow_insecure=True)
    from interfaces.modbus_port import ModbusPort

    return ModbusPort(TAG_MAPS["modbus"], host="127.0.0.1", port=port, timeout_s=TEST_SETTINGS.io_timeout_s)


async def run_runtime_against(
    loaded: LoadedSimulation,
    history_path: Path,
    *,
    protocol: str = "opcua",
    settings: RuntimeSettings = TEST_SETTINGS,
    mpc: EconomicMpc | None = None,
    runtime_loaded: LoadedSimulation | None = None,
    stop_at_h: float | None = None,
    on_cycle: Callable[[CycleReport, SimulatedPlant], Any] | None = None,
    lockstep_timeout_s: float = 10.0,
    wall_timeout_s: float = 240.0,
    audit: Any = None,
    start_at_h: float = 0.0,
    history: SqliteHistory | None = None,
    takeover: Any = None,
    port: Callable[[Any], Any] | None = None,
    runtime_ref: dict[str, Runtime] | None = None,
) -> RunResult:
    """One (partial) batch: the runtime against the simulated PLC of ``loaded``; ``runtime_loaded`` gives the runtime another batch file.

    ``start_at_h``: the PLC runs its recipe alone until then (a runtime started mid-batch); ``port`` wraps the runtime's PLC port
    (a :class:`TamperingPort`); ``history``: an open history to use instead of one at ``history_path``.
    """
    plc, _ = build_simulated_plc(loaded)
    if start_at_h > 0.0:
        plc.advance_to(start_at_h)
    plc.lockstep = True
    server_port = free_port()
    server = _server(protocol, plc, server_port)
    await server.start()
    proxy = TcpProxy(server_port)
    await proxy.start()
    plant = SimulatedPlant(plc, server, proxy, lockstep_timeout_s)
    history = history if history is not None else SqliteHistory(history_path)
    stop = plant.stop
    pending: set[asyncio.Task[Any]] = set()

    def cycle(report: CycleReport) -> None:
        if stop_at_h is not None and report.record.process_time_h >= stop_at_h - 1e-6:
            stop.set()
        if on_cycle is not None:
            outcome = on_cycle(report, plant)
            if asyncio.iscoroutine(outcome):
                task = asyncio.ensure_future(outcome)
                pending.add(task)

    source = runtime_loaded or loaded
    plc_port = _port(protocol, proxy.port)
    runtime = Runtime(
        port=port(plc_port) if port is not None else plc_port,
        history=history,
        batch=source.batch,
        nominal_parameters=parameter_vector(source.nominal, source.batch.media),
        envelope=source.nominal.envelope,  # as the runtime's own start passes them (bioreactor_mpc/runtime_cli.py)
        fitted=source.nominal.calibrated,
        settings=settings,
        mpc=mpc,
        on_cycle=cycle,
        audit=audit,
        takeover=takeover,
    )
    if runtime_ref is not None:
        runtime_ref["runtime"] = runtime
    try:
        summary = await asyncio.wait_for(runtime.run(stop=stop), wall_timeout_s)
        for task in pending:
            await task
    finally:
        await plant.stop_clock()
        await proxy.cut()
        await server.stop()
    return RunResult(summary, plc, history, runtime)


async def run_command_runtime(loaded_runtime: Any, plant: LoadedSimulation, *, until_h: float, mpc: EconomicMpc | None = None, wall_timeout_s: float = 60.0) -> None:
    """``bioreactor-mpc run``'s runtime (:func:`~bioreactor_mpc.runtime_cli.run_runtime`, from its loaded config) against the simulated
    OPC UA PLC of ``plant`` in lockstep, stopped once the PLC reaches ``until_h`` (or the runtime ends by itself)."""
    from bioreactor_mpc.runtime_cli import run_runtime

    plc, _ = build_simulated_plc(plant)
    plc.lockstep = True
    port = free_port()
    server = OpcUaPlcServer(plc, TAG_MAPS["opcua"], endpoint=f"opc.tcp://127.0.0.1:{port}/bioreactor-mpc/")
    await server.start()
    simulated = SimulatedPlant(plc, server, TcpProxy(port), lockstep_timeout_s=10.0)
    stop = asyncio.Event()
    running = asyncio.create_task(run_runtime(loaded_runtime, endpoint=server.endpoint, console=None, stop=stop, mpc=mpc))
    try:
        for _ in range(int(wall_timeout_s / 0.05)):
            if plc.process_time_h >= until_h or running.done():
                break
            await asyncio.sleep(0.05)
        stop.set()
        await asyncio.wait_for(running, 30.0)
    finally:
        await simulated.stop_clock()
        await server.stop()
