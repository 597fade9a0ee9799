"""``policy.circuit_breaker``: limits on connections, pending and active requests and
retries, per cluster; and ``policy.retries.budget``, which Envoy keeps in the same
thresholds. Set on every cluster, because one default is wrong for a mesh."""

from __future__ import annotations

from typing import Final

from envoy.config.cluster.v3 import circuit_breaker_pb2, cluster_pb2
from envoy.config.core.v3 import base_pb2
from envoy.type.v3 import percent_pb2

from controlplane.mesh.model import CircuitBreaker, RetryBudget, Service, ServicePort
from controlplane.translator.policies.base import Feature
from controlplane.translator.protoutil import u32

# Envoy allows only 3 concurrent retries per cluster by default: during a rolling update
# every client retries at once and most retries are refused. Istio makes the same call.
# Connections, pending and active requests keep Envoy's default of 1024 each when unset:
# that is per sidecar, i.e. per client instance, far above what one app instance sends
# to one service, and low enough to stop a runaway client; a tighter limit is a choice
# about a particular service, so it is left to its policy.
DEFAULT_MAX_RETRIES: Final = 1024


class CircuitBreaking(Feature):
    name = "circuit_breaker"

    def cluster(self, service: Service, port: ServicePort, cluster: cluster_pb2.Cluster) -> None:
        policy = service.policy
        budget = policy.retries.budget if policy.retries is not None else None
        cluster.circuit_breakers.CopyFrom(circuit_breakers(policy.circuit_breaker, budget))


def circuit_breakers(policy: CircuitBreaker | None,
                     budget: RetryBudget | None = None) -> circuit_breaker_pb2.CircuitBreakers:
    """A retry budget replaces ``max_retries`` in Envoy (it is ignored when both are
    set), so with a budget ``max_retries`` is left out rather than shown and unused."""
    thresholds = circuit_breaker_pb2.CircuitBreakers.Thresholds(
        priority=base_pb2.RoutingPriority.DEFAULT,
    )
    if budget is not None:
        thresholds.retry_budget.budget_percent.CopyFrom(percent_pb2.Percent(value=budget.percent))
        thresholds.retry_budget.min_retry_concurrency.value = budget.min_concurrency
    else:
        thresholds.max_retries.CopyFrom(u32(DEFAULT_MAX_RETRIES))
    if policy is not None:
        if policy.max_connections is not None:
            thresholds.max_connections.value = policy.max_connections
        if policy.max_pending_requests is not None:
            thresholds.max_pending_requests.value = policy.max_pending_requests
        if policy.max_requests is not None:
            thresholds.max_requests.value = policy.max_requests
        if policy.max_retries is not None and budget is None:
            thresholds.max_retries.value = policy.max_retries
    return circuit_breaker_pb2.CircuitBreakers(thresholds=[thresholds])
