"""HTTPRoute and GRPCRoute status: ``status.parents[]``, one entry per parent of ours.

As the Gateway API specifies: each entry names the parent as the route does
(``parentRef``), our controller (``controllerName``) and the conditions attachment found
for that parent (``Accepted``, ``ResolvedRefs``, with the spec's reasons), each with the
route's ``observedGeneration``; a condition's ``lastTransitionTime`` is kept while its
status holds. Entries of other controllers are kept as they are (a route may also have
a Gateway of another implementation as parent); ours for parents the route no longer
names are dropped. Written only when it differs from what is there (time stamps aside),
so two replicas agree and our own writes do not echo back as changes.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping, Sequence
from typing import Any, Final

import structlog
from kubernetes import client

from controlplane.mesh.attach import attach
from controlplane.mesh.model import Mesh
from controlplane.mesh.route_status import CONTROLLER, Condition, ParentStatus, RouteKey
from controlplane.mesh.routes import ParentRef
from controlplane.sources.kubernetes.conditions import condition_json, find_condition
from controlplane.sources.kubernetes.kinds import GRPC_ROUTES, HTTP_ROUTES, Kind
from controlplane.sources.kubernetes.routes import RouteConversion, RouteObject, is_ours
from controlplane.sources.kubernetes.services import Key
from controlplane.sources.kubernetes.status_patch import StatusPatcher

log = structlog.get_logger("controlplane.source.kubernetes")

KINDS: Final[dict[str, Kind]] = {HTTP_ROUTES.kind: HTTP_ROUTES, GRPC_ROUTES.kind: GRPC_ROUTES}
MAX_PARENTS: Final = 32  # the CRD's bound on status.parents
_COMPARED: Final = ("type", "status", "reason", "message", "observedGeneration")


def _entries(current: Mapping[str, Any] | None) -> list[Mapping[str, Any]]:
    found = current.get("parents") if isinstance(current, Mapping) else None
    return [e for e in found if isinstance(e, Mapping)] if isinstance(found, list) else []


def _same_parent(raw: Any, parent: ParentRef, namespace: str) -> bool:
    """Does a written ``parentRef`` name this parent (defaults and namespace filled in)?"""
    try:
        written = ParentRef.model_validate(raw)
    except Exception:
        return False
    return (written.group, written.kind, written.namespace_or(namespace), written.name,
            written.section_name, written.port) == (
        parent.group, parent.kind, parent.namespace_or(namespace), parent.name,
        parent.section_name, parent.port)


def _condition(condition: Condition, generation: int,
               previous: Mapping[str, Any] | None) -> dict[str, Any]:
    listed = previous.get("conditions") if isinstance(previous, Mapping) else None
    return condition_json(condition.type, "True" if condition.status else "False",
                          condition.reason, condition.message, generation,
                          find_condition(listed, condition.type))


def parents(route: RouteObject, statuses: Sequence[ParentStatus],
            current: Mapping[str, Any] | None) -> list[dict[str, Any]]:
    """The ``status.parents`` to write: other controllers' entries as they are, then one
    of ours per parent in ``statuses`` (bounded by the CRD's 32)."""
    entries = _entries(current)
    kept = [dict(e) for e in entries if e.get("controllerName") != CONTROLLER]
    ours = [e for e in entries if e.get("controllerName") == CONTROLLER]
    made = []
    for status in statuses[:max(0, MAX_PARENTS - len(kept))]:
        previous = next((e for e in ours if _same_parent(e.get("parentRef"), status.parent,
                                                          route.namespace)), None)
        made.append({
            "parentRef": status.parent.model_dump(exclude_none=True),
            "controllerName": CONTROLLER,
            "conditions": [_condition(c, route.generation, previous)
                           for c in status.conditions],
        })
    return kept + made


def needs_write(wanted: list[dict[str, Any]], current: Mapping[str, Any] | None) -> bool:
    """Does ``status.parents`` differ from ``wanted`` in anything but time stamps?"""
    entries = _entries(current)
    if len(entries) != len(wanted):
        return True
    for have, want in zip(entries, wanted, strict=True):
        if have.get("controllerName") != want.get("controllerName") \
                or have.get("parentRef") != want.get("parentRef"):
            return True
        if want.get("controllerName") != CONTROLLER:
            continue
        conditions = [c for c in have.get("conditions") or [] if isinstance(c, Mapping)]
        if len(conditions) != len(want["conditions"]) or any(
                c.get(k) != w[k] for c, w in zip(conditions, want["conditions"], strict=True)
                for k in _COMPARED):
            return True
    return False


def has_ours(current: Mapping[str, Any] | None) -> bool:
    """Does the status hold an entry of ours (to drop when the route is ours no more)?"""
    return any(e.get("controllerName") == CONTROLLER for e in _entries(current))


class RouteStatusWriter(StatusPatcher):
    def __init__(self, api: client.ApiClient) -> None:
        super().__init__(api, "route", "route",
                         "; routes are served meanwhile, their status is not written")

    def write(self, route: RouteObject, wanted: list[dict[str, Any]]) -> bool:
        """Blocking; run it off the event loop. The status subresource, merge-patched
        (the list whole: other controllers' entries are in it as they were read).
        Failures are logged, never raised; False: try again with the next batch."""
        kind = KINDS[route.kind]
        outcome = self.patch(kind, route.namespace, route.name, {"status": {"parents": wanted}})
        if outcome != "written":
            return outcome == "gone"
        shown = f"{route.namespace}/{route.name}"
        log.info("route.status", route=shown, kind=kind.kind, parents=[
            f"{e['parentRef'].get('kind')} {e['parentRef'].get('name')}: " + ", ".join(
                f"{c['type']}={c['status']} ({c['reason']})" for c in e["conditions"])
            for e in wanted if e.get("controllerName") == CONTROLLER])
        return True


StatusSource = Callable[[Mesh], Mapping[RouteKey, Sequence[ParentStatus]]]
# Per route: (its parents' statuses, the object, its status) when they needed no write.
Settled = dict[RouteKey, tuple[tuple[ParentStatus, ...], RouteObject, object]]


def service_parents(mesh: Mesh) -> Mapping[RouteKey, Sequence[ParentStatus]]:
    """The Service parents' statuses (GAMMA), from attachment."""
    return attach(mesh).statuses()


def wanted_statuses(mesh: Mesh, routes: RouteConversion,
                    current: Mapping[RouteKey, Mapping[str, Any] | None],
                    sources: Sequence[StatusSource] = (service_parents,),
                    gateways: Collection[Key] = (),
                    settled: Settled | None = None,
                    ) -> dict[RouteKey, tuple[RouteObject, list[dict[str, Any]]]]:
    """Per route whose status must change: the route and its ``status.parents``.
    ``current``: each route object's status as last read (routes not ours included, so
    an entry of ours left on one that is ours no more is dropped). ``sources``: where
    parents' statuses come from (Service parents; gateways add their own function);
    ``gateways``: ours, the only Gateway parents written (never another controller's);
    ``settled``: kept between calls, it skips each route whose statuses, object and
    status (the very same dict) are as when it last needed no write."""
    found: dict[RouteKey, list[ParentStatus]] = {}
    for source in sources:
        for route_key, statuses in source(mesh).items():
            found.setdefault(route_key, []).extend(
                s for s in statuses if is_ours(s.parent, route_key[1], gateways))
    for route_key, statuses in routes.refused.items():
        found[route_key] = list(statuses)
    changed = {}
    known = dict(settled) if settled is not None else {}
    if settled is not None:
        settled.clear()
    for route_key, status in current.items():
        route = routes.ours.get(route_key)
        if route is None:
            if not has_ours(status):
                continue
            route = RouteObject(route_key[0], route_key[1], route_key[2], 0, "")
        statuses = tuple(found.get(route_key, ()))
        last = known.get(route_key)
        if last is not None and last[2] is status and last[1] == route \
                and last[0] == statuses:
            if settled is not None:
                settled[route_key] = last
            continue
        wanted = parents(route, statuses, status)
        if needs_write(wanted, status):
            changed[route_key] = (route, wanted)
        elif settled is not None:
            settled[route_key] = (statuses, route, status)
    return changed


def log_not_accepted(route: RouteObject, wanted: list[dict[str, Any]]) -> None:
    """Each parent of ours that did not accept the route, or whose backends do not all
    resolve (the same event as the file source's), once per status change."""
    for entry in wanted:
        if entry.get("controllerName") != CONTROLLER:
            continue
        for found in entry["conditions"]:
            if found["status"] != "True":
                ref = entry["parentRef"]
                log.warning("routes.not_accepted", route=f"{route.kind}/{route.namespace}/"
                            f"{route.name}", parent=f"{ref.get('kind')} {ref.get('name')}"
                            + (f" port {ref['port']}" if ref.get("port") else ""),
                            condition=found["type"], reason=found["reason"],
                            message=found["message"])
