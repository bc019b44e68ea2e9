"""The simulated reference PLC: the plant plus the PLC's own logic, on a virtual batch clock.

The PLC's logic is :class:`~simulator.plc_logic.PlcLogic`, the lab
:class:`~simulator.lims.Lims`, the instruments :func:`online_values`: the
soft PLC and ``plant-sim`` of hardware-in-the-loop runs (docs/hil.md) are
built from the same pieces, split at the PLC's field I/O.

It serves exactly the tags of ``shared/reference-plc.md`` (by their logical
names; the OPC UA and Modbus servers map them to nodes and registers) and
implements its behaviour: range checks that reject and keep the old setpoint,
writes refused while remote is disabled, the heartbeat watchdog, the local
platform recipe, offline samples published hours after they are drawn, and
harvest. Choices where the reference is silent are in ``docs/plc-simulator.md``.

Time only moves when :meth:`SimulatedPlc.advance_to` is called, so a batch
runs as fast as the model integrates, and a server can pace it in lockstep or
at any time scale.

One batch after another: after harvest, :meth:`SimulatedPlc.next_batch`
inoculates the next batch (a new ``Status.BatchId``, process time 0, a fresh
plant, recipe and sampling schedule, the watchdog armed afresh); the PLC's
``MPC.*`` registers and ``Sample.Seq`` keep their values, as a PLC's memory does.
"""

from __future__ import annotations

import math

import numpy as np

from controller.config import BatchConfig
from controller.types import PHASE_HARVESTED, PHASE_RUNNING
from simulator.config import PV_TAGS, FeedLotFault, OnlineNoise, PlcConfig, ProbeFault, SimulationConfig
from simulator.lims import Lims
from simulator.plant import MINUTES_PER_HOUR, Plant
from simulator.plants.base import EquationPlant
from simulator.plc_logic import LAB_FIELD_BY_TAG, RECOMMENDATION_TAGS, PlcLogic, TagReading

__all__ = ["LAB_FIELD_BY_TAG", "PHASE_HARVESTED", "PHASE_RUNNING", "RECOMMENDATION_TAGS", "InstrumentNoise", "SimulatedPlc", "TagReading", "online_values"]


class InstrumentNoise:
    """The online instruments' noise as a function of process time: what an instrument shows in a minute is the same however often it is read.

    Drawn from a stream per read, the noise depended on the client: a runtime
    that also read while it watched for another runtime saw other values
    than the same cycle in-process, and a lab check at the edge of its
    tolerance could go either way between the two. Keyed by the minute, the
    in-process loop and a runtime over the network see the same batch.
    """

    def __init__(self, rng: np.random.Generator) -> None:
        self._seed = int(rng.integers(0, 2**62))

    def standard_normal(self, process_time_h: float, n: int) -> np.ndarray:
        minute = round(process_time_h * 60.0)
        return np.random.default_rng((self._seed, minute + 2**40)).standard_normal(n)


def online_values(plant: Plant, inputs: np.ndarray, noise: OnlineNoise, plc: PlcConfig, instruments: InstrumentNoise, *, running: bool) -> dict[str, float]:
    """What the online instruments show now, in engineering units and the reference's ``PV.*`` names: the plant's observables with their noise.

    The pH and DO loops are assumed to hold their setpoints; the totalisers
    are the delivered volumes (the all-in-one PLC totalises exactly).
    """
    observed = plant.observables_now(inputs)
    z = instruments.standard_normal(plant.process_time_h, len(PV_TAGS))
    values = {
        "PV.Temperature": observed["temperature"] + noise.temperature_degc * z[0],
        "PV.pH": plc.ph_setpoint + noise.ph * z[1],
        "PV.DO": plc.do_setpoint_pct + noise.do_pct * z[2],
        "PV.Volume": observed["volume"] + noise.volume_l * z[3],
        "PV.FeedTotal": plant.feed_total_l,
        "PV.GlucoseFeedTotal": plant.glucose_feed_total_l,
        "PV.BaseTotal": max(0.0, observed["base_added"] + noise.base_total_l * z[6]),
        "PV.OUR": observed["our"] * (1.0 + noise.our_relative * z[7]) if running else 0.0,
        "PV.CER": observed["cer"] * (1.0 + noise.cer_relative * z[8]) if running else 0.0,
        "PV.Capacitance": observed["capacitance"] * (1.0 + noise.capacitance_relative * z[9]),
        "PV.AgitationSpeed": plc.agitation_rpm if running else 0.0,
    }
    return {tag: float(value) for tag, value in values.items()}


