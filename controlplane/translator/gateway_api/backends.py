"""A rule's backendRefs as the route's action: one cluster, weighted clusters, or 500.

The spec: a backend that does not resolve keeps its share, which answers 500 (a
weighted cluster that does not exist, with Envoy told to answer 500 for it); legs of
weight 0 get nothing; no backend with weight (or none at all, without a redirect):
every request answers 500. A GRPCRoute's rule answers 503 instead, which Envoy sends a
gRPC client as UNAVAILABLE, as the GRPCRoute spec asks (a 500 would be UNKNOWN)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Final

from envoy.config.route.v3 import route_components_pb2

from controlplane.mesh.attach import ResolvedBackend, ResolvedRule
from controlplane.translator.gateway_api.filters import apply_header_filters
from controlplane.translator.protoutil import u32

UNRESOLVED: Final = "unresolved-backend"  # the prefix of a missing backend's cluster name
SERVER_ERROR: Final = 500
UNAVAILABLE: Final = 503  # gRPC's UNAVAILABLE, in Envoy's local reply to a gRPC call


def no_backend(route: route_components_pb2.Route, grpc: bool = False) -> None:
    route.ClearField("route")
    route.direct_response.status = UNAVAILABLE if grpc else SERVER_ERROR


def set_backends(rule: ResolvedRule, backends: Sequence[ResolvedBackend],
                 route: route_components_pb2.Route) -> bool:
    """Fill ``route.route`` with the backends; False when every request answers 500
    (``route`` then has a direct response)."""
    live = [(index, b) for index, b in enumerate(backends) if b.weight > 0]
    if not live or all(b.cluster is None for _, b in live):
        no_backend(route, rule.grpc)
        return False
    action = route.route
    if len(live) == 1 and not live[0][1].filters:
        action.cluster = live[0][1].cluster or ""
        return True
    for index, backend in live:
        name = backend.cluster or f"{UNRESOLVED}|{'/'.join(rule.route)}|{rule.rule}|{index}"
        weighted = route_components_pb2.WeightedCluster.ClusterWeight(
            name=name, weight=u32(backend.weight))
        apply_header_filters(backend.filters, weighted)
        action.weighted_clusters.clusters.append(weighted)
    if any(b.cluster is None for _, b in live) and not rule.grpc:
        action.cluster_not_found_response_code = (
            route_components_pb2.RouteAction.INTERNAL_SERVER_ERROR)
    # (a gRPC rule keeps Envoy's default for a missing cluster: 503, UNAVAILABLE)
    return True


def names_unresolved(route: route_components_pb2.Route) -> bool:
    """Whether a route sends a share to a backend that did not resolve (a cluster name
    that exists nowhere, answering 500 for HTTP and 503 for gRPC)."""
    return route.route.cluster.startswith(UNRESOLVED) or any(
        weighted.name.startswith(UNRESOLVED)
        for weighted in route.route.weighted_clusters.clusters)
