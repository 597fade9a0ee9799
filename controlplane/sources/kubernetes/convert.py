"""Kubernetes objects -> the mesh model. Pure functions over the API's JSON (camelCase
dicts), so they are tested without a cluster and nothing downstream knows the source.

- A Service becomes a mesh service; its ports become the mesh ports. A port's protocol
  comes from ``appProtocol``, else the port name's prefix (``http``, ``http2``, ``grpc``,
  ``h2c``, ``tcp``, ``tls``...), else http. UDP and SCTP ports are left out.
- Every EndpointSlice labelled with the Service's name is merged; endpoints are matched
  to Service ports by port name (what ``targetPort`` names resolve to), deduplicated by
  address, and keep their conditions (ready, serving, terminating) and zone.
- An ExternalName Service becomes an external DNS service.
- Label subsets (a policy's ``split`` or ``match`` by ``labels``) need the labels of the
  Pods behind the endpoints: each endpoint's ``targetRef`` names its Pod, and the Pod's
  metadata gives the labels. Only the label keys some subset selects are copied, and
  only for Services whose policy has subsets, so a Pod relabelled by a controller
  (``pod-template-hash``) changes nothing else.
- A TrafficPolicy's spec (minus ``targetRef``) is the service's policy; it is validated
  here, and a policy that fails is left out (the service still serves) and reported.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from pydantic import ValidationError

from controlplane.mesh.loader import describe_error
from controlplane.mesh.model import Mesh, Policy, Service
from controlplane.sources.kubernetes.kinds import SERVICE_NAME_LABEL

Obj = Mapping[str, Any]
Key = tuple[str, str]  # (namespace, name)

_GRPC = ("grpc", "http2", "h2c", "kubernetes.io/h2c")
_TCP = ("tcp", "tls", "https", "mongo", "mysql", "redis", "kubernetes.io/ws",
        "kubernetes.io/wss")


@dataclass(frozen=True)
class Verdict:
    """What becomes a TrafficPolicy's ``Accepted`` condition."""

    accepted: bool
    reason: str  # Accepted | Invalid | TargetNotFound | Conflicted
    message: str
    generation: int = 0


@dataclass
class Conversion:
    mesh: Mesh
    verdicts: dict[Key, Verdict] = field(default_factory=dict)
    skipped: list[str] = field(default_factory=list)  # services left out, and why


def key(obj: Obj) -> Key:
    meta = obj.get("metadata", {})
    return str(meta.get("namespace", "default")), str(meta.get("name", ""))


def protocol_of(port: Obj) -> str:
    """``http``, ``grpc`` or ``tcp`` for one Service port (Istio's naming convention)."""
    app = str(port.get("appProtocol") or "").lower()
    name = str(port.get("name") or "").lower()
    for hint in (app, name.split("-", 1)[0] if name else ""):
        if not hint:
            continue
        if hint in _GRPC:
            return "grpc"
        if hint in _TCP:
            return "tcp"
        if hint == "http":
            return "http"
    return "http"


def convert(services: Iterable[Obj], slices: Iterable[Obj], policies: Iterable[Obj],
            pods: Mapping[Key, Obj] | None = None) -> Conversion:
    """One conversion, from nothing (``Converter`` remembers between batches). ``pods``:
    Pod metadata by (namespace, name), or None when Pods are not watched."""
    return Converter().convert(services, slices, policies, pods)


class Converter:
    """Converts again only the Services whose inputs changed since the last batch.

    The source's stores replace an object's dict only when it changed, so a Service whose
    own dict, slice dicts and policy dict are the very same objects as last time converts
    to the same mesh service. The memo holds those dicts, so their ids cannot be reused.
    """

    def __init__(self) -> None:
        self._memo: dict[Key, tuple[tuple[Obj, ...], Service | str]] = {}

    def convert(self, services: Iterable[Obj], slices: Iterable[Obj],
                policies: Iterable[Obj], pods: Mapping[Key, Obj] | None = None) -> Conversion:
        by_service: dict[Key, list[Obj]] = {}
        for slice_ in slices:
            owner = slice_.get("metadata", {}).get("labels", {}).get(SERVICE_NAME_LABEL)
            if owner:
                by_service.setdefault((key(slice_)[0], owner), []).append(slice_)
        service_objs = {key(s): s for s in services}
        chosen, verdicts = _choose_policies(policies, service_objs, pods is not None)
        result = Conversion(Mesh(), verdicts)
        built: list[Service] = []
        memo: dict[Key, tuple[tuple[Obj, ...], Service | str]] = {}
        for svc_key in sorted(service_objs):
            policy = chosen.get(svc_key)
            own_slices = by_service.get(svc_key, [])
            subset_keys = _subset_keys(policy[1]) if policy else frozenset()
            labels = _PodLabels(pods or {}, subset_keys) if subset_keys else None
            inputs = (service_objs[svc_key], *own_slices,
                      *((policy[0],) if policy else ()),
                      *(labels.pods(own_slices) if labels else ()))
            known = self._memo.get(svc_key)
            if known is not None and len(known[0]) == len(inputs) and all(
                    a is b for a, b in zip(known[0], inputs, strict=True)):
                outcome = known[1]
            else:
                outcome = _build(svc_key, service_objs[svc_key], own_slices,
                                 policy[1] if policy else None, labels)
            memo[svc_key] = (inputs, outcome)
            if isinstance(outcome, Service):
                built.append(outcome)
            else:
                result.skipped.append(outcome)
        self._memo = memo
        result.mesh = _mesh(built, result.skipped)
        return result


