"""The snapshot of an ingress gateway proxy (``ProxyIdentity.kind == "gateway"``).

Its listeners and route tables are its own (``translator/gateway``), made from its
Gateway and the routes attached to it, with the mesh's access log and tracing
(``translator/gateway/telemetry.py``). Its clusters and endpoints are the shared layers
of the services its routes send to (``translator/gateway/scope.py``), the same a sidecar
that sees those services gets: mTLS to sidecars with the same identity machinery when
the mesh has a CA, circuit breakers and load balancing; a change to any other service
leaves its snapshot as it is, so nothing is pushed to it. Its certificates are not in
the snapshot: the server adds them per stream (``cache/gateway_secrets.py``).
"""

from __future__ import annotations

import structlog
from envoy.config.listener.v3 import listener_pb2
from google.protobuf.message import Message

from controlplane import resource
from controlplane.assembly.build import MeshBuild
from controlplane.cache.layers import Layer, empty_layer
from controlplane.cache.snapshot import Snapshot, TypeSnapshot, encode_resource
from controlplane.mesh.gateway_attach import gateway_attachments
from controlplane.mesh.model import Mesh
from controlplane.proxy import ProxyIdentity
from controlplane.translator import resource_name
from controlplane.translator.gateway.scope import gateway_visible
from controlplane.translator.gateway.telemetry import (
    gateway_clusters,
    gateway_observed,
    observe_gateway,
)
from controlplane.translator.gateway.translate import gateway_resources

log = structlog.get_logger("controlplane.assembly.gateway")

_MOST_REPORTED = 1_000
# What was last reported per gateway (namespace, name): a problem is logged when it
# appears, not again on every build of an unchanged one.
_reported: dict[tuple[str, str], frozenset[tuple[str, ...]]] = {}


def gateway_snapshot(build: MeshBuild, proxy: ProxyIdentity,
                     reuse: Snapshot | None = None) -> Snapshot:
    """The group's snapshot; ``reuse`` itself when nothing of it changed."""
    old = reuse.types if reuse is not None else {}
    report(build.mesh, proxy)
    own: dict[str, list[Message]] = dict(gateway_resources(build.mesh, proxy))
    ctx = gateway_observed(build.mesh, proxy)
    listeners = [m for m in own[resource.LISTENER] if isinstance(m, listener_pb2.Listener)]
    observe_gateway(ctx, listeners)
    visible = gateway_visible(build.mesh, own[resource.LISTENER], own[resource.ROUTE])
    own[resource.CLUSTER] = list(gateway_clusters(ctx))
    types: dict[str, TypeSnapshot] = {}
    encoded = 0
    shared: dict[str, tuple[Layer, ...]] = {
        resource.CLUSTER: (build.cluster_layer(visible),),
        resource.ENDPOINT: (build.endpoint_layer(visible, proxy.zone),),
    }
    for type_url in (resource.CLUSTER, resource.ENDPOINT, resource.LISTENER, resource.ROUTE):
        prior = old.get(type_url)
        layers = shared.get(type_url, ())
        messages = own.get(type_url, [])
        if layers and not messages:
            types[type_url] = build.typed(type_url, layers, prior)
            continue
        made = [encode_resource(type_url, resource_name(m), m,
                                prior.resources.get(resource_name(m)) if prior else None)
                for m in messages]
        encoded += sum(r.size for r in made)
        types[type_url] = TypeSnapshot.layered(type_url, layers, Layer.of(type_url, made),
                                               reuse=prior)
    types[resource.SECRET] = build.typed(resource.SECRET, (empty_layer(resource.SECRET),),
                                         old.get(resource.SECRET))
    return Snapshot.of(types, encoded, reuse)


def report(mesh: Mesh, proxy: ProxyIdentity) -> None:
    """A gateway proxy whose Gateway the mesh lacks serves nothing: say so, once per
    change (what its Gateway does not serve, the sources report: the file source's log,
    the Kubernetes status)."""
    where = (proxy.namespace, proxy.gateway)
    missing = gateway_attachments(mesh).gateway(*where) is None
    problems = frozenset({("missing",)}) if missing else frozenset()
    if _reported.get(where) == problems:
        return
    if len(_reported) >= _MOST_REPORTED:
        _reported.clear()
    _reported[where] = problems
    if missing:
        log.warning("gateway.not_found", gateway=f"{proxy.namespace}/{proxy.gateway}",
                    node_id=proxy.node_id, hint="the proxy serves no listener until the "
                    "mesh has this Gateway (gateways:, or a Gateway of our class)")
