"""Gateway API routes in the mesh file: ``http_routes``, ``grpc_routes`` and
``reference_grants``, each entry a Kubernetes object's ``metadata.name``/``namespace``
beside its ``spec`` fields, with the Gateway API's own (camelCase) names and bounds, so
a spec is copied across as it is (DESIGN.md section 5).

The models check shape only. Whether a route's parents and backends exist, and what is
served of it, is attachment's business (``attach.py``): a bad reference leaves that
route (or that backend's share) out and is reported, never the mesh.
"""

from __future__ import annotations

import re
from datetime import timedelta
from typing import Annotated, Any, Final, Literal, Protocol, TypeVar

from pydantic import AfterValidator, BeforeValidator, Field, PlainSerializer, model_validator

from controlplane.mesh.duration import format_duration, parse_duration
from controlplane.mesh.limits import Int, Port, dns_label
from controlplane.mesh.route_filters import (
    CORE,
    GATEWAY_GROUP,
    MAX_FILTERS,
    BackendObjectRef,
    Group,
    Kind,
    Name,
    Namespace,
    RouteFilter,
    check_prefix_rewrite,
    filter_problems,
)
from controlplane.mesh.route_match import (
    MAX_MATCHES,
    GRPCRouteMatch,
    HTTPRouteMatch,
    _GatewayModel,
)

MAX_PARENTS: Final = 32  # the CRD's bound (CommonRouteSpec.parentRefs)
MAX_HOSTNAMES: Final = 16
MAX_RULES: Final = 16
MAX_BACKENDS: Final = 16
MAX_WEIGHT: Final = 1_000_000
MAX_GRANT_ENTRIES: Final = 16
MAX_ROUTES: Final = 10_000  # per kind in one mesh
_GEP_2257: Final = re.compile(r"([0-9]{1,5}(h|m|s|ms)){1,4}")

RouteKind = Literal["HTTPRoute", "GRPCRoute", "TLSRoute", "TCPRoute"]
RouteKey = tuple[str, str, str]  # (kind, namespace, name)


def _gateway_duration(value: Any) -> timedelta:
    """GEP-2257's durations: up to four ``<1-5 digits><h|m|s|ms>`` parts, ``0s`` allowed."""
    if isinstance(value, str) and not _GEP_2257.fullmatch(value):
        raise ValueError(f"duration {value[:20]!r} is not a Gateway API duration: one to four "
                         "parts of up to 5 digits and h, m, s or ms, such as '10s' or '1m30s'")
    return parse_duration(value)


GatewayDuration = Annotated[timedelta, BeforeValidator(_gateway_duration),
                            PlainSerializer(format_duration, return_type=str)]
Weight = Annotated[Int, Field(ge=0, le=MAX_WEIGHT)]
Hostname = Annotated[str, Field(min_length=1, max_length=253,
                                pattern=r"^(\*\.)?[a-z0-9]([-a-z0-9]*[a-z0-9])?"
                                        r"(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")]


class ParentRef(_GatewayModel):
    """A Service (``kind: Service``, group ``""``: GAMMA) or a Gateway (the defaults).
    In the route's namespace unless ``namespace`` says. ``port`` picks one port of the
    Service (none: all its HTTP/gRPC ports); ``sectionName`` a Gateway listener."""

    group: Group = GATEWAY_GROUP
    kind: Kind = "Gateway"
    namespace: Namespace | None = None
    name: Name
    section_name: str | None = Field(default=None, min_length=1, max_length=253)
    port: Port | None = None

    @model_validator(mode="before")
    @classmethod
    def _core_service(cls, data: Any) -> Any:
        """``{kind: Service, name: x}``: a core Service, whose group is ``""`` (a mesh file
        need not say so; a Kubernetes object always does)."""
        if isinstance(data, dict) and data.get("kind") == "Service" and "group" not in data:
            return {**data, "group": CORE}
        return data

    @property
    def is_service(self) -> bool:
        return self.group == CORE and self.kind == "Service"

    def namespace_or(self, default: str) -> str:
        return self.namespace or default

    def describe(self, default_namespace: str) -> str:
        where = f"{self.kind} {self.namespace_or(default_namespace)}/{self.name}"
        if self.port is not None:
            where += f" port {self.port}"
        if self.section_name is not None:
            where += f" section {self.section_name}"
        return where