def _mesh(built: list[Service], skipped: list[str]) -> Mesh:
    """A policy may split to a service that is not there (deleted, or not yet created):
    the service whose policy does is left out with the reason, as one with a bad policy
    is, and the rest of the mesh is served. Leaving one out may strand another's target,
    hence the loop (bounded: each round removes at least one service)."""
    services = list(built)
    for _ in range(len(built) + 1):
        try:
            return Mesh(services=services)
        except ValidationError as exc:
            names = {"services": [{"name": s.name, "namespace": s.namespace} for s in services]}
            bad: set[int] = set()
            for error in exc.errors():
                loc = error["loc"]
                if len(loc) < 2 or loc[0] != "services" or not isinstance(loc[1], int):
                    raise
                bad.add(loc[1])
                svc = services[loc[1]]
                skipped.append(f"service {svc.namespace}/{svc.name}: "
                               f"{describe_error(error, names)}")
            services = [s for i, s in enumerate(services) if i not in bad]
    raise AssertionError("unreachable: every round leaves out a service")


def _subset_keys(spec: Mapping[str, Any]) -> frozenset[str]:
    """The label keys a policy's split and match legs select on."""
    return frozenset(label for field in ("split", "match") for leg in spec.get(field) or []
                     for label in leg.get("labels") or {})


class _PodLabels:
    """The labels of endpoints' Pods, cut down to the keys subsets select on."""

    def __init__(self, pods: Mapping[Key, Obj], keys: frozenset[str]) -> None:
        self._pods = pods
        self._keys = keys

    @staticmethod
    def _pod_key(endpoint: Obj, namespace: str) -> Key | None:
        ref = endpoint.get("targetRef") or {}
        if ref.get("kind") != "Pod" or not ref.get("name"):
            return None
        return str(ref.get("namespace") or namespace), str(ref["name"])

    def pods(self, slices: Iterable[Obj]) -> list[Obj]:
        """The Pod objects the slices' endpoints name, as the memo's inputs: a relabelled,
        new or deleted Pod makes the Service convert again."""
        found: dict[Key, Obj] = {}
        for slice_ in slices:
            namespace = key(slice_)[0]
            for endpoint in slice_.get("endpoints") or []:
                pod_key = self._pod_key(endpoint, namespace)
                if pod_key is not None and pod_key in self._pods:
                    found[pod_key] = self._pods[pod_key]
        return [found[k] for k in sorted(found)]

    def of(self, endpoint: Obj, namespace: str) -> dict[str, str]:
        pod_key = self._pod_key(endpoint, namespace)
        pod = self._pods.get(pod_key) if pod_key is not None else None
        if pod is None:
            return {}
        labels = pod.get("metadata", {}).get("labels") or {}
        return {k: str(v) for k, v in sorted(labels.items()) if k in self._keys}


def _build(svc_key: Key, service: Obj, slices: list[Obj], policy: dict[str, Any] | None,
           labels: _PodLabels | None = None) -> Service | str:
    """The mesh service, or why there is none."""
    data = service_data(service, slices, labels)
    if data is None:
        return f"service {svc_key[0]}/{svc_key[1]}: no TCP ports"
    if policy is not None:
        data["policy"] = policy
    try:
        return Service.model_validate(data)
    except ValidationError as exc:
        problems = "; ".join(describe_error(e, data) for e in exc.errors())
        return f"service {svc_key[0]}/{svc_key[1]}: {problems}"


def service_data(service: Obj, slices: list[Obj],
                 labels: _PodLabels | None = None) -> dict[str, Any] | None:
    """The mesh-file form of one Service (see the README's mesh file reference)."""
    namespace, name = key(service)
    spec = service.get("spec", {})
    ports = [p for p in spec.get("ports", []) if p.get("protocol", "TCP") == "TCP"]
    if not ports:
        return None
    data: dict[str, Any] = {"name": name, "namespace": namespace}
    single = len(ports) == 1
    if single:
        data["port"] = int(ports[0]["port"])
        data["protocol"] = protocol_of(ports[0])
    else:
        data["ports"] = [{"name": str(p.get("name", "")), "port": int(p["port"]),
                          "protocol": protocol_of(p)} for p in ports]
    if spec.get("type") == "ExternalName":
        data["external_name"] = str(spec.get("externalName", "")).rstrip(".").lower()
        return data
    data["endpoints"] = _endpoints(ports, slices, single, labels)
    return data


