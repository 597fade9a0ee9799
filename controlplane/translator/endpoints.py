"""ClusterLoadAssignments: a service's endpoints as EDS serves them, one per port."""

from __future__ import annotations

from itertools import groupby

from envoy.config.core.v3 import base_pb2, health_check_pb2
from envoy.config.endpoint.v3 import endpoint_components_pb2, endpoint_pb2

from controlplane.mesh.model import Endpoint, Service, ServicePort
from controlplane.translator import names
from controlplane.translator.policies.traffic import in_subset, subset_name, subset_ports, subsets
from controlplane.translator.protoutil import socket_address, struct
from controlplane.translator.security import Upstream, secure_lb_endpoint

# Where endpoint labels go; subset load balancing reads this namespace.
LB_METADATA = "envoy.lb"

_HealthStatus = health_check_pb2.HealthStatus


def load_assignments(service: Service,
                     upstream: Upstream | None = None) -> list[endpoint_pb2.ClusterLoadAssignment]:
    """One per service port, as the clusters; none for an external service or one whose
    endpoints are DNS names: those clusters resolve DNS themselves, assignment inline."""
    if service.external_name is not None or service.resolves_dns:
        return []
    return [
        *(load_assignment(service, port, upstream=upstream) for port in service.service_ports),
        *(
            load_assignment(service, port, labels, upstream)
            for port in subset_ports(service)
            for labels in subsets(service)
        ),
    ]


def load_assignment(
    service: Service, port: ServicePort, subset: dict[str, str] | None = None,
    upstream: Upstream | None = None,
) -> endpoint_pb2.ClusterLoadAssignment:
    """Always a CLA, even an empty one: an EDS cluster without one stays warming and
    holds back every listener update behind it. An endpoint that does not serve
    ``port`` is left out of it, and so is one without the ``subset`` labels, if given.
    With ``upstream``, an endpoint with a sidecar is marked for mTLS (security/mtls.py)."""
    kept = [
        (ep, target, status)
        for ep in service.endpoints
        if (target := ep.port_for(port)) is not None and (status := _health(ep)) is not None
        and (subset is None or in_subset(ep, subset))
    ]
    kept.sort(key=lambda item: (item[0].zone or "", item[0].address, item[1]))
    localities = [
        endpoint_components_pb2.LocalityLbEndpoints(
            locality=base_pb2.Locality(zone=zone),
            lb_endpoints=[_lb_endpoint(ep, target, status, service, upstream)
                          for ep, target, status in group],
        )
        for zone, group in groupby(kept, key=lambda item: item[0].zone or "")
    ]
    return endpoint_pb2.ClusterLoadAssignment(
        cluster_name=names.outbound_cluster(
            service, port.port, subset_name(subset) if subset is not None else ""
        ),
        endpoints=localities,
    )


def static_assignment(
    cluster_name: str, address: str, port: int
) -> endpoint_pb2.ClusterLoadAssignment:
    """The one-host assignment of a STATIC cluster (the sidecar's own app)."""
    return endpoint_pb2.ClusterLoadAssignment(
        cluster_name=cluster_name,
        endpoints=[
            endpoint_components_pb2.LocalityLbEndpoints(
                lb_endpoints=[
                    endpoint_components_pb2.LbEndpoint(
                        endpoint=endpoint_components_pb2.Endpoint(
                            address=socket_address(address, port)
                        )
                    )
                ]
            )
        ],
    )


def _health(endpoint: Endpoint) -> int | None:
    """EndpointSlice conditions: a terminating pod that still serves drains its open
    requests instead of being cut off; one that neither is ready nor serves is dropped."""
    if endpoint.ready:
        return int(_HealthStatus.HEALTHY)
    if endpoint.is_serving and endpoint.terminating:
        return int(_HealthStatus.DRAINING)
    return None


def _lb_endpoint(endpoint: Endpoint, port: int, status: int, service: Service,
                 upstream: Upstream | None) -> endpoint_components_pb2.LbEndpoint:
    lb_endpoint = endpoint_components_pb2.LbEndpoint(
        endpoint=endpoint_components_pb2.Endpoint(address=socket_address(endpoint.address, port)),
        health_status=status,
    )
    if endpoint.labels:
        lb_endpoint.metadata.filter_metadata[LB_METADATA].CopyFrom(struct(endpoint.labels))
    if upstream is not None:
        secure_lb_endpoint(upstream, service, endpoint, lb_endpoint)
    return lb_endpoint
