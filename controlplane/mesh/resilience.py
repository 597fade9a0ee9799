"""Resilience policies: retries, circuit breaking, outlier detection, load balancing,
fault injection and rate limiting. Every bound is one Envoy keeps (controlplane.mesh.limits)."""

from __future__ import annotations

from datetime import timedelta
from typing import Annotated, Final, Literal

from pydantic import Field, Strict, field_validator, model_validator

from controlplane.mesh.base import _Model, longer_than_zero
from controlplane.mesh.duration import Duration, format_duration
from controlplane.mesh.limits import TOKEN, HeaderName, Int, Percent, UInt32

RetryOn = Literal[
    "5xx",
    "gateway-error",
    "reset",
    "connect-failure",
    "retriable-4xx",
    "refused-stream",
    "retriable-status-codes",
    "cancelled",
    "deadline-exceeded",
    "internal",
    "resource-exhausted",
    "unavailable",
]
_DEFAULT_RETRY_ON: tuple[RetryOn, ...] = ("5xx", "reset", "connect-failure")
LbPolicy = Literal["round_robin", "least_request", "random", "ring_hash", "maglev"]
StatusCode = Annotated[int, Strict(), Field(ge=100, le=599)]
MAX_RATE: Final = 1_000_000  # requests per second, per calling sidecar
MAX_BURST: Final = 1_000_000_000


class RetryBackoff(_Model):
    """The wait between tries: random below base_interval * 2^n, at most max_interval
    (default 10 x base_interval). Unset, Envoy's base is 25ms, quick on a busy host."""

    base_interval: Duration
    max_interval: Duration | None = None

    @field_validator("base_interval", "max_interval")
    @classmethod
    def _positive(cls, value: timedelta | None) -> timedelta | None:
        return longer_than_zero(value)

    @model_validator(mode="after")
    def _ordered(self) -> RetryBackoff:
        if self.max_interval is not None and self.max_interval < self.base_interval:
            raise ValueError(
                f"max_interval {format_duration(self.max_interval)} is shorter than "
                f"base_interval {format_duration(self.base_interval)}; the cap must be at "
                "least the first interval"
            )
        return self


class RetryBudget(_Model):
    """Retries in flight at most percent of the active requests (and at least
    min_concurrency), so retries cannot multiply the load on a failing service.
    Per cluster; it replaces circuit_breaker.max_retries."""

    percent: Percent
    min_concurrency: UInt32 = 3


class Retries(_Model):
    """Retries; each goes to a host not tried yet for the request, when there is one."""

    attempts: Annotated[Int, Field(ge=0, le=100)] = 1
    per_try_timeout: Duration | None = None
    on: list[RetryOn] = Field(default_factory=lambda: list(_DEFAULT_RETRY_ON))
    retriable_status_codes: list[StatusCode] = Field(default_factory=list, max_length=500)
    backoff: RetryBackoff | None = None
    budget: RetryBudget | None = None

    @field_validator("per_try_timeout")
    @classmethod
    def _per_try_positive(cls, value: timedelta | None) -> timedelta | None:
        return longer_than_zero(value)


class CircuitBreaker(_Model):
    """Per-cluster limits. Each one unset is 1024: Envoy's default, except for
    max_retries (Envoy's is 3, too few when every client retries at once). Envoy keeps
    each in a uint32: at most 4294967295."""

    max_connections: UInt32 | None = None
    max_pending_requests: UInt32 | None = None
    max_requests: UInt32 | None = None
    max_retries: UInt32 | None = None


class OutlierDetection(_Model):
    consecutive_5xx: UInt32 | None = None
    consecutive_gateway_errors: UInt32 | None = None
    interval: Duration | None = None
    base_ejection_time: Duration | None = None
    max_ejection_percent: Percent | None = None

    @field_validator("interval", "base_ejection_time")
    @classmethod
    def _positive(cls, value: timedelta | None) -> timedelta | None:
        return longer_than_zero(value)


class HashOn(_Model):
    """What ``ring_hash`` and ``maglev`` hash on, so the same client keeps its host:
    exactly one of a request header, a cookie (Envoy sets it when missing, with
    ``cookie_ttl``), or the client's source IP."""

    header: HeaderName | None = None
    cookie: str | None = Field(default=None, min_length=1)
    cookie_ttl: Duration | None = None
    source_ip: bool = False

    @field_validator("cookie")
    @classmethod
    def _cookie(cls, value: str | None) -> str | None:
        # A cookie name is an RFC 6265 token: the same characters as a header name.
        if value is not None and (len(value) > 256 or not TOKEN.fullmatch(value)):
            raise ValueError(f"cookie name {value[:40]!r} must be 1 to 256 token characters "
                             "(letters, digits and !#$%&'*+-.^_`|~), no spaces or '='")
        return value

    @model_validator(mode="after")
    def _exactly_one(self) -> HashOn:
        chosen = [k for k in ("header", "cookie") if getattr(self, k) is not None]
        chosen += ["source_ip"] if self.source_ip else []
        if len(chosen) != 1:
            raise ValueError("give exactly one of header, cookie, source_ip: true "
                             f"(got {', '.join(chosen) or 'none'})")
        if self.cookie_ttl is not None and self.cookie is None:
            raise ValueError("cookie_ttl goes with cookie")
        return self


class LoadBalancer(_Model):
    policy: LbPolicy = "round_robin"
    hash: HashOn | None = None

    @model_validator(mode="after")
    def _hash_fits_policy(self) -> LoadBalancer:
        hashing = self.policy in ("ring_hash", "maglev")
        if hashing and self.hash is None:
            raise ValueError(f"{self.policy} needs hash: {{header: NAME}}, {{cookie: NAME}} "
                             "or {source_ip: true}, else every request hashes alike")
        if not hashing and self.hash is not None:
            raise ValueError(f"hash only applies to ring_hash and maglev, not {self.policy}")
        return self


class FaultDelay(_Model):
    """Hold ``percent`` of the requests for ``duration`` before sending them on."""

    percent: Percent
    duration: Duration

    @field_validator("duration")
    @classmethod
    def _positive(cls, value: timedelta) -> timedelta:
        if value <= timedelta(0):
            raise ValueError("a fault delay must be longer than 0s")
        return value


class FaultAbort(_Model):
    """Answer ``percent`` of the requests with ``status`` without sending them."""

    percent: Percent
    status: Annotated[Int, Field(ge=200, le=599)]


class Fault(_Model):
    """Fault injection for calls to the service: a delay, an abort, or both."""

    delay: FaultDelay | None = None
    abort: FaultAbort | None = None

    @model_validator(mode="after")
    def _something(self) -> Fault:
        if self.delay is None and self.abort is None:
            raise ValueError("a fault needs a delay, an abort, or both")
        return self


class RateLimit(_Model):
    """A token bucket per calling sidecar: ``requests_per_second`` on average (at most
    1,000,000, in steps of 0.001), at most ``burst`` at once (default: one second's
    worth). Past it, callers get 429."""

    requests_per_second: Annotated[
        float, Strict(), Field(gt=0, le=MAX_RATE, allow_inf_nan=False)
    ]
    burst: Annotated[Int, Field(ge=1, le=MAX_BURST)] | None = None

    @field_validator("requests_per_second")
    @classmethod
    def _millis(cls, value: float) -> float:
        if abs(value * 1000 - round(value * 1000)) > 1e-6:
            raise ValueError(
                f"requests_per_second {value} has more than 3 decimals; "
                "rates are expressed exactly, in steps of 0.001"
            )
        return value
