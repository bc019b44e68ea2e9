"""The runtime's configuration: how it behaves (:class:`RuntimeSettings`) and, for a deployment, which files it uses (:class:`RuntimeConfig`)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from pydantic import Field, model_validator

from controller.config import BatchConfig
from controller.estimator import EstimatorConfig
from controller.forecast import EarlyWarningConfig
from controller.modes import RequestedMode
from controller.nmpc import NmpcConfig
from controller.plausibility import PlausibilityConfig
from controller.quality import DataQualityConfig
from controller.safeguards import SafeguardSettings
from plant_models.config_loading import FieldError, FrozenConfig, config_error, read_yaml_mapping, validate_model
from plant_models.errors import ConfigError
from plant_models.parameters import CultureParameters, parameter_vector


class ScreenSettings(FrozenConfig):
    """Where the operator screen listens (docs/operator-screen.md)."""

    host: str = Field(default="127.0.0.1", description="address to listen on; 0.0.0.0 for every interface")
    port: int = Field(default=8080, ge=1, le=65535, description="TCP port")
    secure_cookies: bool = Field(default=False, description="mark the session cookie Secure (when a TLS proxy serves the screen)")


class RuntimeSettings(FrozenConfig):
    """How the runtime behaves (the paths of a deployment are in :class:`RuntimeConfig`)."""

    mode: RequestedMode = Field(default=RequestedMode.CLOSED_LOOP, description="off, advisory or closed-loop")
    poll_interval_s: float = Field(default=1.0, gt=0.0, le=60.0, description="how often the batch clock is read between cycles [s]")
    io_timeout_s: float = Field(default=5.0, gt=0.0, le=60.0, description="timeout of every PLC request [s]")
    reconnect_initial_s: float = Field(default=0.5, gt=0.0, description="first wait before reconnecting after a lost link [s]")
    reconnect_max_s: float = Field(default=10.0, gt=0.0, description="longest wait between reconnection attempts [s]")
    max_write_failures: int = Field(default=3, ge=1, description="failed setpoint writes in a row before the runtime drops to fault")
    write_retry_cycles: int = Field(default=6, ge=1, description="cycles in fault for failing writes before one more write is tried")
    fault_hand_over_cycles: int | None = Field(
        default=3,
        ge=1,
        description="after this many cycles in fault, stop moving MPC.Heartbeat so that the PLC's watchdog hands control to its local recipe: "
        "a runtime that cannot trust what it sees must not leave the PLC on its last setpoints (docs/runtime.md, section 7); "
        "null: always move it, as the reference interface reads literally",
    )
    auto_approve: bool = Field(default=False, description="advisory mode: approve every recommendation at once (lockstep tests and demos only; logged at start)")
    screen: ScreenSettings | None = Field(default=None, description="serve the operator screen; none without this section")
    early_warning: EarlyWarningConfig = EarlyWarningConfig()
    quality: DataQualityConfig = DataQualityConfig()
    nmpc: NmpcConfig = NmpcConfig()
    estimator: EstimatorConfig = EstimatorConfig()
    plausibility: PlausibilityConfig = PlausibilityConfig()
    safeguards: SafeguardSettings = SafeguardSettings()

    @model_validator(mode="after")
    def _consistent(self) -> RuntimeSettings:
        if self.reconnect_initial_s > self.reconnect_max_s:
            raise FieldError("reconnect_initial_s", self.reconnect_initial_s, f"must not be above reconnect_max_s ({self.reconnect_max_s})")
        mpc = self.nmpc.mpc
        if mpc.glucose_min_g_per_l >= mpc.glucose_max_g_per_l:
            raise FieldError("nmpc.mpc.glucose_min_g_per_l", mpc.glucose_min_g_per_l, f"must be below nmpc.mpc.glucose_max_g_per_l ({mpc.glucose_max_g_per_l})")
        if self.nmpc.initial_harvest_h is not None and self.nmpc.initial_harvest_h <= 0.0:
            raise FieldError("nmpc.initial_harvest_h", self.nmpc.initial_harvest_h, "must be greater than 0 (a process time [h]), or none for the recipe's")
        return self


class RuntimeConfig(RuntimeSettings):
    """A deployment: which PLC, which batch, which kinetics, where the history goes. Paths are relative to this file."""

    tag_map: Path = Field(description="the PLC's tag map (configs/plc/)")
    batch: Path = Field(description="the batch file: inoculation record, media, equipment, recipe, limits")
    model: Path = Field(description="the nominal kinetics of the cell line")
    history: Path = Field(description="the SQLite history file (created if missing)")
    allow_insecure: bool = Field(default=False, description="OPC UA security mode None, by explicit opt-in (logged at every start)")


@dataclass(frozen=True)
class LoadedRuntime:
    source: Path
    config: RuntimeConfig
    batch: BatchConfig
    nominal: CultureParameters
    tag_map_path: Path
    history_path: Path


def load_runtime_config(path: str | Path, *, history: str | Path | None = None, mode: RequestedMode | None = None) -> LoadedRuntime:
    """Load a runtime config and the batch and kinetics files it names; ``history`` and ``mode`` override the file."""
    path = Path(path)
    config = validate_model(RuntimeConfig, read_yaml_mapping(path), source=str(path))
    if mode is not None:
        config = config.model_copy(update={"mode": mode})
    base = path.parent
    batch = BatchConfig.from_yaml(base / config.batch)
    _check_against_batch(config, batch, source=str(path), batch_path=base / config.batch)
    nominal = CultureParameters.from_yaml(base / config.model)
    tag_map_path = base / config.tag_map
    if not tag_map_path.is_file():
        raise ConfigError(f"{path}: tag_map: no such file {tag_map_path}")
    history_path = Path(history) if history is not None else base / config.history
    return LoadedRuntime(path, config, batch, nominal, tag_map_path, history_path)


def _check_against_batch(config: RuntimeSettings, batch: BatchConfig, *, source: str, batch_path: Path) -> None:
    """What a runtime config asks of its batch must be possible in it."""
    nmpc, limits = config.nmpc, batch.limits
    if nmpc.initial_harvest_h is not None and nmpc.initial_harvest_h > limits.latest_harvest_h:
        raise config_error(
            source, "nmpc.initial_harvest_h", nmpc.initial_harvest_h, f"must not be after the batch's limits.latest_harvest_h ({limits.latest_harvest_h} in {batch_path})"
        )
    headroom_l = batch.equipment.max_working_volume_l - batch.inoculation.volume_l
    if nmpc.mpc.volume_backoff_l >= headroom_l:
        raise config_error(
            source,
            "nmpc.mpc.volume_backoff_l",
            nmpc.mpc.volume_backoff_l,
            f"must be below the room the batch leaves after inoculation ({headroom_l:g} L = equipment.max_working_volume_l - inoculation.volume_l in {batch_path})",
        )
    osmolality_room = limits.osmolality_max_mosm_per_kg - batch.inoculation.osmolality_mosm_per_kg
    if nmpc.mpc.osmolality_backoff_mosm_per_kg >= osmolality_room:
        raise config_error(
            source,
            "nmpc.mpc.osmolality_backoff_mosm_per_kg",
            nmpc.mpc.osmolality_backoff_mosm_per_kg,
            f"must be below the room between the inoculum and the limit ({osmolality_room:g} mOsm/kg = limits.osmolality_max_mosm_per_kg - inoculation.osmolality_mosm_per_kg in {batch_path})",
        )
    if nmpc.mpc.glucose_max_g_per_l <= limits.glucose_min_g_per_l:
        raise config_error(
            source,
            "nmpc.mpc.glucose_max_g_per_l",
            nmpc.mpc.glucose_max_g_per_l,
            f"must be above the batch's limits.glucose_min_g_per_l ({limits.glucose_min_g_per_l} in {batch_path})",
        )


def nominal_parameter_vector(loaded: LoadedRuntime) -> np.ndarray:
    return parameter_vector(loaded.nominal, loaded.batch.media)