class BackendRef(BackendObjectRef):
    """A share of the rule's traffic (``weight``, default 1, relative to the others').
    ``filters`` apply to the requests sent to this backend only."""

    weight: Weight = 1
    filters: list[RouteFilter] | None = Field(default=None, max_length=MAX_FILTERS)

    @model_validator(mode="after")
    def _filters(self) -> BackendRef:
        problem = filter_problems(self.filters)
        if problem is not None:
            raise ValueError(problem)
        return self


class Timeouts(_GatewayModel):
    """``request``: the whole request, retries included (the route timeout);
    ``backendRequest``: each try to a backend. ``0s``: no timeout."""

    request: GatewayDuration | None = None
    backend_request: GatewayDuration | None = None

    @model_validator(mode="after")
    def _order(self) -> Timeouts:
        zero = timedelta(0)
        if (self.request is not None and self.backend_request is not None
                and self.request != zero and (self.backend_request == zero
                                              or self.backend_request > self.request)):
            raise ValueError("backendRequest must not be longer than request (the whole "
                             "request includes every try); shorten backendRequest")
        return self


class Retry(_GatewayModel):
    """Retry up to ``attempts`` times (after the first try) on ``codes`` (and on
    connection failures), waiting ``backoff`` between tries."""

    codes: list[Annotated[Int, Field(ge=400, le=599)]] | None = Field(default=None,
                                                                      max_length=32)
    attempts: Annotated[Int, Field(ge=0, le=100)] | None = None
    backoff: GatewayDuration | None = None


def _rule_checks(filters: list[RouteFilter] | None, grpc: bool) -> None:
    problem = filter_problems(filters, grpc)
    if problem is not None:
        raise ValueError(problem)


def _prefix_replacement(filters: list[RouteFilter] | None) -> str | None:
    """The ReplacePrefixMatch value of the rule's rewrite or redirect, if it has one."""
    for found in filters or ():
        path = (found.url_rewrite.path if found.url_rewrite is not None
                else found.request_redirect.path if found.request_redirect is not None
                else None)
        if path is not None and path.type == "ReplacePrefixMatch":
            return path.value
    return None


class HTTPRouteRule(_GatewayModel):
    name: str | None = Field(default=None, min_length=1, max_length=253)
    matches: list[HTTPRouteMatch] | None = Field(default=None, max_length=MAX_MATCHES)
    filters: list[RouteFilter] | None = Field(default=None, max_length=MAX_FILTERS)
    backend_refs: list[BackendRef] | None = Field(default=None, max_length=MAX_BACKENDS)
    timeouts: Timeouts | None = None
    retry: Retry | None = None

    @model_validator(mode="after")
    def _checks(self) -> HTTPRouteRule:
        _rule_checks(self.filters, grpc=False)
        replacement = _prefix_replacement(self.filters)
        if replacement is None:
            return self
        if any(m.path_or_default.type != "PathPrefix" for m in self.matches or ()):
            raise ValueError("ReplacePrefixMatch needs every match of the rule to be a "
                             "PathPrefix path match (it replaces the matched prefix)")
        for match in self.matches_or_default:
            check_prefix_rewrite(match.path_or_default.value, replacement)
        return self

    @property
    def matches_or_default(self) -> list[HTTPRouteMatch]:
        return self.matches or [HTTPRouteMatch()]


class GRPCRouteRule(_GatewayModel):
    name: str | None = Field(default=None, min_length=1, max_length=253)
    matches: list[GRPCRouteMatch] | None = Field(default=None, max_length=MAX_MATCHES)
    filters: list[RouteFilter] | None = Field(default=None, max_length=MAX_FILTERS)
    backend_refs: list[BackendRef] | None = Field(default=None, max_length=MAX_BACKENDS)

    @model_validator(mode="after")
    def _checks(self) -> GRPCRouteRule:
        _rule_checks(self.filters, grpc=True)
        return self

    @property
    def matches_or_default(self) -> list[GRPCRouteMatch]:
        return self.matches or [GRPCRouteMatch()]


