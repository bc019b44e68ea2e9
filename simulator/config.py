"""Configuration of a simulated batch: which truth, which noise, which faults.

A simulation config names the kinetics file and the batch file (paths relative
to the simulation config itself), a seed, how the "true" parameters differ
from the nominal ones, the noise of every signal, the sampling schedule and the
faults to inject.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, NonNegativeFloat, PositiveFloat, field_validator, model_validator

from controller.config import BatchConfig
from controller.types import LAB_FIELDS
from plant_models.config_loading import FieldError, FrozenConfig, config_error, read_yaml_mapping, validate_model
from plant_models.errors import ConfigError
from plant_models.parameters import CultureParameters
from simulator.plants import PLANTS, make_plant

PV_TAGS: tuple[str, ...] = (
    "PV.Temperature",
    "PV.pH",
    "PV.DO",
    "PV.Volume",
    "PV.FeedTotal",
    "PV.GlucoseFeedTotal",
    "PV.BaseTotal",
    "PV.OUR",
    "PV.CER",
    "PV.Capacitance",
    "PV.AgitationSpeed",
)
"""Online process values in the reference PLC's register order."""


class OnlineNoise(FrozenConfig):
    """Standard deviations of the online measurement noise (Gaussian)."""

    temperature_degc: float = Field(default=0.03, ge=0.0)
    ph: float = Field(default=0.01, ge=0.0)
    do_pct: float = Field(default=1.0, ge=0.0)
    volume_l: float = Field(default=1.0, ge=0.0, description="load-cell noise [L]")
    our_relative: float = Field(default=0.03, ge=0.0, le=1.0)
    cer_relative: float = Field(default=0.03, ge=0.0, le=1.0)
    capacitance_relative: float = Field(default=0.02, ge=0.0, le=1.0)
    base_total_l: float = Field(default=0.01, ge=0.0)


class LabNoise(FrozenConfig):
    """Relative standard deviations of the offline assays (viability: absolute, in %)."""

    vcd_relative: float = Field(default=0.06, ge=0.0, le=1.0)
    viability_pct: float = Field(default=1.0, ge=0.0)
    glucose_relative: float = Field(default=0.03, ge=0.0, le=1.0)
    lactate_relative: float = Field(default=0.04, ge=0.0, le=1.0)
    glutamine_relative: float = Field(default=0.06, ge=0.0, le=1.0)
    ammonia_relative: float = Field(default=0.06, ge=0.0, le=1.0)
    titer_relative: float = Field(default=0.04, ge=0.0, le=1.0)
    osmolality_relative: float = Field(default=0.01, ge=0.0, le=1.0)


class NoiseConfig(FrozenConfig):
    online: OnlineNoise = OnlineNoise()
    lab: LabNoise = LabNoise()


class SamplingConfig(FrozenConfig):
    """When offline samples are drawn and when their results appear."""

    first_draw_h: float = Field(default=0.0, ge=0.0, description="process time of the first draw [h]")
    interval_h: float = Field(default=24.0, gt=0.0, description="time between draws [h]")
    draw_jitter_h: float = Field(default=0.25, ge=0.0, le=2.0, description="draws happen uniformly within ± this of schedule [h]")
    result_delay_min_h: float = Field(default=3.0, ge=0.0, description="shortest time from draw to published result [h]")
    result_delay_max_h: float = Field(default=5.0, ge=0.0, description="longest time from draw to published result [h]")
    sample_volume_l: float = Field(default=0.05, ge=0.0, description="culture removed by each draw [L]")

    @model_validator(mode="after")
    def _ordered(self) -> SamplingConfig:
        if self.result_delay_max_h < self.result_delay_min_h:
            raise FieldError("result_delay_max_h", self.result_delay_max_h, f"must not be below result_delay_min_h ({self.result_delay_min_h})")
        if self.result_delay_max_h >= self.interval_h:
            raise FieldError("result_delay_max_h", self.result_delay_max_h, f"must be below interval_h ({self.interval_h}): results are published before the next draw")
        if 2.0 * self.draw_jitter_h >= self.interval_h:
            raise FieldError("draw_jitter_h", self.draw_jitter_h, f"must be below half of interval_h ({self.interval_h}), or draws could swap order")
        return self


class PlcConfig(FrozenConfig):
    """Behaviour of the simulated PLC where reference-plc.md leaves a choice."""

    unit: str = Field(default="BR01", min_length=1, description="unit prefix of the OPC UA node ids")
    remote_enabled_at_start: bool = Field(default=True, description="the operator's remote/local switch at inoculation")
    watchdog_timeout_h: float | None = Field(default=None, gt=0.0, description="heartbeat watchdog on the batch clock; default two cycle periods [h]")
    ph_setpoint: float = Field(default=7.0, ge=6.0, le=8.0)
    do_setpoint_pct: float = Field(default=40.0, ge=0.0, le=100.0)
    agitation_rpm: float = Field(default=90.0, ge=0.0)


class ProbeFault(FrozenConfig):
    """An online sensor misbehaves from ``start_h`` until ``end_h`` (or the end)."""

    kind: Literal["probe"]
    tag: str
    mode: Literal["bad", "nan", "frozen", "stale"] = "bad"
    start_h: float = Field(ge=0.0)
    end_h: float | None = None

    @model_validator(mode="after")
    def _known_tag(self) -> ProbeFault:
        if self.tag not in PV_TAGS:
            raise ValueError(f"tag {self.tag!r} is not an online signal; expected one of {', '.join(PV_TAGS)}")
        _check_ends_after_start(self.start_h, self.end_h)
        return self


