"""The history's rows MAC'd with the audit key as they are written (and again when a write's outcome or a run's end changes them); a checkpoint every N cycles, whose failure never loses a cycle."""

from __future__ import annotations

import math
import sqlite3

import pytest
from structlog.testing import capture_logs

from controller.ports import CycleRecord, Reading
from interfaces.audit import AuditError, AuditTrail, check_history_rows
from interfaces.audit_keys import AuditKeyring, generate_key
from interfaces.history import COVERED_COLUMNS, SqliteHistory

pytestmark = pytest.mark.usefixtures("uncached_logging")


def _cycle(t_h: float) -> CycleRecord:
    return CycleRecord(
        process_time_h=t_h,
        state="advisory",
        reason="ok",
        source="mpc",
        requested=None,
        applied=None,
        adjustments=(),
        harvest_time_h=336.0,
        predicted_titer_g_per_l=math.nan,
        predicted_score_g_per_day=500.0,
        solve_time_s=0.05,
        estimate={"state": {"glucose": 5.0}},
        wrote_setpoints=False,
    )


def test_every_covered_row_carries_the_mac_of_its_final_content(tmp_path):
    path = tmp_path / "h.sqlite"
    key = generate_key()
    history = SqliteHistory(path, mac_key=key)
    history.start_run(batch_id="B1", requested_mode="advisory", config={})
    history.record_scan(1.0, {"PV.Volume": Reading(1400.0, True, None), "Status.BatchId": Reading("B1", True, None)}, {})
    write_id = history.record_write_intent(1.0, {"SP.FeedRate": 1.5})
    macs_pending = sqlite3.connect(path).execute("SELECT audit_mac FROM writes WHERE id = ?", (write_id,)).fetchone()[0]
    history.record_write_outcome(write_id, "ok")
    history.record_alarm(1.0, "plc_link", "lost", active=True)
    history.record_state_change(1.0, "off", "advisory", "start")
    history.commit_cycle(_cycle(1.0), None)
    history.end_run(reason="stopped")
    history.close()
    db = sqlite3.connect(path)
    assert db.execute("SELECT audit_mac FROM writes WHERE id = ?", (write_id,)).fetchone()[0] != macs_pending, "resealed with its outcome"
    for table in COVERED_COLUMNS:
        macs = [row[0] for row in db.execute(f"SELECT audit_mac FROM {table}")]
        assert all(m is not None and m.startswith(f"{key.key_id}:") for m in macs), table
    db.close()
    with AuditTrail(path, read_only=True) as trail:
        result = trail.verify(keys=AuditKeyring([key]), checkers=[check_history_rows])
    assert result.problems == [], "each MAC matches the row as it now reads"


def test_without_a_key_rows_carry_no_mac(tmp_path):
    history = SqliteHistory(tmp_path / "h.sqlite")
    history.start_run(batch_id="B1", requested_mode="advisory", config={})
    history.commit_cycle(_cycle(1.0), None)
    assert [row["audit_mac"] for row in history.table("cycles")] == [None]
    history.close()


def test_a_checkpoint_every_n_cycles_and_a_failing_one_is_logged_and_tried_again(tmp_path):
    calls: list[int] = []
    failing = [True]

    def checkpoint() -> None:
        calls.append(len(calls))
        if failing[0]:
            raise AuditError("h.sqlite: cannot write the audit record: disk full")

    history = SqliteHistory(tmp_path / "h.sqlite", checkpoint=checkpoint, checkpoint_every_cycles=3)
    history.start_run(batch_id="B1", requested_mode="advisory", config={})
    with capture_logs() as logs:
        for t_h in (1.0, 2.0, 3.0, 4.0):
            history.commit_cycle(_cycle(t_h), None)
    assert len(history.table("cycles")) == 4, "the cycles are committed whatever the checkpoint does"
    assert len(calls) == 2, "due at the third cycle, failed, tried again at the fourth"
    assert [e["event"] for e in logs if e["log_level"] == "warning"] == ["history_checkpoint_failed", "history_checkpoint_failed"]
    failing[0] = False
    history.commit_cycle(_cycle(5.0), None)
    assert len(calls) == 3
    for t_h in (6.0, 7.0):
        history.commit_cycle(_cycle(t_h), None)
    assert len(calls) == 3, "counted afresh from the one that succeeded"
    history.commit_cycle(_cycle(8.0), None)
    assert len(calls) == 4
    history.close()
    with pytest.raises(ValueError, match="checkpoint_every_cycles must be at least 1, got 0"):
        SqliteHistory(tmp_path / "other.sqlite", checkpoint_every_cycles=0)
