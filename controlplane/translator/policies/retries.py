"""``policy.retries``: how often, on what, and how long each try may take."""

from __future__ import annotations

from envoy.config.route.v3 import route_components_pb2

from controlplane.mesh.model import Retries as RetriesPolicy
from controlplane.mesh.model import Service, ServicePort
from controlplane.translator.policies.base import Feature
from controlplane.translator.protoutil import duration, u32

_RETRIABLE_STATUS_CODES = "retriable-status-codes"


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
    )
    if retries.per_try_timeout is not None:
        policy.per_try_timeout.CopyFrom(duration(retries.per_try_timeout))
    return policy
