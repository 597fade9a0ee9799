"""Tracing: Envoy's OpenTelemetry tracer, spans sent over OTLP/gRPC to a collector.

The collector is a cluster of the sidecar's own (the group's), named after its address;
a DNS name is resolved by Envoy (STRICT_DNS), an IP address is used as it is. Spans name
the sidecar's service (``name.namespace``). With no tracer, Envoy still generates
``x-request-id`` and passes a ``traceparent`` through untouched.
"""

from __future__ import annotations

import ipaddress
from datetime import timedelta
from typing import Final

from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.core.v3 import grpc_service_pb2
from envoy.config.trace.v3 import http_tracer_pb2, opentelemetry_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import (
    http_connection_manager_pb2 as hcm_pb2,
)
from envoy.type.v3 import percent_pb2

from controlplane.mesh.telemetry import Tracing
from controlplane.translator.clusters import use_http2
from controlplane.translator.endpoints import static_assignment
from controlplane.translator.protoutil import duration, pack

OPENTELEMETRY: Final = "envoy.tracers.opentelemetry"
CONNECT_TIMEOUT: Final = timedelta(seconds=1)

_Cluster = cluster_pb2.Cluster


def collector_cluster_name(tracing: Tracing) -> str:
    return f"opentelemetry|{tracing.address}"


def _host_port(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    return host.strip("[]"), int(port)


def collector_cluster(tracing: Tracing) -> cluster_pb2.Cluster:
    """HTTP/2 to the collector's OTLP/gRPC port."""
    assert tracing.address is not None  # the model demands it when tracing is on
    name = collector_cluster_name(tracing)
    host, port = _host_port(tracing.address)
    try:
        ipaddress.ip_address(host)
        kind = _Cluster.DiscoveryType.STATIC
    except ValueError:
        kind = _Cluster.DiscoveryType.STRICT_DNS
    cluster = _Cluster(name=name, type=kind, connect_timeout=duration(CONNECT_TIMEOUT),
                       load_assignment=static_assignment(name, host, port))
    if kind == _Cluster.DiscoveryType.STRICT_DNS:
        cluster.dns_lookup_family = _Cluster.DnsLookupFamily.V4_PREFERRED
    use_http2(cluster)
    return cluster


def manager_tracing(tracing: Tracing, service: str) -> hcm_pb2.HttpConnectionManager.Tracing:
    """The HTTP connection manager's ``tracing``: ``sampling`` percent of requests start
    a trace (one that arrives sampled is continued whatever it says)."""
    config = opentelemetry_pb2.OpenTelemetryConfig(
        grpc_service=grpc_service_pb2.GrpcService(
            envoy_grpc=grpc_service_pb2.GrpcService.EnvoyGrpc(
                cluster_name=collector_cluster_name(tracing))),
        service_name=service,
    )
    return hcm_pb2.HttpConnectionManager.Tracing(
        random_sampling=percent_pb2.Percent(value=tracing.sampling),
        provider=http_tracer_pb2.Tracing.Http(name=OPENTELEMETRY, typed_config=pack(config)),
    )
