"""The project's exception hierarchy.

It lives in the lowest layer so every layer can raise and catch the same
classes. Each class also subclasses the matching builtin, so callers that only
know the builtin (``ValueError``, ``RuntimeError``) still catch them.
"""

from __future__ import annotations


class BioreactorMPCError(Exception):
    """Base class of every error raised on purpose by this project."""


class ConfigError(ValueError, BioreactorMPCError):
    """A configuration file is missing, unreadable or invalid.

    The message names the file, the offending field and what was expected; it
    is meant to be shown to the user as it is, without a stack trace.
    """


class NonPhysicalStateError(ArithmeticError, BioreactorMPCError):
    """A simulated or predicted state left its physical domain.

    Raised instead of clipping: a negative concentration or a non-finite value
    means the model, its parameters or its inputs are wrong, and hiding that
    would corrupt everything downstream.
    """

    def __init__(self, message: str, *, process_time_h: float, state: str, value: float) -> None:
        super().__init__(message)
        self.process_time_h = process_time_h
        self.state = state
        self.value = value


class SetpointRejectedError(BioreactorMPCError):
    """A PLC refused a setpoint write. ``reason`` says why."""

    def __init__(self, message: str, *, tag: str, reason: str) -> None:
        Exception.__init__(self, message)
        self.tag = tag
        self.reason = reason


class SetpointOutOfRangeError(ValueError, SetpointRejectedError):
    """The value lies outside the equipment's range; the old setpoint stays."""

    def __init__(self, message: str, *, tag: str) -> None:
        SetpointRejectedError.__init__(self, message, tag=tag, reason="out_of_range")


class RemoteDisabledError(PermissionError, SetpointRejectedError):
    """The PLC does not accept setpoints from the runtime right now."""

    def __init__(self, message: str, *, tag: str) -> None:
        SetpointRejectedError.__init__(self, message, tag=tag, reason="remote_disabled")