class _Route(_GatewayModel):
    name: Annotated[str, AfterValidator(lambda v: dns_label(v, "name"))]
    namespace: Annotated[str, AfterValidator(lambda v: dns_label(v, "namespace"))] = "default"
    parent_refs: list[ParentRef] = Field(default_factory=list, max_length=MAX_PARENTS)
    hostnames: list[Hostname] | None = Field(default=None, max_length=MAX_HOSTNAMES)

    @model_validator(mode="after")
    def _distinct_parents(self) -> _Route:
        seen = set()
        for ref in self.parent_refs:
            key = (ref.group, ref.kind, ref.namespace_or(self.namespace), ref.name,
                   ref.section_name, ref.port)
            if key in seen:
                raise ValueError(f"parentRefs names {ref.describe(self.namespace)} twice; "
                                 "name each parent once")
            seen.add(key)
        return self


class HTTPRoute(_Route):
    """An HTTPRoute: ``rules`` program the routing of each parent (GAMMA: a Service)."""

    rules: list[HTTPRouteRule] = Field(default_factory=lambda: [HTTPRouteRule()],
                                       min_length=1, max_length=MAX_RULES)

    @property
    def key(self) -> RouteKey:
        return ("HTTPRoute", self.namespace, self.name)


class GRPCRoute(_Route):
    """A GRPCRoute: gRPC methods and headers matched, on a Service's HTTP/2 port."""

    rules: list[GRPCRouteRule] = Field(default_factory=lambda: [GRPCRouteRule()],
                                       min_length=1, max_length=MAX_RULES)

    @property
    def key(self) -> RouteKey:
        return ("GRPCRoute", self.namespace, self.name)


class GrantFrom(_GatewayModel):
    group: Group
    kind: Kind
    namespace: Namespace


class GrantTo(_GatewayModel):
    group: Group
    kind: Kind
    name: Name | None = None


class ReferenceGrant(_GatewayModel):
    """Lets objects of ``from`` (kind and namespace) refer to objects of ``to`` in this
    grant's namespace: a route's backendRef to a Service of another namespace needs one
    there."""

    name: Annotated[str, AfterValidator(lambda v: dns_label(v, "name"))]
    namespace: Annotated[str, AfterValidator(lambda v: dns_label(v, "namespace"))] = "default"
    from_: list[GrantFrom] = Field(alias="from", min_length=1, max_length=MAX_GRANT_ENTRIES)
    to: list[GrantTo] = Field(min_length=1, max_length=MAX_GRANT_ENTRIES)

    def allows(self, kind: str, namespace: str, to_kind: str, to_name: str,
               to_group: str = CORE) -> bool:
        return (any(f.group == GATEWAY_GROUP and f.kind == kind and f.namespace == namespace
                    for f in self.from_)
                and any(t.group == to_group and t.kind == to_kind
                        and t.name in (None, to_name) for t in self.to))


class _Named(Protocol):
    @property
    def namespace(self) -> str: ...
    @property
    def name(self) -> str: ...


_N = TypeVar("_N", bound=_Named)


def unique_objects(items: list[_N], what: str) -> list[_N]:
    """A list validator: no two entries of one namespace and name (``what`` their kind)."""
    seen: set[tuple[str, str]] = set()
    for item in items:
        if (item.namespace, item.name) in seen:
            raise ValueError(f"{what} {item.namespace}/{item.name} appears twice; merge the "
                             "two entries or rename one")
        seen.add((item.namespace, item.name))
    return items


HTTPRoutes = Annotated[list[HTTPRoute], Field(max_length=MAX_ROUTES),
                       AfterValidator(lambda v: unique_objects(v, "HTTPRoute"))]
GRPCRoutes = Annotated[list[GRPCRoute], Field(max_length=MAX_ROUTES),
                       AfterValidator(lambda v: unique_objects(v, "GRPCRoute"))]
ReferenceGrants = Annotated[list[ReferenceGrant], Field(max_length=MAX_ROUTES),
                            AfterValidator(lambda v: unique_objects(v, "ReferenceGrant"))]
