"""RouteConfigurations: the egress table (by Host header) and the inbound one."""

from __future__ import annotations

from collections.abc import Collection, Iterable
from datetime import timedelta

from envoy.config.core.v3 import base_pb2
from envoy.config.route.v3 import route_components_pb2, route_pb2

from controlplane.mesh.attach import Attachments, attach
from controlplane.mesh.model import Mesh, Service, ServicePort
from controlplane.translator import names
from controlplane.translator.gateway_api import rule_routes
from controlplane.translator.gateway_api.backends import names_unresolved
from controlplane.translator.policies import FEATURES
from controlplane.translator.protoutil import duration

ROUTE_OWNED = frozenset({"traffic", "timeout", "retries"})  # features a route replaces
ON_ACTION = frozenset({"load_balancer"})  # features that shape the forwarding action


def egress_route(
    mesh: Mesh, namespace: str, visible: Collection[str] | None = None
) -> route_pb2.RouteConfiguration:
    """One virtual host per HTTP or gRPC service port, the proxy's own service included
    (a service may call itself). TCP ports have no Host header to route on. Only the
    proxy's namespace matters (for bare service names), so proxies of a namespace share
    it. ``visible`` (keys ``name.namespace``, from ``visible_services``) limits the table
    to those services: a call to any other gets Envoy's 404, as for an unknown host."""
    if visible is None:
        services: Iterable[Service] = mesh.services
    else:
        by_key = mesh.by_key
        services = (by_key[key] for key in visible if key in by_key)
    attached = attach(mesh) if mesh.http_routes or mesh.grpc_routes else None
    hosts = [host for service in services
             for host in (virtual_hosts(service, namespace) if attached is None
                          else virtual_hosts(service, namespace, attached))]
    hosts.sort(key=lambda host: str(host.name))
    config = route_pb2.RouteConfiguration(name=names.EGRESS_ROUTE, virtual_hosts=hosts)
    if attached is not None and any(names_unresolved(route)
                                    for host in hosts for route in host.routes):
        # A Gateway API backend that does not resolve is a cluster that does not exist,
        # answering 500 (the spec; 503 for gRPC); RDS does not check cluster names, say
        # so anyway.
        config.validate_clusters.value = False
    return config


def source_header() -> base_pb2.HeaderValueOption:
    """Tells the called sidecar (its access log) which service calls: this sidecar's
    ``name.namespace``, from its node, so every sidecar of a namespace shares the table.
    Overwritten, never appended: the app cannot claim to be another service here (it
    is a log field, not a credential: mTLS identity is that). Only towards services of
    the mesh: a host outside it learns nothing of the caller."""
    return base_pb2.HeaderValueOption(
        header=base_pb2.HeaderValue(
            key=names.SOURCE_HEADER,
            value="%CEL(xds.node.cluster)%.%CEL(xds.node.metadata.namespace)%"),
        append_action=base_pb2.HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD,
    )


def inbound_route(cluster_name: str) -> route_pb2.RouteConfiguration:
    """Inlined in the inbound listener: it never changes apart from the listener.

    The route timeout is disabled: the calling sidecar enforces the service's timeout,
    and Envoy's 15s default here would cut a longer policy timeout or a gRPC stream."""
    return route_pb2.RouteConfiguration(
        name=names.INBOUND_ROUTE,
        virtual_hosts=[
            route_components_pb2.VirtualHost(
                name=names.INBOUND_ROUTE,
                domains=["*"],
                routes=[
                    route_components_pb2.Route(
                        match=route_components_pb2.RouteMatch(prefix="/"),
                        route=route_components_pb2.RouteAction(
                            cluster=cluster_name, timeout=duration(timedelta(0))
                        ),
                    )
                ],
            )
        ],
    )


def virtual_hosts(
    service: Service, proxy_namespace: str, attached: Attachments | None = None
) -> list[route_components_pb2.VirtualHost]:
    """The first HTTP/gRPC port also takes the port-less Host forms (a client calling
    ``http://api/`` says no port); the others answer only with theirs. A port with
    Gateway API routes attached (``attached``) is routed by them."""
    routed = [port for port in service.service_ports if port.protocol in ("http", "grpc")]
    return [
        route_components_pb2.VirtualHost(
            name=names.virtual_host(service, port.port),
            domains=names.domains(service, proxy_namespace, port.port, bare=index == 0),
            routes=_port_routes(service, port, proxy_namespace, attached),
            request_headers_to_add=[source_header()] if service.external_name is None
            else [],
        )
        for index, port in enumerate(routed)
    ]


def _port_routes(service: Service, port: ServicePort, proxy_namespace: str,
                 attached: Attachments | None) -> list[route_components_pb2.Route]:
    rules = attached.for_service(service.key, port.port, proxy_namespace) if attached else []
    if not rules:
        return [*_extra_routes(service, port), _route(service, port)]
    # The routes replace the policy's split, match, timeout and retries (the route
    # wins, DESIGN.md); its other route features (fault, rate limit, fallback) apply.
    routes = rule_routes(rules, port)
    for route in routes:
        forwards = route.HasField("route")  # not a redirect, nor a 500 for no backend
        for feature in FEATURES:
            if feature.name not in ROUTE_OWNED and (forwards or feature.name not in ON_ACTION):
                feature.route(service, port, route)
    return routes


def _extra_routes(service: Service, port: ServicePort) -> list[route_components_pb2.Route]:
    """The features' routes ahead of the default one (first match wins in Envoy)."""
    extra = [route for feature in FEATURES for route in feature.routes(service, port)]
    for route in extra:
        for feature in FEATURES:
            feature.route(service, port, route)
    return extra


def _route(service: Service, port: ServicePort) -> route_components_pb2.Route:
    """Everything to the port's cluster; the governance features shape the rest."""
    route = route_components_pb2.Route(
        match=route_components_pb2.RouteMatch(prefix="/"),
        route=route_components_pb2.RouteAction(cluster=names.outbound_cluster(service, port.port)),
    )
    for feature in FEATURES:
        feature.route(service, port, route)
    return route
