"""Listeners for proxyless gRPC servers (gRFC A36): what ``grpc.server(xds=True)`` asks for.

A gRPC server started with xDS asks for the Listener named by its bootstrap's
``server_listener_resource_name_template`` with ``%s`` replaced by the address it
listens on (``grpc/server?xds.resource.listening_address=10.0.0.7:50051``); it serves
only once the answer came, and checks that the Listener's address is that address. The
answers are made for the node's own service: every address a pod of it may listen on,
each endpoint's ``IP:PORT`` and the wildcards ``0.0.0.0:PORT`` and ``[::]:PORT``, for
every target port of its gRPC and HTTP ports (a TCP port has no HTTP to serve). All of
them are the same for every replica, so the group's snapshot stays shared.

Each Listener has one filter chain, by the service's mTLS mode:

- ``strict`` (with a mesh identity): TLS from the bootstrap's certificate provider
  (``bootstrap --grpc --cert-dir``, gRFC A29), a client certificate required and checked
  against the mesh roots. A server without certificates gets no Listener (it does not
  serve, rather than serve plaintext), and a note says what to add.
- ``permissive`` and ``disable``: plaintext. gRPC matches filter chains on addresses and
  ports only: a chain for ``transport_protocol: tls`` never matches, so one port cannot
  take both. Permissive is served as plaintext, which every caller can use (Istio makes
  the same choice), and noted.

The chain's connection manager has an inline route table of one virtual host ``*``
whose one route takes every call to the server's own methods (``non_forwarding_action``,
which A36 requires), and the RBAC filters of the service's authorization rules
(``server_rbac``) before the router, which gRPC demands last.
"""

from __future__ import annotations

import ipaddress
from typing import Final

from envoy.config.core.v3 import address_pb2, base_pb2
from envoy.config.listener.v3 import listener_components_pb2, listener_pb2
from envoy.config.route.v3 import route_components_pb2, route_pb2
from envoy.extensions.filters.http.router.v3 import router_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import (
    http_connection_manager_pb2 as hcm_pb2,
)
from envoy.extensions.transport_sockets.tls.v3 import common_pb2, tls_pb2
from google.protobuf import wrappers_pb2

from controlplane.mesh.model import Mesh, Service, ServicePort
from controlplane.security.grpc_certs import PROVIDER_INSTANCE
from controlplane.security.sds import CERT_SECRET, ROOT_SECRET
from controlplane.translator.protoutil import pack
from controlplane.translator.proxyless.listeners import ROUTER
from controlplane.translator.proxyless.notes import LeftOut
from controlplane.translator.proxyless.server_rbac import grpc_rbac_filters
from controlplane.translator.security import Inbound, Port, inbound
from controlplane.translator.security.tls import TRANSPORT_SOCKET_TLS

TEMPLATE: Final = "grpc/server?xds.resource.listening_address=%s"
"""The bootstrap's ``server_listener_resource_name_template`` (the form gRPC documents)."""
HCM: Final = "envoy.filters.network.http_connection_manager"
SERVER_ROUTE: Final = "grpc-inbound"
WILDCARDS: Final = ("0.0.0.0", "::")
MAX_ADDRESSES: Final = 256
"""Endpoint addresses named per target port; past it only the wildcards (noted)."""


