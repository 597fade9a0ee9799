"""Load assignments as a gRPC client reads them (gRFC A27).

gRPC drops a locality without ``load_balancing_weight``, so each gets the number of its
endpoints: calls spread over endpoints as evenly as Envoy's do. Priorities (the
proxy's own zone first) are kept; gRPC wants them contiguous from 0, which they are
unless a locality empties, so they are renumbered. An address listed twice is kept once
(gRPC refuses duplicates). Endpoint metadata (labels, the mTLS mark) is Envoy's only.
"""

from __future__ import annotations

from envoy.config.endpoint.v3 import endpoint_components_pb2, endpoint_pb2


def grpc_assignment(
    assignment: endpoint_pb2.ClusterLoadAssignment,
) -> endpoint_pb2.ClusterLoadAssignment:
    made = endpoint_pb2.ClusterLoadAssignment(cluster_name=assignment.cluster_name)
    seen: set[tuple[str, int]] = set()
    kept: list[endpoint_components_pb2.LocalityLbEndpoints] = []
    for group in assignment.endpoints:
        locality = endpoint_components_pb2.LocalityLbEndpoints(
            locality=group.locality, priority=group.priority)
        for lb in group.lb_endpoints:
            socket = lb.endpoint.address.socket_address
            key = (socket.address, socket.port_value)
            if key in seen:
                continue
            seen.add(key)
            endpoint = locality.lb_endpoints.add(health_status=lb.health_status)
            endpoint.endpoint.address.CopyFrom(lb.endpoint.address)
            if lb.HasField("load_balancing_weight"):
                endpoint.load_balancing_weight.CopyFrom(lb.load_balancing_weight)
        if locality.lb_endpoints:
            locality.load_balancing_weight.value = len(locality.lb_endpoints)
            kept.append(locality)
    order = {p: n for n, p in enumerate(sorted({group.priority for group in kept}))}
    for group in kept:
        group.priority = order[group.priority]
    made.endpoints.extend(kept)
    return made
