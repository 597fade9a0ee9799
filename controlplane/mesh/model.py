"""The mesh model: what every source produces and the translator consumes.

Plain, frozen pydantic models. They import neither protobuf nor the Kubernetes client,
so a source can be swapped without the translator noticing. Validation lives here: a
mesh that passes these models is one the translator can turn into a consistent snapshot.
"""

from __future__ import annotations

import re
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from controlplane.mesh.duration import Duration

_DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")

Port = Annotated[int, Field(ge=1, le=65535)]
Percent = Annotated[float, Field(ge=0, le=100)]
Protocol = Literal["http", "grpc", "tcp"]
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


class _Model(BaseModel):
    """Frozen and strict about unknown keys, so a typo is an error, not a silent default."""

    model_config = ConfigDict(extra="forbid", frozen=True)


def _dns_label(value: str, what: str) -> str:
    if len(value) > 63 or not _DNS_LABEL.match(value):
        raise ValueError(
            f"{what} {value!r} must be a DNS label: lower-case letters, digits and '-', "
            "starting and ending with a letter or digit, at most 63 characters"
        )
    return value


class Endpoint(_Model):
    """One backend instance. ``ready`` endpoints take traffic; ``serving`` and
    ``terminating`` ones drain; the rest are left out (Kubernetes' EndpointSlice conditions)."""

    address: str = Field(min_length=1)
    port: Port
    zone: str | None = None
    labels: dict[str, str] = Field(default_factory=dict)
    ready: bool = True
    serving: bool | None = None
    terminating: bool = False

    @property
    def is_serving(self) -> bool:
        return self.ready if self.serving is None else self.serving


class Retries(_Model):
    attempts: int = Field(default=1, ge=0, le=100)
    per_try_timeout: Duration | None = None
    on: list[RetryOn] = Field(default_factory=lambda: list(_DEFAULT_RETRY_ON))
    retriable_status_codes: list[Annotated[int, Field(ge=100, le=599)]] = Field(
        default_factory=list
    )


class CircuitBreaker(_Model):
    max_connections: int | None = Field(default=None, ge=1)
    max_pending_requests: int | None = Field(default=None, ge=1)
    max_requests: int | None = Field(default=None, ge=1)
    max_retries: int | None = Field(default=None, ge=1)


class OutlierDetection(_Model):
    consecutive_5xx: int | None = Field(default=None, ge=1)
    consecutive_gateway_errors: int | None = Field(default=None, ge=1)
    interval: Duration | None = None
    base_ejection_time: Duration | None = None
    max_ejection_percent: Percent | None = None


class LoadBalancer(_Model):
    policy: LbPolicy = "round_robin"


class SplitTarget(_Model):
    """One leg of a traffic split: a label subset of this service's endpoints."""

    labels: dict[str, str] = Field(min_length=1)
    weight: int = Field(ge=0, le=10000)


class FaultDelay(_Model):
    percent: Percent
    duration: Duration


class FaultAbort(_Model):
    percent: Percent
    status: int = Field(ge=200, le=599)


class Fault(_Model):
    delay: FaultDelay | None = None
    abort: FaultAbort | None = None


class RateLimit(_Model):
    requests_per_second: float = Field(gt=0)
    burst: int | None = Field(default=None, ge=1)


class Policy(_Model):
    """Service governance for one service; every field optional (DESIGN.md section 3)."""

    timeout: Duration | None = None
    retries: Retries | None = None
    circuit_breaker: CircuitBreaker | None = None
    outlier_detection: OutlierDetection | None = None
    load_balancer: LoadBalancer | None = None
    split: list[SplitTarget] | None = None
    fault: Fault | None = None
    rate_limit: RateLimit | None = None

    @field_validator("split")
    @classmethod
    def _split_has_weight(cls, split: list[SplitTarget] | None) -> list[SplitTarget] | None:
        if split is not None and split and sum(t.weight for t in split) == 0:
            raise ValueError("split weights add up to 0; give at least one target a weight")
        return split


class Service(_Model):
    name: str
    namespace: str = "default"
    port: Port
    protocol: Protocol = "http"
    endpoints: list[Endpoint] = Field(default_factory=list)
    policy: Policy = Field(default_factory=Policy)

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        return _dns_label(value, "service name")

    @field_validator("namespace")
    @classmethod
    def _namespace(cls, value: str) -> str:
        return _dns_label(value, "namespace")

    @property
    def key(self) -> str:
        """``name.namespace``: how the mesh and the translator refer to a service."""
        return f"{self.name}.{self.namespace}"


class Mesh(_Model):
    """The whole validated state that a source hands downstream."""

    services: list[Service] = Field(default_factory=list)

    @model_validator(mode="after")
    def _unique(self) -> Mesh:
        seen: dict[str, int] = {}
        for index, service in enumerate(self.services):
            if service.key in seen:
                raise ValueError(
                    f"services[{index}] repeats service {service.name!r} in namespace "
                    f"{service.namespace!r} (first at services[{seen[service.key]}]); "
                    "merge the two entries"
                )
            seen[service.key] = index
        return self

    def service(self, name: str, namespace: str = "default") -> Service | None:
        for service in self.services:
            if service.name == name and service.namespace == namespace:
                return service
        return None
