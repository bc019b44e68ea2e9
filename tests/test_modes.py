"""The mode machine: every state the conditions call for, every change in the table, logged with its reason."""

from __future__ import annotations

import pytest
import structlog

from controller.modes import TRANSITIONS, Conditions, ModeMachine, RequestedMode, State

UP = Conditions(link_up=True, remote_enabled=True)


@pytest.mark.parametrize(
    ("requested", "conditions", "expected"),
    [
        (RequestedMode.CLOSED_LOOP, UP, State.CLOSED_LOOP),
        (RequestedMode.CLOSED_LOOP, Conditions(link_up=True, remote_enabled=False), State.HELD),
        (RequestedMode.CLOSED_LOOP, Conditions(link_up=True, remote_enabled=False, watchdog_tripped=True), State.HELD),
        (RequestedMode.CLOSED_LOOP, Conditions(link_up=False), State.FAULT),
        (RequestedMode.CLOSED_LOOP, Conditions(link_up=True, remote_enabled=True, critical_failures=("Status.ProcessTime",)), State.FAULT),
        (RequestedMode.CLOSED_LOOP, Conditions(link_up=True, remote_enabled=True, write_failures=3), State.FAULT),
        (RequestedMode.ADVISORY, Conditions(link_up=True, remote_enabled=True, write_failures=3), State.ADVISORY),
        (RequestedMode.ADVISORY, Conditions(link_up=True, remote_enabled=False), State.ADVISORY),
        (RequestedMode.OFF, UP, State.OFF),
        (RequestedMode.CLOSED_LOOP, Conditions(link_up=True, remote_enabled=True, batch_running=False), State.OFF),
    ],
)
def test_the_conditions_decide_the_state(requested, conditions, expected):
    machine = ModeMachine(requested)
    machine.evaluate(conditions)
    assert machine.state is expected


def test_what_each_state_writes():
    assert [s.plc_mode for s in State] == [0, 1, 1, 2, 0]
    assert [s for s in State if s.writes_setpoints] == [State.CLOSED_LOOP]
    assert {s for s in State if s.writes_recommendations} == {State.ADVISORY, State.HELD, State.CLOSED_LOOP}


def test_every_change_is_in_the_table_and_logged_with_its_reason():
    machine = ModeMachine(RequestedMode.CLOSED_LOOP)
    sequence = [UP, Conditions(link_up=True, remote_enabled=False), Conditions(link_up=False), UP]
    with structlog.testing.capture_logs() as logs:
        changes = [machine.evaluate(c) for c in sequence]
    assert [(c.previous, c.state) for c in changes if c] == [
        (State.OFF, State.CLOSED_LOOP),
        (State.CLOSED_LOOP, State.HELD),
        (State.HELD, State.FAULT),
        (State.FAULT, State.CLOSED_LOOP),
    ]
    assert all((c.previous, c.state) in TRANSITIONS for c in changes if c)
    assert [entry["reason"] for entry in logs if entry["event"] == "state_changed"][2] == "PLC link lost"
    assert machine.evaluate(UP) is None, "no change, no log"


def test_the_table_covers_every_pair_the_conditions_can_produce():
    states = set(State)
    reachable = {(a, b) for a in states for b in states if a is not b}
    assert reachable == set(TRANSITIONS), "every change between two states is described"
