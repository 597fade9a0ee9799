"""Which listeners of which Gateway serve, and which routes attach to them: pure.

The Gateway API's rules, applied to a mesh:
- a listener is served when it is valid, not in conflict and its certificates resolve
  (``gateway_listeners.py``); one that is not says why in its conditions, the others
  are served.
- an HTTPRoute or GRPCRoute (to HTTP/HTTPS listeners), TLSRoute (to TLS listeners) or
  TCPRoute (to TCP listeners, and TLS listeners that terminate) attaches to a Gateway
  parent's listeners that its ``sectionName``/``port`` pick, whose ``allowedRoutes``
  admit its kind and namespace, and whose hostname intersects its hostnames (the more
  specific of the two is served). Each parent gets a ParentStatus. Several TCPRoutes may
  attach to one listener; the first (the oldest) takes its connections.

``gateway_attachments(mesh)`` gives both, for the translator (what to serve), the file
source (what to log) and the Kubernetes source (what to write in ``status``).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TypeAlias

from controlplane.mesh.attach import not_accepted, unsupported
from controlplane.mesh.gateway_listeners import (
    CONFLICTED,
    HTTP,
    HTTPS,
    INVALID,
    LISTENERS_NOT_VALID,
    PROGRAMMED,
    TCP,
    TLS,
    Checked,
    check_listeners,
    condition,
    intersect,
    route_kinds,
)
from controlplane.mesh.gateway_tcp import TCPRoute
from controlplane.mesh.gateways import Gateway, Listener, TLSRoute
from controlplane.mesh.model import Mesh
from controlplane.mesh.route_filters import CORE, GATEWAY_GROUP
from controlplane.mesh.route_status import (
    ACCEPTED,
    BACKEND_NOT_FOUND,
    INVALID_KIND,
    NO_MATCHING_LISTENER_HOSTNAME,
    NO_MATCHING_PARENT,
    NOT_ALLOWED_BY_LISTENERS,
    REF_NOT_PERMITTED,
    UNSUPPORTED_PROTOCOL,
    UNSUPPORTED_VALUE,
    Condition,
    ParentStatus,
    RouteKey,
    accepted,
    resolved,
)
from controlplane.mesh.routes import BackendRef, GRPCRoute, HTTPRoute, ParentRef

__all__ = ["HTTP", "HTTPS", "TCP", "TLS", "Attached", "GatewayAttachments", "GatewayStatus",
           "GatewayView", "ListenerStatus", "ServedListener", "gateway_attachments",
           "gateway_warnings", "intersect", "not_served"]

Route: TypeAlias = HTTPRoute | GRPCRoute | TLSRoute | TCPRoute


@dataclass(frozen=True, slots=True)
class ListenerStatus:
    """``status.listeners[]`` of one listener."""

    name: str
    supported_kinds: tuple[str, ...]  # route kinds of group gateway.networking.k8s.io
    attached_routes: int
    conditions: tuple[Condition, ...]


@dataclass(frozen=True, slots=True)
class GatewayStatus:
    conditions: tuple[Condition, ...]  # Accepted, Programmed
    listeners: tuple[ListenerStatus, ...]


@dataclass(frozen=True, slots=True)
class Attached:
    """A route attached to a listener, and the hostnames it is served for there ("*":
    any)."""

    route: Route
    hostnames: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class ServedListener:
    listener: Listener
    certificates: tuple[tuple[str, str], ...]  # (namespace, name), HTTPS only
    routes: tuple[Attached, ...]


@dataclass(frozen=True, slots=True)
class GatewayView:
    gateway: Gateway
    status: GatewayStatus
    served: tuple[ServedListener, ...]  # in the Gateway's listener order


@dataclass(slots=True)
class GatewayAttachments:
    gateways: dict[tuple[str, str], GatewayView] = field(default_factory=dict)
    routes: dict[RouteKey, tuple[ParentStatus, ...]] = field(default_factory=dict)
    """Each route's Gateway parents (Service parents: ``attach.py``)."""

    def gateway(self, namespace: str, name: str) -> GatewayView | None:
        return self.gateways.get((namespace, name))


# -- routes ------------------------------------------------------------------------------

def _admits(gateway: Gateway, listener: Listener, kind: str, namespace: str
            ) -> bool:
    kinds, _ = route_kinds(listener)
    if kind not in kinds:
        return False
    frm = listener.allowed_routes.namespaces.from_
    return frm == "All" or (frm == "Same" and namespace == gateway.namespace)


