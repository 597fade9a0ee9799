"""GatewayClasses, Gateways, TLSRoutes and TCPRoutes -> the mesh's ``gateways``,
``tls_routes``, ``tcp_routes`` and ``certificates``. Pure functions over the API's JSON.

- A GatewayClass is ours when its ``spec.controllerName`` is our controller
  (``mesh.controlplane.io/gateway-controller``); others are left alone, never written.
- A Gateway is ours when its ``gatewayClassName`` names one of our GatewayClasses.
  Gateways of other classes are ignored and never written to. Ours are ordered by
  creationTimestamp, then namespace/name (the Gateway API's tie-break: the oldest wins).
- A TLSRoute or TCPRoute is kept when one of its parentRefs names a Gateway of ours;
  they are ordered oldest first (a TCP listener's connections go to its oldest route).
- A listener's certificateRefs name Secrets; each Secret our Gateways may use (its own
  namespace, or another that a ReferenceGrant opens to Gateways of that namespace) is
  wanted by the certificates provider (``certificates.py``), and a ``certificates``
  entry (a name only: the key stays with the provider) once it holds a usable pair.

One object's fault stays with it: a Gateway or TLSRoute the model refuses is left out and
reported (the Gateway's ``Accepted: False``, reason ``Invalid``, names the field).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Final

from pydantic import BaseModel, ValidationError

from controlplane.mesh.gateway_tcp import TCPRoute
from controlplane.mesh.gateways import Gateway, TLSRoute
from controlplane.mesh.loader import describe_error
from controlplane.sources.kubernetes.kinds import GATEWAY_CONTROLLER, GATEWAY_GROUP
from controlplane.sources.kubernetes.services import Key, key, meta

Obj = Mapping[str, Any]
Ref = tuple[str, str]  # a Secret: (namespace, name)
MAX_OURS: Final = 1000  # Gateways of ours (the mesh's bound); the oldest are kept
# The spec fields the mesh model takes, per object (the rest, e.g. infrastructure, is
# the deployer's).
_GATEWAY_FIELDS: Final = ("gatewayClassName", "listeners", "addresses")
_LISTENER_FIELDS: Final = ("name", "hostname", "port", "protocol", "tls", "allowedRoutes")
_TLS_ROUTE_FIELDS: Final = ("parentRefs", "hostnames", "rules")
_TCP_ROUTE_FIELDS: Final = ("parentRefs", "rules")


@dataclass(frozen=True)
class GatewayVerdict:
    """Whether a Gateway of ours could be taken into the mesh ("" problem: it was)."""

    generation: int
    problem: str = ""


@dataclass
class Gateways:
    """What one conversion found."""

    classes: dict[str, Obj] = field(default_factory=dict)  # ours, by name
    gateways: list[dict[str, Any]] = field(default_factory=list)  # mesh entries
    objects: dict[Key, Obj] = field(default_factory=dict)  # our Gateway objects
    verdicts: dict[Key, GatewayVerdict] = field(default_factory=dict)
    tls_routes: list[dict[str, Any]] = field(default_factory=list)
    route_objects: dict[Key, Obj] = field(default_factory=dict)  # TLSRoutes kept
    route_problems: dict[Key, str] = field(default_factory=dict)  # TLSRoutes refused
    tcp_routes: list[dict[str, Any]] = field(default_factory=list)
    tcp_route_objects: dict[Key, Obj] = field(default_factory=dict)  # TCPRoutes kept
    tcp_route_problems: dict[Key, str] = field(default_factory=dict)  # TCPRoutes refused
    secrets: set[Ref] = field(default_factory=set)  # what the provider should watch
    certificates: list[dict[str, str]] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)


def ours(gateway_classes: Iterable[Obj]) -> dict[str, Obj]:
    """Our GatewayClasses by name."""
    found: dict[str, Obj] = {}
    for obj in gateway_classes:
        spec = obj.get("spec") if isinstance(obj, Mapping) else None
        if isinstance(spec, Mapping) and spec.get("controllerName") == GATEWAY_CONTROLLER:
            found[str(meta(obj).get("name") or "")] = obj
    return found


def _order(obj: Obj) -> tuple[str, str, str]:
    namespace, name = key(obj)
    return str(meta(obj).get("creationTimestamp") or ""), namespace, name


def _generation(obj: Obj) -> int:
    value = meta(obj).get("generation")
    return value if isinstance(value, int) and not isinstance(value, bool) else 0


def _entry(obj: Obj, fields: tuple[str, ...]) -> dict[str, Any]:
    namespace, name = key(obj)
    spec = obj.get("spec")
    spec = spec if isinstance(spec, Mapping) else {}
    return {"name": name, "namespace": namespace,
            **{k: spec[k] for k in fields if k in spec}}


def _gateway_entry(obj: Obj) -> dict[str, Any]:
    entry = _entry(obj, _GATEWAY_FIELDS)
    listeners = entry.get("listeners")
    if isinstance(listeners, list):
        entry["listeners"] = [{k: v for k, v in item.items() if k in _LISTENER_FIELDS}
                              if isinstance(item, Mapping) else item for item in listeners]
    return entry


def _validated(model: type[BaseModel], entry: dict[str, Any]) -> str:
    try:
        model.model_validate(entry)
    except ValidationError as exc:
        return "; ".join(describe_error(e, entry) for e in exc.errors())
    return ""


def _grants(grants: Iterable[Obj]) -> set[tuple[str, str, str]]:
    """(Secret namespace, Gateway namespace, Secret name or "") that ReferenceGrants open."""
    opened: set[tuple[str, str, str]] = set()
    for grant in grants:
        if not isinstance(grant, Mapping):
            continue
        spec = grant.get("spec")
        if not isinstance(spec, Mapping):
            continue
        to = [t for t in spec.get("to") or [] if isinstance(t, Mapping)
              and (t.get("group") or "") == "" and t.get("kind") == "Secret"]
        for source in spec.get("from") or []:
            if not isinstance(source, Mapping) or source.get("group") != GATEWAY_GROUP \
                    or source.get("kind") != "Gateway":
                continue
            for target in to:
                opened.add((key(grant)[0], str(source.get("namespace") or ""),
                            str(target.get("name") or "")))
    return opened


def secret_refs(gateway: Mapping[str, Any], grants: set[tuple[str, str, str]]) -> set[Ref]:
    """The Secrets a validated Gateway entry's listeners may use."""
    found: set[Ref] = set()
    namespace = str(gateway.get("namespace") or "default")
    for listener in gateway.get("listeners") or []:
        tls = listener.get("tls") if isinstance(listener, Mapping) else None
        if not isinstance(tls, Mapping) or tls.get("mode", "Terminate") != "Terminate":
            continue
        for ref in tls.get("certificateRefs") or []:
            if not isinstance(ref, Mapping) or (ref.get("group") or "") != "" \
                    or ref.get("kind", "Secret") != "Secret":
                continue
            target = str(ref.get("namespace") or namespace)
            name = str(ref.get("name") or "")
            if target == namespace or (target, namespace, "") in grants \
                    or (target, namespace, name) in grants:
                found.add((target, name))
    return found


