"""The mesh model: what every source produces and the translator consumes.

Plain, frozen pydantic models. They import neither protobuf nor the Kubernetes client,
so a source can be swapped without the translator noticing. Validation lives here: a
mesh that passes these models is one the translator can turn into a consistent snapshot,
and one Envoy accepts. The models live in small modules (endpoints, resilience, policy,
service); this one holds the whole mesh and its cross-service checks, and re-exports
every name, so ``controlplane.mesh.model`` stays the one import path.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any, Literal

from pydantic import Field, PrivateAttr, ValidationError, model_validator
from pydantic_core import InitErrorDetails

from controlplane.mesh.base import _Model, longer_than_zero, problem
from controlplane.mesh.endpoints import AddressType, Endpoint, Protocol, ServicePort
from controlplane.mesh.gateway_tcp import TCPRoutes
from controlplane.mesh.gateways import Certificates, Gateways, TLSRoutes
from controlplane.mesh.limits import UINT32_MAX, Percent, Port
from controlplane.mesh.policy import (
    Fallback,
    MatchRoute,
    PathMatch,
    Policy,
    SplitTarget,
)
from controlplane.mesh.resilience import (
    CircuitBreaker,
    Fault,
    FaultAbort,
    FaultDelay,
    HashOn,
    LbPolicy,
    LoadBalancer,
    OutlierDetection,
    RateLimit,
    Retries,
    RetryBackoff,
    RetryBudget,
    RetryOn,
)
from controlplane.mesh.routes import GRPCRoutes, HTTPRoutes, ReferenceGrants
from controlplane.mesh.scope import (
    MAX_SIDECARS,
    Egress,
    ScopeIndex,
    Sidecar,
    WorkloadSelector,
    sidecar_problems,
    unmatched_hosts,
)
from controlplane.mesh.security import (
    AuthorizationRule,
    HeaderCondition,
    MeshIdentity,
    MeshSecurity,
    Mtls,
    Operation,
    Security,
    Source,
    effective,
)
from controlplane.mesh.service import Service
from controlplane.mesh.telemetry import MeshTelemetry, Telemetry

__all__ = [
    "UINT32_MAX",
    "AddressType",
    "AuthorizationRule",
    "CircuitBreaker",
    "Egress",
    "Endpoint",
    "Fallback",
    "Fault",
    "FaultAbort",
    "FaultDelay",
    "HashOn",
    "HeaderCondition",
    "LbPolicy",
    "LoadBalancer",
    "MatchRoute",
    "Mesh",
    "MeshIdentity",
    "MeshSecurity",
    "MeshTelemetry",
    "Mtls",
    "Operation",
    "OutboundTrafficPolicy",
    "OutlierDetection",
    "PathMatch",
    "Percent",
    "Policy",
    "Port",
    "Protocol",
    "RateLimit",
    "Retries",
    "RetryBackoff",
    "RetryBudget",
    "RetryOn",
    "ScopeIndex",
    "Security",
    "Service",
    "ServicePort",
    "Sidecar",
    "Source",
    "SplitTarget",
    "Telemetry",
    "WorkloadSelector",
    "_Model",
    "effective",
    "empty_subsets",
    "longer_than_zero",
    "reference_problems",
    "unmatched_hosts",
]

_ROUTED = ("http", "grpc")

OutboundTrafficPolicy = Literal["ALLOW_ANY", "REGISTRY_ONLY"]
"""What a captured sidecar does with a connection to a destination outside the mesh
(Istio's names): pass it through to where it was going, or refuse it (HTTP gets a 502
that says why, other TCP is closed)."""


class Mesh(_Model):
    """The whole validated state that a source hands downstream."""

    services: list[Service] = Field(default_factory=list)
    sidecars: list[Sidecar] = Field(default_factory=list, max_length=MAX_SIDECARS)
    """What sidecars may reach (``scope.py``); none: every service exported to them."""
    outbound_traffic_policy: OutboundTrafficPolicy = "ALLOW_ANY"
    """Captured sidecars: where calls to destinations outside the mesh go."""
    security: MeshSecurity = Field(default_factory=MeshSecurity)
    """Mesh-wide and per-namespace mTLS modes and authorization rules (``security.py``)."""
    identity: MeshIdentity | None = None
    """Set by the server when it runs a CA, never read from a file (the loader refuses
    it): None, the translator emits no TLS, no SDS references and no principal matching."""
    telemetry: MeshTelemetry = Field(default_factory=MeshTelemetry)
    """Mesh-wide and per-namespace access logs and tracing (``telemetry.py``)."""
    http_routes: HTTPRoutes = Field(default_factory=list)  # Gateway API (routes.py)
    grpc_routes: GRPCRoutes = Field(default_factory=list)
    reference_grants: ReferenceGrants = Field(default_factory=list)
    gateways: Gateways = Field(default_factory=list)  # ingress (gateways.py)
    tls_routes: TLSRoutes = Field(default_factory=list)
    tcp_routes: TCPRoutes = Field(default_factory=list)  # gateway_tcp.py
    certificates: Certificates = Field(default_factory=list)  # file mode: PEM files by name

    # Derived indexes, built on first use. Each remembers the list it was built from,
    # so a model_copy with other services builds its own rather than trust a stale one.
    _by_key: tuple[list[Service], Mapping[str, Service]] | None = PrivateAttr(None)
    _scope: tuple[list[Service], list[Sidecar], ScopeIndex] | None = PrivateAttr(None)
    # When the source saw the earliest change this mesh holds (time.time()), for the
    # convergence measurement (sources/base.py: stamp, observed_at); None: not known.
    _observed_at: float | None = PrivateAttr(None)
    _attached: Any = PrivateAttr(None)  # the routes' attachment (attach.py), built on first use

    @model_validator(mode="after")
    def _unique(self) -> Mesh:
        problems = reference_problems(enumerate(self.services))
        problems += sidecar_problems(enumerate(self.sidecars))
        if problems:
            # Raised with each problem's own path, so the loader names it as it names
            # field errors: services[0] (reviews.default).policy.split[1].service: ...
            raise ValidationError.from_exception_data(type(self).__name__, problems)
        return self

    def __eq__(self, other: object) -> bool:
        """Equal content, whichever indexes either has built."""
        if not isinstance(other, Mesh):
            return NotImplemented
        return all(getattr(self, name) == getattr(other, name)
                   for name in type(self).model_fields)

    __hash__ = None  # type: ignore[assignment]  # a list inside: never hashable

    @property
    def by_key(self) -> Mapping[str, Service]:
        """Every service by ``name.namespace`` (read-only), built once per mesh."""
        if self._by_key is None or self._by_key[0] is not self.services:
            # A plain dict (deep copies and pickles of the mesh copy it), read-only by type.
            self._by_key = (self.services, {service.key: service for service in self.services})
        return self._by_key[1]

    def service(self, name: str, namespace: str = "default") -> Service | None:
        return self.by_key.get(f"{name}.{namespace}")

    @property
    def scope(self) -> ScopeIndex:
        """The scoping rules (``sidecars``, ``exportTo``) indexed, built once per mesh."""
        cached = self._scope
        if cached is None or cached[0] is not self.services or cached[1] is not self.sidecars:
            cached = (self.services, self.sidecars, ScopeIndex(self.by_key, self.sidecars))
            self._scope = cached
        return cached[2]


def reference_problems(
    services: Iterable[tuple[int, Service]], unparsed: frozenset[str] = frozenset()
) -> list[InitErrorDetails]:
    """Problems between services: a name repeated, a cluster IP two services claim, a
    split, match or fallback to a service that is not there (or does not speak HTTP on
    that port). ``services`` are
    (index in the file, service); ``unparsed`` holds the keys (``name.namespace``) of
    services that failed their own validation: a reference to one of those is not
    reported again, so ``controlplane validate`` lists both kinds of problem at once."""
    indexed = list(services)
    seen: dict[str, int] = {}
    by_key: dict[str, Service] = {}
    problems: list[InitErrorDetails] = []
    for index, service in indexed:
        if service.key in seen:
            problems.append(problem(
                ("services", index, "name"), service.name,
                f"repeats service {service.name!r} in namespace "
                f"{service.namespace!r} (first at services[{seen[service.key]}]); "
                "merge the two entries"))
            continue
        seen[service.key] = index
        by_key[service.key] = service
    problems += _cluster_ip_problems(indexed, seen)
    for index, service in indexed:
        problems += _check_targets(index, service, by_key, unparsed)
    return problems


def _cluster_ip_problems(indexed: list[tuple[int, Service]],
                         first: Mapping[str, int]) -> list[InitErrorDetails]:
    """A cluster IP says which service a captured connection is for: one service each."""
    owners: dict[str, tuple[int, Service]] = {}
    problems: list[InitErrorDetails] = []
    for index, service in indexed:
        if first.get(service.key) != index:  # a repeated service: reported already
            continue
        for at, ip in enumerate(service.cluster_ips or ()):
            owner = owners.setdefault(ip, (index, service))
            if owner[0] != index:
                problems.append(problem(
                    ("services", index, "cluster_ips", at), ip,
                    f"{ip} is also the cluster IP of {owner[1].key} (services[{owner[0]}]); "
                    "a cluster IP belongs to one service, give each its own"))
    return problems


def _check_targets(
    index: int, service: Service, by_key: dict[str, Service], unparsed: frozenset[str]
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

    def report(field: str, where: tuple[str | int, ...], value: object, message: str) -> None:
        problems.append(problem(("services", index, "policy", *where, field), value, message))

    for kind, at, target in targets:
        if target.labels is not None and service.external_name is not None:
            report("labels", (kind, at), target.labels,
                    "an external_name service has no endpoints to select by label; "
                    "route to a service instead")
        if target.service is None:
            continue
        namespace = target.namespace or service.namespace
        key = f"{target.service}.{namespace}"
        found = by_key.get(key)
        if found is None:
            if key not in unparsed:
                report("service", (kind, at), target.service,
                        f"no service {target.service!r} in namespace {namespace!r}")
            continue
        # A target is called on the port the request came for: it must have each.
        theirs = {p.port for p in found.service_ports if p.protocol in _ROUTED}
        missing = [p.port for p in service.service_ports
                   if p.protocol in _ROUTED and p.port not in theirs]
        if missing:
            report("service", (kind, at), target.service,
                    f"{key} has no HTTP or gRPC port "
                    f"{', '.join(map(str, missing))}; a split or match to another "
                    "service calls it on the same port number")
    fallback = policy.fallback.target(service.namespace) if policy.fallback else None
    if fallback is not None:
        where = f"{fallback[0]}.{fallback[1]}"
        other = by_key.get(where)
        if where == service.key:
            report("service", ("fallback",), where,
                    "a service cannot fall back to itself; name another service")
        elif other is None:
            if where not in unparsed:
                report("service", ("fallback",), where,
                        f"no service {fallback[0]!r} in namespace {fallback[1]!r}")
        elif not any(p.protocol in _ROUTED for p in other.service_ports):
            report("service", ("fallback",), where,
                    f"{where} has no HTTP or gRPC port to answer in this one's place")
    return problems


def empty_subsets(mesh: Mesh) -> list[str]:
    """The split and match legs whose label subset no endpoint has (``services[0]
    (reviews.default).policy.split[1].labels (version=v3)``): valid, since endpoints come
    and go, but their share of the traffic fails with 503 until one does, so sources warn."""
    found = []
    for index, service in enumerate(mesh.services):
        legs = [*(("split", i, t.labels) for i, t in enumerate(service.policy.split or [])),
                *(("match", i, t.labels) for i, t in enumerate(service.policy.match or []))]
        for field, at, labels in legs:
            if labels is None or any(
                all(e.labels.get(k) == v for k, v in labels.items()) for e in service.endpoints
            ):
                continue
            shown = ",".join(f"{k}={v}" for k, v in sorted(labels.items()))
            found.append(f"services[{index}] ({service.key}).policy.{field}[{at}].labels ({shown})")
    return found
