"""The runtime's modes and the states it drops to, in one table (``TRANSITIONS``) and one place that changes them.

The operator (or the config) *requests* a mode: off, advisory or closed loop.
What the runtime actually does each cycle is its *state*, decided from the
request and the cycle's conditions, in this order of precedence:

1. the PLC link is down → ``fault``;
2. a critical input failed its checks → ``fault``;
3. writes keep failing (refused or read back wrong) → ``fault``;
4. the batch is over (harvested) → ``off``;
5. the request: ``off`` or ``advisory``;
6. closed loop requested, but the PLC does not accept setpoints (remote
   disabled by the operator, watchdog tripped) → ``held``;
7. otherwise ``closed_loop``.

What each state writes:

=============  ==========  ==================  ==========
state          ``SP.*``    ``MPC.Rec.*``       ``MPC.Mode``
=============  ==========  ==================  ==========
off            no          no                  0
advisory       no          yes                 1
held           no          yes                 1
closed_loop    yes         yes                 2
fault          no          no                  0
=============  ==========  ==================  ==========

``MPC.Heartbeat`` moves at the end of every cycle in every state (it says the
runtime is alive, not that it is in control), except after
``fault_hand_over_cycles`` cycles in fault and while the history cannot be
written: then it is withheld, so that the PLC's watchdog hands control to its
own recipe (docs/runtime.md, section 7).
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

import structlog

log = structlog.get_logger(__name__)


class RequestedMode(str, Enum):
    OFF = "off"
    ADVISORY = "advisory"
    CLOSED_LOOP = "closed-loop"


class State(str, Enum):
    OFF = "off"
    ADVISORY = "advisory"
    HELD = "held"
    CLOSED_LOOP = "closed_loop"
    FAULT = "fault"

    @property
    def writes_setpoints(self) -> bool:
        return self is State.CLOSED_LOOP

    @property
    def writes_recommendations(self) -> bool:
        return self in (State.ADVISORY, State.HELD, State.CLOSED_LOOP)

    @property
    def plc_mode(self) -> int:
        """``MPC.Mode``: 2 while the runtime writes setpoints, 1 while it only recommends, 0 otherwise."""
        return 2 if self is State.CLOSED_LOOP else 1 if self.writes_recommendations else 0


TRANSITIONS: dict[tuple[State, State], str] = {
    (State.OFF, State.ADVISORY): "advisory requested",
    (State.OFF, State.CLOSED_LOOP): "closed loop requested and the PLC accepts setpoints",
    (State.OFF, State.HELD): "closed loop requested; the PLC does not accept setpoints",
    (State.OFF, State.FAULT): "link lost, bad critical input or failing writes",
    (State.ADVISORY, State.OFF): "off requested, or the batch ended",
    (State.ADVISORY, State.CLOSED_LOOP): "closed loop requested",
    (State.ADVISORY, State.HELD): "closed loop requested; the PLC does not accept setpoints",
    (State.ADVISORY, State.FAULT): "link lost or bad critical input",
    (State.HELD, State.CLOSED_LOOP): "the PLC accepts setpoints again",
    (State.HELD, State.ADVISORY): "advisory requested",
    (State.HELD, State.OFF): "off requested, or the batch ended",
    (State.HELD, State.FAULT): "link lost or bad critical input",
    (State.CLOSED_LOOP, State.HELD): "the operator disabled remote, or the PLC's watchdog tripped",
    (State.CLOSED_LOOP, State.ADVISORY): "advisory requested",
    (State.CLOSED_LOOP, State.OFF): "off requested, or the batch ended",
    (State.CLOSED_LOOP, State.FAULT): "link lost, bad critical input or failing writes",
    (State.FAULT, State.OFF): "recovered; off requested, or the batch ended",
    (State.FAULT, State.ADVISORY): "recovered; advisory requested",
    (State.FAULT, State.HELD): "recovered; the PLC does not accept setpoints",
    (State.FAULT, State.CLOSED_LOOP): "recovered; closed loop",
}
"""Every allowed change of state, with when it happens."""


@dataclass(frozen=True)
class Conditions:
    """What one cycle found, as far as the state is concerned."""

    link_up: bool
    critical_failures: tuple[str, ...] = ()
    write_failures: int = 0
    batch_running: bool = True
    remote_enabled: bool = False
    watchdog_tripped: bool = False


@dataclass(frozen=True)
class StateChange:
    previous: State
    state: State
    reason: str


class ModeMachine:
    """Holds the requested mode and the current state; :meth:`evaluate` is the one place the state changes."""

    def __init__(self, requested: RequestedMode, *, max_write_failures: int = 3, state: State = State.OFF) -> None:
        self.requested = requested
        self.max_write_failures = max_write_failures
        self.state = state
        self.reason = "start"

    def request(self, mode: RequestedMode) -> None:
        """Change the requested mode; it takes effect at the next :meth:`evaluate`."""
        log.info("mode_requested", previous=self.requested.value, requested=mode.value)
        self.requested = mode

    def target(self, c: Conditions) -> tuple[State, str]:
        """The state these conditions call for, and why."""
        if not c.link_up:
            return State.FAULT, "PLC link lost"
        if c.critical_failures:
            return State.FAULT, f"bad critical input: {', '.join(c.critical_failures)}"
        if c.write_failures >= self.max_write_failures and self.requested is RequestedMode.CLOSED_LOOP:
            return State.FAULT, f"{c.write_failures} failed setpoint writes in a row"
        if not c.batch_running:
            return State.OFF, "the batch is not running"
        if self.requested is RequestedMode.OFF:
            return State.OFF, "off requested"
        if self.requested is RequestedMode.ADVISORY:
            return State.ADVISORY, "advisory requested"
        if c.watchdog_tripped:
            return State.HELD, "the PLC's watchdog tripped; it runs its local recipe"
        if not c.remote_enabled:
            return State.HELD, "remote disabled at the PLC"
        return State.CLOSED_LOOP, "closed loop requested and the PLC accepts setpoints"

    def evaluate(self, conditions: Conditions) -> StateChange | None:
        """Move to the state the conditions call for; the change (logged) or None."""
        state, reason = self.target(conditions)
        if state is self.state:
            self.reason = reason
            return None
        if (self.state, state) not in TRANSITIONS:
            raise RuntimeError(f"state change {self.state.value} -> {state.value} is not in the transitions table")
        change = StateChange(self.state, state, reason)
        emit = log.warning if state in (State.FAULT, State.HELD) else log.info
        emit("state_changed", previous=change.previous.value, state=state.value, reason=reason)
        self.state, self.reason = state, reason
        return change
