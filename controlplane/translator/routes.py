"""RouteConfigurations: the egress table (by Host header) and the inbound one."""

from __future__ import annotations

from datetime import timedelta

from envoy.config.route.v3 import route_components_pb2, route_pb2

from controlplane.mesh.model import Mesh, Retries, Service, ServicePort
from controlplane.translator import names
from controlplane.translator.protoutil import duration, u32

_RETRIABLE_STATUS_CODES = "retriable-status-codes"


def egress_route(mesh: Mesh, namespace: str) -> route_pb2.RouteConfiguration:
    """One virtual host per HTTP or gRPC service port, the proxy's own service included
    (a service may call itself). TCP ports have no Host header to route on. Only the
    proxy's namespace matters (for bare service names), so proxies of a namespace share
    it."""
    hosts = [host for service in mesh.services for host in _virtual_hosts(service, namespace)]
    hosts.sort(key=lambda host: str(host.name))
    return route_pb2.RouteConfiguration(name=names.EGRESS_ROUTE, virtual_hosts=hosts)


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


def _virtual_hosts(
    service: Service, proxy_namespace: str
) -> list[route_components_pb2.VirtualHost]:
    """The first HTTP/gRPC port also takes the port-less Host forms (a client calling
    ``http://api/`` says no port); the others answer only with theirs."""
    routed = [port for port in service.service_ports if port.protocol in ("http", "grpc")]
    return [
        route_components_pb2.VirtualHost(
            name=names.virtual_host(service, port.port),
            domains=names.domains(service, proxy_namespace, port.port, bare=index == 0),
            routes=[
                route_components_pb2.Route(
                    match=route_components_pb2.RouteMatch(prefix="/"),
                    route=_route_action(service, port),
                )
            ],
        )
        for index, port in enumerate(routed)
    ]


def _route_action(service: Service, port: ServicePort) -> route_components_pb2.RouteAction:
    policy = service.policy
    action = route_components_pb2.RouteAction(cluster=names.outbound_cluster(service, port.port))
    if policy.timeout is not None:
        action.timeout.CopyFrom(duration(policy.timeout))
    if policy.retries is not None:
        action.retry_policy.CopyFrom(_retry_policy(policy.retries))
    return action


def _retry_policy(retries: Retries) -> route_components_pb2.RetryPolicy:
    """Status codes only count when ``retry_on`` names ``retriable-status-codes``; a
    policy that lists codes clearly wants them retried, so the condition is added."""
    retry_on: list[str] = list(retries.on)
    if retries.retriable_status_codes and _RETRIABLE_STATUS_CODES not in retry_on:
        retry_on.append(_RETRIABLE_STATUS_CODES)
    policy = route_components_pb2.RetryPolicy(
        retry_on=",".join(retry_on),
        num_retries=u32(retries.attempts),
        retriable_status_codes=retries.retriable_status_codes,
    )
    if retries.per_try_timeout is not None:
        policy.per_try_timeout.CopyFrom(duration(retries.per_try_timeout))
    return policy
