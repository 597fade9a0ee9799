"""Small hand-built snapshots for protocol tests: clusters, their endpoints, one listener
with one route configuration that points at chosen clusters."""

from __future__ import annotations

from typing import TypeVar

from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.core.v3 import address_pb2, config_source_pb2
from envoy.config.endpoint.v3 import endpoint_components_pb2, endpoint_pb2
from envoy.config.listener.v3 import listener_components_pb2, listener_pb2
from envoy.config.route.v3 import route_components_pb2, route_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import (
    http_connection_manager_pb2 as hcm_pb2,
)
from google.protobuf import any_pb2
from google.protobuf.message import Message

from controlplane import resource
from controlplane.assembly import MeshBuild
from controlplane.cache.snapshot import Snapshot, build_snapshot
from controlplane.proxy import ProxyIdentity

ADS = config_source_pb2.ConfigSource(
    ads=config_source_pb2.AggregatedConfigSource(), resource_api_version=config_source_pb2.V3)

_M = TypeVar("_M", bound=Message)


def served(build: MeshBuild, proxy: ProxyIdentity, type_url: str, name: str,
           kind: type[_M]) -> _M:
    """The resource ``name`` of ``type_url`` in the snapshot ``proxy`` is served, checked to
    be there and to be a ``kind``."""
    typed = build.snapshot(proxy).get(type_url)
    assert typed is not None, f"no {type_url} in the snapshot"
    message = typed.resources[name].message
    assert isinstance(message, kind), message
    return message


def cluster(name: str) -> cluster_pb2.Cluster:
    return cluster_pb2.Cluster(
        name=name, type=cluster_pb2.Cluster.EDS,
        eds_cluster_config=cluster_pb2.Cluster.EdsClusterConfig(eds_config=ADS, service_name=name))


def endpoints(name: str, *ports: int) -> endpoint_pb2.ClusterLoadAssignment:
    lb = [endpoint_components_pb2.LbEndpoint(endpoint=endpoint_components_pb2.Endpoint(
        address=address_pb2.Address(socket_address=address_pb2.SocketAddress(
            address="127.0.0.1", port_value=p)))) for p in ports]
    return endpoint_pb2.ClusterLoadAssignment(
        cluster_name=name, endpoints=[endpoint_components_pb2.LocalityLbEndpoints(lb_endpoints=lb)])


def routes(name: str, *clusters: str) -> route_pb2.RouteConfiguration:
    hosts = [route_components_pb2.VirtualHost(
        name=c, domains=[c],
        routes=[route_components_pb2.Route(
            match=route_components_pb2.RouteMatch(prefix="/"),
            route=route_components_pb2.RouteAction(cluster=c))]) for c in clusters]
    return route_pb2.RouteConfiguration(name=name, virtual_hosts=hosts)


def listener(name: str, route_name: str, port: int = 15001) -> listener_pb2.Listener:
    hcm = hcm_pb2.HttpConnectionManager(
        stat_prefix=name, rds=hcm_pb2.Rds(config_source=ADS, route_config_name=route_name))
    packed = any_pb2.Any()
    packed.Pack(hcm)
    return listener_pb2.Listener(
        name=name,
        address=address_pb2.Address(socket_address=address_pb2.SocketAddress(
            address="127.0.0.1", port_value=port)),
        filter_chains=[listener_components_pb2.FilterChain(filters=[
            listener_components_pb2.Filter(name="envoy.filters.network.http_connection_manager",
                                           typed_config=packed)])])


def snapshot(clusters: dict[str, tuple[int, ...]], routed: tuple[str, ...] | None = None,
             reuse: Snapshot | None = None) -> Snapshot:
    """Clusters with endpoint ports; a listener ``egress`` and routes ``egress`` to ``routed``
    (default: every cluster)."""
    routed = tuple(sorted(clusters)) if routed is None else routed
    return build_snapshot({
        resource.CLUSTER: [(n, cluster(n)) for n in sorted(clusters)],
        resource.ENDPOINT: [(n, endpoints(n, *p)) for n, p in sorted(clusters.items())],
        resource.LISTENER: [("egress", listener("egress", "egress"))],
        resource.ROUTE: [("egress", routes("egress", *routed))],
    }, reuse=reuse)
