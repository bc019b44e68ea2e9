"""Settings of the runtime's safeguards: the batch clock, taking over a batch, storage, other writers of the PLC (docs/runtime.md, "Faults").

A config module: it imports nothing heavy, so validating a config never pulls in CasADi.
"""

from __future__ import annotations

from pydantic import Field

from plant_models.config_loading import FrozenConfig


class SafeguardSettings(FrozenConfig):
    clock_lost_cycle_every_s: float = Field(
        default=60.0, gt=0.0, le=3600.0, description="while the batch clock is unusable, a fault cycle (alarm, record, heartbeat) this often [wall s]"
    )
    clock_frozen_after_periods: float = Field(
        default=1.5,
        gt=0.0,
        le=100.0,
        description="a Good batch clock that has not advanced for this many cycle periods of wall time (after cycles ran) has stopped: fault cycles [-]",
    )
    fresh_start_within_h: float = Field(
        default=2.0,
        ge=0.0,
        le=24.0,
        description="a runtime with no history for a running batch starts from the inoculation record only this close to inoculation; later it needs "
        "an engineer's signed take-over [process h]",
    )
    takeover_sd_scale: float = Field(default=3.0, ge=1.0, le=100.0, description="a take-over's initial state uncertainty, relative to the configured one [-]")
    storage_retry_s: float = Field(default=10.0, gt=0.0, le=600.0, description="while the history cannot be written, try it again this often [wall s]")
    claim_watch_s: float = Field(
        default=3.0,
        ge=0.0,
        le=600.0,
        description="before taking the PLC, watch MPC.Heartbeat this long: if it moves, another runtime holds the PLC and this one refuses to start [wall s]",
    )
    auth_retry_after_s: float = Field(
        default=300.0,
        ge=10.0,
        le=86400.0,
        description="after the PLC refused the credentials or a certificate, wait at least this long before trying again: a real PLC locks accounts [wall s]",
    )
    stall_after_cycles: float = Field(default=2.0, gt=0.0, le=100.0, description="/healthz reports a stall when no cycle ran for this many cycle periods of wall time [-]")