class SimulatedPlc(PlcLogic):
    """A reference PLC in front of a simulated plant: the PLC's logic (:class:`~simulator.plc_logic.PlcLogic`), the plant and its lab in one object."""

    def __init__(
        self,
        *,
        model: EquationPlant,
        batch: BatchConfig,
        simulation: SimulationConfig,
        true_parameters: np.ndarray,
        rng_streams: tuple[np.random.Generator, np.random.Generator, np.random.Generator],
    ) -> None:
        super().__init__(batch=batch, simulation=simulation)
        self._model = model
        self._sampling_rng, self._lab_rng, self._online_rng = rng_streams
        self._true_parameters = np.asarray(true_parameters, dtype=float).copy()
        self._feed_strength_index = model.parameter_index(model.feed_strength_parameter)
        self._inoculate(batch)

    def _inoculate(self, batch: BatchConfig) -> None:
        """Start ``batch`` at process time 0: a fresh plant, recipe, setpoints, sampling schedule and watchdog."""
        self.plant = Plant(self._model, self._model.initial_state(batch), self._true_parameters)
        self._start_logic(batch)
        self.lims = Lims(self._simulation, self._sampling_rng, self._lab_rng)
        self._instruments = InstrumentNoise(self._online_rng)
        self._frozen_readings: dict[str, TagReading] = {}
        self._last_good_pv: dict[str, float] = {}
        self._process_events()

    def next_batch(self, batch: BatchConfig) -> None:
        """Inoculate the next batch after this one's harvest (the turnaround is the caller's wait): ``Status.BatchId`` becomes ``batch``'s,
        the process time 0, the phase running. The plant's true kinetics stay; ``batch`` may differ in its inoculation (a wrong volume).

        Raises :class:`RuntimeError` while a batch runs: a PLC inoculates an empty, cleaned reactor.
        """
        if self.phase == PHASE_RUNNING:
            raise RuntimeError(f"batch {self._batch.batch_id} is still running at {self.process_time_h:.2f} h: harvest it first")
        self._inoculate(batch)

    # ----------------------------------------------------------------- clock

    @property
    def minute(self) -> int:
        return self.plant.minute

    def recipe_volume_l(self) -> float:
        return self.plant.volume_l

    def advance_to(self, process_time_h: float) -> None:
        """Run the plant and the PLC logic up to ``process_time_h`` (or harvest, whichever comes first)."""
        target = round(process_time_h * MINUTES_PER_HOUR)
        while self.minute < target and self.phase == PHASE_RUNNING:
            stop = min(target, self._next_event_minute())
            self.plant.integrate(stop - self.minute, self._active_inputs())
            self._process_events()

    def _next_event_minute(self) -> int:
        candidates = self._logic_event_minutes() + self.lims.event_minutes()
        for fault in self._simulation.faults:
            if isinstance(fault, FeedLotFault):
                candidates.append(round(fault.start_h * MINUTES_PER_HOUR))
        return min(c for c in candidates if c > self.minute)

    def _active_inputs(self) -> np.ndarray:
        return self.active_inputs()

    # ---------------------------------------------------------------- events

    def _process_events(self) -> None:
        self._apply_feed_lot(self.process_time_h)
        self._check_watchdog()
        for sample in self.lims.due(self.minute):
            self.publish_lab_result(sample.result, volume_l=sample.volume_l, glucose_delivered_g=sample.glucose_delivered_g)
        self.lims.draw_due(self.plant, self._active_inputs(), self._batch.media.glucose_delivered_g(self.plant.feed_total_l, self.plant.glucose_feed_total_l))
        self._run_logic()

    def _apply_feed_lot(self, now_h: float) -> None:
        strength = 1.0
        for fault in self._simulation.faults:
            if isinstance(fault, FeedLotFault) and fault.start_h <= now_h:
                strength = fault.strength
        parameters = self._true_parameters.copy()
        parameters[self._feed_strength_index] *= strength
        if not np.array_equal(parameters, self.plant.parameters):
            self.plant.set_parameters(parameters)

    # ----------------------------------------------------------------- reads

    def snapshot(self) -> dict[str, TagReading]:
        """Scan every readable tag now, with the quality and scan time a real PLC would attach."""
        now_h = self.process_time_h
        readings: dict[str, TagReading] = {}
        values = online_values(self.plant, self._active_inputs(), self._simulation.noise.online, self._plc, self._instruments, running=self.phase == PHASE_RUNNING)
        for tag, value in values.items():
            readings[tag] = self._faulted_reading(tag, value, now_h)
        readings.update(self.logic_readings(now_h))
        return readings

    def _faulted_reading(self, tag: str, value: float, now_h: float) -> TagReading:
        active = [
            fault
            for fault in self._simulation.faults
            if isinstance(fault, ProbeFault) and fault.tag == tag and fault.start_h <= now_h and (fault.end_h is None or now_h < fault.end_h)
        ]
        if not active:
            self._frozen_readings.pop(tag, None)
            self._last_good_pv[tag] = value
            return TagReading(value, True, now_h)
        mode = active[-1].mode
        if mode == "bad":
            return TagReading(self._last_good_pv.get(tag, 0.0), False, now_h)
        if mode == "nan":
            return TagReading(math.nan, True, now_h)
        frozen = self._frozen_readings.setdefault(tag, TagReading(self._last_good_pv.get(tag, value), True, now_h))
        if mode == "frozen":
            return TagReading(frozen.value, True, now_h)
        return frozen  # stale: value and scan time both stop
