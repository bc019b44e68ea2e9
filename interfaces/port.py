"""The PLC port: what the runtime needs from any PLC link, whatever the protocol.

Implementations: :class:`interfaces.opcua_port.OpcUaPort` (Modbus TCP next).
The runtime cannot tell them apart: it reads every mapped signal in one
snapshot and writes signals by their logical names (:mod:`interfaces.signals`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Protocol

from plant_models.errors import BioreactorMPCError

Value = float | int | bool | str


@dataclass(frozen=True)
class Reading:
    """One signal as scanned by the PLC, in engineering units."""

    value: Value
    good: bool
    source_time: datetime | None
    """When the PLC scanned it (wall-clock UTC), if the protocol says."""


class PlcLinkError(ConnectionError, BioreactorMPCError):
    """The PLC could not be reached or did not answer in time; nothing can be assumed about a write in flight."""


class PlcWriteRefusedError(PermissionError, BioreactorMPCError):
    """The PLC answered and refused one or more writes (out of range, remote disabled, wrong type)."""

    def __init__(self, refusals: Mapping[str, str]) -> None:
        self.refusals = dict(refusals)
        super().__init__("; ".join(f"{signal}: {reason}" for signal, reason in self.refusals.items()))


class PlcWriteMismatchError(BioreactorMPCError, RuntimeError):
    """A write the PLC accepted reads back as something else."""


class PlcPort(Protocol):
    async def connect(self) -> None: ...

    async def close(self) -> None: ...

    async def read(self) -> dict[str, Reading]:
        """Every mapped signal, in one request."""
        ...

    async def write(self, values: Mapping[str, Value]) -> None:
        """Write signals (each checked by the PLC) and verify them by reading back.

        Raises :class:`PlcWriteRefusedError` naming every refused signal (the
        others were written), :class:`PlcWriteMismatchError` when an accepted
        value reads back differently, :class:`PlcLinkError` when the link
        failed. Never retries a write.
        """
        ...
