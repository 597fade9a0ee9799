"""Status of our GatewayClasses, Gateways and TLSRoutes, as the Gateway API defines it.

- GatewayClass: ``Accepted`` True (reason Accepted) on each class naming our controller.
- Gateway: ``Accepted`` (False, reason Invalid, naming the field, when the model refuses
  it), ``Programmed`` (True once its Deployment, Service and ServiceAccount are in place
  and the Service has an address; False with reason Invalid or AddressNotAssigned and
  what to do otherwise), ``addresses`` (the Service's load balancer ingress, else its
  cluster IP), and per listener ``attachedRoutes``, ``supportedKinds`` and the listener
  conditions attachment computes (``mesh/gateway_attach.py``: Accepted, ResolvedRefs
  with InvalidCertificateRef, Programmed, Conflicted).
- TLSRoute: ``status.parents[]``: our controller's entries replaced, every other
  controller's kept.

Pure functions build the status bodies; lastTransitionTime is kept while a condition's
status is unchanged, and a body equal (but for times) to what is there is not written,
so replicas agree and our writes do not echo back as changes. ``StatusWriter`` is the
edge (merge patches of the ``status`` subresource).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final

import structlog
from kubernetes import client

from controlplane.mesh.route_status import CONTROLLER, Condition, ParentStatus
from controlplane.sources.kubernetes.conditions import condition_json, find_condition
from controlplane.sources.kubernetes.kinds import Kind
from controlplane.sources.kubernetes.services import meta
from controlplane.sources.kubernetes.status_patch import StatusPatcher

log = structlog.get_logger("controlplane.source.kubernetes")

ACCEPTED: Final = "Accepted"
PROGRAMMED: Final = "Programmed"
_COMPARED: Final = ("type", "status", "reason", "message", "observedGeneration")
MAX_ADDRESSES: Final = 16  # status.addresses' bound


@dataclass(frozen=True)
class ListenerState:
    name: str
    attached_routes: int
    supported_kinds: tuple[tuple[str, str], ...]  # (group, kind)
    conditions: tuple[Condition, ...]


@dataclass(frozen=True)
class GatewayState:
    """What the status of one Gateway says (before times and generations)."""

    generation: int
    conditions: tuple[Condition, ...]
    listeners: tuple[ListenerState, ...] = ()
    addresses: tuple[tuple[str, str], ...] = ()  # (type, value)


def conditions_json(conditions: Iterable[Condition], generation: int,
                    previous: Any) -> list[dict[str, Any]]:
    """metav1.Conditions, each keeping its lastTransitionTime from ``previous`` (a list
    of condition dicts) while its status is unchanged."""
    return [condition_json(c.type, "True" if c.status else "False", c.reason,
                           c.message or c.reason, generation, find_condition(previous, c.type))
            for c in conditions]


def class_status(generation: int, current: Any) -> dict[str, Any]:
    """A GatewayClass of ours: Accepted."""
    previous = current.get("conditions") if isinstance(current, Mapping) else None
    return {"conditions": conditions_json(
        [Condition(ACCEPTED, True, "Accepted",
                   f"handled by {CONTROLLER}: its Gateways get an Envoy deployment each")],
        generation, previous)}


def gateway_status(state: GatewayState, current: Any) -> dict[str, Any]:
    current = current if isinstance(current, Mapping) else {}
    listeners_before = {item.get("name"): item for item in current.get("listeners") or []
                        if isinstance(item, Mapping)}
    return {
        "addresses": [{"type": t, "value": v} for t, v in state.addresses[:MAX_ADDRESSES]],
        "conditions": conditions_json(state.conditions, state.generation,
                                      current.get("conditions")),
        "listeners": [{
            "name": listener.name,
            "supportedKinds": [{"group": g, "kind": k} for g, k in listener.supported_kinds],
            "attachedRoutes": listener.attached_routes,
            "conditions": conditions_json(
                listener.conditions, state.generation,
                listeners_before.get(listener.name, {}).get("conditions")),
        } for listener in state.listeners],
    }


def parent_ref_json(parent: Any) -> dict[str, Any]:
    """A ParentRef model as the API writes it (defaults spelled out, None left out)."""
    data: dict[str, Any] = parent.model_dump(by_alias=True, exclude_none=True)
    return data


def route_parents(parents: Sequence[ParentStatus], generation: int,
                  current: Any) -> dict[str, Any]:
    """``status.parents`` with our entries from ``parents`` and every other controller's
    entries as they are."""
    current = current if isinstance(current, Mapping) else {}
    listed = [p for p in current.get("parents") or [] if isinstance(p, Mapping)]
    others = [p for p in listed if p.get("controllerName") != CONTROLLER]
    ours_before = {_ref_key(p.get("parentRef")): p for p in listed
                   if p.get("controllerName") == CONTROLLER}
    made = []
    for parent in parents:
        ref = parent_ref_json(parent.parent)
        before = ours_before.get(_ref_key(ref), {})
        made.append({"parentRef": ref, "controllerName": CONTROLLER,
                     "conditions": conditions_json(parent.conditions, generation,
                                                   before.get("conditions"))})
    return {"parents": [*others, *made][:32]}


def _ref_key(ref: Any) -> tuple[str, ...]:
    if not isinstance(ref, Mapping):
        return ()
    return tuple(str(ref.get(k) or "") for k in ("group", "kind", "namespace", "name",
                                                  "sectionName", "port"))


def differs(wanted: Mapping[str, Any], current: Any) -> bool:
    """Whether writing ``wanted`` would change ``current`` (times aside)."""
    return bool(_comparable(wanted) != _comparable(
        {k: current.get(k) for k in wanted} if isinstance(current, Mapping) else {}))


def _comparable(value: Any) -> Any:
    if isinstance(value, Mapping):
        if "lastTransitionTime" in value and "type" in value:
            return tuple((k, _comparable(value.get(k))) for k in _COMPARED)
        return tuple(sorted((k, _comparable(v)) for k, v in value.items()
                            if v not in (None, [], {})))
    if isinstance(value, list):
        return tuple(_comparable(v) for v in value)
    return value


def service_addresses(service: Mapping[str, Any], wanted_type: str,
                      ) -> tuple[tuple[tuple[str, str], ...], str]:
    """A LoadBalancer's ingress addresses (IPs, host names), else (ClusterIP, NodePort)
    its cluster IPs; or why there are none yet and what to do."""
    spec = service.get("spec") if isinstance(service.get("spec"), Mapping) else {}
    status = service.get("status") if isinstance(service.get("status"), Mapping) else {}
    assert isinstance(spec, Mapping) and isinstance(status, Mapping)
    name = f"{meta(service).get('namespace')}/{meta(service).get('name')}"
    if wanted_type == "LoadBalancer":
        balancer = status.get("loadBalancer") if isinstance(status.get("loadBalancer"),
                                                            Mapping) else {}
        assert isinstance(balancer, Mapping)
        found: list[tuple[str, str]] = []
        for item in balancer.get("ingress") or []:
            if isinstance(item, Mapping) and item.get("ip"):
                found.append(("IPAddress", str(item["ip"])))
            elif isinstance(item, Mapping) and item.get("hostname"):
                found.append(("Hostname", str(item["hostname"])))
        if not found:
            return (), (f"waiting for a load balancer address for Service {name}; on a "
                        "cluster without load balancers, annotate the Gateway "
                        "mesh.controlplane.io/service-type: ClusterIP (or NodePort)")
        return tuple(found), ""
    ips = [ip for ip in spec.get("clusterIPs") or [spec.get("clusterIP")]
           if isinstance(ip, str) and ip and ip != "None"]
    if not ips:
        return (), f"its Service {name} has no cluster IP yet"
    return tuple(("IPAddress", ip) for ip in ips), ""


class GatewayStatusWriter(StatusPatcher):
    """Merge-patches the ``status`` of Gateway API objects. Blocking: run it off the loop.
    Failures are logged, never raised; a 403 is kept in ``forbidden`` (for /readyz)."""

    def __init__(self, api: client.ApiClient) -> None:
        super().__init__(api, "gateway", "object")

    def write(self, kind: Kind, namespace: str, name: str, status: dict[str, Any]) -> bool:
        outcome = self.patch(kind, namespace, name, {"status": status})
        if outcome != "written":
            return outcome == "gone"
        log.info("gateway.status", kind=kind.kind, object=f"{namespace}/{name}" if namespace
                 else name, conditions={c["type"]: c["status"]
                                        for c in status.get("conditions") or []})
        return True
