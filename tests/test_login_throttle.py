"""The screen's login throttle: five failures in five minutes block the name until the window passes."""

from __future__ import annotations

import pytest

from interfaces.web.app import LoginThrottle

pytestmark = pytest.mark.security


def test_five_failures_block_a_name_until_the_window_passes():
    now = [0.0]
    throttle = LoginThrottle(attempts=5, window_s=300.0, clock=lambda: now[0])
    for _ in range(4):
        throttle.failed("olga")
    assert not throttle.blocked("olga")
    throttle.failed("olga")
    assert throttle.blocked("olga") and not throttle.blocked("erik")
    now[0] = 299.0
    assert throttle.blocked("olga")
    now[0] = 301.0
    assert not throttle.blocked("olga")
    throttle.failed("olga")
    throttle.succeeded("olga")
    assert not throttle.blocked("olga")


def test_the_table_is_bounded():
    throttle = LoginThrottle(max_keys=3)
    for name in ("a", "b", "c", "d"):
        throttle.failed(name)
    assert len(throttle._failures) == 3 and "a" not in throttle._failures
