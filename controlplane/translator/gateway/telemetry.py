"""A gateway's telemetry: the sidecars' JSON access log and tracing (issue 12), on the
connection managers and TCP proxies of its listeners. Pure.

What applies is read as for a sidecar of no service in the gateway's namespace: the
mesh's ``telemetry`` block, then its ``namespaces`` entry (a service's own block names a
service, and a gateway is none). A line names the gateway (``node.cluster``, the
Gateway's name, and its namespace) as source and the backend service (its cluster's
metadata) as destination, with ``direction: gateway``: the request entered the mesh
there. Spans name the gateway as their service. Metrics need nothing here: the
bootstrap's stats listener labels them (``bootstrap_stats.py``).
"""

from __future__ import annotations

from typing import Final

from envoy.config.accesslog.v3 import accesslog_pb2
from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.core.v3 import substitution_format_string_pb2
from envoy.config.listener.v3 import listener_pb2
from envoy.extensions.access_loggers.stream.v3 import stream_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import (
    http_connection_manager_pb2 as hcm_pb2,
)
from envoy.extensions.filters.network.tcp_proxy.v3 import tcp_proxy_pb2
from google.protobuf import struct_pb2

from controlplane.mesh.model import Mesh
from controlplane.proxy import ProxyIdentity
from controlplane.translator.listeners import HTTP_CONNECTION_MANAGER, TCP_PROXY
from controlplane.translator.protoutil import pack
from controlplane.translator.telemetry import Observed, observed, telemetry_clusters
from controlplane.translator.telemetry.access_log import STDOUT_LOGGER, log_format
from controlplane.translator.telemetry.tracing import manager_tracing

__all__ = ["DIRECTION", "gateway_clusters", "gateway_observed", "observe_gateway"]

DIRECTION: Final = "gateway"


def gateway_observed(mesh: Mesh, proxy: ProxyIdentity) -> Observed:
    """What the gateway records: the mesh's and its namespace's telemetry."""
    return observed(mesh, None, proxy)


def gateway_clusters(ctx: Observed) -> list[cluster_pb2.Cluster]:
    """The collector's cluster when tracing is on (the gateway's own)."""
    return telemetry_clusters(ctx)


def access_log(http: bool) -> accesslog_pb2.AccessLog:
    """A sidecar's outbound line (source: this proxy, destination: the cluster's
    service), marked ``direction: gateway``."""
    fields = struct_pb2.Struct()
    for key, value in {**log_format("outbound", http), "direction": DIRECTION}.items():
        fields.fields[key].string_value = value
    config = stream_pb2.StdoutAccessLog(
        log_format=substitution_format_string_pb2.SubstitutionFormatString(
            json_format=fields))
    return accesslog_pb2.AccessLog(name=STDOUT_LOGGER, typed_config=pack(config))


def observe_gateway(ctx: Observed, listeners: list[listener_pb2.Listener]) -> None:
    """Add the access log and tracing to every chain of ``listeners``, in place."""
    if not ctx.access_log and ctx.tracing is None:
        return
    for listener in listeners:
        for chain in listener.filter_chains:
            for found in chain.filters:
                if found.name == HTTP_CONNECTION_MANAGER:
                    manager = hcm_pb2.HttpConnectionManager()
                    found.typed_config.Unpack(manager)
                    if ctx.access_log:
                        manager.access_log.append(access_log(http=True))
                    if ctx.tracing is not None:
                        manager.tracing.CopyFrom(manager_tracing(ctx.tracing, ctx.service))
                    found.typed_config.CopyFrom(pack(manager))
                elif found.name == TCP_PROXY and ctx.access_log:
                    proxy = tcp_proxy_pb2.TcpProxy()
                    found.typed_config.Unpack(proxy)
                    proxy.access_log.append(access_log(http=False))
                    found.typed_config.CopyFrom(pack(proxy))
