"""The JSON bootstrap a proxyless gRPC client reads (``GRPC_XDS_BOOTSTRAP``).

The format every gRPC library shares (gRFC A27; grpc-go, grpc-java, grpcio): the xDS
server with its channel credentials, and the node this client is. The node says
``kind: grpc`` (controlplane.proxy), so the server builds it a gRPC client's resources
(API listeners, a route table and clusters gRPC reads) whatever its user agent, in the
namespace that decides its bare names and visible services. With a certificate
directory (``--cert-dir``, kept current by ``controlplane certs``), the bootstrap has
the ``file_watcher`` certificate provider the server's clusters name (gRFC A29) and the
node says ``certificates: "true"``, so STRICT services are called with mTLS. Pure:
options in, text out.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from controlplane.bootstrap import parse_host_port
from controlplane.bootstrap_xds import is_ip
from controlplane.security import grpc_certs

SERVER_TEMPLATE = "grpc/server?xds.resource.listening_address=%s"
"""What a gRPC server asks for: ``%s`` is the address it listens on (gRFC A36). The
translator's ``server_listeners.TEMPLATE`` names the same."""
SERVER_FLAG = "grpc_server"
"""Node metadata saying the process serves (``"true"``): its group gets the listeners."""


@dataclass(frozen=True)
class GrpcBootstrapOptions:
    """What ``controlplane bootstrap --grpc`` takes; field names follow its flags."""

    node_id: str
    """``node.id``: unique per client process."""
    service: str
    """``node.cluster``: the service the client belongs to (its scoping rules apply)."""
    namespace: str = "default"
    """``node.metadata.namespace``: bare names (``xds:///reviews``) resolve in it."""
    xds_address: str = "127.0.0.1:18000"
    """HOST:PORT of the xDS server."""
    zone: str | None = None
    """``node.locality.zone``: endpoints in it are preferred."""
    xds_ca_file: str | None = None
    """The control plane's trust bundle (PEM file): xDS over TLS, verified against it."""
    token_file: str | None = None
    """The client's token, sent as a bearer token (needs ``xds_ca_file``)."""
    cert_dir: str | None = None
    """Where ``controlplane certs`` writes the workload's certificate, key and roots."""
    server: bool = False
    """The process also serves with ``grpc.server(xds=True)`` (gRFC A36): the bootstrap
    names its server listeners, which the control plane makes for ``service``."""


def build_grpc_bootstrap(options: GrpcBootstrapOptions) -> dict[str, Any]:
    host, port = parse_host_port(options.xds_address)
    if options.token_file and not options.xds_ca_file:
        raise ValueError("--token-file needs --xds-ca: a token is sent only over TLS")
    server: dict[str, Any] = {
        "server_uri": f"[{host}]:{port}" if is_ip(host) and ":" in host else f"{host}:{port}",
        "channel_creds": [{"type": "insecure"}],
        "server_features": ["xds_v3"],
    }
    if options.xds_ca_file:
        server["channel_creds"] = [{"type": "tls",
                                    "config": {"ca_certificate_file": options.xds_ca_file}}]
    if options.token_file:
        # gRFC A97: gRPC reads the file again as it changes (grpc-go, grpc-java; C-core
        # behind GRPC_EXPERIMENTAL_XDS_BOOTSTRAP_CALL_CREDS=true).
        server["call_creds"] = [{"type": "jwt_token_file",
                                 "config": {"jwt_token_file": options.token_file}}]
    node: dict[str, Any] = {
        "id": options.node_id,
        "cluster": options.service,
        "metadata": {"kind": "grpc", "namespace": options.namespace},
    }
    if options.zone:
        node["locality"] = {"zone": options.zone}
    made: dict[str, Any] = {"xds_servers": [server], "node": node}
    if options.cert_dir:
        node["metadata"][grpc_certs.NODE_FLAG] = "true"
        made["certificate_providers"] = certificate_providers(options.cert_dir)
    if options.server:
        node["metadata"][SERVER_FLAG] = "true"
        made["server_listener_resource_name_template"] = SERVER_TEMPLATE
    return made


def certificate_providers(cert_dir: str) -> dict[str, Any]:
    """gRPC's ``file_watcher`` provider over the files ``controlplane certs`` writes."""
    return {grpc_certs.PROVIDER_INSTANCE: {"plugin_name": "file_watcher", "config": {
        "certificate_file": f"{cert_dir}/{grpc_certs.CERT_FILE}",
        "private_key_file": f"{cert_dir}/{grpc_certs.KEY_FILE}",
        "ca_certificate_file": f"{cert_dir}/{grpc_certs.CA_FILE}",
        "refresh_interval": grpc_certs.REFRESH_INTERVAL}}}


def render_grpc_bootstrap(options: GrpcBootstrapOptions) -> str:
    return json.dumps(build_grpc_bootstrap(options), indent=2) + "\n"
