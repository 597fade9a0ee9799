"""Which names a snapshot's resources point at, and which of them are missing.

A snapshot is published only when every listener's route configuration, every route's
cluster and every EDS cluster's endpoints are present (go-control-plane's Consistent()).
Secrets are not checked: the two that listeners and clusters name (``default``,
``ROOTCA``) are never in a group's snapshot, they are answered per stream from its
identity (``cache/secrets.py``).
"""

from __future__ import annotations

from collections.abc import Collection, Mapping

from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.listener.v3 import listener_pb2
from envoy.config.route.v3 import route_components_pb2, route_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import (
    http_connection_manager_pb2 as hcm_pb2,
)
from envoy.extensions.filters.network.tcp_proxy.v3 import tcp_proxy_pb2
from google.protobuf.message import Message

from controlplane import resource
from controlplane.translator.gateway_api.backends import UNRESOLVED

_HCM = "type.googleapis.com/" + hcm_pb2.HttpConnectionManager.DESCRIPTOR.full_name
_TCP = "type.googleapis.com/" + tcp_proxy_pb2.TcpProxy.DESCRIPTOR.full_name


def route_clusters(config: route_pb2.RouteConfiguration) -> set[str]:
    names: set[str] = set()
    for vhost in config.virtual_hosts:
        names |= vhost_clusters(vhost)
    return names


def vhost_clusters(vhost: route_components_pb2.VirtualHost) -> set[str]:
    """The clusters a virtual host's routes send to (VHDS serves them on their own)."""
    names: set[str] = set()
    for route in vhost.routes:
        if not route.HasField("route"):
            continue
        action = route.route
        if action.cluster:
            names.add(action.cluster)
        # A Gateway API backend that does not resolve is a cluster that is missing on
        # purpose: its share answers 500 (translator/gateway_api/backends.py).
        names.update(w.name for w in action.weighted_clusters.clusters
                     if not w.name.startswith(UNRESOLVED))
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


References = Mapping[str, frozenset[str]]  # target type URL -> names referenced


def references(type_url: str, message: Message) -> References:
    """The names ``message`` points at, by the type they must exist in. Computed once per
    encoded resource, so checking a snapshot is set arithmetic."""
    found: dict[str, set[str]] = {}
    if isinstance(message, listener_pb2.Listener):
        routes, clusters = listener_references(message)
        found = {resource.ROUTE: routes, resource.CLUSTER: clusters}
    elif isinstance(message, route_pb2.RouteConfiguration):
        found = {resource.CLUSTER: route_clusters(message)}
    elif isinstance(message, route_components_pb2.VirtualHost):
        found = {resource.CLUSTER: vhost_clusters(message)}
    elif isinstance(message, cluster_pb2.Cluster):
        wanted = eds_name(message)
        found = {resource.ENDPOINT: {wanted}} if wanted is not None else {}
    return {t: frozenset(names) for t, names in found.items() if names}


_KINDS = {
    resource.LISTENER: "listener",
    resource.ROUTE: "route configuration",
    resource.VIRTUAL_HOST: "virtual host",
    resource.CLUSTER: "cluster",
    resource.ENDPOINT: "endpoints",
    resource.SECRET: "secret",
}


def dangling(kind_url: str, name: str, refs: References,
             present: Mapping[str, Collection[str]]) -> list[str]:
    """``<kind> <name> points at missing <kind> <name>`` for each reference not present."""
    problems = []
    for target, wanted in refs.items():
        have = present.get(target, ())
        for missing in sorted(w for w in wanted if w not in have):
            problems.append(f"{_KINDS.get(kind_url, kind_url)} {name!r} points at missing "
                            f"{_KINDS.get(target, target)} {missing!r}")
    return problems
