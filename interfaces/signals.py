"""The logical signals the runtime reads and writes, whatever the PLC calls them.

The names are those of the reference interface (``shared/reference-plc.md``);
a tag map (:mod:`interfaces.tagmap`) says where each one lives on a given PLC.
Code refers to these names only, never to a node id or a register.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum


class Kind(str, Enum):
    """What a signal's value is, independent of how a PLC encodes it."""

    REAL = "real"
    UNSIGNED = "unsigned"
    INTEGER = "integer"
    BOOLEAN = "boolean"
    TEXT = "text"


@dataclass(frozen=True)
class Signal:
    kind: Kind
    writable: bool
    unit: str
    required: bool
    """The runtime cannot run without it; optional signals are informational or simulator-only."""


def _real(unit: str, *, writable: bool = False, required: bool = True) -> Signal:
    return Signal(Kind.REAL, writable, unit, required)


SIGNALS: dict[str, Signal] = {
    "PV.Temperature": _real("°C"),
    "PV.pH": _real("pH", required=False),
    "PV.DO": _real("% air saturation", required=False),
    "PV.Volume": _real("L"),
    "PV.FeedTotal": _real("L"),
    "PV.GlucoseFeedTotal": _real("L"),
    "PV.BaseTotal": _real("L"),
    "PV.OUR": _real("mmol/L/h"),
    "PV.CER": _real("mmol/L/h"),
    "PV.Capacitance": _real("pF/cm"),
    "PV.AgitationSpeed": _real("rpm", required=False),
    "Sample.Seq": Signal(Kind.UNSIGNED, False, "", True),
    "Sample.TakenAt": _real("h"),
    "Sample.VCD": _real("1e6 cells/mL"),
    "Sample.Viability": _real("%"),
    "Sample.Glucose": _real("g/L"),
    "Sample.Lactate": _real("g/L"),
    "Sample.Glutamine": _real("mM"),
    "Sample.Ammonia": _real("mM"),
    "Sample.Titer": _real("g/L"),
    "Sample.Osmolality": _real("mOsm/kg"),
    "SP.FeedRate": _real("L/h", writable=True),
    "SP.GlucoseRate": _real("L/h", writable=True),
    "SP.Temperature": _real("°C", writable=True),
    "SP.HarvestRequest": Signal(Kind.BOOLEAN, True, "", True),
    "Status.ProcessTime": _real("h"),
    "Status.BatchId": Signal(Kind.TEXT, False, "", True),
    "Status.Phase": Signal(Kind.INTEGER, False, "", True),
    "Status.RemoteEnabled": Signal(Kind.BOOLEAN, False, "", True),
    "Status.WatchdogTripped": Signal(Kind.BOOLEAN, False, "", True),
    "MPC.Heartbeat": Signal(Kind.UNSIGNED, True, "", True),
    "MPC.Mode": Signal(Kind.INTEGER, True, "", True),
    "MPC.Rec.FeedRate": _real("L/h", writable=True),
    "MPC.Rec.GlucoseRate": _real("L/h", writable=True),
    "MPC.Rec.Temperature": _real("°C", writable=True),
    "MPC.Rec.HarvestTime": _real("h", writable=True),
    "MPC.Pred.HarvestTiter": _real("g/L", writable=True),
    "Sim.Lockstep": Signal(Kind.BOOLEAN, False, "", False),
}
"""Every signal of the reference interface, in its order."""
