"""Controller layer: configuration, recipe, KPIs, and (later) estimator, MPC and cycle logic.

Depends on ``plant_models`` and on small Protocols; never on a protocol library or the simulator.
"""
