"""Shared fixtures of the whole-batch and network tests."""

from __future__ import annotations

import pytest
from runtime_harness import free_port


@pytest.fixture
def opcua_endpoint() -> str:
    """An OPC UA endpoint on a free 127.0.0.1 port."""
    return f"opc.tcp://127.0.0.1:{free_port()}/bioreactor-mpc/"


@pytest.fixture
def modbus_port_number() -> int:
    """A free TCP port on 127.0.0.1."""
    return free_port()
