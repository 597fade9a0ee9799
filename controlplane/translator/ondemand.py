"""On-demand sidecars: config fetched the first time the app calls a service.

An on-demand sidecar starts with its listeners, its own inbound cluster and an empty
egress route table that says where virtual hosts come from (VHDS over ADS). When the app
calls a Host the table does not know, Envoy's on-demand filter holds the request, asks
for ``egress/<host>`` (the route configuration's name, a slash, the Host header as sent)
and, once the virtual host is in, asks for the cluster its route points at (on-demand
CDS); then it replays the request. So a sidecar's memory follows the services its app
actually calls. Both need delta xDS (Envoy's VHDS and on-demand CDS speak nothing else).

Virtual hosts are served as their own resources, named ``egress/<virtual host name>``
(the same name inside the VirtualHost: Envoy keys the ones it holds by that name, so a
removal must use it), and answer the aliases ``egress/<domain>`` for each of their
domains. Pure functions, no I/O.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Final

from envoy.config.route.v3 import route_components_pb2, route_pb2
from envoy.extensions.filters.http.on_demand.v3 import on_demand_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import (
    http_connection_manager_pb2,
)
from google.protobuf.message import Message

from controlplane.mesh.model import Mesh
from controlplane.translator import names
from controlplane.translator.protoutil import ads, duration, pack
from controlplane.translator.routes import egress_route

ON_DEMAND: Final = "envoy.filters.http.on_demand"

# How long Envoy holds a first call while it fetches the cluster (Envoy's default is 5 s).
# The server answers at once, even for a cluster it does not have (a removal), so this
# only bounds a call when the control plane is unreachable.
CLUSTER_FETCH_TIMEOUT: Final = timedelta(seconds=5)


def on_demand_filter() -> http_connection_manager_pb2.HttpFilter:
    """The HTTP filter that fetches a missing virtual host (VHDS) and then a missing
    cluster (on-demand CDS over ADS) before the router sees the request."""
    config = on_demand_pb2.OnDemand(
        odcds=on_demand_pb2.OnDemandCds(source=ads(), timeout=duration(CLUSTER_FETCH_TIMEOUT))
    )
    return http_connection_manager_pb2.HttpFilter(name=ON_DEMAND, typed_config=pack(config))


def vhds_route() -> route_pb2.RouteConfiguration:
    """The egress route table of an on-demand sidecar: no virtual hosts, only where to
    fetch them. The same for every on-demand sidecar."""
    return route_pb2.RouteConfiguration(
        name=names.EGRESS_ROUTE, vhds=route_pb2.Vhds(config_source=ads())
    )


def vhds_name(host: str) -> str:
    """The VHDS name of a virtual host, or of a Host header (an alias)."""
    return f"{names.EGRESS_ROUTE}/{host}"


def virtual_hosts(
    mesh: Mesh, namespace: str
) -> tuple[list[tuple[str, Message]], dict[str, str]]:
    """The egress virtual hosts a sidecar in ``namespace`` may fetch, as VHDS resources
    ``(name, VirtualHost)``, and the aliases (``egress/<domain>`` -> resource name) that
    let a request's Host header find its virtual host. ``mesh`` holds only the services
    the sidecar may see. The same hosts, domains and routes as the full route table."""
    named: list[tuple[str, Message]] = []
    aliases: dict[str, str] = {}
    for host in egress_route(mesh, namespace).virtual_hosts:
        name = vhds_name(host.name)
        vhost = route_components_pb2.VirtualHost()
        vhost.CopyFrom(host)
        vhost.name = name
        named.append((name, vhost))
        for domain in host.domains:
            aliases[vhds_name(domain)] = name
    return named, aliases
