"""Cross-checks between signals (issue 11): no contradiction in healthy simulated batches, every injected fault found.

Healthy batches run the simulated PLC (the platform recipe, or a harder
profile) and pass every scan through the runtime's data-quality checks
before the plausibility checker, as the runtime does. Faults are injected
into the scan, where a mis-configured tag map or a failing probe would put
them.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pytest

from controller.nmpc import CycleObservation
from controller.plausibility import ContradictionCode, PlausibilityChecker, PlausibilityConfig
from controller.quality import DataQualityChecker
from controller.types import Setpoints
from simulator.batch import build_simulated_plc
from simulator.config import LoadedSimulation, load_simulation
from simulator.plc import PHASE_RUNNING, SimulatedPlc, TagReading
from tests.conftest import CONFIGS

SIMULATE = CONFIGS / "simulate"
Transform = Callable[[float, np.random.Generator], float]


@dataclass(frozen=True)
class Fault:
    tag: str
    onset_h: float
    transform: Transform


def _aggressive(plc: SimulatedPlc) -> None:
    """Harder than the NMPC: full feed to the top from day 2, 37 °C, then down to 30 °C at the 0.5 °C/h rate limit on day 6.5, overfeeding into a death phase."""
    t, volume = plc.process_time_h, float(plc.plant.state[plc.plant.model.state_index("volume")])
    applied = plc.snapshot()["SP.Temperature"].value
    target = 37.0 if t < 156.0 else 30.0
    temperature = float(applied) + float(np.clip(target - float(applied), -0.5, 0.5))  # type: ignore[arg-type]
    full = volume >= 1985.0
    plc.write_heartbeat(plc.heartbeat + 1)
    plc.write_setpoints(Setpoints(10.0 if t >= 48.0 and not full else 0.0, 0.3 if t > 72.0 and not full else 0.0, temperature))


def _run(loaded: LoadedSimulation, fault: Fault | None = None, *, drive: Callable[[SimulatedPlc], None] | None = None) -> list[tuple[float, tuple]]:
    """(process time, contradictions) per cycle of a whole batch."""
    plc, _ = build_simulated_plc(loaded)
    if drive is None:
        plc.set_operator_remote(False)
    quality, checker = DataQualityChecker(), PlausibilityChecker(loaded.batch)
    rng = np.random.default_rng(5)
    cycles = []
    while plc.phase == PHASE_RUNNING:
        scan = dict(plc.snapshot())
        if fault is not None and plc.process_time_h >= fault.onset_h:
            reading = scan[fault.tag]
            scan[fault.tag] = TagReading(fault.transform(float(reading.value), rng), reading.good, reading.scanned_at_h)  # type: ignore[arg-type]
        report = quality.check(scan)
        if report.usable:
            observation = report.observation()
            if observation.lab_result is not None:
                quality.commit_lab(observation.lab_result.seq)
            cycles.append((observation.process_time_h, checker.check(observation)))
        if drive is not None:
            drive(plc)
        plc.advance_to(plc.next_cycle_boundary_h())
    return cycles


def _first_found(cycles, fault: Fault, code: ContradictionCode) -> float:
    before = [c for t, found in cycles if t < fault.onset_h for c in found]
    assert before == []
    return next((t - fault.onset_h for t, found in cycles if t >= fault.onset_h and any(c.code is code for c in found)), math.inf)


def _scaled(factor: float) -> Transform:
    return lambda value, rng: value * factor


def _stuck(relative_noise: float = 0.0, absolute_noise: float = 0.0) -> Transform:
    held: list[float] = []

    def transform(value: float, rng: np.random.Generator) -> float:
        if not held:
            held.append(value)
        return held[0] * (1.0 + relative_noise * rng.standard_normal()) + absolute_noise * rng.standard_normal()

    return transform


HEALTHY = [
    ("platform", 1),
    ("platform", 2),
    ("platform", 3),
    ("perturbed", 1),
    ("perturbed", 2),
    ("perturbed", 3),
    ("faults", 1),  # weak feed lot, lab typo, capacitance Bad for 50 h, local control
]


@pytest.mark.parametrize(("config", "seed"), HEALTHY)
def test_no_contradiction_in_a_whole_healthy_recipe_batch(config, seed):
    """Temperature shift on day 5, stationary and death phases, kinetics drawn around nominal, probe outages."""
    cycles = _run(load_simulation(SIMULATE / f"{config}.yaml", seed=seed))
    assert len(cycles) > 300
    assert [(t, c.message) for t, found in cycles for c in found] == []


@pytest.mark.parametrize("config", ["platform", "perturbed"])
def test_no_contradiction_when_filled_fast_cooled_to_30_degc_and_dying(config):
    cycles = _run(load_simulation(SIMULATE / f"{config}.yaml", seed=4), drive=_aggressive)
    assert len(cycles) > 300
    assert [(t, c.message) for t, found in cycles for c in found] == []


# ------------------------------------------------------------------ volume balance


@pytest.mark.parametrize(
    ("fault", "within_h"),
    [
        (Fault("PV.Volume", 0.0, _scaled(0.1)), 0.0),  # issue 11
        (Fault("PV.Volume", 0.0, _scaled(1.1)), 0.0),
        (Fault("PV.Volume", 0.0, _scaled(0.9)), 0.0),
        (Fault("PV.Volume", 100.0, _scaled(1.1)), 1.0),  # a tag map changed mid-batch
        (Fault("PV.Volume", 200.0, lambda value, rng: value + 35.0), 0.0),  # load cell re-tared wrongly
        (Fault("PV.Volume", 200.0, lambda value, rng: value - 50.0), 0.0),
        (Fault("PV.Volume", 80.0, _stuck()), 24.0),  # frozen load cell while the recipe feeds about 2.5 L/h
        (Fault("PV.Volume", 80.0, _stuck(absolute_noise=1.0)), 24.0),  # stuck, with live noise
    ],
)
def test_a_wrong_volume_reading_contradicts_the_balance(fault, within_h):
    cycles = _run(load_simulation(SIMULATE / "platform.yaml", seed=1), fault)
    assert _first_found(cycles, fault, ContradictionCode.VOLUME_BALANCE) <= within_h


def test_the_smallest_mis_scaling_found_at_once_follows_from_the_tolerance(batch):
    """At inoculation the tolerance is max(20 L, 1.5 % of 1400 L) = 21 L: a 2 % mis-scaling (28 L) is found at once, 1 % (14 L) never."""
    config = PlausibilityConfig()
    tolerance_l = max(config.volume_tolerance_l, config.volume_tolerance_fraction * batch.inoculation.volume_l)
    assert tolerance_l == pytest.approx(21.0)
    loaded = load_simulation(SIMULATE / "platform.yaml", seed=1)
    assert _first_found(_run(loaded, Fault("PV.Volume", 0.0, _scaled(1.02))), Fault("PV.Volume", 0.0, _scaled(1.02)), ContradictionCode.VOLUME_BALANCE) == 0.0
    one_percent = _run(loaded, Fault("PV.Volume", 0.0, _scaled(1.01)))
    assert [c for _, found in one_percent for c in found] == []


def _observation(time_h: float, online: dict[str, float], feed_l: float = 0.0, glucose_l: float = 0.0) -> CycleObservation:
    return CycleObservation(time_h, online, feed_l, glucose_l, Setpoints(0.0, 0.0, 36.5))


def test_the_contradiction_names_the_signals_and_carries_the_numbers(batch):
    (found,) = PlausibilityChecker(batch).check(_observation(48.0, {"volume_l": 145.2, "base_total_l": 4.0}, feed_l=10.0, glucose_l=1.0))
    assert found.code == "volume_balance" and found.code is ContradictionCode.VOLUME_BALANCE
    assert found.signals == ("PV.Volume", "PV.FeedTotal", "PV.GlucoseFeedTotal", "PV.BaseTotal")
    assert found.measured == 145.2 and found.expected == pytest.approx(1415.0)
    assert "145.2 L" in found.message and "1415.0 L" in found.message and "base 4.0" in found.message


def test_missing_signals_are_not_checked(batch):
    checker = PlausibilityChecker(batch)
    assert checker.check(_observation(10.0, {})) == ()
    assert checker.check(_observation(10.0, {"capacitance_pf_per_cm": 50.0, "base_total_l": 1.0})) == ()


def test_while_the_base_total_is_missing_its_last_value_stands_in_and_the_upper_tolerance_widens(batch):
    config = PlausibilityConfig()
    checker = PlausibilityChecker(batch, config)
    assert checker.check(_observation(100.0, {"volume_l": 1420.0, "base_total_l": 20.0})) == ()
    ten_hours_later = _observation(110.0, {"volume_l": 1420.0 + 21.0 + 4.0})  # 4 L of base in 10 h, unseen
    assert checker.expected_volume_l(ten_hours_later) == 1420.0
    assert checker.check(ten_hours_later) == ()  # within 21 L + 10 h × 0.5 L/h
    assert checker.check(_observation(110.0, {"volume_l": 1420.0 + 21.0 + 5.5})) != ()


# -------------------------------------------------------------- capacitance / OUR


@pytest.mark.parametrize(
    "fault",
    [
        Fault("PV.Capacitance", 150.0, _scaled(2.0)),
        Fault("PV.Capacitance", 150.0, _scaled(0.5)),
        Fault("PV.Capacitance", 60.0, _scaled(2.0)),  # still growing
        Fault("PV.Capacitance", 250.0, _scaled(0.5)),  # dying
        Fault("PV.OUR", 150.0, _scaled(2.0)),
    ],
)
def test_a_scale_error_appearing_mid_batch_contradicts_the_ratio(fault):
    for config, seed in [("platform", 1), ("perturbed", 2)]:
        cycles = _run(load_simulation(SIMULATE / f"{config}.yaml", seed=seed), fault)
        assert _first_found(cycles, fault, ContradictionCode.CAPACITANCE_OUR) <= 3.0


def test_a_capacitance_probe_stuck_with_live_noise_is_found_while_the_culture_grows():
    fault = Fault("PV.Capacitance", 50.0, _stuck(relative_noise=0.02))
    cycles = _run(load_simulation(SIMULATE / "platform.yaml", seed=1), fault)
    assert _first_found(cycles, fault, ContradictionCode.CAPACITANCE_OUR) <= 30.0


def test_a_probe_frozen_exactly_is_the_quality_checks_business_and_not_checked_here():
    fault = Fault("PV.Capacitance", 50.0, _stuck())
    loaded = load_simulation(SIMULATE / "platform.yaml", seed=1)
    plc, _ = build_simulated_plc(loaded)
    plc.set_operator_remote(False)
    quality = DataQualityChecker()
    rng = np.random.default_rng(0)
    problems = []
    while plc.process_time_h < 60.0:
        scan = dict(plc.snapshot())
        if plc.process_time_h >= fault.onset_h:
            scan[fault.tag] = TagReading(fault.transform(float(scan[fault.tag].value), rng), True, plc.process_time_h)  # type: ignore[arg-type]
        problems.append(quality.check(scan).problems.get(fault.tag, ""))
        plc.advance_to(plc.next_cycle_boundary_h())
    assert problems[-1].startswith("frozen")


def test_relearn_forgets_a_ratio_in_force(batch):
    checker = PlausibilityChecker(batch)
    ratio_cycles = [_observation(100.0 + i, {"capacitance_pf_per_cm": 10.0, "our_mmol_per_l_h": 1.0, "temperature_degc": 36.5}) for i in range(20)]
    for observation in ratio_cycles:
        assert checker.check(observation) == ()
    doubled = [_observation(120.0 + i, {"capacitance_pf_per_cm": 20.0, "our_mmol_per_l_h": 1.0, "temperature_degc": 36.5}) for i in range(3)]
    assert [bool(checker.check(o)) for o in doubled] == [False, True, True]  # one cycle is a spike; two are a contradiction
    checker.relearn()
    assert checker.check(_observation(123.0, {"capacitance_pf_per_cm": 20.0, "our_mmol_per_l_h": 1.0, "temperature_degc": 36.5})) == ()
