"""Which names a snapshot's resources point at, and which of them are missing.

A snapshot is published only when every listener's route configuration, every route's
cluster and every EDS cluster's endpoints are present (go-control-plane's Consistent()).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import TypeVar

from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.listener.v3 import listener_pb2
from envoy.config.route.v3 import route_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import (
    http_connection_manager_pb2 as hcm_pb2,
)
from envoy.extensions.filters.network.tcp_proxy.v3 import tcp_proxy_pb2
from google.protobuf.message import Message

from controlplane import resource

T = TypeVar("T")

_HCM = "type.googleapis.com/" + hcm_pb2.HttpConnectionManager.DESCRIPTOR.full_name
_TCP = "type.googleapis.com/" + tcp_proxy_pb2.TcpProxy.DESCRIPTOR.full_name


def route_clusters(config: route_pb2.RouteConfiguration) -> set[str]:
    names: set[str] = set()
    for vhost in config.virtual_hosts:
        for route in vhost.routes:
            if not route.HasField("route"):
                continue
            action = route.route
            if action.cluster:
                names.add(action.cluster)
            names.update(w.name for w in action.weighted_clusters.clusters)
            names.update(p.cluster for p in action.request_mirror_policies if p.cluster)
    return names


def listener_references(listener: listener_pb2.Listener) -> tuple[set[str], set[str]]:
    """(route configuration names via RDS, cluster names used directly)."""
    routes: set[str] = set()
    clusters: set[str] = set()
    chains = [*listener.filter_chains]
    if listener.HasField("default_filter_chain"):
        chains.append(listener.default_filter_chain)
    for chain in chains:
        for net_filter in chain.filters:
            config = net_filter.typed_config
            if config.type_url == _HCM:
                hcm = hcm_pb2.HttpConnectionManager()
                config.Unpack(hcm)
                if hcm.HasField("rds"):
                    routes.add(hcm.rds.route_config_name)
                elif hcm.HasField("route_config"):
                    clusters |= route_clusters(hcm.route_config)
            elif config.type_url == _TCP:
                tcp = tcp_proxy_pb2.TcpProxy()
                config.Unpack(tcp)
                if tcp.cluster:
                    clusters.add(tcp.cluster)
                clusters.update(w.name for w in tcp.weighted_clusters.clusters)
    return routes, clusters


def eds_name(cluster: cluster_pb2.Cluster) -> str | None:
    if cluster.type != cluster_pb2.Cluster.EDS:
        return None
    return str(cluster.eds_cluster_config.service_name or cluster.name)


def missing_references(by_type: Mapping[str, Sequence[Message]]) -> list[str]:
    """Every dangling reference, as ``<kind> <name> points at missing <kind> <name>``."""
    names = {t: {_name(m) for m in msgs} for t, msgs in by_type.items()}
    clusters = names.get(resource.CLUSTER, set())
    problems: list[str] = []
    for listener in _typed(by_type.get(resource.LISTENER, ()), listener_pb2.Listener):
        routes, direct = listener_references(listener)
        problems += _missing("listener", listener.name, "route configuration", routes,
                             names.get(resource.ROUTE, set()))
        problems += _missing("listener", listener.name, "cluster", direct, clusters)
    for config in _typed(by_type.get(resource.ROUTE, ()), route_pb2.RouteConfiguration):
        problems += _missing("route configuration", config.name, "cluster",
                             route_clusters(config), clusters)
    for cluster in _typed(by_type.get(resource.CLUSTER, ()), cluster_pb2.Cluster):
        wanted = eds_name(cluster)
        if wanted is not None:
            problems += _missing("cluster", cluster.name, "endpoints", {wanted},
                                 names.get(resource.ENDPOINT, set()))
    return problems


def _missing(kind: str, name: str, target: str, wanted: Iterable[str], have: set[str]) -> list[str]:
    return [f"{kind} {name!r} points at missing {target} {w!r}" for w in sorted(wanted)
            if w not in have]


def _typed(messages: Iterable[Message], cls: type[T]) -> list[T]:
    return [m for m in messages if isinstance(m, cls)]


def _name(message: Message) -> str:
    return str(getattr(message, "cluster_name", "") or getattr(message, "name", ""))
