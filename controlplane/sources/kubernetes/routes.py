"""Gateway API objects -> the mesh's ``http_routes``, ``grpc_routes`` and
``reference_grants``. Pure functions over the API's JSON.

A Kubernetes route becomes a mesh entry by flattening: its ``metadata.name`` and
``namespace`` beside its ``spec`` fields, which keep the Gateway API's names (the mesh
models are the spec's shape, DESIGN.md section 5). Only routes of ours are taken: those
with a Service parent (GAMMA) or a parent Gateway of our GatewayClass (``gateways``);
a route only for another controller's Gateways is none of our business, and its status
is never written. Routes are ordered as the spec breaks precedence ties: oldest first
(creationTimestamp), then by namespace/name.

One object's fault stays with it: a route the model refuses is left out, and each of
its parents of ours gets ``Accepted: False`` (``UnsupportedValue``) naming the field; a
ReferenceGrant the model refuses is left out (and reported), so the references it would
have allowed stay unresolved (``RefNotPermitted``). No object of any shape raises.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Final

from pydantic import ValidationError

from controlplane.mesh.attach import attach, overridden
from controlplane.mesh.loader import describe_error
from controlplane.mesh.model import Mesh
from controlplane.mesh.route_status import (
    UNSUPPORTED_VALUE,
    ParentStatus,
    RouteKey,
    accepted,
)
from controlplane.mesh.routes import (
    MAX_ROUTES,
    GRPCRoute,
    HTTPRoute,
    ParentRef,
    ReferenceGrant,
)
from controlplane.sources.kubernetes.kinds import GRPC_ROUTES, HTTP_ROUTES, REFERENCE_GRANTS
from controlplane.sources.kubernetes.policies import generation_of, uid_of
from controlplane.sources.kubernetes.services import Key, Obj, key, meta

_CORE: Final = ""
_GATEWAY: Final = ("gateway.networking.k8s.io", "Gateway")
MAX_SHOWN: Final = 3  # problems named per refused object (the rest counted)


@dataclass(frozen=True)
class RouteObject:
    """What status writing needs of one route object of ours."""

    kind: str  # HTTPRoute | GRPCRoute
    namespace: str
    name: str
    generation: int
    uid: str


@dataclass
class RouteConversion:
    http_routes: list[HTTPRoute] = field(default_factory=list)
    grpc_routes: list[GRPCRoute] = field(default_factory=list)
    reference_grants: list[ReferenceGrant] = field(default_factory=list)
    ours: dict[RouteKey, RouteObject] = field(default_factory=dict)  # every route of ours
    # Routes the model refused: their parents of ours, each not accepted, and why.
    refused: dict[RouteKey, tuple[ParentStatus, ...]] = field(default_factory=dict)
    skipped: list[str] = field(default_factory=list)  # objects left out, and why


def _order(objs: Iterable[Obj]) -> list[Obj]:
    """Oldest first, then namespace/name: the spec's tie-break between routes."""
    return sorted((o for o in objs if isinstance(o, Mapping)), key=lambda o: (
        str(meta(o).get("creationTimestamp") or ""), key(o)))


def flatten(obj: Obj) -> dict[str, Any]:
    """The mesh entry of a Kubernetes object: name and namespace beside the spec's
    fields (a spec that is not an object contributes nothing; the model says so)."""
    namespace, name = key(obj)
    spec = obj.get("spec")
    fields = dict(spec) if isinstance(spec, Mapping) else {}
    fields.pop("name", None)  # a spec never has these: the metadata's win
    fields.pop("namespace", None)
    return {"name": name, "namespace": namespace, **fields}


def _parents(obj: Obj) -> list[ParentRef]:
    """The parentRefs the model can read, one at a time (a route refused as a whole still
    reports to each parent it names)."""
    spec = obj.get("spec")
    refs = spec.get("parentRefs") if isinstance(spec, Mapping) else None
    found = []
    for raw in refs if isinstance(refs, list) else []:
        try:
            found.append(ParentRef.model_validate(raw))
        except ValidationError:
            continue
    return found


def is_ours(parent: ParentRef, route_namespace: str,
            gateways: Collection[Key] = ()) -> bool:
    """A Service parent (GAMMA), or a Gateway of our GatewayClass (``gateways``:
    (namespace, name) of each)."""
    if parent.is_service:
        return True
    return ((parent.group, parent.kind) == _GATEWAY
            and (parent.namespace_or(route_namespace), parent.name) in gateways)


def _problems(exc: ValidationError, data: Mapping[str, Any]) -> str:
    errors = exc.errors()
    shown = [describe_error(e, data, root="spec") for e in errors[:MAX_SHOWN]]
    more = f" (and {len(errors) - MAX_SHOWN} more)" if len(errors) > MAX_SHOWN else ""
    return "; ".join(shown) + more


def convert_routes(http_routes: Iterable[Obj], grpc_routes: Iterable[Obj],
                   reference_grants: Iterable[Obj],
                   gateways: Collection[Key] = ()) -> RouteConversion:
    """Every route of ours and every ReferenceGrant, as mesh models; the rest left out."""
    return RouteConverter().convert(http_routes, grpc_routes, reference_grants, gateways)


@dataclass(frozen=True)
class _Outcome:
    """One object's conversion: the route (None: not ours), its model, or why not."""

    route: RouteObject | None = None
    model: HTTPRoute | GRPCRoute | ReferenceGrant | None = None
    refused: tuple[ParentStatus, ...] = ()
    problem: str = ""


