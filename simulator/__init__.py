"""The plant simulator: the culture model with "true" parameters behind a simulated reference PLC.

Runtime code (``controller``, ``interfaces``) never imports this package; an
import-linter contract checks it.
"""
