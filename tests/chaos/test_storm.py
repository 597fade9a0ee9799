"""A storm of debug requests does not delay a push or /healthz."""

from __future__ import annotations

import pytest

from tests.chaos.harness import Stack
from tests.chaos.scenarios import debug_storm

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(180)]


def test_debug_storm_does_not_delay_a_push(stack: Stack) -> None:
    figures = debug_storm(stack, services=300, concurrency=200, bound_seconds=3.0)
    print(figures)
    assert max(figures["push_seconds_storm"]) < 3.0
    assert sum(figures["debug_responses"].values()) >= 200