def _check_ends_after_start(start_h: float, end_h: float | None) -> None:
    if end_h is not None and end_h <= start_h:
        raise FieldError("end_h", end_h, f"must be after start_h ({start_h}), or none for the rest of the batch")


def _lab_field(value: str) -> str:
    if value not in LAB_FIELDS:
        raise ValueError(f"field {value!r} is not a lab field; expected one of {', '.join(LAB_FIELDS)}")
    return value


class LabValueFault(FrozenConfig):
    """The lab reports a wrong value (a typo): the true value times ``factor``."""

    kind: Literal["lab_value"]
    draw_index: int = Field(ge=0, description="0 is the sample drawn first")
    field: str
    factor: float = Field(gt=0.0)

    _known_field = field_validator("field")(_lab_field)


class LabMissingFault(FrozenConfig):
    """A lab field was not measured for one sample: it reads NaN with a Bad status."""

    kind: Literal["lab_missing"]
    draw_index: int = Field(ge=0)
    field: str

    _known_field = field_validator("field")(_lab_field)


class FeedLotFault(FrozenConfig):
    """From ``start_h`` the nutrient feed comes from a lot of different strength."""

    kind: Literal["feed_lot"]
    start_h: float = Field(ge=0.0)
    strength: float = Field(gt=0.0, le=2.0, description="concentration relative to specification [-]")


class OperatorLocalFault(FrozenConfig):
    """The operator switches the PLC to local control between ``start_h`` and ``end_h``."""

    kind: Literal["operator_local"]
    start_h: float = Field(ge=0.0)
    end_h: float | None = None

    @model_validator(mode="after")
    def _ordered(self) -> OperatorLocalFault:
        _check_ends_after_start(self.start_h, self.end_h)
        return self


Fault = Annotated[
    ProbeFault | LabValueFault | LabMissingFault | FeedLotFault | OperatorLocalFault,
    Field(discriminator="kind"),
]


class SimulationConfig(FrozenConfig):
    """A simulated batch. ``model`` and ``batch`` are paths relative to this file."""

    model: Path = Field(description="kinetics file of the nominal parameter set")
    batch: Path = Field(description="batch file: inoculation, media, equipment, recipe, limits")
    seed: int = Field(default=0, ge=0)
    plant: str = Field(
        default="cho",
        description="the plant model the PLC serves: 'cho' (the controller's own model with the true parameters) or a plant of other structure (docs/plants.md)",
    )
    true_parameter_factors: dict[str, PositiveFloat] = Field(
        default_factory=dict, description="fixed multipliers of the plant's nominal parameters, e.g. growth.mu_max_per_h: 1.2 (names are the plant's own)"
    )
    true_parameter_relative_sd: dict[str, NonNegativeFloat] = Field(default_factory=dict, description="log-normal random multipliers drawn from the seed")
    noise: NoiseConfig = NoiseConfig()
    sampling: SamplingConfig = SamplingConfig()
    plc: PlcConfig = PlcConfig()
    faults: list[Fault] = Field(default_factory=list)


class LoadedSimulation(FrozenConfig):
    """A simulation config with the files it names loaded and validated."""

    source: Path
    simulation: SimulationConfig
    nominal: CultureParameters
    batch: BatchConfig


def load_simulation(path: str | Path, *, seed: int | None = None, model: str | Path | None = None) -> LoadedSimulation:
    """Load a simulation config and the kinetics and batch files it names.

    ``seed`` and ``model`` override the file's values (command-line flags).
    """
    path = Path(path)
    data = read_yaml_mapping(path)
    simulation = validate_model(SimulationConfig, data, source=str(path))
    if seed is not None:
        simulation = simulation.model_copy(update={"seed": seed})
    model_path = Path(model) if model is not None else path.parent / simulation.model
    batch_path = path.parent / simulation.batch
    nominal = CultureParameters.from_yaml(model_path)
    batch = BatchConfig.from_yaml(batch_path)
    watchdog_h = simulation.plc.watchdog_timeout_h
    if watchdog_h is not None and watchdog_h <= batch.cycle_period_h:
        raise config_error(
            str(path),
            "plc.watchdog_timeout_h",
            watchdog_h,
            f"must be longer than one cycle, the batch's cycle_period_h ({batch.cycle_period_h} h in {batch_path}), or it trips between heartbeats",
        )
    if simulation.plant not in PLANTS:
        raise config_error(str(path), "plant", simulation.plant, f"is not a plant the simulator knows; expected one of {', '.join(sorted(PLANTS))}")
    plant = make_plant(simulation.plant, nominal)
    for name in [*simulation.true_parameter_factors, *simulation.true_parameter_relative_sd]:
        if name not in plant.parameter_names:
            raise ConfigError(
                f"{path}: true_parameter_*: {name!r} is not a parameter of plant {simulation.plant!r} (names look like {plant.parameter_names[0]!r}; the list is in docs/plants.md)"
            )
    return LoadedSimulation(source=path, simulation=simulation, nominal=nominal, batch=batch)
