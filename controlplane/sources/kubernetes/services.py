"""A Service and its EndpointSlices -> the mesh-file form of one service.

Pure functions over the API's JSON (camelCase dicts). They read defensively: the API
server validates built-in kinds, but the source must not trust that (a newer server, an
aggregated API, a bug anywhere), so a field of the wrong shape is a ``Malformed`` error
naming the object and the field, never a ``KeyError`` deep in a batch.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from controlplane.mesh.security import service_account_name
from controlplane.mesh.service import OWN, export_namespace, export_to
from controlplane.sources.kubernetes.kinds import (
    EXPORT_TO_ANNOTATION,
    PROXYLESS_KIND,
    PROXYLESS_LABEL,
    SERVICE_ACCOUNT_ANNOTATION,
)

Obj = Mapping[str, Any]
Key = tuple[str, str]  # (namespace, name)

_GRPC = ("grpc", "http2", "h2c", "kubernetes.io/h2c")
_TCP = ("tcp", "tls", "https", "mongo", "mysql", "redis", "kubernetes.io/ws",
        "kubernetes.io/wss")
_TLS = ("tls", "https")


class Malformed(ValueError):
    """An object whose shape the API would not produce: ``field: what is wrong``."""


def meta(obj: Any) -> Mapping[str, Any]:
    """``metadata``, or an empty mapping when there is none (or it is not a mapping)."""
    found = obj.get("metadata") if isinstance(obj, Mapping) else None
    return found if isinstance(found, Mapping) else {}


def key(obj: Any) -> Key:
    data = meta(obj)
    return str(data.get("namespace") or "default"), str(data.get("name") or "")


def mapping(value: Any, field: str) -> Mapping[str, Any]:
    """``value`` if it is a mapping, {} if absent; else Malformed naming ``field``."""
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise Malformed(f"{field}: expected an object, got {type(value).__name__}")
    return value


def sequence(value: Any, field: str) -> list[Any]:
    if value is None:
        return []
    if not isinstance(value, list):
        raise Malformed(f"{field}: expected a list, got {type(value).__name__}")
    return value


def port_number(value: Any, field: str) -> int:
    """A TCP port: an integer 1-65535 (``True`` is not one, though Python says it is)."""
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 65535:
        raise Malformed(f"{field}: {value!r} is not a port number (an integer 1-65535)")
    return value


def protocol_of(port: Obj, external: bool = False) -> str:
    """``http``, ``grpc`` or ``tcp`` for one Service port (Istio's naming convention);
    on an ExternalName Service (``external``), ``tls`` for ``tls``/``https``: the app's
    own TLS, routed by its server name (a mesh service's TLS port stays ``tcp``)."""
    app = str(port.get("appProtocol") or "").lower()
    name = str(port.get("name") or "").lower()
    for hint in (app, name.split("-", 1)[0] if name else ""):
        if not hint:
            continue
        if hint in _GRPC:
            return "grpc"
        if external and hint in _TLS:
            return "tls"
        if hint in _TCP:
            return "tcp"
        if hint == "http":
            return "http"
    return "http"


class PodLabels:
    """What endpoints' Pods say: their labels, cut down to the keys subsets select on,
    and the service account injection wrote on them."""

    def __init__(self, pods: Mapping[Key, Obj], keys: frozenset[str]) -> None:
        self._pods = pods
        self._keys = keys
        self.problems: list[str] = []

    @staticmethod
    def _pod_key(endpoint: Any, namespace: str) -> Key | None:
        ref = endpoint.get("targetRef") if isinstance(endpoint, Mapping) else None
        if not isinstance(ref, Mapping) or ref.get("kind") != "Pod" or not ref.get("name"):
            return None
        return str(ref.get("namespace") or namespace), str(ref["name"])

    def pods(self, slices: Iterable[Obj]) -> list[Obj]:
        """The Pod objects the slices' endpoints name, as the memo's inputs: a relabelled,
        new or deleted Pod makes the Service convert again."""
        found: dict[Key, Obj] = {}
        for slice_ in slices:
            namespace = key(slice_)[0]
            endpoints = slice_.get("endpoints")
            for endpoint in endpoints if isinstance(endpoints, list) else []:
                pod_key = self._pod_key(endpoint, namespace)
                if pod_key is not None and pod_key in self._pods:
                    found[pod_key] = self._pods[pod_key]
        return [found[k] for k in sorted(found)]

    def accounts(self, slices: Iterable[Obj]) -> tuple[tuple[Key, str | None, bool], ...]:
        """The service-account annotation of each Pod the slices' endpoints name (None:
        none, or the Pod unknown) and whether it is proxyless, sorted: what the
        identities of a Service, and how callers reach them, depend on."""
        found: dict[Key, tuple[str | None, bool]] = {}
        for slice_ in slices:
            namespace = key(slice_)[0]
            endpoints = slice_.get("endpoints")
            for endpoint in endpoints if isinstance(endpoints, list) else []:
                pod_key = self._pod_key(endpoint, namespace)
                if pod_key is None:
                    continue
                annotations = meta(self._pods.get(pod_key)).get("annotations")
                value = (annotations.get(SERVICE_ACCOUNT_ANNOTATION)
                         if isinstance(annotations, Mapping) else None)
                found[pod_key] = (None if value is None else str(value),
                                  self._proxyless(self._pods.get(pod_key)))
        return tuple(sorted((k, *v) for k, v in found.items()))

    @staticmethod
    def _proxyless(pod: Obj | None) -> bool:
        labels = meta(pod).get("labels")
        return isinstance(labels, Mapping) and labels.get(PROXYLESS_LABEL) == PROXYLESS_KIND

    def proxyless(self, endpoint: Obj, namespace: str) -> bool:
        """Whether the endpoint's Pod is a proxyless gRPC server (labelled by injection)."""
        pod_key = self._pod_key(endpoint, namespace)
        return self._proxyless(self._pods.get(pod_key) if pod_key is not None else None)

    def service_account(self, endpoint: Obj, namespace: str) -> str | None:
        """The ``mesh.controlplane.io/service-account`` annotation of the endpoint's Pod
        (None: no Pod, or not injected, or not a name: then said in ``problems``)."""
        pod_key = self._pod_key(endpoint, namespace)
        pod = self._pods.get(pod_key) if pod_key is not None else None
        annotations = meta(pod).get("annotations")
        value = (annotations.get(SERVICE_ACCOUNT_ANNOTATION)
                 if isinstance(annotations, Mapping) else None)
        if value is None:
            return None
        try:
            return service_account_name(str(value))
        except ValueError as exc:
            assert pod_key is not None
            self.problems.append(
                f"Pod {pod_key[0]}/{pod_key[1]}: annotation {SERVICE_ACCOUNT_ANNOTATION}: "
                f"{exc}; its endpoint is served as one without a sidecar until it is fixed")
            return None

    def of(self, endpoint: Obj, namespace: str) -> dict[str, str]:
        pod_key = self._pod_key(endpoint, namespace)
        pod = self._pods.get(pod_key) if pod_key is not None else None
        labels = meta(pod).get("labels")
        if not isinstance(labels, Mapping):
            return {}
        return {str(k): str(v) for k, v in sorted(labels.items(), key=lambda kv: str(kv[0]))
                if k in self._keys}


def export_to_of(service: Obj, problems: list[str]) -> list[str] | None:
    """The ``mesh.controlplane.io/export-to`` annotation as ``exportTo`` (None: absent,
    visible everywhere). One the model refuses keeps the Service to its own namespace
    (closed rather than open: it was meant to narrow who sees it) and is reported."""
    annotations = meta(service).get("annotations")
    raw = annotations.get(EXPORT_TO_ANNOTATION) if isinstance(annotations, Mapping) else None
    if raw is None:
        return None
    items = [item.strip() for item in str(raw).split(",") if item.strip()]
    try:
        return export_to([export_namespace(item) for item in items])
    except ValueError as exc:
        namespace, name = key(service)
        problems.append(f"service {namespace}/{name}: annotation {EXPORT_TO_ANNOTATION} "
                        f"{str(raw)[:200]!r}: {exc}; the Service is visible in its own "
                        "namespace only until the annotation is fixed")
        return [OWN]


def cluster_ips_of(spec: Mapping[str, Any]) -> list[str] | None:
    """``spec.clusterIPs`` (else ``spec.clusterIP``): the virtual IPs captured sidecars
    route by. None for a headless Service (``None``), an ExternalName one, or none set."""
    if spec.get("type") == "ExternalName":
        return None
    raw = spec.get("clusterIPs")
    if raw is None:
        raw = [spec["clusterIP"]] if spec.get("clusterIP") is not None else []
    ips = sequence(raw, "spec.clusterIPs")
    for index, ip in enumerate(ips):
        if not isinstance(ip, str):
            raise Malformed(f"spec.clusterIPs[{index}]: {ip!r} is not an address")
    found = [ip for ip in ips if ip and ip != "None"]
    return found or None


def service_data(service: Obj, slices: list[Obj], labels: PodLabels | None = None,
                 problems: list[str] | None = None) -> dict[str, Any] | None:
    """The mesh-file form of one Service (see the README's mesh file reference), or None
    when it has no TCP port. A malformed Service raises ``Malformed``; a malformed
    EndpointSlice is left out and described in ``problems``."""
    namespace, name = key(service)
    spec = mapping(service.get("spec"), "spec")
    ports = []
    for index, port in enumerate(sequence(spec.get("ports"), "spec.ports")):
        port = mapping(port, f"spec.ports[{index}]")
        if port.get("protocol", "TCP") == "TCP":
            port_number(port.get("port"), f"spec.ports[{index}].port")
            ports.append(port)
    if not ports:
        return None
    data: dict[str, Any] = {"name": name, "namespace": namespace}
    exported = export_to_of(service, problems if problems is not None else [])
    if exported is not None:
        data["exportTo"] = exported
    ips = cluster_ips_of(spec)
    if ips is not None:
        data["cluster_ips"] = ips
    single = len(ports) == 1
    external = spec.get("type") == "ExternalName"
    if single:
        data["port"] = ports[0]["port"]
        data["protocol"] = protocol_of(ports[0], external)
    else:
        data["ports"] = [{"name": str(p.get("name") or ""), "port": p["port"],
                          "protocol": protocol_of(p, external)} for p in ports]
    if spec.get("type") == "ExternalName":
        data["external_name"] = str(spec.get("externalName") or "").rstrip(".").lower()
        return data
    data["endpoints"] = _endpoints(ports, slices, single, labels,
                                   problems if problems is not None else [])
    return data


def _endpoints(ports: list[Obj], slices: list[Obj], single: bool, labels: PodLabels | None,
               problems: list[str]) -> list[dict[str, Any]]:
    """Merge every slice; one endpoint per address, with its port per Service port name."""
    wanted = {str(p.get("name") or "") for p in ports}
    merged: dict[str, dict[str, Any]] = {}
    for slice_ in sorted(slices, key=lambda s: key(s)[1]):
        try:
            _merge_slice(slice_, wanted, labels, merged)
        except Malformed as exc:
            namespace, name = key(slice_)
            problems.append(f"EndpointSlice {namespace}/{name}: {exc}; its endpoints are "
                            "left out, the rest of the Service is served")
    if labels is not None:
        problems.extend(labels.problems)
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


def _merge_slice(slice_: Obj, wanted: set[str], labels: PodLabels | None,
                 merged: dict[str, dict[str, Any]]) -> None:
    """One slice's endpoints into ``merged``; checks the whole slice before touching it."""
    if slice_.get("addressType", "IPv4") not in ("IPv4", "IPv6"):
        return
    slice_ports: dict[str, int] = {}
    for index, port in enumerate(sequence(slice_.get("ports"), "ports")):
        port = mapping(port, f"ports[{index}]")
        if port.get("port") is not None and port.get("protocol", "TCP") == "TCP":
            slice_ports[str(port.get("name") or "")] = port_number(
                port["port"], f"ports[{index}].port")
    served = {n: port for n, port in slice_ports.items() if n in wanted}
    if not served:
        return
    found: list[tuple[str, Obj, Mapping[str, Any]]] = []
    for index, endpoint in enumerate(sequence(slice_.get("endpoints"), "endpoints")):
        endpoint = mapping(endpoint, f"endpoints[{index}]")
        addresses = sequence(endpoint.get("addresses"), f"endpoints[{index}].addresses")
        if not addresses:
            continue
        if not isinstance(addresses[0], str):
            raise Malformed(f"endpoints[{index}].addresses[0]: {addresses[0]!r} is not an "
                            "address")
        conditions = mapping(endpoint.get("conditions"), f"endpoints[{index}].conditions")
        found.append((addresses[0], endpoint, conditions))
    for address, endpoint, conditions in found:
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
        pod = _pod_name(endpoint, key(slice_)[0])
        if pod is not None:  # which sidecar this endpoint is (mesh/workloads.py)
            entry["pod"] = pod
        if labels is not None and "labels" not in entry:
            pod_labels = labels.of(endpoint, key(slice_)[0])
            if pod_labels:
                entry["labels"] = pod_labels
        if labels is not None and "service_account" not in entry:
            account = labels.service_account(endpoint, key(slice_)[0])
            if account is not None:
                entry["service_account"] = account
        if labels is not None and labels.proxyless(endpoint, key(slice_)[0]):
            entry["proxyless"] = True


def _pod_name(endpoint: Obj, namespace: str) -> str | None:
    """The name of the Pod an endpoint is: its ``targetRef`` when that is a Pod of the
    slice's own namespace (a Service's pods are in its namespace)."""
    ref = endpoint.get("targetRef")
    if not isinstance(ref, Mapping) or ref.get("kind") != "Pod":
        return None
    name = ref.get("name")
    if not isinstance(name, str) or not name or (ref.get("namespace") or namespace) != namespace:
        return None
    return name
