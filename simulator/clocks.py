"""The two clocks of a simulated PLC server, shared by the OPC UA and the Modbus servers.

**Lockstep** pauses the plant at every cycle boundary (t = 0 included) until
``MPC.Heartbeat`` changes or a wall timeout passes; **free-running** advances
``time_scale`` plant seconds per wall second. A server publishes the PLC's
scan after every advance and sets :attr:`PlcServerClocks.heartbeat_moved`
when a client's write moves the heartbeat.
"""

from __future__ import annotations

import asyncio
import time

import structlog

from simulator.plc import PHASE_RUNNING, SimulatedPlc

log = structlog.get_logger(__name__)

PUBLISH_TICK_S = 0.05


class PlcServerClocks:
    """Base of a protocol server in front of a :class:`~simulator.plc.SimulatedPlc`: its clocks."""

    def __init__(self, plc: SimulatedPlc) -> None:
        self.plc = plc
        self.heartbeat_moved = asyncio.Event()

    async def publish(self) -> None:
        """Scan the PLC and serve every value (each protocol its own way)."""
        raise NotImplementedError

    async def run_lockstep(self, *, wall_timeout_s: float = 30.0) -> None:
        """Pause at every cycle boundary until the heartbeat moves (or ``wall_timeout_s``), then advance one cycle."""
        while self.plc.phase == PHASE_RUNNING:
            self.heartbeat_moved.clear()
            await self.publish()
            try:
                await asyncio.wait_for(self.heartbeat_moved.wait(), timeout=wall_timeout_s)
            except TimeoutError:
                log.warning("lockstep_timeout", process_time_h=self.plc.process_time_h, wall_timeout_s=wall_timeout_s)
            if self.plc.phase != PHASE_RUNNING:
                break
            self.plc.advance_to(self.plc.next_cycle_boundary_h())
        await self.publish()

    async def run_free(self, *, time_scale: float) -> None:
        """Advance ``time_scale`` plant seconds per wall second, publishing every tick."""
        if not time_scale > 0.0:
            raise ValueError(f"time_scale must be positive, got {time_scale}")
        started_wall, started_h = time.monotonic(), self.plc.process_time_h
        while self.plc.phase == PHASE_RUNNING:
            await asyncio.sleep(PUBLISH_TICK_S)
            target_h = started_h + (time.monotonic() - started_wall) * time_scale / 3600.0
            self.plc.advance_to(target_h)
            await self.publish()
