"""The snapshot of an on-demand sidecar: its own config up front, the rest by name.

Made of the same shared layers as everyone's (the clusters and load assignments of the
services the sidecar may see, encoded once per mesh), plus:
- the route table ``egress`` with no virtual hosts, only ``vhds`` (the same for all);
- the visible services' virtual hosts as VHDS resources, one layer per (namespace,
  visible set), with the aliases that map a request's Host to its virtual host.
A wildcard subscription gets only the sidecar's own clusters (its inbound one) and no
load assignment or virtual host: Envoy asks for the others by name when the app first
calls them (see ``controlplane.translator.ondemand``). The visible set still applies:
a sidecar can fetch only what it may see.
"""

from __future__ import annotations

from controlplane import resource
from controlplane.assembly.build import MeshBuild
from controlplane.cache.layers import Layer
from controlplane.cache.snapshot import Snapshot, TypeSnapshot, encode_resource
from controlplane.proxy import ProxyIdentity
from controlplane.translator import resource_name
from controlplane.translator.ondemand import vhds_route, virtual_hosts

_NOTHING: frozenset[str] = frozenset()


def _route_layer() -> Layer:
    config = vhds_route()
    return Layer.of(resource.ROUTE,
                    [encode_resource(resource.ROUTE, resource_name(config), config)])


_ROUTES = _route_layer()  # one for every on-demand sidecar: it never changes


def ondemand_snapshot(build: MeshBuild, proxy: ProxyIdentity,
                      reuse: Snapshot | None = None) -> Snapshot:
    """The group's snapshot; ``reuse`` itself when nothing of it changed. Per group this
    costs its own resources and a few lookups: every layer is shared."""
    visible = build.visible(proxy)
    own = build.own_layers(proxy)
    old = reuse.types if reuse is not None else {}
    own_clusters = own.get(resource.CLUSTER)
    vhosts, aliases = build.shared_layer(resource.VIRTUAL_HOST, proxy.namespace, visible,
                                         virtual_hosts)
    types = {
        resource.CLUSTER: TypeSnapshot.layered(
            resource.CLUSTER, [build.cluster_layer(visible)], own_clusters,
            wildcard=frozenset(own_clusters.resources) if own_clusters else _NOTHING,
            reuse=old.get(resource.CLUSTER)),
        resource.ENDPOINT: TypeSnapshot.layered(
            resource.ENDPOINT, [build.endpoint_layer(visible, proxy.zone)],
            wildcard=_NOTHING, reuse=old.get(resource.ENDPOINT)),
        resource.LISTENER: TypeSnapshot.layered(
            resource.LISTENER, [], own.get(resource.LISTENER),
            reuse=old.get(resource.LISTENER)),
        resource.ROUTE: TypeSnapshot.layered(resource.ROUTE, [_ROUTES],
                                             reuse=old.get(resource.ROUTE)),
        resource.VIRTUAL_HOST: TypeSnapshot.layered(
            resource.VIRTUAL_HOST, [vhosts], wildcard=_NOTHING, aliases=aliases,
            reuse=old.get(resource.VIRTUAL_HOST)),
        resource.SECRET: TypeSnapshot.layered(resource.SECRET, [],
                                              reuse=old.get(resource.SECRET)),
    }
    return Snapshot.of(types, reuse=reuse)
