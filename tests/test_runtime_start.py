"""How the runtime chooses its requested mode at start: the command line, else the one in force when it stopped, else the config's."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from controller.config import BatchConfig
from controller.modes import RequestedMode
from controller.ports import ResumeState
from controller.runtime import Runtime
from controller.runtime_config import RuntimeSettings

CONFIGS = Path(__file__).resolve().parent.parent / "configs"


def _runtime(*, config: RequestedMode, override: RequestedMode | None) -> Runtime:
    batch = BatchConfig.from_yaml(CONFIGS / "batch" / "platform.yaml")
    settings = RuntimeSettings(mode=config)
    return Runtime(port=None, history=None, batch=batch, nominal_parameters=np.zeros(3), settings=settings, mpc=object(), mode_override=override)  # type: ignore[arg-type]


def _resume(mode: str | None) -> ResumeState:
    return ResumeState(batch_id="BR01-DEMO-001", last_cycle_h=80.0, estimator={}, lab_seq=3, harvest_time_h=336.0, requested_mode=mode)


@pytest.mark.parametrize(
    ("config", "override", "resume", "expected"),
    [
        (RequestedMode.CLOSED_LOOP, None, None, RequestedMode.CLOSED_LOOP),
        (RequestedMode.CLOSED_LOOP, None, _resume("advisory"), RequestedMode.ADVISORY),
        (RequestedMode.CLOSED_LOOP, None, _resume(None), RequestedMode.CLOSED_LOOP),
        (RequestedMode.CLOSED_LOOP, RequestedMode.OFF, _resume("advisory"), RequestedMode.OFF),
    ],
)
def test_an_engineers_mode_outlives_a_restart_unless_the_command_line_says_otherwise(config, override, resume, expected):
    runtime = _runtime(config=config, override=override)
    runtime._choose_mode(resume)
    assert runtime.modes.requested is expected
