"""Which Gateway API routes attach to which Service ports, and what is served of them.

Pure, and built once per mesh (``attach(mesh)``, cached on it like ``mesh.by_key``).
GAMMA: an HTTPRoute or GRPCRoute whose parentRef is a Service (group ``""``) programs
the routing of calls to that Service, on the port it names or on each HTTP/gRPC port.
A route in the Service's own namespace is a *producer* route (every caller gets it); one
in another namespace is a *consumer* route, for callers in that namespace only, and
replaces the producer routes there.

Nothing here fails the mesh. A route that cannot attach to a parent gets ``Accepted:
False`` for that parent; a backendRef that does not resolve gets ``ResolvedRefs:
False`` and its share of the traffic answers 500 (``cluster`` None), as the spec says.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Final

from controlplane.mesh.model import Mesh
from controlplane.mesh.route_filters import CORE, SUPPORTED, BackendObjectRef, RouteFilter
from controlplane.mesh.route_match import GRPCRouteMatch, HTTPRouteMatch
from controlplane.mesh.route_status import (
    ACCEPTED,
    BACKEND_NOT_FOUND,
    INVALID_KIND,
    NO_MATCHING_PARENT,
    REF_NOT_PERMITTED,
    RESOLVED_REFS,
    UNSUPPORTED_PROTOCOL,
    UNSUPPORTED_VALUE,
    Condition,
    ParentStatus,
    accepted,
    resolved,
)
from controlplane.mesh.routes import (
    BackendRef,
    GRPCRoute,
    GRPCRouteRule,
    HTTPRoute,
    HTTPRouteRule,
    ParentRef,
    Retry,
    RouteKey,
    Timeouts,
)

ROUTED: Final = ("http", "grpc")
# The policy fields a route replaces on the ports it attaches to (DESIGN: the route wins).
OVERRIDDEN: Final = ("split", "match", "timeout", "retries")
CLUSTER_DOMAIN: Final = "cluster.local"
_PER_BACKEND: Final = frozenset({"RequestHeaderModifier", "ResponseHeaderModifier"})
_RESOLVED: Final = (RESOLVED_REFS, "")

Route = HTTPRoute | GRPCRoute
Rule = HTTPRouteRule | GRPCRouteRule


def outbound_cluster(name: str, namespace: str, port: int) -> str:
    """The outbound cluster of a Service port; the translator's ``names.outbound_cluster``
    (the mesh layer cannot import it; a test keeps the two equal)."""
    return f"outbound|{port}||{name}.{namespace}.svc.{CLUSTER_DOMAIN}"


@dataclass(frozen=True, slots=True)
class ResolvedBackend:
    cluster: str | None  # None: unresolved, its share of the traffic answers 500
    weight: int
    service_key: str | None  # name.namespace of the Service, when found
    port: int | None
    filters: tuple[RouteFilter, ...] = ()


@dataclass(frozen=True, slots=True)
class ResolvedMirror:
    cluster: str
    numerator: int
    denominator: int


@dataclass(frozen=True, slots=True)
class ResolvedRule:
    route: RouteKey
    rule: int  # index in the route's rules
    matches: tuple[HTTPRouteMatch | GRPCRouteMatch, ...]
    filters: tuple[RouteFilter, ...]
    backends: tuple[ResolvedBackend, ...]
    mirrors: tuple[ResolvedMirror, ...] = ()  # the resolved RequestMirror filters, in order
    timeouts: Timeouts | None = None
    retry: Retry | None = None
    name: str | None = None  # the rule's own name, if it has one

    @property
    def grpc(self) -> bool:
        return self.route[0] == "GRPCRoute"


@dataclass(frozen=True, slots=True)
class _Attached:
    route: Route
    rules: tuple[ResolvedRule, ...]


class Attachments:
    """One mesh's routes, attached. Build with ``attach(mesh)``."""

    def __init__(self, mesh: Mesh) -> None:
        self._by_key = mesh.by_key
        self._grants = mesh.reference_grants
        self._ports: dict[tuple[str, int], list[_Attached]] = {}
        self._statuses: dict[RouteKey, tuple[ParentStatus, ...]] = {}
        self._targets: dict[str, set[str]] = {}
        self._protocols: dict[str, dict[int, str]] = {}  # each Service's ports
        self._routed: dict[str, set[tuple[int, RouteKey]]] = {}  # by Service: (port, route)
        routes: list[Route] = [*mesh.http_routes, *mesh.grpc_routes]
        for route in routes:
            self._attach(route)

    # -- answers -------------------------------------------------------------------------

    def for_service(self, key: str, port: int, proxy_namespace: str) -> list[ResolvedRule]:
        """The rules attached to ``key``'s ``port`` as a proxy in ``proxy_namespace``
        gets them: its namespace's consumer routes when it has any, else the producer
        routes; by route order, then rule order (``rule_routes`` sorts the matches by
        the spec's precedence, these orders breaking ties). Empty: no route attached."""
        attached = self._ports.get((key, port))
        if not attached:
            return []
        namespace = key.partition(".")[2]
        consumer = [a for a in attached if a.route.namespace == proxy_namespace != namespace]
        chosen = consumer or [a for a in attached if a.route.namespace == namespace]
        return [rule for a in chosen for rule in a.rules]

    def attached(self, key: str) -> list[tuple[int, RouteKey]]:
        """(port, route) for every route attached to a port of ``key``, any namespace."""
        return sorted(self._routed.get(key, ()))

    def statuses(self) -> dict[RouteKey, tuple[ParentStatus, ...]]:
        """Each route's status for its Service parents (other parents are not ours here:
        gateways add theirs)."""
        return dict(self._statuses)

    def targets(self, key: str) -> frozenset[str]:
        """The services the routes attached to ``key`` send to (backends, mirrors), in
        any namespace: a sidecar that sees ``key`` needs their clusters."""
        return frozenset(self._targets.get(key, ()))

    def resolve(self, route: Route, port: int | None = None) -> list[ResolvedRule]:
        """``route``'s rules with their backends resolved, for a parent that is not a
        Service port (a gateway listener): ``port`` is the one a backendRef without
        its own means (None: such a backendRef does not resolve)."""
        rules: list[Rule] = list(route.rules)
        return [self._rule(route, index, rule, port or 0) for index, rule in enumerate(rules)]

    @property
    def routed(self) -> frozenset[str]:
        """The services that have a route attached."""
        return frozenset(self._routed)

    # -- building ------------------------------------------------------------------------

    def _attach(self, route: Route) -> None:
        why_not = unsupported(route)
        parents: list[ParentStatus] = []
        for parent in route.parent_refs:
            if not parent.is_service:
                continue
            reason, message, ports = self._parent(route, parent)
            if reason == ACCEPTED and why_not is not None:
                reason, message = UNSUPPORTED_VALUE, why_not
            if reason != ACCEPTED:
                parents.append(ParentStatus(parent, (accepted(reason, message),
                                                     resolved(*self._refs(route, None)))))
                continue
            service_key = f"{parent.name}.{parent.namespace_or(route.namespace)}"
            for port in ports:
                given: list[Rule] = list(route.rules)
                rules = tuple(self._rule(route, index, rule, port)
                              for index, rule in enumerate(given))
                self._ports.setdefault((service_key, port), []).append(_Attached(route, rules))
                self._routed.setdefault(service_key, set()).add((port, route.key))
                targets = self._targets.setdefault(service_key, set())
                targets.update(b.service_key for r in rules for b in r.backends
                               if b.service_key is not None)
                targets.update(self._mirror_keys(route))
            parents.append(ParentStatus(parent, (accepted(),
                                                 resolved(*self._refs(route, ports[0])))))
        if parents:
            self._statuses[route.key] = tuple(parents)

    def _parent(self, route: Route, parent: ParentRef) -> tuple[str, str, list[int]]:
        """(reason, message, the ports it attaches to) for a Service parent."""
        namespace = parent.namespace_or(route.namespace)
        service = self._by_key.get(f"{parent.name}.{namespace}")
        if service is None:
            return (NO_MATCHING_PARENT, f"no Service {parent.name!r} in namespace "
                    f"{namespace!r}; name an existing Service in parentRefs", [])
        routed = [p.port for p in service.service_ports if p.protocol in ROUTED]
        if parent.port is not None:
            numbers = [p.port for p in service.service_ports]
            if parent.port not in numbers:
                return (NO_MATCHING_PARENT, f"Service {service.key} has no port "
                        f"{parent.port} (it has {', '.join(map(str, numbers))}); name one "
                        "of its ports or leave port out", [])
            if parent.port not in routed:
                return (NO_MATCHING_PARENT, f"port {parent.port} of Service {service.key} "
                        f"is TCP; a {route.key[0]} attaches to an HTTP or gRPC port "
                        "(protocol: http or grpc)", [])
            return ACCEPTED, "", [parent.port]
        if not routed:
            return (NO_MATCHING_PARENT, f"Service {service.key} has no HTTP or gRPC port "
                    f"for a {route.key[0]}; give it one (protocol: http or grpc)", [])
        return ACCEPTED, "", routed

    def _rule(self, route: Route, index: int, rule: Rule, port: int) -> ResolvedRule:
        backends = tuple(self._backend(route, ref, port)[0] for ref in rule.backend_refs or ())
        mirrors = tuple(m for f in rule.filters or () if f.request_mirror is not None
                        if (m := self._mirror(route, f, port)) is not None)
        http = rule if isinstance(rule, HTTPRouteRule) else None
        return ResolvedRule(
            route=route.key, rule=index, matches=tuple(rule.matches_or_default),
            filters=tuple(rule.filters or ()), backends=backends, mirrors=mirrors,
            timeouts=http.timeouts if http else None, retry=http.retry if http else None,
            name=rule.name)

    def _backend(self, route: Route, ref: BackendObjectRef,
                 port: int) -> tuple[ResolvedBackend, tuple[str, str]]:
        """The backend as served, and (reason, message) for ResolvedRefs."""
        weight = ref.weight if isinstance(ref, BackendRef) else 0
        filters = tuple(ref.filters or ()) if isinstance(ref, BackendRef) else ()
        namespace = ref.namespace_or(route.namespace)
        shown = f"{ref.kind} {namespace}/{ref.name}"

        def unresolved(reason: str, message: str) -> tuple[ResolvedBackend, tuple[str, str]]:
            return ResolvedBackend(None, weight, None, ref.port, filters), (reason, message)

        if ref.group != CORE or ref.kind != "Service":
            group = ref.group or "core"
            return unresolved(INVALID_KIND, f"backendRef {ref.name!r} is a {ref.kind} of "
                              f"group {group!r}; only Services (group \"\") are backends")
        if namespace != route.namespace and not self._granted(route, namespace, ref.name):
            return unresolved(REF_NOT_PERMITTED, f"backendRef {shown} is in another namespace "
                              f"and no ReferenceGrant in {namespace!r} allows "
                              f"{route.key[0]}s from {route.namespace!r}; add one")
        key = f"{ref.name}.{namespace}"
        service = self._by_key.get(key)
        if service is None:
            return unresolved(BACKEND_NOT_FOUND, f"backendRef {shown} does not exist; "
                              "name an existing Service")
        number = ref.port if ref.port is not None else port
        protocols = self._protocols.get(key)
        if protocols is None:
            protocols = self._protocols[key] = {p.port: p.protocol for p in service.service_ports}
        if number not in protocols:
            return unresolved(BACKEND_NOT_FOUND, f"backendRef {shown} has no port {number}; "
                              "name one of its ports")
        if route.key[0] == "GRPCRoute" and protocols[number] != "grpc":
            return unresolved(UNSUPPORTED_PROTOCOL, f"backendRef {shown} port {number} is "
                              f"{protocols[number]}, and gRPC needs HTTP/2; give the port "
                              "protocol: grpc")
        return (ResolvedBackend(outbound_cluster(service.name, service.namespace, number),
                                weight, key, number, filters), _RESOLVED)

    def _mirror(self, route: Route, found: RouteFilter, port: int) -> ResolvedMirror | None:
        mirror = found.request_mirror
        assert mirror is not None
        backend, _ = self._backend(route, mirror.backend_ref, port)
        if backend.cluster is None:
            return None
        numerator, denominator = mirror.share
        return ResolvedMirror(backend.cluster, numerator, denominator)

    def _mirror_keys(self, route: Route) -> Iterable[str]:
        for rule in route.rules:
            for found in rule.filters or ():
                if found.request_mirror is not None:
                    ref = found.request_mirror.backend_ref
                    yield f"{ref.name}.{ref.namespace_or(route.namespace)}"

    def _refs(self, route: Route, port: int | None) -> tuple[str, str]:
        """ResolvedRefs for the route: the first backendRef (or mirror) that does not
        resolve, or all fine."""
        for rule in route.rules:
            refs: list[BackendObjectRef] = [*(rule.backend_refs or ()), *(
                f.request_mirror.backend_ref for f in rule.filters or ()
                if f.request_mirror is not None)]
            for ref in refs:
                wanted = ref.port if ref.port is not None else port
                if wanted is None:  # not attached: any port of the Service will do
                    service = self._by_key.get(f"{ref.name}.{ref.namespace_or(route.namespace)}")
                    wanted = service.service_ports[0].port if service and service.service_ports \
                        else 0
                _, (reason, message) = self._backend(route, ref, wanted)
                if reason != RESOLVED_REFS:
                    return reason, message
        return RESOLVED_REFS, ""

    def _granted(self, route: Route, namespace: str, name: str) -> bool:
        return any(grant.namespace == namespace
                   and grant.allows(route.key[0], route.namespace, "Service", name)
                   for grant in self._grants)


