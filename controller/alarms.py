"""The runtime's alarms: which are active, and which a cycle raised or cleared.

An alarm has a code (``quality.PV.OUR``, ``plc_link``, ``volume_balance``, …)
and a message. Each cycle hands the board every condition it found; the board
answers what is new (to raise) and what is gone (to clear), each once, and the
runtime records both in the history and the audit trail. Alarms that are not
a cycle's to clear (``plc_link``, ``history_unavailable``: the link and the
storage clear them when they recover) are *latched*: a cycle leaves them alone.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

LATCHED = frozenset({"plc_link", "history_unavailable"})
"""Alarms raised and cleared outside the cycle."""


@dataclass(frozen=True)
class AlarmChange:
    code: str
    message: str
    active: bool


class AlarmBoard:
    def __init__(self) -> None:
        self._active: dict[str, str] = {}

    @property
    def active(self) -> dict[str, str]:
        return dict(self._active)

    def __contains__(self, code: str) -> bool:
        return code in self._active

    def update(self, current: Mapping[str, str]) -> list[AlarmChange]:
        """A cycle's conditions: raise what is new, clear what is gone (latched alarms excepted)."""
        changes = [AlarmChange(code, message, True) for code, message in current.items() if code not in self._active]
        changes += [AlarmChange(code, self._active[code], False) for code in self._active if code not in current and code not in LATCHED]
        self._apply(changes)
        self._active.update(current)
        return changes

    def raise_(self, code: str, message: str) -> AlarmChange | None:
        """Raise one alarm outside a cycle; None if it is already active."""
        if code in self._active:
            return None
        change = AlarmChange(code, message, True)
        self._apply([change])
        return change

    def clear(self, code: str) -> AlarmChange | None:
        """Clear one alarm outside a cycle; None if it is not active."""
        if code not in self._active:
            return None
        change = AlarmChange(code, self._active[code], False)
        self._apply([change])
        return change

    def _apply(self, changes: list[AlarmChange]) -> None:
        for change in changes:
            if change.active:
                self._active[change.code] = change.message
            else:
                self._active.pop(change.code, None)
