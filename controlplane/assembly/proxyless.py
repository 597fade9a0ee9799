"""The snapshot of a proxyless gRPC client (``ProxyIdentity.kind == "grpc"``).

Made from the same shared layers as a sidecar of its namespace and visible set (the
clusters, the zone's load assignments, the namespace's egress route table), each turned
into what gRPC reads (``controlplane.translator.proxyless``). The gRPC layers are kept
by their source layer's version, with the build that made them (and taken over by the
next build while it is derived from that one): every gRPC group that sees the same
services shares them, a second build of an unchanged mesh converts nothing, and a change
converts only the resources that changed (each converted resource is kept while some
layer holds it). A build that is dropped takes its gRPC layers with it.
What a gRPC client's resources leave out is logged once per change
(``proxyless.left_out``), never per group or per stream.

A client with the mesh certificates (``ProxyIdentity.certificates``) calls STRICT
services with mTLS: its cluster layers are another variant, kept by the set of STRICT
services too (a mode change alters no sidecar cluster, but it alters these).

A gRPC server (``grpc.server(xds=True)``, gRFC A36) asks for Listeners named by the
address it listens on: the group of a node that says it serves (``bootstrap --grpc
--grpc-server``) also holds its service's server listeners
(``translator/proxyless/server_listeners.py``), made once per build and service.
"""

from __future__ import annotations

import hashlib
import threading
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TypeAlias, TypeVar

import structlog
from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.endpoint.v3 import endpoint_pb2
from envoy.config.route.v3 import route_pb2
from google.protobuf.message import Message

from controlplane import resource
from controlplane.assembly.build import MeshBuild
from controlplane.cache.layers import Layer, empty_layer
from controlplane.cache.snapshot import Resource, Snapshot, TypeSnapshot, encode_resource
from controlplane.mesh.security import effective
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
from controlplane.translator.proxyless.clusters import service_of
from controlplane.translator.proxyless.server_listeners import server_listeners
from controlplane.translator.proxyless.tls import mesh_sans

log = structlog.get_logger("controlplane.assembly.proxyless")

_V = TypeVar("_V")
_K = TypeVar("_K")
Convert: TypeAlias = Callable[[Message, LeftOut], Message | None]
Key: TypeAlias = tuple[str, str]
LayerKey: TypeAlias = tuple[str, str, str]  # (type, source layer version, variant)
Suffix: TypeAlias = Callable[[Resource], str]

# (type, name, source version) -> the converted resource, while something holds it
_CONVERTED: weakref.WeakValueDictionary[tuple[str, str, str], Resource] = (
    weakref.WeakValueDictionary())


@dataclass(slots=True)
class _Kept:
    """A build's gRPC layers: they live as long as the build (the current one and, while
    it is derived from, the previous one), so a mesh that shrinks lets them go."""

    # (type, source layer version, variant) -> the gRPC layer
    layers: dict[LayerKey, Layer] = field(default_factory=dict)
    # (source route version, gRPC cluster layer version) -> what follows from the table
    tables: dict[Key, Tables] = field(default_factory=dict)
    # (service key, with certificates) -> its server listeners, in this build
    servers: dict[tuple[str, bool], Layer] = field(default_factory=dict)


_BUILDS: weakref.WeakKeyDictionary[MeshBuild, _Kept] = weakref.WeakKeyDictionary()
_LOCK = threading.Lock()  # builds may run on worker threads


def proxyless_snapshot(build: MeshBuild, proxy: ProxyIdentity,
                       reuse: Snapshot | None = None) -> Snapshot:
    """The group's snapshot; ``reuse`` itself when nothing of it changed."""
    visible = build.visible(proxy)
    kept = _kept(build)
    strict = _strict(build) if proxy.certificates else None
    convert = _ClusterConvert(strict)
    clusters = grpc_layer(kept, build.cluster_layer(visible), convert, _variant(strict),
                          convert.suffix)
    endpoints = grpc_layer(kept, build.endpoint_layer(visible, proxy.zone), _assignment)
    tables = grpc_tables(kept, build.route(proxy.namespace, visible), clusters)
    servers = (server_layer(kept, build, proxy) if proxy.serves
               else empty_layer(resource.LISTENER))
    old = reuse.types if reuse is not None else {}
    types: dict[str, TypeSnapshot] = {
        type_url: build.typed(type_url, layers, old.get(type_url))
        for type_url, layers in (
            (resource.CLUSTER, (clusters, tables.clusters)),
            (resource.ENDPOINT, (endpoints, tables.endpoints)),
            (resource.LISTENER, (tables.listeners, servers)), (resource.ROUTE, (tables.routes,)),
            (resource.SECRET, (empty_layer(resource.SECRET),)))
    }
    return Snapshot.of(types, reuse=reuse)


def grpc_layer(kept: _Kept, source: Layer, convert: Convert, variant: str = "",
               suffix: Suffix | None = None) -> Layer:
    """``source``'s resources converted for gRPC (those with no gRPC form left out):
    the layer a live build already made of the same source (and ``variant``), or one
    derived from a layer of the source's ancestor (converting what changed), or made
    anew. ``suffix``: what tells a resource's conversions apart within the variant."""
    key = (source.type_url, source.version, variant)
    found = _find(kept, key, lambda k: k.layers)
    if found is not None:
        return found
    left = LeftOut()
    base = _ancestor(source, variant)
    if base is not None:
        changed, prior = base
        made = prior.replace(changed, (r for n in changed
                                       if (r := _converted(source.resources.get(n), convert,
                                                           left, suffix)) is not None))
    else:
        made = Layer.of(source.type_url,
                        (r for s in source.resources.values()
                         if (r := _converted(s, convert, left, suffix)) is not None))
    _report(left)
    kept.layers[key] = made
    return made


