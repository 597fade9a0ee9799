"""The mesh model: what every source produces and the translator consumes.

Plain, frozen pydantic models. They import neither protobuf nor the Kubernetes client,
so a source can be swapped without the translator noticing. Validation lives here: a
mesh that passes these models is one the translator can turn into a consistent snapshot.
"""

from __future__ import annotations

import re
from datetime import timedelta
from typing import Annotated, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_core import InitErrorDetails, PydanticCustomError

from controlplane.mesh.duration import Duration, format_duration

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


def _longer_than_zero(value: timedelta | None) -> timedelta | None:
    """Zero durations that Envoy would reject (or read as "no limit") are refused here,
    by path, rather than NACKed by every sidecar. Negative ones never parse."""
    if value is not None and value <= timedelta(0):
        raise ValueError("must be longer than 0, such as '100ms'")
    return value


class RetryBackoff(_Model):
    """The wait between tries: random below base_interval * 2^n, at most max_interval
    (default 10 x base_interval). Unset, Envoy's base is 25ms, quick on a busy host."""

    base_interval: Duration
    max_interval: Duration | None = None

    @field_validator("base_interval", "max_interval")
    @classmethod
    def _positive(cls, value: timedelta | None) -> timedelta | None:
        return _longer_than_zero(value)

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
    min_concurrency: int = Field(default=3, ge=1)


class Retries(_Model):
    """Retries; each goes to a host not tried yet for the request, when there is one."""

    attempts: int = Field(default=1, ge=0, le=100)
    per_try_timeout: Duration | None = None
    on: list[RetryOn] = Field(default_factory=lambda: list(_DEFAULT_RETRY_ON))
    retriable_status_codes: list[Annotated[int, Field(ge=100, le=599)]] = Field(
        default_factory=list
    )
    backoff: RetryBackoff | None = None
    budget: RetryBudget | None = None

    @field_validator("per_try_timeout")
    @classmethod
    def _per_try_positive(cls, value: timedelta | None) -> timedelta | None:
        return _longer_than_zero(value)


class CircuitBreaker(_Model):
    """Per-cluster limits. Each one unset is 1024: Envoy's default, except for
    max_retries (Envoy's is 3, too few when every client retries at once)."""

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

    @field_validator("interval", "base_ejection_time")
    @classmethod
    def _positive(cls, value: timedelta | None) -> timedelta | None:
        return _longer_than_zero(value)


class HashOn(_Model):
    """What ``ring_hash`` and ``maglev`` hash on, so the same client keeps its host:
    exactly one of a request header, a cookie (Envoy sets it when missing, with
    ``cookie_ttl``), or the client's source IP."""

    header: str | None = Field(default=None, min_length=1)
    cookie: str | None = Field(default=None, min_length=1)
    cookie_ttl: Duration | None = None
    source_ip: bool = False

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


class SplitTarget(_Model):
    """One leg of a traffic split: a label subset of this service's endpoints
    (``labels``), or another service (``service``, in this service's namespace unless
    ``namespace`` says otherwise). Weights are relative: 90/10 and 9/1 split alike."""

    labels: dict[str, str] | None = Field(default=None, min_length=1)
    service: str | None = None
    namespace: str | None = None
    weight: int = Field(ge=0, le=10000)

    @model_validator(mode="after")
    def _one_target(self) -> SplitTarget:
        _one_target(self.labels, self.service, self.namespace)
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
    status: int = Field(ge=200, le=599)


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
    """A token bucket per calling sidecar: ``requests_per_second`` on average, at most
    ``burst`` at once (default: one second's worth). Past it, callers get 429."""

    requests_per_second: float = Field(gt=0)
    burst: int | None = Field(default=None, ge=1, le=1_000_000_000)

    @field_validator("requests_per_second")
    @classmethod
    def _millis(cls, value: float) -> float:
        if abs(value * 1000 - round(value * 1000)) > 1e-6:
            raise ValueError(
                f"requests_per_second {value} has more than 3 decimals; "
                "rates are expressed exactly, in steps of 0.001"
            )
        return value


