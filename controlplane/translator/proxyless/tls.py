"""Mesh mTLS for a proxyless gRPC client's clusters (gRFC A29).

A sidecar's cluster to a service with sidecars carries a ``transport_socket_matches``
entry ``mtls`` (SDS secrets, peer SANs). gRPC reads neither socket matches nor SDS: it
takes one ``transport_socket`` per cluster whose ``CommonTlsContext`` names certificate
provider instances of its own bootstrap (``bootstrap --grpc --cert-dir``: the
``file_watcher`` provider, fed by ``controlplane certs``), and checks the server's
SANs by ``match_subject_alt_names`` (the field every gRPC language reads; the typed
one is not read everywhere). Every other TLS field is left unset: gRPC ignores or NACKs
them. The peer identities are the sidecars' own: the same SPIFFE IDs, exactly.
"""

from __future__ import annotations

from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.core.v3 import base_pb2
from envoy.extensions.transport_sockets.tls.v3 import common_pb2, tls_pb2
from envoy.type.matcher.v3 import string_pb2

from controlplane.security.grpc_certs import PROVIDER_INSTANCE
from controlplane.security.sds import CERT_SECRET, ROOT_SECRET
from controlplane.translator.protoutil import pack
from controlplane.translator.security.mtls import MTLS_MATCHES
from controlplane.translator.security.tls import TRANSPORT_SOCKET_TLS


def mesh_sans(cluster: cluster_pb2.Cluster) -> list[string_pb2.StringMatcher] | None:
    """The peer SANs a sidecar checks when it calls this cluster with mesh mTLS; None
    when the sidecars' cluster has no mTLS (no endpoint with a sidecar, or ``disable``)."""
    for match in cluster.transport_socket_matches:
        if match.name not in MTLS_MATCHES:  # a sidecar's or a proxyless server's
            continue
        context = tls_pb2.UpstreamTlsContext()
        if not match.transport_socket.typed_config.Unpack(context):
            return None
        common = context.common_tls_context
        validation = common.combined_validation_context.default_validation_context
        return [m.matcher for m in validation.match_typed_subject_alt_names
                if m.san_type == common_pb2.SubjectAltNameMatcher.URI]
    return None


def grpc_mtls_socket(sans: list[string_pb2.StringMatcher]) -> base_pb2.TransportSocket:
    """The client's mTLS as gRPC reads it: our certificate and the mesh roots from the
    bootstrap's provider instance, the server's SPIFFE ID among ``sans``."""
    context = tls_pb2.UpstreamTlsContext(common_tls_context=tls_pb2.CommonTlsContext(
        tls_certificate_provider_instance=common_pb2.CertificateProviderPluginInstance(
            instance_name=PROVIDER_INSTANCE, certificate_name=CERT_SECRET),
        validation_context=common_pb2.CertificateValidationContext(
            ca_certificate_provider_instance=common_pb2.CertificateProviderPluginInstance(
                instance_name=PROVIDER_INSTANCE, certificate_name=ROOT_SECRET),
            match_subject_alt_names=sans)))
    return base_pb2.TransportSocket(name=TRANSPORT_SOCKET_TLS, typed_config=pack(context))
