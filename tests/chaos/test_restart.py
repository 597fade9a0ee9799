"""A killed server, restarted under traffic; two replicas and a failover between them."""

from __future__ import annotations

import pytest

from tests.chaos.harness import Stack
from tests.chaos.scenarios import failover, kill_and_restart

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(150)]


def test_sigkill_and_restart_under_traffic_fails_no_request(stack: Stack) -> None:
    figures = kill_and_restart(stack)
    print(figures)
    assert figures["traffic"]["failed"] == 0
    assert figures["served_while_down"] >= 20


def test_sigterm_and_restart_is_a_non_event(stack: Stack) -> None:
    """A rollout: the server ends cleanly on SIGTERM, the sidecar comes back at once."""
    figures = kill_and_restart(stack, graceful=True)
    print(figures)
    assert figures["traffic"]["failed"] == 0


def test_failover_between_two_replicas_changes_nothing(stack: Stack) -> None:
    figures = failover(stack)
    print(figures)
    assert figures["traffic"]["failed"] == 0
    assert figures["config_stats_unchanged"]
