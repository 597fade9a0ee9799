"""A Gateway's listeners, checked: which are served, and the conditions each reports.

A listener is served when it is valid (HTTP; HTTPS terminating with certificateRefs; TLS
passing through, or terminating with certificateRefs; TCP), not in conflict with an
earlier listener of its port (HTTP beside HTTPS/TLS on one port, or TCP beside anything:
ProtocolConflict; the same hostname twice: HostnameConflict), and, when it terminates
TLS, every certificate it names exists and may be used (same namespace, or a
ReferenceGrant from the Gateway's namespace). Also the hostname intersection of a
listener and a route. Pure; ``gateway_attach.py`` puts it together with the routes.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Final

from controlplane.mesh.gateways import Gateway, Listener
from controlplane.mesh.model import Mesh
from controlplane.mesh.route_filters import CORE, GATEWAY_GROUP
from controlplane.mesh.route_status import (
    ACCEPTED,
    REF_NOT_PERMITTED,
    RESOLVED_REFS,
    UNSUPPORTED_PROTOCOL,
    Condition,
    accepted,
    resolved,
)

HTTP: Final = "HTTP"
HTTPS: Final = "HTTPS"
TLS: Final = "TLS"
TCP: Final = "TCP"
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
# The route kinds each protocol takes (its supportedKinds): gRPC is HTTP/2, so a
# GRPCRoute attaches where an HTTPRoute does (h2c on HTTP, ALPN h2 on HTTPS).
# A TLS listener that terminates forwards the decrypted stream: a TLSRoute (by SNI, the
# Gateway API's TLSRouteModeTerminate) or a TCPRoute (the listener's hostname is the SNI).
_KINDS: Final = {HTTP: ("HTTPRoute", "GRPCRoute"), HTTPS: ("HTTPRoute", "GRPCRoute"),
                 TLS: ("TLSRoute",), TCP: ("TCPRoute",)}
_TERMINATED_KINDS: Final = ("TLSRoute", "TCPRoute")

Checked = tuple[Listener, list[Condition], tuple[tuple[str, str], ...], bool]
"""A listener, its conditions (all but Programmed), its certificates, whether served."""


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

def condition(type_: str, ok: bool, reason: str, message: str) -> Condition:
    return Condition(type_, ok, reason, message)


def _family(protocol: str) -> str:
    return {HTTP: "http", TCP: "tcp"}.get(protocol, "tls")


def terminates(listener: Listener) -> bool:
    """It decrypts TLS with its own certificates (HTTPS; TLS in mode Terminate)."""
    return listener.protocol in (HTTPS, TLS) and listener.tls is not None \
        and listener.tls.mode == "Terminate"


def supported_kinds(listener: Listener) -> tuple[str, ...]:
    """The route kinds its protocol (and TLS mode) takes."""
    if listener.protocol == TLS and terminates(listener):
        return _TERMINATED_KINDS
    return _KINDS.get(listener.protocol, ())


def _shape_problem(listener: Listener) -> tuple[str, str] | None:
    """(Accepted reason, message) when the listener cannot be served as written."""
    protocol, tls = listener.protocol, listener.tls
    if protocol not in _KINDS:
        return (UNSUPPORTED_PROTOCOL, f"protocol {protocol!r} is not supported; use HTTP, "
                "HTTPS, TLS or TCP")
    if protocol == HTTP and tls is not None:
        return (UNSUPPORTED_VALUE, "an HTTP listener takes no tls; use protocol HTTPS to "
                "terminate TLS")
    if protocol == TCP and tls is not None:
        return (UNSUPPORTED_VALUE, "a TCP listener takes no tls; use protocol TLS with "
                "tls.mode Terminate to terminate TLS, or Passthrough to route by SNI")
    if protocol == HTTPS and (tls is None or tls.mode != "Terminate"):
        return (UNSUPPORTED_VALUE, "an HTTPS listener terminates TLS: give tls.mode "
                "Terminate and tls.certificateRefs (use protocol TLS to pass through)")
    if protocol == TLS and tls is None:
        return (UNSUPPORTED_VALUE, "a TLS listener needs tls: give tls.mode Passthrough "
                "(route by SNI, the backend terminates) or Terminate with "
                "tls.certificateRefs")
    if protocol == TLS and tls is not None and tls.mode == "Passthrough" \
            and tls.certificate_refs:
        return (UNSUPPORTED_VALUE, "a Passthrough listener takes no certificateRefs: the "
                "backend terminates TLS; remove them")
    return None


def route_kinds(listener: Listener) -> tuple[tuple[str, ...], str | None]:
    """(route kinds it admits, why some asked for are not supported)."""
    supported = supported_kinds(listener)
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
    if not terminates(listener) or listener.tls is None:
        return (), None
    if not listener.tls.certificate_refs:
        return (), (INVALID_CERTIFICATE_REF, f"a {listener.protocol} listener that "
                    "terminates TLS needs tls.certificateRefs")
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


def check_listeners(mesh: Mesh, gateway: Gateway) -> list[Checked]:
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
                            f"{ {'http': 'HTTP', 'tcp': 'TCP'}.get(family, 'TLS')}; give "
                            "this listener another port")
            elif family == "tcp" and (listener.port, "tcp") in hosts:
                conflict = (PROTOCOL_CONFLICT, f"listener {hosts[(listener.port, 'tcp')]} "
                            f"already serves TCP on port {listener.port} (a TCP listener "
                            "takes its whole port); give this listener another port")
            elif taken is not None:
                conflict = (HOSTNAME_CONFLICT, f"listener {taken} already serves hostname "
                            f"{listener.hostname or '(any)'} on port {listener.port}; give "
                            "one of them another hostname or port")
            else:
                hosts[(listener.port, "tcp" if family == "tcp"
                       else listener.hostname or "*")] = listener.name
        conditions.append(condition(CONFLICTED, conflict is not None,
                                     conflict[0] if conflict else NO_CONFLICTS,
                                     conflict[1] if conflict else "no conflicts"))
        conditions.append(accepted(shape[0], shape[1]) if shape else accepted(
            ACCEPTED, "the listener is valid"))
        certificates, bad = _certificates(mesh, gateway, listener) if shape is None \
            else ((), None)
        _, wrong_kinds = route_kinds(listener)
        if bad is not None:
            conditions.append(resolved(bad[0], bad[1]))
        elif wrong_kinds is not None:
            conditions.append(resolved(INVALID_ROUTE_KINDS, wrong_kinds))
        else:
            conditions.append(resolved(RESOLVED_REFS, "every reference resolves"))
        served = shape is None and conflict is None and bad is None
        out.append((listener, conditions, certificates, served))
    return out
