"""Each stream's own SDS secrets, answered beside its group's identity-free snapshot.

Group snapshots never hold a workload's key: listeners and clusters name two secrets,
``default`` (the proxy's certificate and key) and ``ROOTCA`` (the trust bundle), and this
ConfigWatcher answers those two for a proxy with a verified workload identity from the
``Issuer``; everything else comes from the group's snapshot as it is. So the snapshot
store and ``/debug/snapshots`` never see a key, and issue 9's sharing holds: a proxy
without an identity goes straight to the group cache.

A proxy with an identity sees a *derived* snapshot: its group's, with the secret type
replaced. One per (group, identity) that has a stream, made again only when the group's
snapshot or the identity's certificate changes, and shared by that pair's streams. Such a
stream waits on its group's event like any other; a rotated certificate wakes the groups
its identity has streams in (cheap: a stream whose snapshot did not change waits again).
One timer task rotates every identity when the ``Issuer`` says it is due. An identity
with no stream for the group TTL is forgotten (``expire``), key and all.

The secret's ``message`` (what ``/debug/config_dump`` renders) has its private key replaced
by ``[redacted]``, as Envoy's own config dump does; the wire bytes are the real ones.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from types import MappingProxyType

import structlog
from envoy.extensions.transport_sockets.tls.v3 import secret_pb2
from envoy.service.discovery.v3 import discovery_pb2
from google.protobuf import any_pb2

from controlplane import resource
from controlplane.cache.cache import SnapshotCache
from controlplane.cache.identities import Identities
from controlplane.cache.layers import Layer
from controlplane.cache.snapshot import Resource, Snapshot, TypeSnapshot
from controlplane.proxy import ProxyIdentity
from controlplane.security.ca import CertificateAuthority, Issued
from controlplane.security.identity import SpiffeId
from controlplane.security.sds import Issuer, secret_messages

log = structlog.get_logger("controlplane.secrets")

REDACTED = "[redacted]"


def secret_resource(message: secret_pb2.Secret) -> Resource:
    """A Secret ready for the wire, whose ``message`` shows no private key. Its version is
    a hash of the redacted form: the certificate names the key pair, so it changes with it."""
    shown = secret_pb2.Secret()
    shown.CopyFrom(message)
    if shown.HasField("tls_certificate"):
        shown.tls_certificate.private_key.Clear()
        shown.tls_certificate.private_key.inline_string = REDACTED
    name: str = shown.name
    version = hashlib.sha256(shown.SerializeToString(deterministic=True)).hexdigest()[:16]
    packed = any_pb2.Any(type_url=resource.SECRET,
                         value=message.SerializeToString(deterministic=True))
    sotw = discovery_pb2.DiscoveryResponse(resources=[packed]).SerializeToString()
    delta = discovery_pb2.DeltaDiscoveryResponse(resources=[discovery_pb2.Resource(
        name=name, version=version, resource=packed)]).SerializeToString()
    return Resource(name, resource.SECRET, shown, version, sotw, delta, {})


@dataclass(slots=True)
class _Held:
    """One identity's secrets, shared by its streams."""

    spiffe: SpiffeId
    serial: int
    bundle: bytes
    layer: Layer
    typed: TypeSnapshot  # the layer as the secret type of a snapshot, made once
    groups: dict[str, int] = field(default_factory=dict)  # group -> streams open
    idle_since: float | None = None  # monotonic time its last stream closed
    derived: dict[str, tuple[Snapshot, Snapshot]] = field(default_factory=dict)


