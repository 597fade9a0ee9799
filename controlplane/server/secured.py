"""The server's zero-trust parts, put together: the CA it runs, who may connect, the
secrets each proxy gets, and the TLS its xDS port speaks.

``secure`` builds them from a CA loader (the app knows where the CA lives: a directory,
files, a Kubernetes Secret) and an authenticator (None: ``--authentication none``). Two
tasks run beside the server: the rotation timer (one for every identity) and the CA
poll (a rotated root reaches every proxy without a restart).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import timedelta

from controlplane.cache.cache import SnapshotCache
from controlplane.cache.secrets import SecretWatcher
from controlplane.security.authn import Authenticator
from controlplane.security.ca import CertificateAuthority
from controlplane.security.sds import Issuer
from controlplane.server.admission import Admission
from controlplane.server.tls import ServingCertificate
from controlplane.server.trust import Trust


@dataclass
class Secured:
    trust: Trust
    watcher: SecretWatcher
    admission: Admission
    tls: ServingCertificate | None  # None: plaintext xDS (--authentication none)
    tasks: list[asyncio.Task[None]] = field(default_factory=list)

    def start(self, poll_interval: float) -> None:
        self.tasks = [
            asyncio.create_task(self.watcher.rotate(), name="secret-rotation"),
            asyncio.create_task(self.trust.poll(poll_interval, self.watcher.refresh_all),
                                name="ca-poll"),
        ]

    async def stop(self) -> None:
        for task in self.tasks:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task


def secure(cache: SnapshotCache, ca: CertificateAuthority,
           load: Callable[[], CertificateAuthority], where: str, trust_domain: str,
           authenticator: Authenticator | None, workload_ttl: timedelta,
           server_dns: list[str], server_ips: Sequence[str]) -> Secured:
    trust = Trust(load, ca, where)
    issuer = Issuer(trust.current, workload_ttl)
    watcher = SecretWatcher(cache, issuer, trust.current)
    tls = None if authenticator is None else ServingCertificate(
        trust.current, server_dns, list(server_ips))
    return Secured(trust, watcher, Admission(authenticator, trust_domain), tls)
