"""How a sidecar reaches the control plane: the ADS gRPC service of its bootstrap.

Plaintext (the default) goes through Envoy's own gRPC client and a static cluster. A
secured sidecar (``--xds-ca``) uses the Google gRPC client instead: it is the one that
takes channel credentials (TLS, verifying the server against the mesh CA's bundle) and
call credentials, and its ``file_based_metadata`` plugin reads the token file again for
every new stream, so a token rotated on disk (a projected ServiceAccount token, a
re-minted file-mode token) is the one sent at the next reconnect. No agent in the pod.
"""

from __future__ import annotations

import ipaddress
from typing import Any

XDS_CLUSTER = "xds_cluster"
XDS_STAT_PREFIX = "xds_grpc"
TOKEN_HEADER_PREFIX = "Bearer "
"""The token goes out as ``authorization: Bearer <token>`` (the design's fixed header)."""
FILE_METADATA = "envoy.grpc_credentials.file_based_metadata"

# gRPC's default 4 MB limit is too small for big meshes (Istio #32644).
MAX_RECEIVE_MESSAGE_LENGTH = 256 * 1024 * 1024

# Envoy retries a lost xDS stream with a jittered back-off of 0.5 s doubling to 30 s
# (its defaults); after a server restart a sidecar could wait that long to come back.
# Capped at a second, a rollout of the control plane costs sidecars about a second.
XDS_RETRY_BACK_OFF = {"base_interval": "0.1s", "max_interval": "1s"}

# HTTP/2 keepalive of the xDS connection: a server that vanishes without a FIN is
# noticed in seconds rather than hours (both clients, in their own spelling).
KEEPALIVE_INTERVAL_S = 30
KEEPALIVE_TIMEOUT_S = 5


def ads_grpc_service(host: str, port: int, bundle_pem: str | None,
                     token_file: str | None) -> dict[str, Any]:
    """The one gRPC service of ``ads_config``: Envoy's client to the static cluster, or,
    with a trust bundle, the Google client over TLS (with the token when given)."""
    if bundle_pem is None:
        return {"envoy_grpc": {
            "cluster_name": XDS_CLUSTER,
            "max_receive_message_length": MAX_RECEIVE_MESSAGE_LENGTH,
            "retry_policy": {"retry_back_off": dict(XDS_RETRY_BACK_OFF)},
        }}
    google: dict[str, Any] = {
        "target_uri": _target(host, port),
        "stat_prefix": XDS_STAT_PREFIX,
        "channel_credentials": {"ssl_credentials": {
            "root_certs": {"inline_string": bundle_pem}}},
        "channel_args": {"args": {
            "grpc.max_receive_message_length": {"int_value": MAX_RECEIVE_MESSAGE_LENGTH},
            "grpc.keepalive_time_ms": {"int_value": KEEPALIVE_INTERVAL_S * 1000},
            "grpc.keepalive_timeout_ms": {"int_value": KEEPALIVE_TIMEOUT_S * 1000},
            # The channel's own reconnect back-off, capped like the stream's.
            "grpc.initial_reconnect_backoff_ms": {"int_value": 100},
            "grpc.max_reconnect_backoff_ms": {"int_value": 1000},
        }},
    }
    if token_file is not None:
        google["call_credentials"] = [{"from_plugin": {
            "name": FILE_METADATA,
            "typed_config": {
                "@type": "type.googleapis.com/envoy.config.grpc_credential.v3"
                ".FileBasedMetadataConfig",
                "secret_data": {"filename": token_file},
                "header_prefix": TOKEN_HEADER_PREFIX,
            },
        }}]
        google["credentials_factory_name"] = FILE_METADATA
    # No retry_policy: Envoy 1.40 reads the stream's back-off from envoy_grpc only (a
    # top-level one is accepted and ignored), so a secured sidecar retries with Envoy's
    # default, 0.5 s doubling to 30 s. The channel's reconnects are capped above.
    return {"google_grpc": google}


def xds_cluster(host: str, port: int) -> dict[str, Any]:
    """The static cluster of the xDS server (plaintext only): HTTP/2 with keepalives at
    both layers, so a server that vanishes without a FIN is noticed in seconds."""
    cluster: dict[str, Any] = {
        "name": XDS_CLUSTER,
        "type": "STATIC" if is_ip(host) else "STRICT_DNS",
        "connect_timeout": "1s",
        "load_assignment": {
            "cluster_name": XDS_CLUSTER,
            "endpoints": [
                {"lb_endpoints": [{"endpoint": {"address": socket_address(host, port)}}]}
            ],
        },
        "typed_extension_protocol_options": {
            "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3"
                ".HttpProtocolOptions",
                "explicit_http_config": {
                    "http2_protocol_options": {
                        "connection_keepalive": {"interval": f"{KEEPALIVE_INTERVAL_S}s",
                                                 "timeout": f"{KEEPALIVE_TIMEOUT_S}s"},
                    }
                },
            }
        },
        "upstream_connection_options": {
            "tcp_keepalive": {
                "keepalive_probes": 3,
                "keepalive_time": 30,
                "keepalive_interval": 5,
            }
        },
    }
    if not is_ip(host):
        # "localhost" may resolve to ::1 first while the server listens on IPv4 only.
        cluster["dns_lookup_family"] = "V4_PREFERRED"
    return cluster


def check_bundle(bundle_pem: str) -> None:
    """A bundle without a certificate would fail only at connect time, in Envoy's log."""
    if "-----BEGIN CERTIFICATE-----" not in bundle_pem:
        raise ValueError("--xds-ca must hold the control plane's trust bundle as PEM "
                         "certificates (-----BEGIN CERTIFICATE-----); give the CA "
                         "directory's roots.pem (or its ca.crt when it has no roots.pem)")


def _target(host: str, port: int) -> str:
    """gRPC target for the Google client: ``host:port``, ``[v6]:port`` for IPv6."""
    if is_ip(host) and ipaddress.ip_address(host).version == 6:
        return f"[{host}]:{port}"
    return f"{host}:{port}"


def socket_address(address: str, port: int) -> dict[str, Any]:
    return {"socket_address": {"address": address, "port_value": port}}


def is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True
