"""A storm of debug requests does not delay a push or /healthz."""

from __future__ import annotations

import pytest

from tests.chaos.harness import Stack
from tests.chaos.load import big_mesh, debug_storm

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(180)]


def test_debug_storm_does_not_delay_a_push(stack: Stack) -> None:
    figures = debug_storm(stack, services=300, concurrency=200, bound_seconds=3.0)
    print(figures)
    assert max(figures["push_seconds_storm"]) < 3.0
    assert sum(figures["debug_responses"].values()) >= 200


def test_a_big_mesh_file_keeps_healthz_responsive_and_its_memory_is_returned(
        stack: Stack) -> None:
    # Near the baseline: the issue measured 277 MB kept after going back to 2 services;
    # here about 41 MB stays once the server has reclaimed twice (70 MB at the peak).
    kept_mb = 56
    figures = big_mesh(stack, services=2000, endpoints=5, returned_within_mb=kept_mb)
    print(figures)
    assert figures["healthz_worst_seconds"] < 2.0, figures
    assert figures["rss_mb_after"] - figures["rss_mb_before"] < kept_mb, figures
