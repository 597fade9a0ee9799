"""Clusters: one per service port (EDS, or DNS for an external service and for one whose
endpoints are DNS names), plus the sidecar's static inbound cluster."""

from __future__ import annotations

from datetime import timedelta
from typing import Final

from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.core.v3 import protocol_pb2
from envoy.extensions.upstreams.http.v3 import http_protocol_options_pb2

from controlplane.mesh.model import (
    Protocol,
    Service,
    ServicePort,
)
from controlplane.proxy import ProxyIdentity
from controlplane.translator import names
from controlplane.translator.endpoints import load_assignment, static_assignment
from controlplane.translator.policies import FEATURES
from controlplane.translator.policies.traffic import subset_name, subset_ports, subsets
from controlplane.translator.protoutil import ads, duration, pack
from controlplane.translator.security import Upstream, secure_cluster

CONNECT_TIMEOUT: Final = timedelta(seconds=1)
HTTP_PROTOCOL_OPTIONS: Final = "envoy.extensions.upstreams.http.v3.HttpProtocolOptions"
LOCALHOST: Final = "127.0.0.1"

_Cluster = cluster_pb2.Cluster


def outbound_clusters(service: Service,
                      upstream: Upstream | None = None) -> list[cluster_pb2.Cluster]:
    """One cluster per service port, in port order, then one per label subset that the
    service's traffic policy names, for each HTTP/gRPC port (policies/traffic.py).
    ``upstream``: how to call it with mTLS (translator/security)."""
    return [
        *(outbound_cluster(service, port, upstream=upstream) for port in service.service_ports),
        *(
            outbound_cluster(service, port, labels, upstream)
            for port in subset_ports(service)
            for labels in subsets(service)
        ),
    ]


def outbound_cluster(
    service: Service, port: ServicePort, subset: dict[str, str] | None = None,
    upstream: Upstream | None = None,
) -> cluster_pb2.Cluster:
    """Endpoints come by EDS, so an endpoint change does not touch (and re-warm) the
    cluster. An external service has no endpoints to send: Envoy resolves its DNS name
    itself (STRICT_DNS, every address it returns is a host); so does a service whose
    endpoints are DNS names (``address_type: dns``), whose assignment, with zones,
    labels and health, is then inline. ``policy.connect_timeout`` bounds each new
    connection (``CONNECT_TIMEOUT`` otherwise). A subset cluster is built as the port's own,
    every feature included; only its name and endpoints differ."""
    name = names.outbound_cluster(service, port.port, subset_name(subset) if subset else "")
    connect_timeout = service.policy.connect_timeout or CONNECT_TIMEOUT
    cluster = _Cluster(name=name, connect_timeout=duration(connect_timeout))
    # Which service the cluster is for: the access log's destination_service.
    cluster.metadata.filter_metadata[names.METADATA].fields["service"].string_value = (
        service.key)
    if service.external_name is not None:
        cluster.type = _Cluster.DiscoveryType.STRICT_DNS
        cluster.dns_lookup_family = _Cluster.DnsLookupFamily.V4_PREFERRED
        cluster.load_assignment.CopyFrom(static_assignment(name, service.external_name, port.port))
    elif service.resolves_dns:
        cluster.type = _Cluster.DiscoveryType.STRICT_DNS
        cluster.dns_lookup_family = _Cluster.DnsLookupFamily.V4_PREFERRED
        cluster.load_assignment.CopyFrom(load_assignment(service, port, subset, upstream))
    else:
        cluster.type = _Cluster.DiscoveryType.EDS
        cluster.eds_cluster_config.CopyFrom(
            _Cluster.EdsClusterConfig(eds_config=ads(), service_name=name)
        )
    if port.protocol == "grpc":
        use_http2(cluster)
    for feature in FEATURES:
        feature.cluster(service, port, cluster)
    if upstream is not None:
        secure_cluster(upstream, service, cluster)
    return cluster


def inbound_cluster(proxy: ProxyIdentity, own: Service | None) -> cluster_pb2.Cluster | None:
    """The app behind the sidecar, reached on loopback. ``own`` is the proxy's service
    when the mesh knows it; its protocol decides whether the app speaks HTTP/2."""
    if proxy.inbound_port is None or proxy.app_port is None:
        return None
    name = names.inbound_cluster(proxy.service, proxy.namespace, proxy.inbound_port)
    cluster = _Cluster(
        name=name,
        type=_Cluster.DiscoveryType.STATIC,
        connect_timeout=duration(CONNECT_TIMEOUT),
        load_assignment=static_assignment(name, LOCALHOST, proxy.app_port),
    )
    if inbound_protocol(own, proxy.inbound_port) == "grpc":
        use_http2(cluster)
    return cluster


def inbound_protocol(own: Service | None, inbound_port: int) -> Protocol:
    """What the app behind an inbound listener speaks (unknown service: http)."""
    return "http" if own is None else inbound_service_port(own, inbound_port).protocol


def inbound_service_port(own: Service, inbound_port: int) -> ServicePort:
    """The service port an inbound listener serves. An endpoint's port is its sidecar's
    inbound port, so with named ports the port that endpoints serve on ``inbound_port``
    says which; otherwise the first port."""
    for port in own.service_ports:
        if any(endpoint.port_for(port) == inbound_port for endpoint in own.endpoints):
            return port
    return own.service_ports[0]


def use_http2(cluster: cluster_pb2.Cluster) -> None:
    """gRPC needs HTTP/2 upstream; plain HTTP keeps Envoy's HTTP/1.1 default."""
    options = http_protocol_options_pb2.HttpProtocolOptions(
        explicit_http_config=http_protocol_options_pb2.HttpProtocolOptions.ExplicitHttpConfig(
            http2_protocol_options=protocol_pb2.Http2ProtocolOptions()
        )
    )
    cluster.typed_extension_protocol_options[HTTP_PROTOCOL_OPTIONS].CopyFrom(pack(options))
