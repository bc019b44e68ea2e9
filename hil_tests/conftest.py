"""Shared fixtures of the whole-batch and network tests."""

from __future__ import annotations

import socket

import pytest


@pytest.fixture
def opcua_endpoint() -> str:
    """An OPC UA endpoint on a free 127.0.0.1 port."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return f"opc.tcp://127.0.0.1:{probe.getsockname()[1]}/bioreactor-mpc/"
