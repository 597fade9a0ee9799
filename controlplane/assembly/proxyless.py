"""The snapshot of a proxyless gRPC client (``ProxyIdentity.kind == "grpc"``).

Made from the same shared layers as a sidecar of its namespace and visible set (the
clusters, the zone's load assignments, the namespace's egress route table), each turned
into what gRPC reads (``controlplane.translator.proxyless``). The gRPC layers are kept
by their source layer's version, so every gRPC group that sees the same services shares
them, a second build of an unchanged mesh converts nothing, and a change converts only
the resources that changed (each converted resource is kept while some layer holds it).
What a gRPC client's resources leave out is logged once per change
(``proxyless.left_out``), never per group or per stream.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final, TypeAlias, TypeVar

import structlog
from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.endpoint.v3 import endpoint_pb2
from envoy.config.route.v3 import route_pb2
from google.protobuf.message import Message

from controlplane import resource
from controlplane.assembly.build import MeshBuild
from controlplane.cache.layers import Layer, empty_layer
from controlplane.cache.snapshot import Resource, Snapshot, TypeSnapshot, encode_resource
from controlplane.proxy import ProxyIdentity
from controlplane.translator.proxyless import (
    LeftOut,
    api_listener,
    grpc_assignment,
    grpc_cluster,
    grpc_route_config,
    listener_names,
    placeholder_cluster,
)

log = structlog.get_logger("controlplane.assembly.proxyless")

_V = TypeVar("_V")
_KEPT: Final = 64  # gRPC layers kept per kind of source (by the source's version)
Convert: TypeAlias = Callable[[Message, LeftOut], Message | None]

# (type, name, source version) -> the converted resource, while something holds it
_CONVERTED: weakref.WeakValueDictionary[tuple[str, str, str], Resource] = (
    weakref.WeakValueDictionary())
# (type, source layer version) -> the gRPC layer
_LAYERS: dict[tuple[str, str], Layer] = {}
# (source route version, gRPC cluster layer version) -> what follows from the table
_TABLES: dict[tuple[str, str], Tables] = {}


def proxyless_snapshot(build: MeshBuild, proxy: ProxyIdentity,
                       reuse: Snapshot | None = None) -> Snapshot:
    """The group's snapshot; ``reuse`` itself when nothing of it changed."""
    visible = build.visible(proxy)
    clusters = grpc_layer(build.cluster_layer(visible), _cluster)
    endpoints = grpc_layer(build.endpoint_layer(visible, proxy.zone), _assignment)
    tables = grpc_tables(build.route(proxy.namespace, visible), clusters)
    old = reuse.types if reuse is not None else {}
    types: dict[str, TypeSnapshot] = {
        type_url: build.typed(type_url, layers, old.get(type_url))
        for type_url, layers in (
            (resource.CLUSTER, (clusters, tables.clusters)),
            (resource.ENDPOINT, (endpoints, tables.endpoints)),
            (resource.LISTENER, (tables.listeners,)), (resource.ROUTE, (tables.routes,)),
            (resource.SECRET, (empty_layer(resource.SECRET),)))
    }
    return Snapshot.of(types, reuse=reuse)


def grpc_layer(source: Layer, convert: Convert) -> Layer:
    """``source``'s resources converted for gRPC (those with no gRPC form left out)."""
    key = (source.type_url, source.version)
    found = _LAYERS.get(key)
    if found is not None:
        return found
    left = LeftOut()
    base = _ancestor(source)
    if base is not None:
        changed, prior = base
        made = prior.replace(changed, (r for n in changed
                                       if (r := _converted(source.resources.get(n), convert,
                                                           left)) is not None))
    else:
        made = Layer.of(source.type_url,
                        (r for s in source.resources.values()
                         if (r := _converted(s, convert, left)) is not None))
    _report(left)
    _keep(_LAYERS, key, made)
    return made


@dataclass(frozen=True, slots=True)
class Tables:
    """What follows from the route table: itself, an API listener per name it routes,
    and a cluster without endpoints (and its empty assignment) per unresolved backend."""

    routes: Layer
    listeners: Layer
    clusters: Layer
    endpoints: Layer


def grpc_tables(route: Resource, clusters: Layer) -> Tables:
    """Kept by the source table's and the gRPC clusters' versions."""
    key = (route.version, clusters.version)
    found = _TABLES.get(key)
    if found is not None:
        return found
    assert isinstance(route.message, route_pb2.RouteConfiguration)
    made = grpc_route_config(route.message, clusters.resources)
    _report(made.left_out)
    config = made.config
    tables = Tables(
        Layer.of(resource.ROUTE, [encode_resource(resource.ROUTE, config.name, config)]),
        Layer.of(resource.LISTENER, (_listener(name) for name in listener_names(config))),
        Layer.of(resource.CLUSTER, (encode_resource(resource.CLUSTER, n, placeholder_cluster(n))
                                    for n in made.unresolved)),
        Layer.of(resource.ENDPOINT, (encode_resource(
            resource.ENDPOINT, n, endpoint_pb2.ClusterLoadAssignment(cluster_name=n))
            for n in made.unresolved)))
    _keep(_TABLES, key, tables)
    return tables


def _cluster(message: Message, left: LeftOut) -> Message | None:
    assert isinstance(message, cluster_pb2.Cluster)
    return grpc_cluster(message, left)


def _assignment(message: Message, left: LeftOut) -> Message | None:
    assert isinstance(message, endpoint_pb2.ClusterLoadAssignment)
    return grpc_assignment(message)


def _listener(name: str) -> Resource:
    """An API listener depends on its name only: one object per name while held."""
    key = (resource.LISTENER, name, "")
    found = _CONVERTED.get(key)
    if found is None:
        found = _CONVERTED[key] = encode_resource(resource.LISTENER, name, api_listener(name))
    return found


def _converted(source: Resource | None, convert: Convert, left: LeftOut) -> Resource | None:
    if source is None:
        return None
    key = (source.type_url, source.name, source.version)
    found = _CONVERTED.get(key)
    if found is not None:
        return found
    message = convert(source.message, left)
    if message is None:
        return None
    found = _CONVERTED[key] = encode_resource(source.type_url, source.name, message)
    return found


def _ancestor(source: Layer) -> tuple[frozenset[str], Layer] | None:
    """A kept gRPC layer whose source ``source`` was derived from, and what changed."""
    for (type_url, version), made in list(_LAYERS.items()):
        if type_url != source.type_url:
            continue
        changed = source.changed_since(version)
        if changed is not None:
            return changed, made
    return None


def _keep(kept: dict[tuple[str, str], _V], key: tuple[str, str], value: _V) -> None:
    """Add, dropping the oldest past ``_KEPT`` (list() of a dict is atomic: builds may
    run on worker threads)."""
    for oldest in list(kept)[: max(0, len(kept) + 1 - _KEPT)]:
        kept.pop(oldest, None)
    kept[key] = value


def _report(left: LeftOut) -> None:
    if left:
        log.info("proxyless.left_out", left_out=left.summary(),
                 hint="gRPC clients do not support these; they apply to sidecars only "
                 "(see the proxyless notes in the README)")

