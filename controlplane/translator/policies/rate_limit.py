"""``policy.rate_limit``: a local token bucket per calling sidecar, 429 past it.

The egress listener carries Envoy's local rate limit filter without a bucket, which
limits nothing; each route to a rate-limited service brings its own bucket (shared by
the sidecar's workers), so one service's limit never counts another's calls. A captured
sidecar also limits what its own app receives, with a bucket of its own (inbound)."""

from __future__ import annotations

import math
from datetime import timedelta
from fractions import Fraction
from typing import Final

from envoy.config.core.v3 import base_pb2
from envoy.config.route.v3 import route_components_pb2
from envoy.extensions.filters.http.local_ratelimit.v3 import local_rate_limit_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import (
    http_connection_manager_pb2 as hcm_pb2,
)
from envoy.type.v3 import http_status_pb2, percent_pb2, token_bucket_pb2

from controlplane.mesh.model import RateLimit as RateLimitPolicy
from controlplane.mesh.model import Service, ServicePort
from controlplane.translator.policies.base import Feature
from controlplane.translator.protoutil import duration, pack, u32

RATE_LIMIT_FILTER: Final = "envoy.filters.http.local_ratelimit"
STAT_PREFIX: Final = "egress_rate_limit"
INBOUND_STAT_PREFIX: Final = "inbound_rate_limit"
LIMITED_HEADER: Final = "x-local-rate-limit"
_MIN_FILL: Final = Fraction(1, 20)  # Envoy refuses a fill_interval under 50ms
_MICROS: Final = 10**6


class RateLimit(Feature):
    name = "rate_limit"

    def http_filters(self) -> list[hcm_pb2.HttpFilter]:
        config = local_rate_limit_pb2.LocalRateLimit(stat_prefix=STAT_PREFIX)
        return [hcm_pb2.HttpFilter(name=RATE_LIMIT_FILTER, typed_config=pack(config))]

    def inbound_http_filters(self, service: Service,
                             port: ServicePort) -> list[hcm_pb2.HttpFilter]:
        """A captured pod takes at most ``requests_per_second`` itself (its own bucket),
        so callers outside the mesh, or past the callers' own buckets, are limited too."""
        if service.policy.rate_limit is None:
            return []
        config = local_rate_limit(service.policy.rate_limit)
        config.stat_prefix = INBOUND_STAT_PREFIX
        return [hcm_pb2.HttpFilter(name=RATE_LIMIT_FILTER, typed_config=pack(config))]

    def route(self, service: Service, port: ServicePort,
              route: route_components_pb2.Route) -> None:
        if service.policy.rate_limit is not None:
            route.typed_per_filter_config[RATE_LIMIT_FILTER].CopyFrom(
                pack(local_rate_limit(service.policy.rate_limit))
            )


def fill(requests_per_second: float, most: int | None = None) -> tuple[int, timedelta]:
    """(tokens_per_fill, fill_interval) for ``requests_per_second``, in O(1).

    Exact when it can be: the fewest tokens whose interval is a whole number of
    microseconds and at least 50ms (100 rps: 5 tokens every 50ms; 3 rps: 3 every second;
    0.5 rps: 1 every 2s). An exact fill of 12345.677 rps would be 12,345,677 tokens every
    1000s, a bucket that ignores any burst; when the exact fill holds more than ``most``
    tokens (the bucket's size), the fewest tokens per >=50ms are used instead, with the
    interval rounded to the microsecond: off by under 0.002%."""
    rate = Fraction(round(requests_per_second * 1000), 1000)
    least = max(1, math.ceil(rate * _MIN_FILL))  # tokens per fill for an interval >= 50ms
    # interval = tokens / rate is whole microseconds iff tokens is a multiple of `step`.
    step = rate.numerator // math.gcd(rate.numerator, rate.denominator * _MICROS)
    exact = step * math.ceil(Fraction(least, step))
    if most is None or exact <= max(most, least):
        return exact, timedelta(microseconds=int(Fraction(exact) / rate * _MICROS))
    micros = max(round(Fraction(least) / rate * _MICROS), math.ceil(_MIN_FILL * _MICROS))
    return least, timedelta(microseconds=micros)


def token_bucket(policy: RateLimitPolicy) -> token_bucket_pb2.TokenBucket:
    """The bucket holds ``burst`` tokens (default: one second's worth), and never less
    than one fill, else part of each fill would be lost and the rate fall short."""
    burst = policy.burst or max(1, math.ceil(policy.requests_per_second))
    tokens, interval = fill(policy.requests_per_second, burst)
    return token_bucket_pb2.TokenBucket(
        max_tokens=max(burst, tokens),
        tokens_per_fill=u32(tokens),
        fill_interval=duration(interval),
    )


def local_rate_limit(policy: RateLimitPolicy) -> local_rate_limit_pb2.LocalRateLimit:
    everyone = base_pb2.RuntimeFractionalPercent(
        default_value=percent_pb2.FractionalPercent(
            numerator=100, denominator=percent_pb2.FractionalPercent.DenominatorType.HUNDRED
        )
    )
    return local_rate_limit_pb2.LocalRateLimit(
        stat_prefix=STAT_PREFIX,
        status=http_status_pb2.HttpStatus(code=http_status_pb2.StatusCode.TooManyRequests),
        token_bucket=token_bucket(policy),
        filter_enabled=everyone,
        filter_enforced=everyone,
        response_headers_to_add=[
            base_pb2.HeaderValueOption(
                header=base_pb2.HeaderValue(key=LIMITED_HEADER, value="true"),
                append_action=base_pb2.HeaderValueOption.HeaderAppendAction.OVERWRITE_IF_EXISTS_OR_ADD,
            )
        ],
    )
