"""Retry policies for gRPC clients (gRFC A44): gRPC retries on gRPC status codes only.

A sidecar's ``retry_on`` names HTTP conditions; a gRPC client sees each of them as a
status, so each maps to the status the client would get (the HTTP-to-gRPC mapping):

| policy ``retries.on``                                   | gRPC status        |
|---------------------------------------------------------|--------------------|
| 5xx, gateway-error, reset, connect-failure, refused-stream | unavailable     |
| retriable-status-codes 429, 502, 503, 504               | unavailable        |
| cancelled, deadline-exceeded, internal, resource-exhausted, unavailable | the same |
| retriable-4xx, other status codes                        | (none: gRPC has no equivalent) |

A policy that maps to no status, or allows no retry, gives no retry policy.
``per_try_timeout`` and the host predicate are Envoy's only (A44 reads neither); the
attempts (gRPC caps them at 5) and the back-off are kept.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Final

from envoy.config.route.v3 import route_components_pb2

_GRPC_NAMES: Final = ("cancelled", "deadline-exceeded", "internal", "resource-exhausted",
                      "unavailable")
_AS_UNAVAILABLE: Final = frozenset({"5xx", "gateway-error", "reset", "connect-failure",
                                    "refused-stream"})
_STATUS_UNAVAILABLE: Final = frozenset({429, 502, 503, 504})


def grpc_retry_on(retry_on: Iterable[str], status_codes: Iterable[int] = ()) -> list[str]:
    """The gRPC status names for Envoy ``retry_on`` conditions, in gRPC's order."""
    wanted: set[str] = set()
    conditions = {c.strip() for c in retry_on if c.strip()}
    for condition in conditions:
        if condition in _GRPC_NAMES:
            wanted.add(condition)
        elif condition in _AS_UNAVAILABLE:
            wanted.add("unavailable")
    if "retriable-status-codes" in conditions and _STATUS_UNAVAILABLE & set(status_codes):
        wanted.add("unavailable")
    return [name for name in _GRPC_NAMES if name in wanted]


def grpc_retry_policy(
    policy: route_components_pb2.RetryPolicy,
) -> route_components_pb2.RetryPolicy | None:
    """``policy`` as gRPC reads it; None when nothing in it is retriable for gRPC, or it
    allows no retry (``attempts: 0``: gRPC NACKs ``num_retries`` 0)."""
    codes = grpc_retry_on(policy.retry_on.split(","), policy.retriable_status_codes)
    if not codes or (policy.HasField("num_retries") and policy.num_retries.value == 0):
        return None
    made = route_components_pb2.RetryPolicy(retry_on=",".join(codes))
    if policy.HasField("num_retries"):
        made.num_retries.CopyFrom(policy.num_retries)
    if policy.HasField("retry_back_off"):
        made.retry_back_off.CopyFrom(policy.retry_back_off)
    return made