class Fallback(_Model):
    """What callers get instead of a bare 503 when no endpoint of the service is healthy
    (all not ready, or all ejected): a fixed answer (``status``, ``body``,
    ``content_type``) or another ``service`` (``name`` in this namespace, or
    ``name.namespace``) answering in its place. ``status`` defaults to 200 in both
    forms (the service form answers with the fallback service's body and headers)."""

    status: int | None = Field(default=None, ge=200, le=599)
    body: str | None = None
    content_type: str | None = Field(default=None, min_length=1)
    service: str | None = None

    @field_validator("service")
    @classmethod
    def _service(cls, value: str | None) -> str | None:
        if value is not None:
            parts = value.split(".")
            if len(parts) > 2:
                raise ValueError(
                    f"service {value!r}: give name or name.namespace"
                )
            for part in parts:
                _dns_label(part, "service")
        return value

    @model_validator(mode="after")
    def _one_form(self) -> Fallback:
        static = [k for k in ("body", "content_type") if getattr(self, k) is not None]
        if self.service is not None and static:
            raise ValueError(
                f"give service (another service answers) or body/content_type "
                f"(a fixed answer), not both; found service and {', '.join(static)}"
            )
        if self.service is None and not static and self.status is None:
            raise ValueError("give service, or a fixed answer: status, body, content_type")
        return self

    def target(self, namespace: str) -> tuple[str, str] | None:
        """(name, namespace) of the fallback service, in ``namespace`` unless it says."""
        if self.service is None:
            return None
        name, _, other = self.service.partition(".")
        return name, other or namespace


def _one_target(labels: dict[str, str] | None, service: str | None, namespace: str | None) -> None:
    if (labels is None) == (service is None):
        raise ValueError(
            "give labels (a subset of this service's endpoints) or service (another "
            "service), exactly one of them"
        )
    if namespace is not None and service is None:
        raise ValueError("namespace: only with service")
    if service is not None:
        _dns_label(service, "service")
    if namespace is not None:
        _dns_label(namespace, "namespace")


class PathMatch(_Model):
    """The request path (without its query string): one ``prefix`` or one ``exact`` path.
    A prefix matches as Envoy's and Istio's do, character by character: ``/api`` also
    matches ``/apiary``; write ``/api/`` to mean the directory."""

    prefix: str | None = None
    exact: str | None = None

    @field_validator("prefix", "exact")
    @classmethod
    def _path(cls, value: str | None) -> str | None:
        if value is not None and (
            not value.startswith("/") or any(c in value for c in " \t\r\n?#")
        ):
            raise ValueError(
                f"path {value!r} must start with '/' and hold no spaces, '?' or '#' "
                "(the query string is not matched)"
            )
        return value

    @model_validator(mode="after")
    def _one_form(self) -> PathMatch:
        if (self.prefix is None) == (self.exact is None):
            raise ValueError("give prefix or exact, exactly one of them")
        return self


class MatchRoute(_Model):
    """Requests whose headers all have exactly these values, and whose path matches
    ``path`` when given, go to ``labels`` (a subset of this service's endpoints) or
    ``service``, ahead of the split or default route."""

    headers: dict[str, str] | None = Field(default=None, min_length=1)
    path: PathMatch | None = None
    labels: dict[str, str] | None = Field(default=None, min_length=1)
    service: str | None = None
    namespace: str | None = None

    @field_validator("headers")
    @classmethod
    def _header_names(cls, headers: dict[str, str] | None) -> dict[str, str] | None:
        for name in headers or {}:
            if not name or name != name.lower() or any(c in name for c in " :\t\r\n"):
                raise ValueError(
                    f"header name {name!r} must be non-empty, lower-case, with no spaces "
                    "or ':' (pseudo-headers such as :path are not matched)"
                )
        return headers

    @model_validator(mode="after")
    def _one_target(self) -> MatchRoute:
        if self.headers is None and self.path is None:
            raise ValueError("give headers, path or both: what requests this route takes")
        _one_target(self.labels, self.service, self.namespace)
        return self