def listening_address(host: str, port: int) -> str:
    """``host:port`` as gRPC writes an address into the template (IPv6 in brackets)."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def server_listener_name(host: str, port: int) -> str:
    return TEMPLATE.replace("%s", listening_address(host, port))


def server_listeners(mesh: Mesh, service: Service, certificates: bool,
                     left: LeftOut) -> list[listener_pb2.Listener]:
    """The Listeners a proxyless server of ``service`` may ask for, sorted by name;
    ``certificates``: its bootstrap has the mesh certificate provider."""
    ctx = inbound(mesh, service)
    strict = ctx is not None and ctx.mtls and ctx.mode == "strict"
    if ctx is not None and ctx.mtls and ctx.mode == "permissive":
        left.add("mTLS (PERMISSIVE: a proxyless gRPC server takes plaintext only, as it "
                 "cannot tell TLS from plaintext on one port; set STRICT to require mTLS)",
                 f"server of {service.key}")
    if strict and not certificates:
        left.add("the server listener (STRICT needs the mesh certificates: bootstrap "
                 "--grpc --grpc-server --cert-dir, and controlplane certs)",
                 f"server of {service.key}")
        return []
    made: dict[str, listener_pb2.Listener] = {}
    for service_port in service.service_ports:
        if service_port.protocol == "tcp":
            left.add("the server listener (a TCP port: gRPC serves HTTP/2 only)",
                     f"port {service_port.port} of {service.key}")
            continue
        chains: dict[int, listener_components_pb2.FilterChain] = {}
        for host, target in _addresses(service, service_port, left):
            name = server_listener_name(host, target)
            if name in made:  # two service ports on one target: the first decides
                continue
            chain = chains.get(target)
            if chain is None:  # one per target port: the addresses share it
                chain = chains[target] = _chain(ctx, Port(service_port, target), strict, left)
            made[name] = listener_pb2.Listener(
                name=name, filter_chains=[chain],
                address=address_pb2.Address(socket_address=address_pb2.SocketAddress(
                    address=host, port_value=target)))
    return [made[name] for name in sorted(made)]


def _addresses(service: Service, service_port: ServicePort,
               left: LeftOut) -> list[tuple[str, int]]:
    """Where pods of ``service`` serve ``service_port``: each IP endpoint's address and
    the wildcards, on each target port the endpoints name."""
    found: dict[int, list[str]] = {}
    for endpoint in service.endpoints:
        target = endpoint.port_for(service_port)
        if target is None or endpoint.is_dns:
            continue
        hosts = found.setdefault(target, [])
        if len(hosts) < MAX_ADDRESSES:
            hosts.append(str(ipaddress.ip_address(endpoint.address)))
        else:
            left.add(f"server listeners past {MAX_ADDRESSES} endpoint addresses (listen on "
                     "0.0.0.0 or [::], which are always served)",
                     f"port {target} of {service.key}")
    return [(host, target) for target, hosts in sorted(found.items())
            for host in sorted({*WILDCARDS, *hosts})]


def _chain(ctx: Inbound | None, on: Port, strict: bool,
           left: LeftOut) -> listener_components_pb2.FilterChain:
    manager = hcm_pb2.HttpConnectionManager(
        route_config=_ROUTES,
        http_filters=[*(grpc_rbac_filters(ctx, on, left) if ctx is not None else []),
                      hcm_pb2.HttpFilter(name=ROUTER, typed_config=_ROUTER)])
    chain = listener_components_pb2.FilterChain(
        name="mtls" if strict else "plaintext",
        filters=[listener_components_pb2.Filter(name=HCM, typed_config=pack(manager))])
    if strict:
        chain.transport_socket.CopyFrom(_server_mtls())
    return chain


def _server_mtls() -> base_pb2.TransportSocket:
    """Our certificate and the mesh roots from the bootstrap's provider; a client
    certificate required. gRPC servers check no SAN (they NACK a SAN matcher): any
    certificate of the mesh CA is accepted, and authorization names who may call."""
    context = tls_pb2.DownstreamTlsContext(
        common_tls_context=tls_pb2.CommonTlsContext(
            tls_certificate_provider_instance=common_pb2.CertificateProviderPluginInstance(
                instance_name=PROVIDER_INSTANCE, certificate_name=CERT_SECRET),
            validation_context=common_pb2.CertificateValidationContext(
                ca_certificate_provider_instance=common_pb2.CertificateProviderPluginInstance(
                    instance_name=PROVIDER_INSTANCE, certificate_name=ROOT_SECRET))),
        require_client_certificate=wrappers_pb2.BoolValue(value=True))
    return base_pb2.TransportSocket(name=TRANSPORT_SOCKET_TLS, typed_config=pack(context))


def _routes() -> route_pb2.RouteConfiguration:
    return route_pb2.RouteConfiguration(name=SERVER_ROUTE, virtual_hosts=[
        route_components_pb2.VirtualHost(name="inbound", domains=["*"], routes=[
            route_components_pb2.Route(
                match=route_components_pb2.RouteMatch(prefix="/"),
                non_forwarding_action=route_components_pb2.NonForwardingAction())])])


_ROUTES: Final = _routes()
_ROUTER: Final = pack(router_pb2.Router())
