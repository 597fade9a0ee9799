"""Mesh state + proxy identity -> the Envoy resources that proxy is served.

Split by what the output depends on, so the pipeline can share work between proxies:
a service's clusters and endpoints depend on that service alone, the egress route table
on the mesh and the proxy's namespace, a captured sidecar's egress listener on the
services it sees and its port, and the other listeners and inbound clusters on the
proxy. ``translate`` puts them together.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass
from typing import Any, TypeAlias

from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.endpoint.v3 import endpoint_pb2
from google.protobuf.message import Message

from controlplane import resource
from controlplane.mesh.model import Mesh, Service
from controlplane.proxy import ProxyIdentity
from controlplane.translator.capture import (
    capture_clusters,
    captured_egress_listener,
    captured_inbound_listener,
)
from controlplane.translator.clusters import inbound_cluster, outbound_clusters
from controlplane.translator.egress import loopback_listeners
from controlplane.translator.endpoints import load_assignments
from controlplane.translator.listeners import egress_listener, inbound_listener
from controlplane.translator.locality import prefer_zone
from controlplane.translator.routes import egress_route
from controlplane.translator.security import Upstream
from controlplane.translator.security import inbound as inbound_security
from controlplane.translator.security import upstream as upstream_security
from controlplane.translator.telemetry import (
    Observed,
    observe_listener,
    observed,
    telemetry_clusters,
)
from controlplane.translator.visibility import visible_services

Resources: TypeAlias = dict[str, list[Message]]


@dataclass(frozen=True, slots=True)
class ServiceResources:
    """What every proxy gets for one service, whoever it is: a cluster per port, and a
    ClusterLoadAssignment per EDS cluster (none for an external service)."""

    clusters: tuple[cluster_pb2.Cluster, ...]
    load_assignments: tuple[endpoint_pb2.ClusterLoadAssignment, ...]


def service_resources(service: Service, security: Upstream | None = None) -> ServiceResources:
    """``security``: how callers reach it with mTLS (``upstream(mesh, service)``)."""
    return ServiceResources(tuple(outbound_clusters(service, security)),
                            tuple(load_assignments(service, security)))


def proxy_resources(mesh: Mesh, proxy: ProxyIdentity) -> Resources:
    """What depends on the proxy itself: its listeners and the cluster to its own app.
    A captured sidecar's egress listener is not among them (``captured_egress``)."""
    own = mesh.service(proxy.service, proxy.namespace)
    security = inbound_security(mesh, own)
    telemetry = observed(mesh, own, proxy)
    if proxy.capture:
        inbound_listener_ = captured_inbound_listener(proxy, own, security)
        if inbound_listener_ is not None:
            observe_listener(telemetry, inbound_listener_)
        return {resource.CLUSTER: _sorted([*capture_clusters(proxy, own),
                                           *telemetry_clusters(telemetry)]),
                resource.LISTENER: [inbound_listener_] if inbound_listener_ else []}
    clusters: list[Message] = [*telemetry_clusters(telemetry)]
    listeners = [egress_listener(proxy)]
    inbound = inbound_cluster(proxy, own)
    if inbound is not None:
        clusters.append(inbound)
        listener = inbound_listener(proxy, own, str(inbound.name), security)
        if listener is not None:
            listeners.append(listener)
    for made in listeners:
        observe_listener(telemetry, made)
    return {resource.CLUSTER: _sorted(clusters), resource.LISTENER: _sorted(list(listeners))}


def translate(mesh: Mesh, proxy: ProxyIdentity) -> Resources:
    """Every type URL present (an empty list means "none", which SotW needs to say),
    each list sorted by resource name so that equal input gives equal output. Only the
    services the proxy sees (``visible_services``) are translated."""
    visible = visible_services(mesh, proxy)
    services = mesh.services if visible is None else [s for s in mesh.services if s.key in visible]
    shared = [service_resources(s, upstream_security(mesh, s)) for s in services]
    own = proxy_resources(mesh, proxy)
    listeners = own[resource.LISTENER]
    if proxy.capture:
        listeners = _sorted([captured_egress(mesh, visible, proxy.egress_port,
                                             observed(mesh, mesh.service(proxy.service,
                                                                         proxy.namespace),
                                                      proxy)),
                             *listeners])
    else:  # external TCP/TLS ports on loopback (translator/egress.py)
        listeners = _sorted([*loopback_egress(mesh, visible, proxy, observed(
            mesh, mesh.service(proxy.service, proxy.namespace), proxy)), *listeners])
    return {
        resource.CLUSTER: _sorted(
            [*(c for s in shared for c in s.clusters), *own[resource.CLUSTER]]
        ),
        resource.ENDPOINT: _sorted([prefer_zone(a, proxy.zone) or a
                                    for s in shared for a in s.load_assignments]),
        resource.LISTENER: listeners,
        resource.ROUTE: [egress_route(mesh, proxy.namespace, visible)],
        resource.SECRET: [],
    }


def captured_egress(mesh: Mesh, visible: Collection[str] | None,
                    egress_port: int, telemetry: Observed | None = None) -> Message:
    """The egress listener of captured sidecars that see ``visible`` (None: every
    service) on ``egress_port`` and record alike (``telemetry``, the defaults when None):
    the same for all of them."""
    by_key = mesh.by_key
    services = mesh.services if visible is None else [by_key[k] for k in visible
                                                       if k in by_key]
    listener = captured_egress_listener(services, egress_port, mesh.outbound_traffic_policy)
    observe_listener(telemetry or Observed(), listener)
    return listener


def loopback_egress(mesh: Mesh, visible: Collection[str] | None, proxy: ProxyIdentity,
                    telemetry: Observed | None = None) -> list[Message]:
    """A sidecar that is not captured: its listeners on 127.0.0.1 for the external
    TCP/TLS ports of the services it sees (none in a mesh without such ports)."""
    by_key = mesh.by_key
    services = mesh.services if visible is None else [by_key[k] for k in visible
                                                       if k in by_key]
    made = loopback_listeners(services, proxy)
    for listener in made:
        observe_listener(telemetry or Observed(), listener)
    return list(made)


def resource_name(message: Message) -> str:
    """The name xDS addresses a resource by: a ClusterLoadAssignment has no ``name``."""
    if isinstance(message, endpoint_pb2.ClusterLoadAssignment):
        return str(message.cluster_name)
    return str(message.name)


def _sorted(messages: list[Any]) -> list[Message]:
    return sorted(messages, key=resource_name)