class Policy(_Model):
    """Service governance for one service; every field optional (DESIGN.md section 3)."""

    timeout: Duration | None = None
    retries: Retries | None = None
    circuit_breaker: CircuitBreaker | None = None
    outlier_detection: OutlierDetection | None = None
    load_balancer: LoadBalancer | None = None
    split: list[SplitTarget] | None = None
    match: list[MatchRoute] | None = None
    fault: Fault | None = None
    rate_limit: RateLimit | None = None
    fallback: Fallback | None = None

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
        problems = [p for i, s in enumerate(self.services) for p in self._check_targets(i, s, seen)]
        if problems:
            # Raised with each problem's own path, so the loader names it as it names
            # field errors: services[0] (reviews.default).policy.split[1].service: ...
            raise ValidationError.from_exception_data(type(self).__name__, problems)
        return self

    def _check_targets(
        self, index: int, service: Service, keys: dict[str, int]
    ) -> list[InitErrorDetails]:
        """Every split or match target names a service of the mesh that serves HTTP or
        gRPC on each of this service's HTTP/gRPC port numbers, and a label subset needs
        endpoints to select from (not an external name)."""
        policy = service.policy
        targets: list[tuple[str, int, SplitTarget | MatchRoute]] = [
            *(("split", i, t) for i, t in enumerate(policy.split or [])),
            *(("match", i, t) for i, t in enumerate(policy.match or [])),
        ]
        problems: list[InitErrorDetails] = []

        def problem(field: str, where: tuple[str | int, ...], value: object, message: str) -> None:
            problems.append(InitErrorDetails(
                type=PydanticCustomError("value_error", "{message}", {"message": message}),
                loc=("services", index, "policy", *where, field), input=value))

        for kind, at, target in targets:
            if target.labels is not None and service.external_name is not None:
                problem("labels", (kind, at), target.labels,
                        "an external_name service has no endpoints to select by label; "
                        "route to a service instead")
            if target.service is None:
                continue
            namespace = target.namespace or service.namespace
            found = keys.get(f"{target.service}.{namespace}")
            if found is None:
                problem("service", (kind, at), target.service,
                        f"no service {target.service!r} in namespace {namespace!r}")
            else:
                # A target is called on the port the request came for: it must have each.
                theirs = {p.port for p in self.services[found].service_ports
                          if p.protocol in ("http", "grpc")}
                missing = [p.port for p in service.service_ports
                           if p.protocol in ("http", "grpc") and p.port not in theirs]
                if missing:
                    problem("service", (kind, at), target.service,
                            f"{target.service}.{namespace} has no HTTP or gRPC port "
                            f"{', '.join(map(str, missing))}; a split or match to another "
                            "service calls it on the same port number")
        fallback = policy.fallback.target(service.namespace) if policy.fallback else None
        if fallback is not None:
            where = f"{fallback[0]}.{fallback[1]}"
            found = keys.get(where)
            if where == service.key:
                problem("service", ("fallback",), where,
                        "a service cannot fall back to itself; name another service")
            elif found is None:
                problem("service", ("fallback",), where,
                        f"no service {fallback[0]!r} in namespace {fallback[1]!r}")
            elif not any(p.protocol in ("http", "grpc")
                         for p in self.services[found].service_ports):
                problem("service", ("fallback",), where,
                        f"{where} has no HTTP or gRPC port to answer in this one's place")
        return problems

    def service(self, name: str, namespace: str = "default") -> Service | None:
        for service in self.services:
            if service.name == name and service.namespace == namespace:
                return service
        return None
