"""A gateway's certificates, answered per stream beside its group's snapshot.

A gateway group's listeners name their certificates by SDS (``certificate/NS/NAME``);
its snapshot holds no secret, so the snapshot store and ``/debug/snapshots`` never see
a key. This ConfigWatcher wraps the one the server would use (the group cache, or the
``SecretWatcher`` that adds workload identities) and, for a stream of a gateway proxy,
adds the certificates its snapshot's listeners name, read from a ``Certificates``
provider. A sidecar's stream, or any other, passes through untouched: only a gateway's
own listeners can make a certificate reach a proxy, and those name only what its
Gateway may use (same namespace, or a ReferenceGrant: ``mesh/gateway_attach.py``).

The derived snapshot is made once per (group, group snapshot, certificates generation)
and shared by that group's streams; a provider's change signal bumps the generation and
wakes the gateway groups with a stream. A secret's message, as CSDS shows it, has its
private key redacted (``secret_resource``).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from types import MappingProxyType

import structlog
from envoy.config.core.v3 import base_pb2
from envoy.config.listener.v3 import listener_pb2
from envoy.extensions.transport_sockets.tls.v3 import common_pb2, secret_pb2, tls_pb2

from controlplane import resource
from controlplane.cache.cache import ConfigWatcher, SnapshotCache
from controlplane.cache.certificates import CertificatePair, Certificates
from controlplane.cache.identities import Identities
from controlplane.cache.layers import Layer
from controlplane.cache.secrets import secret_resource
from controlplane.cache.snapshot import Resource, Snapshot, TypeSnapshot
from controlplane.proxy import GATEWAY, ProxyIdentity
from controlplane.translator.gateway.names import certificate_of

log = structlog.get_logger("controlplane.gateway_secrets")

_DOWNSTREAM_TLS = "type.googleapis.com/" + tls_pb2.DownstreamTlsContext.DESCRIPTOR.full_name


@dataclass(slots=True)
class _Derived:
    base: Snapshot
    generation: int
    snapshot: Snapshot


class GatewaySecrets:
    """A ConfigWatcher that adds each gateway stream's certificates."""

    def __init__(self, inner: ConfigWatcher, cache: SnapshotCache,
                 certificates: Certificates,
                 account: Callable[[str, str], str | None] = lambda _ns, _name: None) -> None:
        """``account(namespace, gateway)``: the ServiceAccount that Gateway's proxies
        run as (None: no such Gateway)."""
        self.inner = inner
        self.account = account
        self.cache = cache  # woken when certificates change (its waiters re-read)
        self.certificates = certificates
        self.identities: Identities = inner.identities
        self.generation = 0
        self._groups: dict[str, int] = {}  # gateway group -> streams open
        self._derived: dict[tuple[str, str], _Derived] = {}  # (group, workload) -> made
        self._secrets: dict[tuple[str, bytes], Resource] = {}  # (name, content hash)
        certificates.subscribe(self.changed_certificates)

    def changed_certificates(self) -> None:
        """The provider says a pair may have changed: every gateway stream re-reads."""
        self.generation += 1
        self._secrets.clear()
        for group in list(self._groups):
            self.cache.wake(group)

    # -- ConfigWatcher
    def connect(self, proxy: ProxyIdentity) -> None:
        self.inner.connect(proxy)
        if proxy.kind == GATEWAY:
            self._groups[proxy.group] = self._groups.get(proxy.group, 0) + 1

    def disconnect(self, proxy: ProxyIdentity) -> None:
        self.inner.disconnect(proxy)
        if proxy.kind != GATEWAY:
            return
        left = self._groups.get(proxy.group, 0) - 1
        if left > 0:
            self._groups[proxy.group] = left
            return
        self._groups.pop(proxy.group, None)
        for key in [k for k in self._derived if k[0] == proxy.group]:
            del self._derived[key]

    def current(self, proxy: ProxyIdentity) -> Snapshot | None:
        base = self.inner.current(proxy)
        if base is None or proxy.kind != GATEWAY:
            return base
        key = (proxy.group, proxy.workload)
        made = self._derived.get(key)
        if made is not None and made.base is base and made.generation == self.generation:
            return made.snapshot
        snapshot = self._derive(proxy, base)
        if proxy.group in self._groups:
            self._derived[key] = _Derived(base, self.generation, snapshot)
        return snapshot

    async def next_snapshot(self, proxy: ProxyIdentity, after: Snapshot | None) -> Snapshot:
        if proxy.kind != GATEWAY:
            return await self.inner.next_snapshot(proxy, after)
        while True:
            snapshot = self.current(proxy)
            if snapshot is not None and (after is None or snapshot.version != after.version):
                return snapshot
            await self.cache.changed(proxy)  # a new group snapshot, a rotation, a renewal

    # -- deriving
    def _derive(self, proxy: ProxyIdentity, base: Snapshot) -> Snapshot:
        names = sorted(certificate_names(base))
        if names and not self._proves(proxy):
            return base
        mine: list[Resource] = []
        for name in names:
            found = certificate_of(name)
            if found is None:
                continue
            pair = self.certificates.pair(*found)
            if pair is None:
                log.warning("gateway_secrets.missing", gateway=proxy.gateway,
                            namespace=proxy.namespace, certificate=f"{found[0]}/{found[1]}",
                            hint="the listeners that name it wait for it; give the "
                            "certificate (a certificates entry, or a kubernetes.io/tls "
                            "Secret)")
                continue
            mine.append(self._secret(name, pair))
        if not mine:
            return base
        types = dict(base.types)
        theirs = base.types.get(resource.SECRET)
        kept = [r for n, r in (theirs.resources.items() if theirs is not None else ())
                if n not in {m.name for m in mine}]
        typed = TypeSnapshot.layered(resource.SECRET, (),
                                     Layer.of(resource.SECRET, [*kept, *mine]))
        types[resource.SECRET] = typed
        version = hashlib.sha256(f"{base.version}/{typed.version}".encode()).hexdigest()[:16]
        return Snapshot(MappingProxyType(types), version, base.encoded_bytes)

    def _proves(self, proxy: ProxyIdentity) -> bool:
        """Whether the proxy may have its Gateway's keys. With verified identities (a
        CA: the workload comes from the proxy's credential), only a proxy running as the
        Gateway's ServiceAccount in its namespace may: a node's metadata is a claim any
        workload could make. Without them (file mode, no CA) nothing is verified."""
        if not proxy.workload:
            return True
        wanted = self.account(proxy.namespace, proxy.gateway)
        if wanted is not None and proxy.workload.endswith(
                f"/ns/{proxy.namespace}/sa/{wanted}"):
            return True
        log.warning("gateway_secrets.refused", node=proxy.node_id, gateway=proxy.gateway,
                    namespace=proxy.namespace, workload=proxy.workload,
                    expected=wanted or "(no such Gateway)",
                    hint="a gateway's certificates go only to proxies running as its "
                    "ServiceAccount <gateway>-<class>; run the proxy as that account")
        return False

    def _secret(self, name: str, pair: CertificatePair) -> Resource:
        digest = hashlib.sha256(pair.chain_pem + b"\0" + pair.key_pem).digest()
        found = self._secrets.get((name, digest))
        if found is None:
            found = self._secrets[(name, digest)] = secret_resource(tls_secret(name, pair))
        return found


