"""Mesh mTLS: callers use it where the destination's endpoints have sidecars (Istio's
auto-mTLS), and each inbound listener accepts it by mode.

- Outbound: a service's clusters get a ``transport_socket_matches`` entry ``mtls``
  (upstream TLS, peer checked against the identities the service runs as), taken by the
  endpoints whose metadata says ``tlsMode: mtls`` (those with a sidecar); the others
  stay plaintext. A service in mode ``disable`` gets neither.
- Proxyless gRPC servers (endpoints marked ``proxyless``) serve plaintext unless their
  service is ``strict`` (gRPC cannot serve both on one port). Under ``strict`` their
  endpoints say ``tlsMode: mtls-grpc``, a second match whose TLS offers ``h2`` too (gRPC
  closes a connection that selects no ALPN); otherwise they carry no ``tlsMode``. A
  service without such endpoints gets exactly what it got before.
- Inbound: ``strict`` has only a TLS chain (a plaintext connection matches no chain and
  is closed); ``permissive`` adds a TLS chain for connections whose ClientHello offers
  the mesh ALPN, beside the plaintext one (so an app's own TLS still reaches it);
  ``disable`` keeps the plaintext chain alone. The TLS inspector reads the ClientHello.
- The caller's identity reaches the app: ``x-forwarded-client-cert`` is set from the
  verified client certificate (its URI SAN) and any such header from outside removed.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Final, TypeAlias

from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.endpoint.v3 import endpoint_components_pb2
from envoy.config.listener.v3 import listener_components_pb2, listener_pb2
from envoy.extensions.filters.listener.tls_inspector.v3 import tls_inspector_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import (
    http_connection_manager_pb2 as hcm_pb2,
)
from google.protobuf import struct_pb2

from controlplane.mesh.model import Endpoint, Service
from controlplane.mesh.security import has_sidecar, service_identities, takes_mtls
from controlplane.translator.protoutil import duration, pack
from controlplane.translator.security.base import Inbound, Port, SecurityFeature, Upstream
from controlplane.translator.security.tls import (
    GRPC_SERVER_ALPN,
    MESH_ALPN,
    downstream_socket,
    upstream_socket,
)

MATCH_METADATA: Final = "envoy.transport_socket_match"
MTLS_MATCH: Final = "mtls"
MTLS_GRPC_MATCH: Final = "mtls-grpc"
"""The match of a proxyless gRPC server's endpoints under strict (their TLS offers h2)."""
MTLS_MATCHES: Final = (MTLS_MATCH, MTLS_GRPC_MATCH)
TLS_INSPECTOR: Final = "envoy.filters.listener.tls_inspector"
# A client that sends nothing (a server-first protocol) is taken as plaintext after this
# long, rather than closed after Envoy's 15 s: permissive then gives it the plaintext
# chain, strict closes it all the same (no chain, or the one that closes plaintext), and
# a captured sidecar's ports that no service names still pass it through.
INSPECT_TIMEOUT: Final = timedelta(seconds=2)

_Chain: TypeAlias = listener_components_pb2.FilterChain
_Cluster = cluster_pb2.Cluster
_XFCC = hcm_pb2.HttpConnectionManager.ForwardClientCertDetails


class MutualTls(SecurityFeature):
    name = "mtls"

    def cluster(self, ctx: Upstream, service: Service, cluster: cluster_pb2.Cluster) -> None:
        if any(has_sidecar(service, e) for e in service.endpoints):
            cluster.transport_socket_matches.append(_match(ctx, service, MTLS_MATCH,
                                                           (MESH_ALPN,)))
        if any(e.proxyless and takes_mtls(service, e, ctx.mode) for e in service.endpoints):
            cluster.transport_socket_matches.append(_match(ctx, service, MTLS_GRPC_MATCH,
                                                           GRPC_SERVER_ALPN))

    def lb_endpoint(self, ctx: Upstream, service: Service, endpoint: Endpoint,
                    lb_endpoint: endpoint_components_pb2.LbEndpoint) -> None:
        if not takes_mtls(service, endpoint, ctx.mode):
            return
        fields = lb_endpoint.metadata.filter_metadata[MATCH_METADATA].fields
        fields["tlsMode"].string_value = MTLS_GRPC_MATCH if endpoint.proxyless else MTLS_MATCH

    def manager(self, ctx: Inbound, port: Port, manager: hcm_pb2.HttpConnectionManager) -> None:
        if ctx.identity is None:
            return
        manager.forward_client_cert_details = _XFCC.SANITIZE_SET
        manager.set_current_client_cert_details.uri = True

    def chains(self, ctx: Inbound, chain: _Chain, refuse: _Chain | None) -> list[_Chain]:
        if not ctx.mtls or ctx.identity is None:
            return [chain]
        secure = _Chain()
        secure.CopyFrom(chain)
        secure.name = f"{chain.name}~mtls" if chain.name else "mtls"
        secure.filter_chain_match.transport_protocol = "tls"
        secure.transport_socket.CopyFrom(downstream_socket(ctx.identity))
        if ctx.mode == "permissive":
            secure.filter_chain_match.application_protocols.append(MESH_ALPN)
            return [secure, chain]
        if refuse is None:
            return [secure]
        # strict behind a default chain (captured): plaintext for this port is closed
        # here, rather than passed through to the app by the default chain.
        closed = _Chain()
        closed.CopyFrom(refuse)
        closed.name = f"{chain.name}~plaintext" if chain.name else "plaintext"
        closed.filter_chain_match.CopyFrom(chain.filter_chain_match)
        return [secure, closed]

    def listener(self, ctx: Inbound, listener: listener_pb2.Listener) -> None:
        if not ctx.mtls:
            return
        listener.listener_filters.append(listener_components_pb2.ListenerFilter(
            name=TLS_INSPECTOR, typed_config=pack(tls_inspector_pb2.TlsInspector())))
        listener.listener_filters_timeout.CopyFrom(duration(INSPECT_TIMEOUT))
        listener.continue_on_listener_filters_timeout = True


def _match(ctx: Upstream, service: Service, name: str,
           alpn: tuple[str, ...]) -> cluster_pb2.Cluster.TransportSocketMatch:
    """The socket the endpoints whose ``tlsMode`` is ``name`` are called with."""
    match = struct_pb2.Struct()
    match.fields["tlsMode"].string_value = name
    return _Cluster.TransportSocketMatch(
        name=name, match=match,
        transport_socket=upstream_socket(ctx.identity, service.namespace,
                                         service_identities(service), alpn))
