"""The CA at start: an API server blip is waited out (a crash loop of every replica is
worse), a CA that cannot be read from a file ends the start at once with its hint."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime

import pytest

from controlplane import trust
from controlplane.security.ca import CertificateAuthority
from controlplane.security.castore import CaError


def test_a_failing_ca_secret_read_is_retried_then_used(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(trust, "_CA_RETRIES", (0.01, 0.01, 0.01))
    ca = CertificateAuthority.create("cluster.local", datetime.now(UTC))
    calls: list[int] = []

    def load() -> CertificateAuthority:
        calls.append(1)
        if len(calls) < 3:
            raise CaError("cannot read Secret controlplane/controlplane-ca: 503; retried")
        return ca

    assert asyncio.run(trust._first_ca(load, "Secret controlplane/controlplane-ca",
                                       retry=True)) is ca
    assert len(calls) == 3


def test_retries_are_bounded_and_end_in_the_hint(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(trust, "_CA_RETRIES", (0.01, 0.01))
    calls: list[int] = []

    def load() -> CertificateAuthority:
        calls.append(1)
        raise CaError("forbidden: give the control plane get on Secret controlplane-ca")

    with pytest.raises(ValueError, match="give the control plane get"):
        asyncio.run(trust._first_ca(load, "Secret x/y", retry=True))
    assert len(calls) == 3  # the first try and one per wait


def test_a_file_ca_is_not_retried() -> None:
    calls: list[int] = []

    def load() -> CertificateAuthority:
        calls.append(1)
        raise CaError("no such file ca.crt: run controlplane ca init")

    with pytest.raises(ValueError, match="ca init"):
        asyncio.run(trust._first_ca(load, "directory /x", retry=False))
    assert len(calls) == 1
