"""The SQLite history: WAL, every record committed at once, the resume state with its cycle, clear errors."""

from __future__ import annotations

import math
import sqlite3
from datetime import UTC, datetime

import pytest

from controller.ports import CycleRecord, Reading, ResumeState
from controller.types import LabResult
from interfaces.history import HistoryError, SqliteHistory


def _record(t_h: float) -> CycleRecord:
    return CycleRecord(
        process_time_h=t_h,
        state="closed_loop",
        reason="ok",
        source="mpc",
        requested={"feed_rate_lph": 1.0, "harvest": False},
        applied={"feed_rate_lph": 1.0, "harvest": False},
        adjustments=(),
        harvest_time_h=336.0,
        predicted_titer_g_per_l=math.nan,
        predicted_score_g_per_day=500.0,
        solve_time_s=0.05,
        estimate={"state": {"glucose": 5.0}},
        wrote_setpoints=True,
    )


def test_records_are_durable_and_readable_by_another_connection(tmp_path):
    path = tmp_path / "h.sqlite"
    history = SqliteHistory(path)
    history.start_run(batch_id="B1", requested_mode="closed-loop", config={"x": math.nan})
    history.record_scan(1.0, {"PV.Volume": Reading(1400.0, True, datetime.now(UTC)), "Status.BatchId": Reading("B1", True, None)}, {"PV.OUR": "Bad status"})
    history.record_lab(2.0, LabResult(1, 0.5, 1.0, 97.0, math.nan, 0.2, 6.0, 0.5, 0.0, 300.0), used=True)
    history.record_write(1.0, {"SP.FeedRate": 1.0}, "ok")
    history.record_alarm(1.0, "quality.PV.OUR", "Bad status", active=True)
    history.commit_cycle(_record(1.0), ResumeState("B1", 1.0, {"entries": [1, 2]}, 1, 336.0))
    # Another process (a report, the operator screen) sees everything without the writer closing.
    other = sqlite3.connect(path)
    assert other.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert other.execute("SELECT COUNT(*) FROM readings").fetchone()[0] == 2
    assert other.execute("SELECT glucose_g_per_l FROM lab_results").fetchone()[0] is None, "not measured is NULL"
    assert other.execute("SELECT predicted_titer_g_per_l FROM cycles").fetchone()[0] is None
    other.close()
    resume = history.load_resume("B1")
    assert resume == ResumeState("B1", 1.0, {"entries": [1, 2]}, 1, 336.0)
    assert history.load_resume("B2") is None
    history.commit_cycle(_record(2.0), ResumeState("B1", 2.0, {}, 1, 330.0))
    assert history.load_resume("B1").last_cycle_h == 2.0  # type: ignore[union-attr]
    assert [row["process_time_h"] for row in history.table("cycles")] == [1.0, 2.0]


def test_a_file_that_is_not_a_database_is_a_clear_error(tmp_path):
    path = tmp_path / "not-a-db.sqlite"
    path.write_text("hello, this is not SQLite" * 100)
    with pytest.raises(HistoryError, match="not-a-db.sqlite"):
        SqliteHistory(path)


def test_records_before_a_run_are_refused(tmp_path):
    history = SqliteHistory(tmp_path / "h.sqlite")
    with pytest.raises(HistoryError, match="no run started"):
        history.record_write(0.0, {}, "ok")
