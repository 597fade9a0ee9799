"""Security features (mTLS, authorization), one module each, like ``policies/``.

``upstream`` and ``inbound`` read what applies to a service from the mesh (None: nothing
to do, so a mesh without identity and rules translates exactly as before); the other
functions run every feature's hook in ``FEATURES`` order.
"""

from __future__ import annotations

from typing import TypeAlias

from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.endpoint.v3 import endpoint_components_pb2
from envoy.config.listener.v3 import listener_components_pb2, listener_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import (
    http_connection_manager_pb2 as hcm_pb2,
)

from controlplane.mesh.model import Endpoint, Mesh, Service
from controlplane.mesh.security import effective
from controlplane.translator.security.authz import Authorization
from controlplane.translator.security.base import Inbound, Port, SecurityFeature, Upstream
from controlplane.translator.security.mtls import MutualTls

FEATURES: tuple[SecurityFeature, ...] = (MutualTls(), Authorization())

_Chain: TypeAlias = listener_components_pb2.FilterChain

__all__ = [
    "FEATURES",
    "Inbound",
    "Port",
    "SecurityFeature",
    "Upstream",
    "inbound",
    "inbound_http_filters",
    "secure_chains",
    "secure_cluster",
    "secure_lb_endpoint",
    "secure_listener",
    "secure_manager",
    "secure_tcp_chain",
    "upstream",
]


def upstream(mesh: Mesh, service: Service) -> Upstream | None:
    """How callers reach ``service`` with mTLS; None: plaintext (no mesh identity, an
    external service, or the service's mode is ``disable``)."""
    if mesh.identity is None or service.external_name is not None:
        return None
    mode = effective(mesh, service).mode
    return None if mode == "disable" else Upstream(mesh.identity, mode)


def inbound(mesh: Mesh, service: Service | None) -> Inbound | None:
    """What ``service``'s sidecars enforce inbound; None: nothing (no mesh identity and
    no rule, or a sidecar whose service the mesh does not know)."""
    if service is None:
        return None
    mode, rules = effective(mesh, service)
    if mesh.identity is None and not rules:
        return None
    return Inbound(mesh.identity, mode, rules, service.key)


def secure_cluster(ctx: Upstream, service: Service, cluster: cluster_pb2.Cluster) -> None:
    for feature in FEATURES:
        feature.cluster(ctx, service, cluster)


def secure_lb_endpoint(ctx: Upstream, service: Service, endpoint: Endpoint,
                       lb_endpoint: endpoint_components_pb2.LbEndpoint) -> None:
    for feature in FEATURES:
        feature.lb_endpoint(ctx, service, endpoint, lb_endpoint)


def inbound_http_filters(ctx: Inbound | None, port: Port | None) -> list[hcm_pb2.HttpFilter]:
    """Every feature's HTTP filters for ``port`` (None: a service the mesh does not know,
    which has no security either)."""
    if ctx is None or port is None:
        return []
    return [f for feature in FEATURES for f in feature.http_filters(ctx, port)]


def secure_manager(ctx: Inbound | None, port: Port | None,
                   manager: hcm_pb2.HttpConnectionManager) -> None:
    if ctx is None or port is None:
        return
    for feature in FEATURES:
        feature.manager(ctx, port, manager)


def secure_tcp_chain(ctx: Inbound | None, port: Port, chain: _Chain) -> None:
    """Put the features' network filters in front of ``chain``'s TCP proxy."""
    if ctx is None:
        return
    added = [f for feature in FEATURES for f in feature.network_filters(ctx, port)]
    if added:
        existing = list(chain.filters)
        del chain.filters[:]
        chain.filters.extend([*added, *existing])


def secure_chains(ctx: Inbound | None, chain: _Chain,
                  refuse: _Chain | None = None) -> list[_Chain]:
    """The chains that take ``chain``'s connections under ``ctx``."""
    chains = [chain]
    if ctx is None:
        return chains
    for feature in FEATURES:
        chains = [c for one in chains for c in feature.chains(ctx, one, refuse)]
    return chains


def secure_listener(ctx: Inbound | None, listener: listener_pb2.Listener) -> None:
    if ctx is None:
        return
    for feature in FEATURES:
        feature.listener(ctx, listener)
