"""The runtime's configuration: how it behaves (:class:`RuntimeSettings`) and, for a deployment, which files it uses (:class:`RuntimeConfig`)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from pydantic import Field

from controller.config import BatchConfig
from controller.estimator import EstimatorConfig
from controller.forecast import EarlyWarningConfig
from controller.modes import RequestedMode
from controller.nmpc import NmpcConfig
from controller.quality import DataQualityConfig
from plant_models.config_loading import FrozenConfig, read_yaml_mapping, validate_model
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
        default=None,
        ge=1,
        description="after this many cycles in fault, stop moving MPC.Heartbeat so that the PLC's watchdog hands control to its local recipe "
        "(a deliberate departure from the reference interface, which moves it in every state); none: always move it",
    )
    auto_approve: bool = Field(default=False, description="advisory mode: approve every recommendation at once (lockstep tests and demos only; logged at start)")
    screen: ScreenSettings | None = Field(default=None, description="serve the operator screen; none without this section")
    early_warning: EarlyWarningConfig = EarlyWarningConfig()
    quality: DataQualityConfig = DataQualityConfig()
    nmpc: NmpcConfig = NmpcConfig()
    estimator: EstimatorConfig = EstimatorConfig()


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
    nominal = CultureParameters.from_yaml(base / config.model)
    tag_map_path = base / config.tag_map
    if not tag_map_path.is_file():
        raise ConfigError(f"{path}: tag_map: no such file {tag_map_path}")
    history_path = Path(history) if history is not None else base / config.history
    return LoadedRuntime(path, config, batch, nominal, tag_map_path, history_path)


def nominal_parameter_vector(loaded: LoadedRuntime) -> np.ndarray:
    return parameter_vector(loaded.nominal, loaded.batch.media)


