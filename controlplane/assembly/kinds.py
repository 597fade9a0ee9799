"""Snapshots of proxies that are not sidecars, by ``ProxyIdentity.kind``.

A sidecar's snapshot is assembled by ``MeshBuild.assemble``. An ingress gateway
(``gateway``) and a proxyless gRPC client (``grpc``) need other resources; each kind's
builder lives in its own module and is listed here. This module is imported by
``MeshBuild.snapshot`` when it first meets such a proxy (the builders import the build).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, TypeAlias

from controlplane.assembly.gateway import gateway_snapshot
from controlplane.assembly.proxyless import proxyless_snapshot
from controlplane.cache.snapshot import Snapshot
from controlplane.proxy import GATEWAY, GRPC, ProxyIdentity

if TYPE_CHECKING:
    from controlplane.assembly.build import MeshBuild

# (the build, the proxy, the group's current snapshot to reuse) -> the group's snapshot
Builder: TypeAlias = Callable[["MeshBuild", ProxyIdentity, Snapshot | None], Snapshot]

BUILDERS: dict[str, Builder] = {
    GATEWAY: gateway_snapshot,
    GRPC: proxyless_snapshot,
}


def builder_for(kind: str) -> Builder | None:
    """The kind's builder; None for a sidecar (or a kind with none yet)."""
    return BUILDERS.get(kind)
