"""The CA the server runs now, read again from its source so a rotation needs no restart.

The source (a directory, files, a Kubernetes Secret) is read every ``interval`` seconds in
a thread; when the CA or its bundle changed, the new one is used for every certificate
issued from then on, and ``on_change`` sends every connected proxy its reissued
certificate and the new bundle (``SecretWatcher.refresh_all``). A read that fails keeps
the current CA and is logged with what to fix.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import structlog

from controlplane.security.ca import CertificateAuthority

log = structlog.get_logger("controlplane.trust")


class Trust:
    def __init__(self, load: Callable[[], CertificateAuthority], ca: CertificateAuthority,
                 where: str) -> None:
        self._load = load
        self.ca = ca
        self.where = where  # for logs: "directory /x", "Secret ns/controlplane-ca"

    def current(self) -> CertificateAuthority:
        return self.ca

    async def reload(self) -> bool:
        """Read the source again; True when the CA changed."""
        try:
            ca = await asyncio.to_thread(self._load)
        except Exception as exc:
            log.warning("trust.reload_failed", source=self.where,
                        error=f"{type(exc).__name__}: {str(exc)[:300]}",
                        hint="the current CA keeps signing; fix the CA source")
            return False
        if ca.version == self.ca.version:
            return False
        self.ca = ca
        log.info("trust.ca_changed", source=self.where, ca=ca.describe())
        return True

    async def poll(self, interval: float, on_change: Callable[[], Awaitable[object]]) -> None:
        """Run for the process's life."""
        while True:
            await asyncio.sleep(interval)
            if await self.reload():
                await on_change()