def _backend_problem(mesh: Mesh, kind: str, route: Route, ref: BackendRef
                     ) -> tuple[str, str] | None:
    namespace = ref.namespace or route.namespace
    where = f"backendRef {namespace}/{ref.name}"
    if ref.group != CORE or ref.kind != "Service":
        return (INVALID_KIND, f"{where}: kind {ref.group}/{ref.kind} is not supported; "
                "name a Service")
    if namespace != route.namespace and not any(
            grant.namespace == namespace and grant.allows(kind, route.namespace, "Service",
                                                          ref.name)
            for grant in mesh.reference_grants):
        return (REF_NOT_PERMITTED, f"{where}: another namespace's Service needs a "
                f"ReferenceGrant in {namespace} from {kind}s of {route.namespace}")
    service = mesh.service(ref.name, namespace)
    if service is None:
        return (BACKEND_NOT_FOUND, f"{where}: no such service in the mesh")
    protocols = {p.port: p.protocol for p in service.service_ports}
    if ref.port is None or ref.port not in protocols:
        return (BACKEND_NOT_FOUND, f"{where}: port {ref.port} is not a port of the "
                "service; give one of its ports")
    if kind == "GRPCRoute" and protocols[ref.port] != "grpc":
        return (UNSUPPORTED_PROTOCOL, f"{where}: port {ref.port} is "
                f"{protocols[ref.port]}, and gRPC needs HTTP/2; give the port protocol: grpc")
    return None


def backend_refs(route: Route) -> Iterable[BackendRef]:
    for rule in route.rules:
        yield from rule.backend_refs or ()


def _resolved(mesh: Mesh, kind: str, route: Route) -> Condition:
    for ref in backend_refs(route):
        problem = _backend_problem(mesh, kind, route, ref)
        if problem is not None:
            return resolved(*problem)
    return resolved()


def _attach(mesh: Mesh, views: dict[tuple[str, str], _Building], kind: str,
            route: Route, ref: ParentRef) -> Condition:
    namespace = ref.namespace_or(route.namespace)
    building = views.get((namespace, ref.name))
    if building is None:
        return accepted(NO_MATCHING_PARENT, f"no Gateway {namespace}/{ref.name} in the mesh")
    gateway = building.gateway
    picked = [entry for entry in building.listeners
              if (ref.section_name is None or entry[0].name == ref.section_name)
              and (ref.port is None or entry[0].port == ref.port)]
    if not picked:
        wanted = " and ".join([*([f"named {ref.section_name!r}"] if ref.section_name else []),
                                *([f"on port {ref.port}"] if ref.port else [])])
        return accepted(NO_MATCHING_PARENT, f"Gateway {namespace}/{ref.name} has no listener "
                        f"{wanted}; name one of its listeners (sectionName) or ports")
    allowed = [entry for entry in picked if _admits(gateway, entry[0], kind, route.namespace)]
    if not allowed:
        return accepted(NOT_ALLOWED_BY_LISTENERS, f"no listener of Gateway "
                        f"{namespace}/{ref.name} picked by the parentRef admits {kind}s "
                        f"from namespace {route.namespace} (allowedRoutes)")
    any_host = False
    for listener, _conditions, _certificates, _served in allowed:
        hosts = intersect(listener.hostname, route.hostnames)
        if not hosts:
            continue
        any_host = True
        building.attached.setdefault(listener.name, []).append(Attached(route, hosts))
    if not any_host:
        return accepted(NO_MATCHING_LISTENER_HOSTNAME, f"none of the route's hostnames "
                        f"matches a listener of Gateway {namespace}/{ref.name}")
    return accepted()


def _unsupported(route: Route) -> str | None:
    if isinstance(route, TCPRoute):
        return None if len(route.rules) == 1 else (
            f"rules: a TCPRoute takes one rule here ({len(route.rules)} given: a TCP "
            "stream has nothing to choose a rule by); put every backendRef in one rule")
    return unsupported(route) if not isinstance(route, TLSRoute) else None


@dataclass(slots=True)
class _Building:
    gateway: Gateway
    listeners: list[Checked]
    attached: dict[str, list[Attached]] = field(default_factory=dict)


_last: tuple[object, GatewayAttachments] | None = None


def gateway_attachments(mesh: Mesh) -> GatewayAttachments:
    """Every Gateway's status and served listeners, and every route's Gateway parents.
    Computed once per mesh object (the last one asked for is kept)."""
    global _last
    if _last is not None and _last[0] is mesh:
        return _last[1]
    made = _compute(mesh)
    _last = (mesh, made)
    return made


