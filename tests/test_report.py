"""The trust region in ``simulate``'s report: from the cycle records of a trust region whose lab checks confirm, then miss, then stand the NMPC down."""

from __future__ import annotations

import csv

import numpy as np
import pytest

from bioreactor_mpc.report import TrustTimeline, plot_trust, write_trust_csv
from controller.recipe import PlatformRecipe
from controller.trust import RegionSource, Replay, TrustRegion
from controller.types import LabResult
from plant_models.cho import STATE_INDEX

PLANNED = {"viable_cells": 5.0, "titer": 1.0, "glucose": 4.0}
"""What every plan predicts, flat over its horizon."""
LAB_AT_H = {30: 5.0, 54: 10.0, 78: 10.0, 102: 10.0}
"""Draw time → measured VCD: the first agrees with the plans, the next three are twice what they predicted."""


def _lab(seq: int, taken_at_h: float, vcd: float) -> LabResult:
    nan = float("nan")
    return LabResult(seq, taken_at_h, vcd, 95.0, PLANNED["glucose"], nan, nan, nan, PLANNED["titer"], nan)


@pytest.fixture
def recorded(batch):
    """A trust region driven hour by hour to 130 h as the NMPC drives it, and its summary at every cycle (what the cycle records hold)."""
    region = TrustRegion(batch, PlatformRecipe(batch.recipe, batch.media, batch.equipment, batch.inoculation.volume_l), ())
    times, summaries = [], []
    for t in range(131):
        horizon = np.array([t, t + 200.0])
        states = np.zeros((len(STATE_INDEX), 2))
        for state, value in PLANNED.items():
            states[STATE_INDEX[state]] = value
        if not region.stood_down:
            region.remember(float(t), horizon, states)
        if t - 4 in LAB_AT_H:  # published four hours after the draw
            region.check(_lab(len(region.checks) + 1, float(t - 4), LAB_AT_H[t - 4]))
        times.append(float(t))
        summaries.append(region.summary(float(t)))
    return region, times, summaries


def test_the_timeline_has_the_width_the_checks_and_the_stand_down_of_the_records(recorded):
    region, times, summaries = recorded
    trust = TrustTimeline.from_records(times, summaries)
    assert trust is not None and trust.source is RegionSource.RECIPE_BAND
    assert [(c.checked_at_h, c.confirmed, c.width_after) for c in trust.checks] == [(c.taken_at_h + 4.0, c.confirmed, c.width_after) for c in region.checks]
    assert [c.confirmed for c in trust.checks] == [True, False, False, False], "the plans predicted VCD 5: the first result agrees, the next three do not"
    assert trust.stood_down_at_h == 106.0 and trust.stood_down[-1] and not trust.stood_down[times.index(105.0)]
    recipe_degc = 36.5  # configs/batch/platform.yaml before the shift
    assert trust.temperature_degc[0] == pytest.approx([recipe_degc - 0.45, recipe_degc + 0.45]), "30 % of the band's default reach of 1.5 °C at the start"
    lines = trust.describe()
    assert lines[0].startswith("trust region: a band around the platform recipe; width 30 % at the first cycle") and "lab checks: 4 (1 confirmed, 3 missed)" in lines[0]
    assert "reach earned by results a plan predicted days ahead: x1.00 at most" in lines[0]
    assert "lab result 2 (drawn 54 h) missed the plan made at 30 h" in lines[2] and "STOOD DOWN at 106 h" in lines[-1] and "for the rest of the batch" in lines[-1]


def test_the_trust_files_hold_every_cycle_and_each_check_once(recorded, tmp_path):
    _, times, summaries = recorded
    trust = TrustTimeline.from_records(times, summaries)
    assert trust is not None
    write_trust_csv(tmp_path / "trust.csv", trust)
    with (tmp_path / "trust.csv").open(encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == len(times) and float(rows[34]["process_time_h"]) == 34.0
    assert [float(r["process_time_h"]) for r in rows if r["lab_check"]] == [34.0, 58.0, 82.0, 106.0]
    assert float(rows[0]["width"]) == pytest.approx(summaries[0]["width"]) and rows[-1]["stood_down"] == "1"
    assert {float(r["reach_scale"]) for r in rows} == {1.0}  # every check that had a plan three days before missed, or had none
    assert float(rows[0]["temperature_high_degc"]) == pytest.approx(summaries[0]["temperature_degc"][1])
    assert float(rows[0]["glucose_error_g_per_l"]) == pytest.approx(0.75)  # the tolerance's floor: no check was held against a replay
    assert TrustTimeline.from_records([0.0], [{k: v for k, v in summaries[0].items() if k != "glucose_error_g_per_l"}]) is not None  # a record made before it existed
    plot_trust(tmp_path / "trust.png", trust, "test")
    assert (tmp_path / "trust.png").stat().st_size > 10_000


def test_no_trust_records_no_timeline():
    assert TrustTimeline.from_records([0.0, 1.0], [{}, {}]) is None


def test_the_timeline_says_when_the_end_game_began(recorded):
    _, times, summaries = recorded
    marked = [{**summary, "endgame": t >= 120.0} for t, summary in zip(times, summaries, strict=True)]
    trust = TrustTimeline.from_records(times, marked)
    assert trust is not None and trust.endgame.sum() == sum(t >= 120.0 for t in times)
    assert any(line.startswith("end-game from 120 h (day 5.00)") for line in trust.describe())
    old = TrustTimeline.from_records(times, [{k: v for k, v in summary.items() if k != "endgame"} for summary in summaries])  # made before the flag existed
    assert old is not None and not old.endgame.any() and not any("end-game" in line for line in old.describe())


def test_the_timeline_says_when_the_band_was_held(recorded):
    """A calibrated model not shown to rank its records' outcomes right: its band is held at its start, and the report says so."""
    _, times, summaries = recorded
    held = TrustTimeline.from_records(times, [{**summary, "widens": False} for summary in summaries])
    assert held is not None and held.held and "held at its start" in held.describe()[0]
    for widening in ([{**summary, "widens": True} for summary in summaries], summaries):  # a band that widens; records made before the flag
        trust = TrustTimeline.from_records(times, widening)
        assert trust is not None and not trust.held and "held" not in trust.describe()[0]


def test_checks_made_while_stood_down_are_counted_apart_with_their_own_verdict(recorded, tmp_path):
    """Stood down, the misses stay at 3 whatever the model shows: the report takes each check's recorded verdict, not the miss count."""
    region, times, summaries = recorded
    for seq, t in ((5, 126.0), (6, 150.0)):
        run = Replay(t - 24.0, t, {"vcd_1e6_per_ml": 10.0, "titer_g_per_l": PLANNED["titer"], "glucose_g_per_l": PLANNED["glucose"]})
        long = Replay(t - 72.0, t, dict(run.predicted))
        assert region.check(_lab(seq, t, 10.0 if seq == 5 else 4.0), replay=long, day_replay=run) is not None
        times.append(t + 4.0)
        summaries.append(region.summary(t + 4.0))
    trust = TrustTimeline.from_records(times, summaries)
    assert trust is not None and [(c.shadow, c.confirmed) for c in trust.checks[-2:]] == [(True, True), (True, False)]
    assert "lab checks: 4 (1 confirmed, 3 missed); 2 while stood down, against the model run with the recipe's inputs (1 within tolerance)" in trust.describe()[0]
    plot_trust(tmp_path / "trust.png", trust, "test")
