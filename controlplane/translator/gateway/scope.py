"""Which services a gateway proxy sees: the ones its own listeners and route tables send
to, and what those route to in turn. Pure.

A sidecar's scope comes from the ``sidecars`` rules; a gateway's comes from its routes:
every cluster its route tables (backends, weighted splits, mirrors) and its listeners
(TLS passthrough) name, read from the resources themselves, so any route kind attached
to a Gateway is covered by how it is translated. Then every service a seen one routes
to (its policy's split, match and fallback; the GAMMA routes attached to it), as for a
sidecar. A gateway so holds a few clusters of a big mesh, and a change to a service it
does not route to does not reach it.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

from envoy.config.listener.v3 import listener_pb2
from envoy.config.route.v3 import route_pb2
from envoy.extensions.filters.network.tcp_proxy.v3 import tcp_proxy_pb2
from google.protobuf.message import Message

from controlplane.mesh.model import Mesh
from controlplane.translator import names
from controlplane.translator.listeners import TCP_PROXY
from controlplane.translator.visibility import with_route_targets

_HOST_SUFFIX = f".svc.{names.CLUSTER_DOMAIN}"


def gateway_visible(mesh: Mesh, listeners: Iterable[Message],
                    tables: Iterable[Message]) -> frozenset[str] | None:
    """Service keys (``name.namespace``) the gateway needs clusters of; None: all."""
    seeds = {key for cluster in (*_route_clusters(tables), *_listener_clusters(listeners))
             if (key := service_of(cluster)) is not None and key in mesh.by_key}
    return with_route_targets(mesh, frozenset(seeds))


def service_of(cluster: str) -> str | None:
    """``name.namespace`` of an outbound cluster (``outbound|9080|v1|reviews.default.svc
    .cluster.local``, translator/names.py); None for any other cluster."""
    parts = cluster.split("|")
    if len(parts) != 4 or parts[0] != "outbound" or not parts[3].endswith(_HOST_SUFFIX):
        return None
    return parts[3][:-len(_HOST_SUFFIX)]


def _route_clusters(tables: Iterable[Message]) -> Iterator[str]:
    for table in tables:
        assert isinstance(table, route_pb2.RouteConfiguration)
        for host in table.virtual_hosts:
            for route in host.routes:
                if not route.HasField("route"):
                    continue
                action = route.route
                if action.cluster:
                    yield action.cluster
                yield from (c.name for c in action.weighted_clusters.clusters)
                yield from (m.cluster for m in action.request_mirror_policies)


def _listener_clusters(listeners: Iterable[Message]) -> Iterator[str]:
    for listener in listeners:
        assert isinstance(listener, listener_pb2.Listener)
        for chain in listener.filter_chains:
            for found in chain.filters:
                if found.name != TCP_PROXY:
                    continue
                proxy = tcp_proxy_pb2.TcpProxy()
                found.typed_config.Unpack(proxy)
                if proxy.cluster:
                    yield proxy.cluster
                yield from (c.name for c in proxy.weighted_clusters.clusters)