def _endpoints(ports: list[Obj], slices: list[Obj], single: bool,
               labels: _PodLabels | None) -> list[dict[str, Any]]:
    """Merge every slice; one endpoint per address, with its port per Service port name."""
    wanted = {str(p.get("name", "")) for p in ports}
    merged: dict[str, dict[str, Any]] = {}
    for slice_ in sorted(slices, key=lambda s: key(s)[1]):
        if slice_.get("addressType", "IPv4") not in ("IPv4", "IPv6"):
            continue
        slice_ports = {str(p.get("name") or ""): int(p["port"])
                       for p in slice_.get("ports") or [] if p.get("port") is not None
                       and p.get("protocol", "TCP") == "TCP"}
        served = {n: port for n, port in slice_ports.items() if n in wanted}
        if not served:
            continue
        for endpoint in slice_.get("endpoints") or []:
            addresses = endpoint.get("addresses") or []
            if not addresses:
                continue
            address = str(addresses[0])
            conditions = endpoint.get("conditions") or {}
            ready = conditions.get("ready")
            ready = True if ready is None else bool(ready)
            serving = conditions.get("serving")
            entry = merged.setdefault(address, {"address": address, "ports": {}})
            entry["ports"].update(served)
            # The most available view wins when two slices disagree (a pod moving slices).
            if "ready" not in entry or (ready and not entry["ready"]):
                entry["ready"] = ready
                entry["serving"] = ready if serving is None else bool(serving)
                entry["terminating"] = bool(conditions.get("terminating", False))
            zone = endpoint.get("zone")
            if zone:
                entry["zone"] = str(zone)
            if labels is not None and "labels" not in entry:
                found = labels.of(endpoint, key(slice_)[0])
                if found:
                    entry["labels"] = found
    result = []
    for address in sorted(merged):
        entry = merged[address]
        by_name: dict[str, int] = entry.pop("ports")
        if single:
            [only] = wanted
            if only not in by_name:
                continue
            entry["port"] = by_name[only]
        else:
            entry["ports"] = dict(sorted(by_name.items()))
        result.append(entry)
    return result


def _choose_policies(policies: Iterable[Obj], services: Mapping[Key, Obj], pod_labels: bool,
                     ) -> tuple[dict[Key, tuple[Obj, dict[str, Any]]], dict[Key, Verdict]]:
    """Validate every TrafficPolicy; the oldest valid one per Service applies. Returns,
    per Service, the policy object and its spec without ``targetRef``. Without
    ``pod_labels`` (Pods not watched) a policy with label subsets is refused."""
    chosen: dict[Key, tuple[Obj, dict[str, Any]]] = {}
    owner: dict[Key, Key] = {}
    verdicts: dict[Key, Verdict] = {}
    ordered = sorted(policies, key=lambda p: (
        str(p.get("metadata", {}).get("creationTimestamp", "")), key(p)))
    for policy in ordered:
        policy_key = key(policy)
        generation = int(policy.get("metadata", {}).get("generation", 0) or 0)
        spec = dict(policy.get("spec") or {})
        target = spec.pop("targetRef", None) or {}
        if target.get("kind", "Service") != "Service" or not target.get("name"):
            verdicts[policy_key] = Verdict(
                False, "Invalid", "spec.targetRef: must be {kind: Service, name: <service>} "
                "in the policy's namespace", generation)
            continue
        try:
            Policy.model_validate(spec)
        except ValidationError as exc:
            problems = "; ".join(describe_error(e, spec, root="spec") for e in exc.errors())
            verdicts[policy_key] = Verdict(False, "Invalid", problems, generation)
            continue
        subsets = [f"spec.{field}[{i}].labels" for field in ("split", "match")
                   for i, leg in enumerate(spec.get(field) or []) if leg.get("labels")]
        if subsets and not pod_labels:
            verdicts[policy_key] = Verdict(
                False, "Unsupported",
                f"{subsets[0]}: label subsets need Pod labels, which this server does not "
                "watch (--no-pod-labels); drop that flag, or make each version a Service "
                "and split across Services ({service: reviews-v2, weight: 10})", generation)
            continue
        target_key = (policy_key[0], str(target["name"]))
        if target_key not in services:
            verdicts[policy_key] = Verdict(
                False, "TargetNotFound",
                f"spec.targetRef: no Service {target_key[1]!r} in namespace {target_key[0]!r}; "
                "the policy applies once it exists", generation)
            continue
        if target_key in chosen:
            verdicts[policy_key] = Verdict(
                False, "Conflicted",
                f"Service {target_key[1]!r} already has TrafficPolicy {owner[target_key][1]!r} "
                "(the oldest applies); merge the two", generation)
            continue
        chosen[target_key] = (policy, spec)
        owner[target_key] = policy_key
        verdicts[policy_key] = Verdict(True, "Accepted",
                                       f"applied to Service {target_key[1]!r}", generation)
    return chosen, verdicts