def unsupported(route: Route) -> str | None:
    """Why the route cannot be served as written (a filter this mesh lacks), or None."""
    rules: list[Rule] = list(route.rules)
    for index, rule in enumerate(rules):
        filters: list[tuple[str, RouteFilter]] = [(f"rules[{index}].filters[{at}]", f)
                                                  for at, f in enumerate(rule.filters or ())]
        filters += [(f"rules[{index}].backendRefs[{b}].filters[{at}]", f)
                    for b, ref in enumerate(rule.backend_refs or ())
                    for at, f in enumerate(ref.filters or ())]
        for where, found in filters:
            if ".backendRefs[" in where and found.type not in _PER_BACKEND:
                return (f"{where}: a {found.type} filter on one backendRef is not supported "
                        "by this mesh (header modifiers are); move it to the rule's filters")
            if found.type not in SUPPORTED:
                return (f"{where}: filter type {found.type} is not supported by this mesh "
                        f"(supported: {', '.join(sorted(SUPPORTED))}); remove it")
    return None


def attach(mesh: Mesh) -> Attachments:
    """The mesh's routes attached, built once per mesh (and again after a model_copy
    that changed the services or routes)."""
    sources = (mesh.services, mesh.http_routes, mesh.grpc_routes, mesh.reference_grants)
    cached = mesh._attached
    if cached is None or any(a is not b for a, b in zip(cached[0], sources, strict=True)):
        cached = (sources, Attachments(mesh))
        mesh._attached = cached
    found: Attachments = cached[1]
    return found