@dataclass(frozen=True, slots=True)
class Tables:
    """What follows from the route table: itself, an API listener per name it routes,
    and a cluster without endpoints (and its empty assignment) per unresolved backend."""

    routes: Layer
    listeners: Layer
    clusters: Layer
    endpoints: Layer


def grpc_tables(kept: _Kept, route: Resource, clusters: Layer) -> Tables:
    """Kept by the source table's and the gRPC clusters' versions."""
    key = (route.version, clusters.version)
    found = _find(kept, key, lambda k: k.tables)
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
    kept.tables[key] = tables
    return tables


def server_layer(kept: _Kept, build: MeshBuild, proxy: ProxyIdentity) -> Layer:
    """The server listeners of the proxy's own service (none when the mesh lacks it),
    made once per build; their resources are shared while their bytes are unchanged."""
    key = (f"{proxy.service}.{proxy.namespace}", proxy.certificates)
    found = kept.servers.get(key)
    if found is None:
        service = build.mesh.service(proxy.service, proxy.namespace)
        left = LeftOut()
        made = (server_listeners(build.mesh, service, proxy.certificates, left)
                if service is not None else [])
        found = Layer.of(resource.LISTENER, (encode_resource(resource.LISTENER, m.name, m)
                                             for m in made))
        _report_server(key[0], left)
        kept.servers[key] = found
    return found


_SERVER_NOTES: dict[str, list[str]] = {}  # service key -> the notes last logged


def _report_server(service: str, left: LeftOut) -> None:
    """Logged when a service's server notes change, not on every build."""
    notes = left.summary()
    with _LOCK:
        if _SERVER_NOTES.get(service, []) == notes:
            return
        if notes:
            _SERVER_NOTES[service] = notes
        else:
            _SERVER_NOTES.pop(service, None)
    if notes:
        log.info("proxyless.left_out", left_out=notes, service=service,
                 hint="proxyless gRPC servers (xds=True) do not support these; a sidecar "
                 "in front of the server would (see the proxyless notes in the README)")


class _ClusterConvert:
    """Clusters for one variant: ``strict`` None (a client without certificates) or the
    STRICT services, called with mTLS."""

    def __init__(self, strict: frozenset[str] | None) -> None:
        self.strict = strict

    def __call__(self, message: Message, left: LeftOut) -> Message | None:
        assert isinstance(message, cluster_pb2.Cluster)
        return grpc_cluster(message, left, self.strict)

    def suffix(self, source: Resource) -> str:
        """``~mtls`` for a cluster this variant calls with mTLS: its own conversion."""
        message = source.message
        assert isinstance(message, cluster_pb2.Cluster)
        if self.strict is None or service_of(message) not in self.strict:
            return ""
        return "~mtls" if mesh_sans(message) is not None else ""


def _strict(build: MeshBuild) -> frozenset[str]:
    """The STRICT services (``name.namespace``) of the build's mesh."""
    mesh = build.mesh
    return frozenset(s.key for s in mesh.services if effective(mesh, s).mode == "strict")


def _variant(strict: frozenset[str] | None) -> str:
    if strict is None:
        return ""
    digest = hashlib.sha256("\n".join(sorted(strict)).encode()).hexdigest()[:16]
    return f"certs:{digest}"


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


def _converted(source: Resource | None, convert: Convert, left: LeftOut,
               suffix: Suffix | None = None) -> Resource | None:
    if source is None:
        return None
    key = (source.type_url, source.name,
           source.version + (suffix(source) if suffix is not None else ""))
    found = _CONVERTED.get(key)
    if found is not None:
        return found
    message = convert(source.message, left)
    if message is None:
        return None
    found = _CONVERTED[key] = encode_resource(source.type_url, source.name, message)
    return found


def _kept(build: MeshBuild) -> _Kept:
    with _LOCK:
        found = _BUILDS.get(build)
        if found is None:
            found = _BUILDS[build] = _Kept()
        return found


def _find(kept: _Kept, key: _K, part: Callable[[_Kept], dict[_K, _V]]) -> _V | None:
    """``key`` in this build's, else in another live build's (then carried over)."""
    found = part(kept).get(key)
    if found is None:
        with _LOCK:
            others = list(_BUILDS.values())
        found = next((f for k in others if (f := part(k).get(key)) is not None), None)
        if found is not None:
            part(kept)[key] = found
    return found


def _ancestor(source: Layer, variant: str) -> tuple[frozenset[str], Layer] | None:
    """A live build's gRPC layer (of the same variant) whose source ``source`` was
    derived from, and what changed since."""
    with _LOCK:
        others = list(_BUILDS.values())
    for kept in others:
        for (type_url, version, made_for), made in list(kept.layers.items()):
            if type_url != source.type_url or made_for != variant:
                continue
            changed = source.changed_since(version)
            if changed is not None:
                return changed, made
    return None


def _report(left: LeftOut) -> None:
    if left:
        log.info("proxyless.left_out", left_out=left.summary(),
                 hint="gRPC clients do not support these; they apply to sidecars only "
                 "(see the proxyless notes in the README)")

