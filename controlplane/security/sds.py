"""What a sidecar gets over SDS: its own certificate and key (``default``) and the trust
bundle (``ROOTCA``), and the Issuer that keeps one current certificate per identity.

Group snapshots reference these two names only; the server answers them per stream from
the stream's authenticated identity (``cache/secrets.py``), so a proxy can never be sent
another identity's key. The Issuer is pure bookkeeping (the clock is a parameter): it
issues on first ask, again once ``rotate_fraction`` of the lifetime has passed or the CA
changed, and holds only the identities the server still asks for (``forget``).
"""

from __future__ import annotations

import datetime
import heapq
import itertools
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final

from envoy.config.core.v3 import base_pb2
from envoy.extensions.transport_sockets.tls.v3 import common_pb2, secret_pb2

from controlplane.security.ca import CertificateAuthority, Issued
from controlplane.security.identity import SpiffeId

CERT_SECRET: Final = "default"  # the proxy's own certificate chain and key
ROOT_SECRET: Final = "ROOTCA"  # the trust bundle it verifies peers against
DEFAULT_TTL: Final = datetime.timedelta(hours=24)
DEFAULT_ROTATE_FRACTION: Final = 0.5


def secret_messages(issued: Issued, bundle_pem: bytes) -> list[secret_pb2.Secret]:
    """The two secrets of one proxy, inline (nothing on the sidecar's disk)."""
    return [
        secret_pb2.Secret(name=CERT_SECRET, tls_certificate=common_pb2.TlsCertificate(
            certificate_chain=base_pb2.DataSource(inline_bytes=issued.cert_pem),
            private_key=base_pb2.DataSource(inline_bytes=issued.key_pem))),
        secret_pb2.Secret(name=ROOT_SECRET, validation_context=(
            common_pb2.CertificateValidationContext(
                trusted_ca=base_pb2.DataSource(inline_bytes=bundle_pem)))),
    ]


@dataclass(frozen=True, slots=True)
class _Held:
    issued: Issued
    ca_version: str
    rotate_at: datetime.datetime


class Issuer:
    """One current workload certificate per identity the server asks for."""

    def __init__(self, ca_provider: Callable[[], CertificateAuthority],
                 ttl: datetime.timedelta = DEFAULT_TTL,
                 rotate_fraction: float = DEFAULT_ROTATE_FRACTION) -> None:
        if ttl <= datetime.timedelta(0):
            raise ValueError(f"workload certificate TTL {ttl} must be positive "
                             "(--workload-cert-ttl, e.g. 24h)")
        if not 0.0 < rotate_fraction < 1.0:
            raise ValueError(f"rotate_fraction {rotate_fraction} must be between 0 and 1 "
                             "(exclusive): certificates are rotated well before expiry")
        self._ca_provider = ca_provider
        self.ttl = ttl
        self.rotate_fraction = rotate_fraction
        self._held: dict[SpiffeId, _Held] = {}
        # Rotation points, earliest first; an entry whose identity was reissued or
        # forgotten since is skipped when it reaches the top (lazy deletion).
        self._due: list[tuple[datetime.datetime, int, SpiffeId]] = []
        self._order = itertools.count()
        self._versions: Counter[str] = Counter()  # certificates held per CA version
        self.issued_count = 0  # certificates signed since start (for metrics and benches)

    def __len__(self) -> int:
        return len(self._held)

    def __contains__(self, spiffe: object) -> bool:
        return spiffe in self._held

    def current(self, spiffe: SpiffeId, now: datetime.datetime) -> Issued:
        """The identity's certificate: the held one while it is fresh and from the current
        CA, else a new one."""
        ca = self._ca_provider()
        held = self._held.get(spiffe)
        if held is not None and held.ca_version == ca.version and now < held.rotate_at:
            return held.issued
        issued = ca.issue_workload(spiffe, now, self.ttl)
        self.issued_count += 1
        rotate_at = issued.rotate_at(self.rotate_fraction)
        if held is not None:
            self._count(held.ca_version, -1)
        self._count(ca.version, +1)
        self._held[spiffe] = _Held(issued, ca.version, rotate_at)
        heapq.heappush(self._due, (rotate_at, next(self._order), spiffe))
        self._compact()
        return issued

    def _compact(self) -> None:
        """Many entries of reissued or forgotten identities: drop them (memory stays
        proportional to what is held)."""
        if len(self._due) > 2 * len(self._held) + 64:
            self._due = [e for e in self._due if self._live(e)]
            heapq.heapify(self._due)

    def _live(self, entry: tuple[datetime.datetime, int, SpiffeId]) -> bool:
        held = self._held.get(entry[2])
        return held is not None and held.rotate_at == entry[0]

    def next_due(self, now: datetime.datetime) -> tuple[SpiffeId, datetime.datetime] | None:
        """The identity to rotate first and when (``now`` if issued by a CA that is no
        longer current); None when nothing is held."""
        if not self._held:
            return None
        version = self._ca_provider().version
        if self._versions[version] != len(self._held):  # some from another CA: due now
            stale = next(s for s, h in self._held.items() if h.ca_version != version)
            return stale, now
        while self._due and not self._live(self._due[0]):
            heapq.heappop(self._due)
        when, _, spiffe = self._due[0]
        return spiffe, when

    def forget(self, spiffe: SpiffeId) -> None:
        """Drop an identity (its key with it): the server has no stream for it."""
        held = self._held.pop(spiffe, None)
        if held is not None:
            self._count(held.ca_version, -1)
            self._compact()

    def _count(self, version: str, delta: int) -> None:
        self._versions[version] += delta
        if not self._versions[version]:
            del self._versions[version]
