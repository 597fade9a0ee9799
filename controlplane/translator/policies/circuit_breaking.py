"""``policy.circuit_breaker``: limits on connections, pending and active requests and
retries, per cluster. Set on every cluster, because one default is wrong for a mesh."""

from __future__ import annotations

from typing import Final

from envoy.config.cluster.v3 import circuit_breaker_pb2, cluster_pb2
from envoy.config.core.v3 import base_pb2

from controlplane.mesh.model import CircuitBreaker, Service, ServicePort
from controlplane.translator.policies.base import Feature
from controlplane.translator.protoutil import u32

# Envoy allows only 3 concurrent retries per cluster by default: during a rolling update
# every client retries at once and most retries are refused. Istio makes the same call.
DEFAULT_MAX_RETRIES: Final = 1024


class CircuitBreaking(Feature):
    name = "circuit_breaker"

    def cluster(self, service: Service, port: ServicePort, cluster: cluster_pb2.Cluster) -> None:
        cluster.circuit_breakers.CopyFrom(circuit_breakers(service.policy.circuit_breaker))


def circuit_breakers(policy: CircuitBreaker | None) -> circuit_breaker_pb2.CircuitBreakers:
    thresholds = circuit_breaker_pb2.CircuitBreakers.Thresholds(
        priority=base_pb2.RoutingPriority.DEFAULT,
        max_retries=u32(DEFAULT_MAX_RETRIES),
    )
    if policy is not None:
        if policy.max_connections is not None:
            thresholds.max_connections.value = policy.max_connections
        if policy.max_pending_requests is not None:
            thresholds.max_pending_requests.value = policy.max_pending_requests
        if policy.max_requests is not None:
            thresholds.max_requests.value = policy.max_requests
        if policy.max_retries is not None:
            thresholds.max_retries.value = policy.max_retries
    return circuit_breaker_pb2.CircuitBreakers(thresholds=[thresholds])
