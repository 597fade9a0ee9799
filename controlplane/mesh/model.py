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
_LABEL = r"[a-z0-9](?:[-a-z0-9]{0,61}[a-z0-9])?"
_HOSTNAME = re.compile(rf"^{_LABEL}(?:\.{_LABEL})*$")

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
    ``terminating`` ones drain; the rest are left out (Kubernetes' EndpointSlice conditions).

    ``port`` for an endpoint of a single-port service; ``ports`` (service port name ->
    port) for one of a service with named ports: a name it lacks is a port it does not
    serve, as a pod need not serve every port of its Service."""

    address: str = Field(min_length=1)
    port: Port | None = None
    ports: dict[str, Port] | None = Field(default=None, min_length=1)
    zone: str | None = None
    labels: dict[str, str] = Field(default_factory=dict)
    ready: bool = True
    serving: bool | None = None
    terminating: bool = False

    @model_validator(mode="after")
    def _one_port_form(self) -> Endpoint:
        if self.port is not None and self.ports is not None:
            raise ValueError("give port (single-port service) or ports (named ports), not both")
        if self.port is None and self.ports is None:
            raise ValueError("needs port (or ports: {name: port} when the service has named ports)")
        return self

    @property
    def is_serving(self) -> bool:
        return self.ready if self.serving is None else self.serving

    def port_for(self, service_port: ServicePort) -> int | None:
        """Where this endpoint serves ``service_port``, or None when it does not."""
        if not service_port.name:
            return self.port
        return (self.ports or {}).get(service_port.name)


class ServicePort(_Model):
    """One port of a service: what clients call, and how they speak on it. The port of
    a single-port service has the name ``""``."""

    name: str
    port: Port
    protocol: Protocol = "http"

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        return _dns_label(value, "port name")


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
    """A service, in one of two forms: ``port`` + ``protocol`` (one port), or ``ports``
    (named ports, as a Kubernetes Service with several). With ``external_name`` it is a
    DNS name outside the mesh: no endpoints, and its ports are also the external host's.

    The one-port fields are stored as ``single_port``/``single_protocol`` (aliases ``port``
    and ``protocol``, so input and dumps keep the mesh file's keys) because ``port`` and
    ``protocol`` are properties that work in both forms: the first port's."""

    model_config = ConfigDict(serialize_by_alias=True)

    name: str
    namespace: str = "default"
    single_port: Port | None = Field(default=None, alias="port")
    single_protocol: Protocol | None = Field(default=None, alias="protocol")
    ports: list[ServicePort] | None = Field(default=None, min_length=1)
    external_name: str | None = None
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

    @field_validator("external_name")
    @classmethod
    def _external_name(cls, value: str | None) -> str | None:
        if value is not None and (len(value) > 253 or not _HOSTNAME.match(value)):
            raise ValueError(
                f"external_name {value!r} must be a lower-case DNS name such as "
                "'billing.example.com' (dot-separated DNS labels, no trailing dot)"
            )
        return value

    @model_validator(mode="after")
    def _consistent(self) -> Service:
        if self.ports is None:
            if self.single_port is None:
                raise ValueError("port: Field required (or ports: a list of named ports)")
        else:
            if self.single_port is not None:
                raise ValueError("give port (with protocol) or ports, not both")
            if self.single_protocol is not None:
                raise ValueError("protocol: with ports, each port names its own protocol")
            _unique_ports(self.ports)
        if self.external_name is not None and self.endpoints:
            raise ValueError(
                "endpoints: a service with external_name has none; its DNS name is the backend"
            )
        for index, endpoint in enumerate(self.endpoints):
            self._check_endpoint(index, endpoint)
        return self

    def _check_endpoint(self, index: int, endpoint: Endpoint) -> None:
        where = f"endpoints[{index}] ({endpoint.address})"
        if self.ports is None:
            if endpoint.port is None:
                raise ValueError(f"{where}: needs port; this service has a single port")
            return
        names = [p.name for p in self.ports]
        if endpoint.ports is None:
            raise ValueError(
                f"{where}: needs ports: {{name: port}}; this service's ports are named "
                f"{', '.join(names)}"
            )
        unknown = sorted(set(endpoint.ports) - set(names))
        if unknown:
            raise ValueError(
                f"{where}.ports: {', '.join(map(repr, unknown))} is not a port of this "
                f"service ({', '.join(names)})"
            )

    @property
    def key(self) -> str:
        """``name.namespace``: how the mesh and the translator refer to a service."""
        return f"{self.name}.{self.namespace}"

    @property
    def named_ports(self) -> bool:
        """True in the ``ports`` form: resources are then per named port, even for one."""
        return self.ports is not None

    @property
    def service_ports(self) -> list[ServicePort]:
        """Every port, in the order given; a single-port service's one port is named ``""``."""
        if self.ports is not None:
            return list(self.ports)
        assert self.single_port is not None  # the validator demands it
        return [
            ServicePort.model_construct(
                name="", port=self.single_port, protocol=self.single_protocol or "http"
            )
        ]

    @property
    def port(self) -> int:
        """The first (or only) port's number."""
        return self.service_ports[0].port

    @property
    def protocol(self) -> Protocol:
        """The first (or only) port's protocol."""
        return self.service_ports[0].protocol


def _unique_ports(ports: list[ServicePort]) -> None:
    names: dict[str, int] = {}
    numbers: dict[int, int] = {}
    for index, port in enumerate(ports):
        if port.name in names:
            raise ValueError(
                f"ports[{index}].name: {port.name!r} repeats ports[{names[port.name]}]; "
                "port names are unique within a service"
            )
        if port.port in numbers:
            raise ValueError(
                f"ports[{index}].port: {port.port} repeats ports[{numbers[port.port]}]; "
                "ports are unique within a service"
            )
        names[port.name] = index
        numbers[port.port] = index


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