class SecretWatcher:
    """A ConfigWatcher over a SnapshotCache that adds each identity's secrets."""

    def __init__(self, inner: SnapshotCache, issuer: Issuer,
                 ca: Callable[[], CertificateAuthority],
                 clock: Callable[[], datetime] = lambda: datetime.now(UTC)) -> None:
        self.inner = inner
        self.issuer = issuer
        self._ca = ca
        self._clock = clock
        self._held: dict[str, _Held] = {}  # SPIFFE URI -> its secrets
        self._wakeup = asyncio.Event()
        self.identities: Identities = inner.identities

    def __len__(self) -> int:
        """Identities held now (with a stream, or idle for less than the TTL)."""
        return len(self._held)

    def held(self) -> list[str]:
        return sorted(self._held)

    # -- ConfigWatcher
    def connect(self, proxy: ProxyIdentity) -> None:
        self.inner.connect(proxy)
        if not proxy.workload:
            return
        held = self._hold(proxy.workload)
        held.groups[proxy.group] = held.groups.get(proxy.group, 0) + 1
        held.idle_since = None

    def disconnect(self, proxy: ProxyIdentity) -> None:
        self.inner.disconnect(proxy)
        held = self._held.get(proxy.workload) if proxy.workload else None
        if held is None:
            return
        left = held.groups.get(proxy.group, 0) - 1
        if left > 0:
            held.groups[proxy.group] = left
            return
        held.groups.pop(proxy.group, None)
        held.derived.pop(proxy.group, None)
        if not held.groups:
            held.idle_since = time.monotonic()

    def current(self, proxy: ProxyIdentity) -> Snapshot | None:
        base = self.inner.current(proxy)
        if base is None or not proxy.workload:
            return base
        held = self._held.get(proxy.workload)
        if held is None:  # forgotten under a stream that still asks: hold it again
            held = self._hold(proxy.workload)
        return self._derive(held, proxy.group, base)

    async def next_snapshot(self, proxy: ProxyIdentity, after: Snapshot | None) -> Snapshot:
        if not proxy.workload:
            return await self.inner.next_snapshot(proxy, after)
        while True:
            snapshot = self.current(proxy)
            if snapshot is not None and (after is None or snapshot.version != after.version):
                return snapshot
            await self.inner.changed(proxy)

    # -- identities
    def _hold(self, workload: str) -> _Held:
        held = self._held.get(workload)
        if held is not None:
            return held
        spiffe = SpiffeId.parse(workload)
        issued = self.issuer.current(spiffe, self._clock())
        held = self._held[workload] = self._made(spiffe, issued, self._ca().bundle_pem)
        self._wakeup.set()  # the rotation timer may now be due sooner
        return held

    @staticmethod
    def _made(spiffe: SpiffeId, issued: Issued, bundle: bytes) -> _Held:
        secrets = [secret_resource(m) for m in secret_messages(issued, bundle)]
        layer = Layer.of(resource.SECRET, secrets)
        return _Held(spiffe, issued.serial, bundle, layer,
                     TypeSnapshot.layered(resource.SECRET, (), layer))

    def _derive(self, held: _Held, group: str, base: Snapshot) -> Snapshot:
        made = held.derived.get(group)
        if made is not None and made[0] is base:
            return made[1]
        types = dict(base.types)
        theirs = base.types.get(resource.SECRET)
        typed = held.typed
        if theirs is not None and theirs.resources:  # the group's own secrets, if any
            kept = [r for n, r in theirs.resources.items() if n not in held.layer.resources]
            typed = TypeSnapshot.layered(resource.SECRET, (), Layer.of(
                resource.SECRET, [*kept, *held.layer.resources.values()]))
        types[resource.SECRET] = typed
        # Its version says both parts: the group's snapshot and this identity's secrets.
        version = hashlib.sha256(f"{base.version}/{typed.version}".encode()).hexdigest()[:16]
        derived = Snapshot(MappingProxyType(types), version, base.encoded_bytes)
        if held.groups.get(group):  # kept only for a pair with a stream
            held.derived[group] = (base, derived)
        return derived

    def refresh(self, workload: str) -> bool:
        """Ask the Issuer again for ``workload`` (and the CA for its bundle); True when
        either changed, after which the identity's streams are sent the new secrets."""
        held = self._held.get(workload)
        if held is None:
            return False
        issued = self.issuer.current(held.spiffe, self._clock())
        bundle = self._ca().bundle_pem
        if issued.serial == held.serial and bundle == held.bundle:
            return False
        fresh = self._made(held.spiffe, issued, bundle)
        held.serial, held.bundle, held.layer, held.typed = (fresh.serial, fresh.bundle,
                                                            fresh.layer, fresh.typed)
        held.derived.clear()
        for group in held.groups:
            self.inner.wake(group)
        log.info("secrets.rotated", identity=workload, serial=f"{issued.serial:x}",
                 not_after=issued.not_after.isoformat(), groups=len(held.groups))
        return True

    async def refresh_all(self, batch: int = 50) -> int:
        """Every identity again (the CA or its bundle changed), ``batch`` at a time between
        which other work runs (a signature is ~1 ms). Returns how many changed."""
        changed = 0
        for done, workload in enumerate(list(self._held), 1):
            changed += self.refresh(workload)
            if done % batch == 0:
                await asyncio.sleep(0)
        return changed

    def expire(self, ttl: float, now: float | None = None) -> list[str]:
        """Forget the identities with no stream for ``ttl`` seconds (their key with them)."""
        now = time.monotonic() if now is None else now
        gone = [w for w, held in self._held.items()
                if held.idle_since is not None and now - held.idle_since >= ttl]
        for workload in gone:
            held = self._held.pop(workload)
            self.issuer.forget(held.spiffe)
        return gone

    async def rotate(self, most_wait: float = 60.0, batch: int = 50) -> None:
        """Run for the process's life: rotate each identity when the Issuer says it is due.
        One task for all identities; it sleeps until the next one is due, and rotates
        ``batch`` at a time between which other work runs."""
        while True:
            now = self._clock()
            due = self.issuer.next_due(now)
            wait = most_wait if due is None else (due[1] - now).total_seconds()
            if wait > 0:
                self._wakeup.clear()
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(min(wait, most_wait)):
                        await self._wakeup.wait()
                continue
            try:
                if self._rotate_due(now, batch):
                    await asyncio.sleep(0)
                    continue
            except Exception:
                log.exception("secrets.rotation_failed",
                              hint="retried in a second; streams keep their certificates")
            await asyncio.sleep(1.0)  # due, yet nothing rotated: do not spin

    def _rotate_due(self, now: datetime, batch: int) -> bool:
        """Rotate up to ``batch`` of what is due; False when something due could not be."""
        for _ in range(batch):
            due = self.issuer.next_due(now)
            if due is None or due[1] > now:
                return True
            spiffe = due[0]
            if spiffe.uri in self._held:
                if not self.refresh(spiffe.uri):
                    return False
            else:
                self.issuer.forget(spiffe)
        return True
