"""Clients choose their identity: 1000 invented ones leave nothing behind."""

from __future__ import annotations

import pytest

from tests.chaos.clients import abusive_clients, invented_identities, stalled_clients
from tests.chaos.harness import Stack

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(180)]

TTL = 2.0


def test_invented_identities_are_forgotten_after_the_group_ttl(stack: Stack) -> None:
    figures = invented_identities(stack, 1000, {"CONTROLPLANE_GROUP_TTL": str(TTL)}, TTL)
    print(figures)
    assert figures["peak_groups"] > 1000  # each invented identity was its own group
    assert figures["groups_after"] == 1
    # Near the baseline: the issue measured hundreds of MB kept for 500 invented groups.
    assert figures["rss_mb_after"] - figures["rss_mb_before"] < 64, figures


def test_abusive_clients_are_refused_with_a_clear_status(stack: Stack) -> None:
    figures = abusive_clients(stack)
    print(figures)
    assert figures["log_bytes"] < 256 * 1024


def test_clients_vanishing_during_a_blocked_write_are_a_normal_event(stack: Stack) -> None:
    figures = stalled_clients(stack, services=1000, count=20)
    print(figures)