def _compute(mesh: Mesh) -> GatewayAttachments:
    views = {(g.namespace, g.name): _Building(g, check_listeners(mesh, g)) for g in mesh.gateways}
    result = GatewayAttachments()
    routes: list[tuple[str, Route]] = [*(("HTTPRoute", r) for r in mesh.http_routes),
                                       *(("GRPCRoute", r) for r in mesh.grpc_routes),
                                       *(("TLSRoute", r) for r in mesh.tls_routes),
                                       *(("TCPRoute", r) for r in mesh.tcp_routes)]
    for kind, route in routes:
        parents = [p for p in route.parent_refs if p.group == GATEWAY_GROUP
                   and p.kind == "Gateway"]
        if not parents:
            continue
        refs = _resolved(mesh, kind, route)
        why = _unsupported(route)
        result.routes[(kind, route.namespace, route.name)] = tuple(
            ParentStatus(p, (_attach(mesh, views, kind, route, p) if why is None
                             else accepted(UNSUPPORTED_VALUE, why), refs)) for p in parents)
    for key, building in views.items():
        result.gateways[key] = _view(building)
    return result


def _view(building: _Building) -> GatewayView:
    statuses: list[ListenerStatus] = []
    served: list[ServedListener] = []
    for listener, conditions, certificates, ok in building.listeners:
        routes = tuple(building.attached.get(listener.name, ()))
        kinds, _ = route_kinds(listener)
        programmed = condition(PROGRAMMED, ok, PROGRAMMED if ok else INVALID,
                                "served by the gateway's proxies" if ok else
                                "not served: see its other conditions")
        statuses.append(ListenerStatus(listener.name, kinds, len(routes),
                                       (*conditions, programmed)))
        if ok:
            served.append(ServedListener(listener, certificates, routes))
    valid = any(c.status for s in statuses for c in s.conditions if c.type == ACCEPTED)
    gateway_conditions = (
        accepted(ACCEPTED, "the Gateway is accepted") if valid
        else accepted(LISTENERS_NOT_VALID, "no listener is valid; see each listener's "
                      "conditions"),
        condition(PROGRAMMED, bool(served), PROGRAMMED if served else INVALID,
                   f"{len(served)} of {len(statuses)} listeners served" if served
                   else "no listener can be served; see each listener's conditions"),
    )
    return GatewayView(building.gateway, GatewayStatus(gateway_conditions, tuple(statuses)),
                       tuple(served))


def not_served(attachments: GatewayAttachments) -> list[tuple[str, str, Condition]]:
    """(gateway ``ns/name``, listener, the condition that keeps it out) for each listener
    not served: what a file source logs."""
    found = []
    for (namespace, name), view in sorted(attachments.gateways.items()):
        for listener in view.status.listeners:
            for found_condition in listener.conditions:
                failing = found_condition.status if found_condition.type == CONFLICTED \
                    else not found_condition.status
                if failing and found_condition.type != PROGRAMMED:
                    found.append((f"{namespace}/{name}", listener.name, found_condition))
    return found


def gateway_warnings(mesh: Mesh) -> list[str]:
    """One line per route a Gateway parent did not accept (or whose backends do not all
    resolve) and per listener not served (``controlplane validate`` prints them, as
    ``route_warnings`` for Service parents): valid, but not all served."""
    if not (mesh.gateways or mesh.http_routes or mesh.grpc_routes or mesh.tls_routes
            or mesh.tcp_routes):
        return []
    found = gateway_attachments(mesh)
    lines = [f"{'/'.join(key)} on {parent.describe(key[1])}: {bad.type} {bad.reason}: "
             f"{bad.message}" for key, parent, bad in not_accepted(found.routes)]
    lines += [f"Gateway {gateway} listener {listener}: {bad.type} {bad.reason}: "
              f"{bad.message}" for gateway, listener, bad in not_served(found)]
    lines += [f"TCPRoute/{route.namespace}/{route.name} on Gateway {gateway} listener "
              f"{listener}: attached, but {first.namespace}/{first.name} came first and "
              "takes every connection (one TCPRoute per listener); give it its own listener"
              for gateway, listener, first, route in shadowed_tcp_routes(found)]
    return lines


def first_tcp_route(served: ServedListener) -> TCPRoute | None:
    """The TCPRoute that takes a listener's connections: the first attached (Kubernetes:
    the oldest; file mode: the first in the file); the rest stay attached, unused."""
    return next((a.route for a in served.routes if isinstance(a.route, TCPRoute)), None)


def shadowed_tcp_routes(attachments: GatewayAttachments
                        ) -> list[tuple[str, str, TCPRoute, TCPRoute]]:
    """(gateway ``ns/name``, listener, the route served, a route attached after it)."""
    found = []
    for (namespace, name), view in sorted(attachments.gateways.items()):
        for served in view.served:
            first = first_tcp_route(served)
            found += [(f"{namespace}/{name}", served.listener.name, first, a.route)
                      for a in served.routes if first is not None
                      and isinstance(a.route, TCPRoute) and a.route is not first]
    return found