def overridden(mesh: Mesh, service_key: str) -> list[tuple[str, RouteKey]]:
    """(policy field, route) for each TrafficPolicy field of ``service_key`` a route
    attached to it replaces (split, match, timeout, retries): on the ports a route
    attaches to, the route wins. Empty: the policy applies as written."""
    service = mesh.by_key.get(service_key)
    if service is None:
        return []
    fields = [f for f in OVERRIDDEN if getattr(service.policy, f) is not None]
    routes = sorted({route for _, route in attach(mesh).attached(service_key)})
    return [(field, route) for route in routes for field in fields]


def not_accepted(statuses: Mapping[RouteKey, Sequence[ParentStatus]]
                 ) -> list[tuple[RouteKey, ParentRef, Condition]]:
    """(route, parent, the failing condition) for each parent that did not accept its
    route or whose refs do not all resolve: what a file source logs."""
    found = []
    for key, parents in sorted(statuses.items()):
        for status in parents:
            for condition in status.conditions:
                if not condition.status:
                    found.append((key, status.parent, condition))
    return found


def route_warnings(mesh: Mesh) -> list[str]:
    """One line per route a Service parent did not accept, or whose backends do not all
    resolve (``controlplane validate`` prints them): valid, but not all served."""
    if not (mesh.http_routes or mesh.grpc_routes):
        return []
    return [f"{'/'.join(key)} on {parent.describe(key[1])}: {condition.type} "
            f"{condition.reason}: {condition.message}"
            for key, parent, condition in not_accepted(attach(mesh).statuses())]
