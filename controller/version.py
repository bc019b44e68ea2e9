"""The installed package's version, for what the tools stamp on their outputs (a calibrated model's provenance, an export's manifest)."""

from __future__ import annotations

from importlib import metadata


def tool_version() -> str:
    try:
        return metadata.version("bioreactor-mpc")
    except metadata.PackageNotFoundError:
        return "unknown (not installed)"
