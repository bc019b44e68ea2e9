"""Controller layer: configuration, recipe, KPIs, estimator, MPC, and the control cycle (``cycle.py``) with the async runtime that drives it beside a PLC.

Depends on ``plant_models`` and on small Protocols (``ports.py``); never on a protocol library or the simulator.
"""
