"""TLS contexts of mesh mTLS: what a sidecar presents and what it accepts.

Every context names the two SDS secrets by their fixed names (``default``: the proxy's
own certificate and key; ``ROOTCA``: the trust bundle), fetched over ADS. The server
answers those names per stream from the stream's identity, so these contexts are the
same for every proxy: a group snapshot stays identity-free (issue 9's sharing).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Final

from envoy.config.core.v3 import base_pb2
from envoy.extensions.transport_sockets.tls.v3 import common_pb2, secret_pb2, tls_pb2
from envoy.type.matcher.v3 import string_pb2
from google.protobuf import wrappers_pb2

from controlplane.mesh.security import MeshIdentity
from controlplane.security.sds import CERT_SECRET, ROOT_SECRET
from controlplane.translator.protoutil import ads, pack

MESH_ALPN: Final = "controlplane-mtls"
"""What a sidecar offers when it calls another with mTLS: an inbound listener tells mesh
mTLS from an app's own TLS by it (both are TLS)."""
TRANSPORT_SOCKET_TLS: Final = "envoy.transport_sockets.tls"
GRPC_SERVER_ALPN: Final = (MESH_ALPN, "h2")
"""What a sidecar offers a proxyless gRPC server (STRICT): grpcio closes a TLS connection
that selects no ALPN, and selects ``h2`` when offered."""
SERVER_ALPN: Final = ("h2", "http/1.1")
"""What an inbound mTLS chain selects when the client offers it (gRPC requires one)."""

_SAN = common_pb2.SubjectAltNameMatcher


def _secret(name: str) -> secret_pb2.SdsSecretConfig:
    return secret_pb2.SdsSecretConfig(name=name, sds_config=ads())


def _common(sans: Iterable[string_pb2.StringMatcher],
            alpn: list[str]) -> tls_pb2.CommonTlsContext:
    """Our certificate, and the peer's checked against the bundle and ``sans``."""
    return tls_pb2.CommonTlsContext(
        tls_certificate_sds_secret_configs=[_secret(CERT_SECRET)],
        combined_validation_context=tls_pb2.CommonTlsContext.CombinedCertificateValidationContext(
            default_validation_context=common_pb2.CertificateValidationContext(
                match_typed_subject_alt_names=[_SAN(san_type=_SAN.URI, matcher=m)
                                               for m in sans]),
            validation_context_sds_secret_config=_secret(ROOT_SECRET),
        ),
        alpn_protocols=alpn,
    )


def upstream_socket(identity: MeshIdentity, namespace: str,
                    service_accounts: Iterable[str],
                    alpn: Iterable[str] = (MESH_ALPN,)) -> base_pb2.TransportSocket:
    """A client's mTLS to a service: the peer must be one of the identities the service
    runs as (``spiffe://<trust domain>/ns/<namespace>/sa/<account>``). ``alpn``: what it
    offers (a sidecar's inbound: the mesh ALPN; a proxyless server: ``GRPC_SERVER_ALPN``)."""
    sans = [string_pb2.StringMatcher(exact=identity.spiffe(namespace, account))
            for account in service_accounts]
    context = tls_pb2.UpstreamTlsContext(common_tls_context=_common(sans, list(alpn)))
    return base_pb2.TransportSocket(name=TRANSPORT_SOCKET_TLS, typed_config=pack(context))


def downstream_socket(identity: MeshIdentity) -> base_pb2.TransportSocket:
    """An inbound listener's mTLS: a client certificate is required, issued by the mesh
    bundle to a workload of the trust domain. A sidecar offers only the mesh ALPN, so
    none is selected and the HTTP connection manager tells HTTP/2 from HTTP/1.1 by the
    bytes; a proxyless gRPC client (gRFC A29) offers ``h2`` and refuses a server that
    selects no ALPN, so ``h2`` (and ``http/1.1``) are selected for a client offering them."""
    prefix = string_pb2.StringMatcher(prefix=f"spiffe://{identity.trust_domain}/")
    context = tls_pb2.DownstreamTlsContext(
        common_tls_context=_common([prefix], list(SERVER_ALPN)),
        require_client_certificate=wrappers_pb2.BoolValue(value=True),
    )
    return base_pb2.TransportSocket(name=TRANSPORT_SOCKET_TLS, typed_config=pack(context))