def convert_gateways(gateway_classes: Iterable[Obj], gateways: Iterable[Obj],
                     tls_routes: Iterable[Obj], reference_grants: Iterable[Obj] = (),
                     usable: Callable[[Ref], bool] = lambda ref: False,
                     tcp_routes: Iterable[Obj] = ()) -> Gateways:
    """Our classes, Gateways, TLSRoutes and TCPRoutes as mesh entries; ``usable``:
    whether the certificates provider holds a usable pair for a Secret."""
    result = Gateways(classes=ours(gateway_classes))
    mine = sorted((g for g in gateways if isinstance(g, Mapping)
                   and isinstance(g.get("spec"), Mapping)
                   and g["spec"].get("gatewayClassName") in result.classes), key=_order)
    grants = _grants(reference_grants)
    for obj in mine:
        gateway_key = key(obj)
        entry = _gateway_entry(obj)
        problem = _validated(Gateway, entry)
        if not problem and len(result.gateways) >= MAX_OURS:
            problem = (f"more than {MAX_OURS} Gateways of this controller; the oldest are "
                       "served: delete some")
        result.objects[gateway_key] = obj
        result.verdicts[gateway_key] = GatewayVerdict(_generation(obj), problem)
        if problem:
            result.skipped.append(f"gateway {gateway_key[0]}/{gateway_key[1]}: {problem}")
            continue
        result.gateways.append(entry)
        result.secrets |= secret_refs(entry, grants)
    served = {(g["namespace"], g["name"]) for g in result.gateways}
    _routes(tls_routes, TLSRoute, _TLS_ROUTE_FIELDS, served, result.tls_routes,
            result.route_objects, result.route_problems, result.skipped)
    _routes(tcp_routes, TCPRoute, _TCP_ROUTE_FIELDS, served, result.tcp_routes,
            result.tcp_route_objects, result.tcp_route_problems, result.skipped)
    result.certificates = certificate_entries(result.secrets, usable)
    return result


def _routes(objects: Iterable[Obj], model: type[BaseModel], fields: tuple[str, ...],
            served: set[Key], entries: list[dict[str, Any]], kept: dict[Key, Obj],
            problems: dict[Key, str], skipped: list[str]) -> None:
    """The routes of one kind naming a Gateway of ours, oldest first, into ``entries``
    (and ``kept``); one the model refuses into ``problems``."""
    for obj in sorted((r for r in objects if isinstance(r, Mapping)), key=_order):
        route_key = key(obj)
        entry = _entry(obj, fields)
        if not _names_ours(entry, served):
            continue
        problem = _validated(model, entry)
        if problem:
            problems[route_key] = problem
            skipped.append(f"{model.__name__.lower()} {route_key[0]}/{route_key[1]}: "
                           f"{problem}")
            continue
        kept[route_key] = obj
        entries.append(entry)


def certificate_entries(secrets: Iterable[Ref], usable: Callable[[Ref], bool],
                        ) -> list[dict[str, str]]:
    """The mesh's ``certificates`` entries (names only) for the Secrets that may serve."""
    return [{"name": name, "namespace": namespace} for namespace, name in sorted(secrets)
            if usable((namespace, name))]


def _names_ours(route: Mapping[str, Any], served: set[Key]) -> bool:
    namespace = str(route.get("namespace") or "default")
    for parent in route.get("parentRefs") or []:
        if not isinstance(parent, Mapping):
            continue
        if parent.get("group", GATEWAY_GROUP) == GATEWAY_GROUP and \
                parent.get("kind", "Gateway") == "Gateway" and \
                (str(parent.get("namespace") or namespace), str(parent.get("name"))) in served:
            return True
    return False
