"""``policy.retries``: how often, on what, how long each try may take, how long to wait
between tries, and never on the host that just failed when there is another. The retry
budget is a cluster limit; ``circuit_breaking`` sets it, with the other limits."""

from __future__ import annotations

from typing import Final

from envoy.config.route.v3 import route_components_pb2
from envoy.extensions.retry.host.previous_hosts.v3 import previous_hosts_pb2

from controlplane.mesh.model import Retries as RetriesPolicy
from controlplane.mesh.model import Service, ServicePort
from controlplane.translator.policies.base import Feature
from controlplane.translator.protoutil import duration, pack, u32

_RETRIABLE_STATUS_CODES = "retriable-status-codes"
_PREVIOUS_HOSTS: Final = "envoy.retry_host_predicates.previous_hosts"
# How often Envoy re-picks a host that the predicate refused before taking it anyway
# (Istio's value): with one healthy host left, the retry still happens.
HOST_SELECTION_ATTEMPTS: Final = 5


class Retries(Feature):
    name = "retries"

    def route(self, service: Service, port: ServicePort,
              route: route_components_pb2.Route) -> None:
        if service.policy.retries is not None:
            route.route.retry_policy.CopyFrom(retry_policy(service.policy.retries))


def retry_policy(retries: RetriesPolicy) -> route_components_pb2.RetryPolicy:
    """Status codes only count when ``retry_on`` names ``retriable-status-codes``; a
    policy that lists codes clearly wants them retried, so the condition is added."""
    retry_on: list[str] = list(retries.on)
    if retries.retriable_status_codes and _RETRIABLE_STATUS_CODES not in retry_on:
        retry_on.append(_RETRIABLE_STATUS_CODES)
    policy = route_components_pb2.RetryPolicy(
        retry_on=",".join(retry_on),
        num_retries=u32(retries.attempts),
        retriable_status_codes=retries.retriable_status_codes,
        retry_host_predicate=[route_components_pb2.RetryPolicy.RetryHostPredicate(
            name=_PREVIOUS_HOSTS,
            typed_config=pack(previous_hosts_pb2.PreviousHostsPredicate()),
        )],
        host_selection_retry_max_attempts=HOST_SELECTION_ATTEMPTS,
    )
    if retries.per_try_timeout is not None:
        policy.per_try_timeout.CopyFrom(duration(retries.per_try_timeout))
    if retries.backoff is not None:
        policy.retry_back_off.base_interval.CopyFrom(duration(retries.backoff.base_interval))
        if retries.backoff.max_interval is not None:
            policy.retry_back_off.max_interval.CopyFrom(duration(retries.backoff.max_interval))
    return policy