class RouteConverter:
    """Validates again only the objects that changed since the last batch: the source's
    stores replace an object's dict only when it changed (as ``Converter`` relies on),
    so the same dict (and the same Gateways of ours) gives the same models."""

    def __init__(self) -> None:
        self._memo: dict[tuple[str, Key], tuple[Obj, frozenset[Key], _Outcome]] = {}

    def convert(self, http_routes: Iterable[Obj], grpc_routes: Iterable[Obj],
                reference_grants: Iterable[Obj],
                gateways: Collection[Key] = ()) -> RouteConversion:
        ours = frozenset(gateways)
        result = RouteConversion()
        memo: dict[tuple[str, Key], tuple[Obj, frozenset[Key], _Outcome]] = {}
        kinds = ((HTTP_ROUTES.kind, http_routes), (GRPC_ROUTES.kind, grpc_routes),
                 (REFERENCE_GRANTS.kind, reference_grants))
        for kind, objs in kinds:
            ordered = _order(objs)
            if len(ordered) > MAX_ROUTES:  # the mesh's bound; the newest are left out
                result.skipped.append(
                    f"{len(ordered) - MAX_ROUTES} {kind}s past the mesh's {MAX_ROUTES}, the "
                    "newest, are not served; merge routes (each may hold 16 rules)")
                ordered = ordered[:MAX_ROUTES]
            for obj in ordered:
                memo_key = (kind, key(obj))
                known = self._memo.get(memo_key)
                if known is not None and known[0] is obj and known[1] == ours:
                    outcome = known[2]
                else:
                    outcome = _judge(kind, obj, ours)
                memo[memo_key] = (obj, ours, outcome)
                _add(kind, memo_key[1], outcome, result)
        self._memo = memo
        return result


def _add(kind: str, obj_key: Key, outcome: _Outcome, result: RouteConversion) -> None:
    if outcome.problem:
        result.skipped.append(outcome.problem)
    if isinstance(outcome.model, ReferenceGrant):
        result.reference_grants.append(outcome.model)
    if outcome.route is None:
        return
    route_key: RouteKey = (kind, *obj_key)
    result.ours[route_key] = outcome.route
    if isinstance(outcome.model, HTTPRoute):
        result.http_routes.append(outcome.model)
    elif isinstance(outcome.model, GRPCRoute):
        result.grpc_routes.append(outcome.model)
    elif outcome.refused:
        result.refused[route_key] = outcome.refused


def _judge(kind: str, obj: Obj, gateways: Collection[Key]) -> _Outcome:
    """One object's outcome; never raises (a shape nothing foresaw: this object only)."""
    namespace, name = key(obj)
    try:
        if kind == REFERENCE_GRANTS.kind:
            return _grant(obj)
        return _route(kind, obj, gateways)
    except Exception as exc:
        return _Outcome(problem=f"{kind} {namespace}/{name}: cannot be read "
                        f"({type(exc).__name__}: {exc}); compare it with the examples in "
                        "deploy/kubernetes/examples")


def _grant(obj: Obj) -> _Outcome:
    namespace, name = key(obj)
    data = flatten(obj)
    try:
        return _Outcome(model=ReferenceGrant.model_validate(data))
    except ValidationError as exc:
        return _Outcome(problem=(
            f"ReferenceGrant {namespace}/{name}: {_problems(exc, data)}; the references "
            "it would allow stay unresolved (RefNotPermitted) until it is fixed"))


def _route(kind: str, obj: Obj, gateways: Collection[Key]) -> _Outcome:
    namespace, name = key(obj)
    ours = [p for p in _parents(obj) if is_ours(p, namespace, gateways)]
    if not ours:
        return _Outcome()  # another controller's (or no parent we can read): not ours
    route = RouteObject(kind, namespace, name, generation_of(obj), uid_of(obj))
    data = flatten(obj)
    try:
        model = (HTTPRoute if kind == HTTP_ROUTES.kind else GRPCRoute).model_validate(data)
    except ValidationError as exc:
        why = f"{_problems(exc, data)}; the route is not served until it is fixed"
        return _Outcome(route, refused=tuple(
            ParentStatus(p, (accepted(UNSUPPORTED_VALUE, why),)) for p in ours),
            problem=f"{kind} {namespace}/{name}: {why}")
    return _Outcome(route, model)


def overridden_by_routes(mesh: Mesh, service_key: str) -> str:
    """What of a Service's TrafficPolicy the routes attached to it replace, for its
    ``Overridden`` condition (design: on a routed port the route wins); "" when none."""
    found = overridden(mesh, service_key)
    if not found:
        return ""
    ports: dict[RouteKey, list[int]] = {}
    for port, route in attach(mesh).attached(service_key):
        ports.setdefault(route, []).append(port)
    fields: dict[RouteKey, list[str]] = {}
    for policy_field, route in found:
        fields.setdefault(route, []).append(policy_field)
    said = []
    for route, names in sorted(fields.items()):
        numbers = ", ".join(str(p) for p in sorted(ports.get(route, [])))
        said.append(f"{', '.join(names)} set by {route[0]} {route[1]}/{route[2]} on port "
                    f"{numbers}")
    return "; ".join(said) + (": the route wins; the policy's other fields (circuit "
                              "breaker, outlier detection, fault, rate limit, fallback...) "
                              "still apply")