def tls_secret(name: str, pair: CertificatePair) -> secret_pb2.Secret:
    """The SDS secret Envoy terminates TLS with; inline, nothing on the gateway's disk."""
    return secret_pb2.Secret(name=name, tls_certificate=common_pb2.TlsCertificate(
        certificate_chain=base_pb2.DataSource(inline_bytes=pair.chain_pem),
        private_key=base_pb2.DataSource(inline_bytes=pair.key_pem)))


def certificate_names(snapshot: Snapshot) -> set[str]:
    """The certificate secrets the snapshot's listeners name (``certificate/NS/NAME``)."""
    typed = snapshot.types.get(resource.LISTENER)
    if typed is None:
        return set()
    found: set[str] = set()
    for res in typed.resources.values():
        if isinstance(res.message, listener_pb2.Listener):
            found.update(n for n in _sds_names(res.message) if certificate_of(n) is not None)
    return found


def _sds_names(listener: listener_pb2.Listener) -> Iterable[str]:
    for chain in listener.filter_chains:
        socket = chain.transport_socket
        if socket.typed_config.type_url != _DOWNSTREAM_TLS:
            continue
        context = tls_pb2.DownstreamTlsContext()
        socket.typed_config.Unpack(context)
        for config in context.common_tls_context.tls_certificate_sds_secret_configs:
            yield str(config.name)
