"""Shared fixtures: configs from the repository, the model, a simulation config factory."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import structlog
import yaml

from controller.config import BatchConfig
from plant_models.cho import CultureModel
from plant_models.parameters import CultureParameters, PhaseEnvelope, ValueRange, parameter_vector
from simulator.config import LoadedSimulation, load_simulation

REPO = Path(__file__).resolve().parent.parent
CONFIGS = REPO / "configs"


@pytest.fixture(scope="session")
def model() -> CultureModel:
    return CultureModel()


@pytest.fixture(scope="session")
def nominal() -> CultureParameters:
    return CultureParameters.from_yaml(CONFIGS / "model" / "cho_nominal.yaml")


@pytest.fixture(scope="session")
def batch() -> BatchConfig:
    return BatchConfig.from_yaml(CONFIGS / "batch" / "platform.yaml")


@pytest.fixture(scope="session")
def nominal_p(nominal: CultureParameters, batch: BatchConfig) -> np.ndarray:
    return parameter_vector(nominal, batch.media)


@pytest.fixture
def make_simulation(tmp_path: Path):
    """Write a simulation config next to copies of the repository's model and batch files."""

    def make(**overrides: Any) -> LoadedSimulation:
        data: dict[str, Any] = {
            "model": str(CONFIGS / "model" / "cho_nominal.yaml"),
            "batch": str(CONFIGS / "batch" / "platform.yaml"),
            "seed": 3,
        }
        data.update(overrides)
        path = tmp_path / f"sim-{len(list(tmp_path.iterdir()))}.yaml"
        path.write_text(yaml.safe_dump(data), encoding="utf-8")
        return load_simulation(path)

    return make


@pytest.fixture(scope="session")
def day_twelve():
    """A recipe batch at day 12 (288 h): the simulated PLC and the setpoints it runs then."""
    from controller.types import Setpoints
    from simulator.batch import build_simulated_plc

    plc, _ = build_simulated_plc(load_simulation(CONFIGS / "simulate" / "platform.yaml"))
    plc.set_operator_remote(False)
    plc.advance_to(288.0)
    snap = plc.snapshot()
    return plc, Setpoints(snap["SP.FeedRate"].value, snap["SP.GlucoseRate"].value, snap["SP.Temperature"].value)


@pytest.fixture(autouse=True)
def logging_as_found() -> Iterator[None]:
    """A test that runs the CLI configures structlog (caching loggers on first use); the next test starts from the configuration found before it."""
    saved = structlog.get_config()
    yield
    structlog.configure(**saved)


@pytest.fixture
def uncached_logging() -> Iterator[None]:
    """structlog's capture_logs needs loggers that are not cached (the CLI tests configure caching)."""
    saved = structlog.get_config()
    structlog.reset_defaults()
    yield
    structlog.configure(**saved)


@pytest.fixture
def envelope() -> tuple[PhaseEnvelope, ...]:
    """A calibration's operating envelope in two phases (growth to 120 h, production to 348 h), as ``calibrate`` writes it."""
    return (
        PhaseEnvelope(
            phase="growth",
            start_h=0.0,
            end_h=120.0,
            temperature_degc=ValueRange(low=36.0, high=37.0),
            feed_per_volume_per_day=ValueRange(low=0.0, high=0.04),
            glucose_feed_per_volume_per_day=ValueRange(low=0.0, high=0.01),
            glucose_g_per_l=ValueRange(low=2.0, high=6.0),
            batches=4,
        ),
        PhaseEnvelope(
            phase="production",
            start_h=120.0,
            end_h=348.0,
            temperature_degc=ValueRange(low=31.0, high=34.0),
            feed_per_volume_per_day=ValueRange(low=0.02, high=0.04),
            glucose_feed_per_volume_per_day=ValueRange(low=0.0, high=0.01),
            glucose_g_per_l=ValueRange(low=3.0, high=6.0),
            batches=4,
        ),
    )
