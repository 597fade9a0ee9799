"""HTTPRoute ``timeouts`` and ``retry`` on the route's action.

``request`` is the route timeout (every try included); ``backendRequest`` bounds each
try: the retry policy's per-try timeout when the rule retries, else (one try) the route
timeout itself, when shorter. ``0s`` turns a timeout off, as in Envoy. ``retry``
retries connection failures and, when ``codes`` are given, those statuses."""

from __future__ import annotations

from datetime import timedelta
from typing import Final

from envoy.config.route.v3 import route_components_pb2

from controlplane.mesh.routes import Retry, Timeouts
from controlplane.translator.protoutil import duration, u32

RETRY_ON: Final = "connect-failure,refused-stream"
DEFAULT_ATTEMPTS: Final = 1


def apply(timeouts: Timeouts | None, retry: Retry | None,
          action: route_components_pb2.RouteAction) -> None:
    request = timeouts.request if timeouts is not None else None
    per_try = timeouts.backend_request if timeouts is not None else None
    if retry is not None:
        action.retry_policy.CopyFrom(retry_policy(retry))
        if per_try is not None:
            action.retry_policy.per_try_timeout.CopyFrom(duration(per_try))
    elif per_try is not None and per_try != timedelta(0) and (
            request is None or request == timedelta(0) or per_try < request):
        request = per_try  # a single try: its bound is the request's
    if request is not None:
        action.timeout.CopyFrom(duration(request))


def retry_policy(retry: Retry) -> route_components_pb2.RetryPolicy:
    on = RETRY_ON + (",retriable-status-codes" if retry.codes else "")
    policy = route_components_pb2.RetryPolicy(
        retry_on=on,
        num_retries=u32(DEFAULT_ATTEMPTS if retry.attempts is None else retry.attempts),
        retriable_status_codes=retry.codes or [])
    if retry.backoff is not None and retry.backoff > timedelta(0):
        policy.retry_back_off.base_interval.CopyFrom(duration(retry.backoff))
    return policy
