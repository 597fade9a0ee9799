"""Locality-aware load balancing: prefer the proxy's own zone, fail over to the others.

Endpoints in the proxy's zone get priority 0 and the rest priority 1, so Envoy sends
everything to its own zone while that zone is healthy, and spills over (by Envoy's
overprovisioning factor) as its endpoints fail or are ejected. A proxy without a zone,
or a service without endpoints in that zone, keeps the plain assignment.
"""

from __future__ import annotations

from envoy.config.endpoint.v3 import endpoint_pb2


def prefer_zone(assignment: endpoint_pb2.ClusterLoadAssignment,
                zone: str) -> endpoint_pb2.ClusterLoadAssignment | None:
    """The assignment with ``zone`` first, or None when nothing would change."""
    zones = {group.locality.zone for group in assignment.endpoints}
    if not zone or zone not in zones or zones == {zone}:
        return None
    preferred = endpoint_pb2.ClusterLoadAssignment()
    preferred.CopyFrom(assignment)
    for group in preferred.endpoints:
        group.priority = 0 if group.locality.zone == zone else 1
    return preferred
