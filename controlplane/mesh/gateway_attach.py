"""Which listeners of which Gateway serve, and which routes attach to them: pure.

The Gateway API's rules, applied to a mesh:
- a listener is served when it is valid (HTTP; HTTPS terminating with certificateRefs;
  TLS passing through), not in conflict with an earlier listener of its port (HTTP
  beside HTTPS/TLS on one port: ProtocolConflict; the same hostname twice:
  HostnameConflict), and, for HTTPS, every certificate it names exists and may be used
  (same namespace, or a ReferenceGrant from the Gateway's namespace). A listener that is
  not served says why in its conditions; the others are served.
- an HTTPRoute (to HTTP/HTTPS listeners) or TLSRoute (to TLS listeners) attaches to a
  Gateway parent's listeners that its ``sectionName``/``port`` pick, whose
  ``allowedRoutes`` admit its kind and namespace, and whose hostname intersects its
  hostnames (the more specific of the two is served). Each parent gets a ParentStatus.

``gateway_attachments(mesh)`` gives both, for the translator (what to serve), the file
source (what to log) and the Kubernetes source (what to write in ``status``).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Final, TypeAlias

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
    RESOLVED_REFS,
    UNSUPPORTED_PROTOCOL,
    Condition,
    ParentStatus,
    RouteKey,
    accepted,
    resolved,
)
from controlplane.mesh.routes import BackendRef, HTTPRoute, ParentRef

HTTP: Final = "HTTP"
HTTPS: Final = "HTTPS"
TLS: Final = "TLS"
PROGRAMMED: Final = "Programmed"
CONFLICTED: Final = "Conflicted"
INVALID: Final = "Invalid"
INVALID_CERTIFICATE_REF: Final = "InvalidCertificateRef"
INVALID_ROUTE_KINDS: Final = "InvalidRouteKinds"
LISTENERS_NOT_VALID: Final = "ListenersNotValid"
PROTOCOL_CONFLICT: Final = "ProtocolConflict"
HOSTNAME_CONFLICT: Final = "HostnameConflict"
NO_CONFLICTS: Final = "NoConflicts"
UNSUPPORTED_VALUE: Final = "UnsupportedValue"
_KINDS: Final = {HTTP: ("HTTPRoute",), HTTPS: ("HTTPRoute",), TLS: ("TLSRoute",)}

Route: TypeAlias = HTTPRoute | TLSRoute


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


# -- hostnames ---------------------------------------------------------------------------

def _covered(name: str, wildcard: str) -> bool:
    """``name`` (itself maybe a wildcard) lies under ``*.suffix``: one label or more."""
    suffix = wildcard[1:]  # ".example.com"
    return name != wildcard and name.endswith(suffix) and len(name) > len(suffix)


def intersect(listener: str | None, route: Sequence[str] | None) -> tuple[str, ...]:
    """The hostnames a route serves on a listener: the more specific of each matching
    pair (Gateway API: a route's ``foo.example.com`` under a listener's
    ``*.example.com``; a listener's ``foo.example.com`` under a route's wildcard)."""
    if not route:
        return (listener or "*",)
    if listener is None:
        return tuple(dict.fromkeys(route))
    found: list[str] = []
    for host in route:
        if host == listener or (listener.startswith("*.") and _covered(host, listener)):
            found.append(host)
        elif host.startswith("*.") and _covered(listener, host):
            found.append(listener)
    return tuple(dict.fromkeys(found))


# -- listeners ---------------------------------------------------------------------------

def _condition(type_: str, ok: bool, reason: str, message: str) -> Condition:
    return Condition(type_, ok, reason, message)


def _family(protocol: str) -> str:
    return "http" if protocol == HTTP else "tls"


def _shape_problem(listener: Listener) -> tuple[str, str] | None:
    """(Accepted reason, message) when the listener cannot be served as written."""
    protocol, tls = listener.protocol, listener.tls
    if protocol not in _KINDS:
        return (UNSUPPORTED_PROTOCOL, f"protocol {protocol!r} is not supported; use HTTP, "
                "HTTPS or TLS")
    if protocol == HTTP and tls is not None:
        return (UNSUPPORTED_VALUE, "an HTTP listener takes no tls; use protocol HTTPS to "
                "terminate TLS")
    if protocol == HTTPS and (tls is None or tls.mode != "Terminate"):
        return (UNSUPPORTED_VALUE, "an HTTPS listener terminates TLS: give tls.mode "
                "Terminate and tls.certificateRefs (use protocol TLS to pass through)")
    if protocol == TLS and (tls is None or tls.mode != "Passthrough"):
        return (UNSUPPORTED_VALUE, "a TLS listener passes TLS through by SNI here: give "
                "tls.mode Passthrough (use protocol HTTPS to terminate)")
    if protocol == TLS and tls is not None and tls.certificate_refs:
        return (UNSUPPORTED_VALUE, "a Passthrough listener takes no certificateRefs: the "
                "backend terminates TLS; remove them")
    return None


def _kinds(listener: Listener) -> tuple[tuple[str, ...], str | None]:
    """(route kinds it admits, why some asked for are not supported)."""
    supported = _KINDS.get(listener.protocol, ())
    asked = listener.allowed_routes.kinds
    if not asked:
        return supported, None
    kept = tuple(k.kind for k in asked if k.group == GATEWAY_GROUP and k.kind in supported)
    wrong = [f"{k.group}/{k.kind}" for k in asked
             if not (k.group == GATEWAY_GROUP and k.kind in supported)]
    article = "an" if listener.protocol.startswith("HTTP") else "a"
    why = (f"allowedRoutes.kinds {', '.join(wrong)} cannot attach to {article} "
           f"{listener.protocol} "
           f"listener (it takes {', '.join(supported) or 'none'})") if wrong else None
    return kept, why


def _certificates(mesh: Mesh, gateway: Gateway, listener: Listener
                  ) -> tuple[tuple[tuple[str, str], ...], tuple[str, str] | None]:
    """(the certificates, (reason, message) when one cannot be used)."""
    if listener.protocol != HTTPS or listener.tls is None:
        return (), None
    if not listener.tls.certificate_refs:
        return (), (INVALID_CERTIFICATE_REF, "an HTTPS listener needs tls.certificateRefs")
    known = {(c.namespace, c.name) for c in mesh.certificates}
    found: list[tuple[str, str]] = []
    for at, ref in enumerate(listener.tls.certificate_refs):
        namespace = ref.namespace or gateway.namespace
        where = f"tls.certificateRefs[{at}] ({namespace}/{ref.name})"
        if ref.group != CORE or ref.kind != "Secret":
            return (), (INVALID_CERTIFICATE_REF, f"{where}: kind {ref.group}/{ref.kind} is "
                        "not supported; name a Secret (group \"\")")
        if namespace != gateway.namespace and not any(
                grant.namespace == namespace
                and grant.allows("Gateway", gateway.namespace, "Secret", ref.name)
                for grant in mesh.reference_grants):
            return (), (REF_NOT_PERMITTED, f"{where}: another namespace's Secret needs a "
                        f"ReferenceGrant in {namespace} from Gateways of "
                        f"{gateway.namespace}")
        if (namespace, ref.name) not in known:
            return (), (INVALID_CERTIFICATE_REF, f"{where}: no such certificate; add a "
                        "certificates entry (a kubernetes.io/tls Secret in a cluster)")
        found.append((namespace, ref.name))
    return tuple(dict.fromkeys(found)), None


def _listeners(mesh: Mesh, gateway: Gateway
               ) -> list[tuple[Listener, list[Condition], tuple[tuple[str, str], ...], bool]]:
    """Each listener with its conditions (but Programmed), certificates and whether it
    is served."""
    out = []
    families: dict[int, str] = {}
    hosts: dict[tuple[int, str], str] = {}
    for listener in gateway.listeners:
        conditions: list[Condition] = []
        shape = _shape_problem(listener)
        conflict: tuple[str, str] | None = None
        if shape is None:
            family = families.setdefault(listener.port, _family(listener.protocol))
            taken = hosts.get((listener.port, listener.hostname or "*"))
            if family != _family(listener.protocol):
                conflict = (PROTOCOL_CONFLICT, f"port {listener.port} already serves "
                            f"{'HTTP' if family == 'http' else 'TLS'}; give this listener "
                            "another port")
            elif taken is not None:
                conflict = (HOSTNAME_CONFLICT, f"listener {taken} already serves hostname "
                            f"{listener.hostname or '(any)'} on port {listener.port}; give "
                            "one of them another hostname or port")
            else:
                hosts[(listener.port, listener.hostname or "*")] = listener.name
        conditions.append(_condition(CONFLICTED, conflict is not None,
                                     conflict[0] if conflict else NO_CONFLICTS,
                                     conflict[1] if conflict else "no conflicts"))
        conditions.append(accepted(shape[0], shape[1]) if shape else accepted(
            ACCEPTED, "the listener is valid"))
        certificates, bad = _certificates(mesh, gateway, listener) if shape is None \
            else ((), None)
        _, wrong_kinds = _kinds(listener)
        if bad is not None:
            conditions.append(resolved(bad[0], bad[1]))
        elif wrong_kinds is not None:
            conditions.append(resolved(INVALID_ROUTE_KINDS, wrong_kinds))
        else:
            conditions.append(resolved(RESOLVED_REFS, "every reference resolves"))
        served = shape is None and conflict is None and bad is None
        out.append((listener, conditions, certificates, served))
    return out


# -- routes ------------------------------------------------------------------------------

def _admits(gateway: Gateway, listener: Listener, kind: str, namespace: str
            ) -> bool:
    kinds, _ = _kinds(listener)
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
    if ref.port is None or ref.port not in {p.port for p in service.service_ports}:
        return (BACKEND_NOT_FOUND, f"{where}: port {ref.port} is not a port of the "
                "service; give one of its ports")
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


@dataclass(slots=True)
class _Building:
    gateway: Gateway
    listeners: list[tuple[Listener, list[Condition], tuple[tuple[str, str], ...], bool]]
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
    views = {(g.namespace, g.name): _Building(g, _listeners(mesh, g)) for g in mesh.gateways}
    result = GatewayAttachments()
    routes: list[tuple[str, Route]] = [*(("HTTPRoute", r) for r in mesh.http_routes),
                                       *(("TLSRoute", r) for r in mesh.tls_routes)]
    for kind, route in routes:
        parents = [p for p in route.parent_refs if p.group == GATEWAY_GROUP
                   and p.kind == "Gateway"]
        if not parents:
            continue
        refs = _resolved(mesh, kind, route)
        result.routes[(kind, route.namespace, route.name)] = tuple(
            ParentStatus(p, (_attach(mesh, views, kind, route, p), refs)) for p in parents)
    for key, building in views.items():
        result.gateways[key] = _view(building)
    return result


def _view(building: _Building) -> GatewayView:
    statuses: list[ListenerStatus] = []
    served: list[ServedListener] = []
    for listener, conditions, certificates, ok in building.listeners:
        routes = tuple(building.attached.get(listener.name, ()))
        kinds, _ = _kinds(listener)
        programmed = _condition(PROGRAMMED, ok, PROGRAMMED if ok else INVALID,
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
        _condition(PROGRAMMED, bool(served), PROGRAMMED if served else INVALID,
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
            for condition in listener.conditions:
                failing = condition.status if condition.type == CONFLICTED \
                    else not condition.status
                if failing and condition.type != PROGRAMMED:
                    found.append((f"{namespace}/{name}", listener.name, condition))
    return found
