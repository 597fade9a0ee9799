"""Small chained builders for Kubernetes test objects (as Contour's ``fixture`` package).

Each ``build()`` returns a plain dict in the API's JSON shape (camelCase, with kind and
apiVersion), ready for ``ApiServerDouble.create`` or the client's ``create_*`` calls:

    service("reviews").port(9080, name="http", target="http").build()
    endpoint_slice("reviews-abc", service="reviews") \\
        .endpoint("10.231.0.2", ready=True, zone="zone-a").port(9080, name="http").build()
    traffic_policy("reviews-policy", target="reviews", spec={"timeout": "2s"}).build()
    pod("reviews-v1-abc").labels(app="reviews", version="v1").build()
    pod("reviews-v1-abc").ip("10.231.0.2").phase("Running").build()  # for update_status

Only what a user writes is set; what the API server fills in (clusterIP, uid,
resourceVersion, defaults) comes from the server, as in a cluster.
"""

from __future__ import annotations

import copy
from typing import Any, Self

from controlplane.sources.kubernetes.kinds import (
    ENDPOINT_SLICES,
    GRPC_ROUTES,
    HTTP_ROUTES,
    PODS,
    REFERENCE_GRANTS,
    SECURITY_POLICIES,
    SERVICE_ACCOUNT_ANNOTATION,
    SERVICE_ACCOUNTS,
    SERVICE_NAME_LABEL,
    SERVICES,
    SIDECARS,
    TRAFFIC_POLICIES,
)

Obj = dict[str, Any]

# Set by the EndpointSlice controller on the slices it manages.
MANAGED_BY_LABEL = "endpointslice.kubernetes.io/managed-by"
MANAGED_BY_CONTROLLER = "endpointslice-controller.k8s.io"


class _Builder:
    """Metadata common to every kind."""

    def __init__(self, api_version: str, kind: str, name: str, namespace: str) -> None:
        self._obj: Obj = {"apiVersion": api_version, "kind": kind,
                          "metadata": {"name": name, "namespace": namespace}}

    def label(self, key: str, value: str) -> Self:
        self._obj["metadata"].setdefault("labels", {})[key] = value
        return self

    def labels(self, **labels: str) -> Self:
        for key, value in labels.items():
            self.label(key, value)
        return self

    def annotation(self, key: str, value: str) -> Self:
        self._obj["metadata"].setdefault("annotations", {})[key] = value
        return self

    def build(self) -> Obj:
        return copy.deepcopy(self._obj)


class ServiceBuilder(_Builder):
    def __init__(self, name: str, namespace: str) -> None:
        super().__init__(SERVICES.api_version, SERVICES.kind, name, namespace)
        self._obj["spec"] = {"selector": {"app": name}, "ports": []}

    def port(self, port: int, *, name: str | None = None, target: int | str | None = None,
             protocol: str = "TCP", app_protocol: str | None = None) -> Self:
        """``target`` is the targetPort: a number, or the name of a container port."""
        entry: Obj = {"port": port, "protocol": protocol}
        if name is not None:
            entry["name"] = name
        if target is not None:
            entry["targetPort"] = target
        if app_protocol is not None:
            entry["appProtocol"] = app_protocol
        self._obj["spec"]["ports"].append(entry)
        return self

    def selector(self, **labels: str) -> Self:
        self._obj["spec"]["selector"] = dict(labels)
        return self

    def headless(self) -> Self:
        self._obj["spec"]["clusterIP"] = "None"
        return self


class EndpointSliceBuilder(_Builder):
    def __init__(self, name: str, namespace: str, service: str | None,
                 address_type: str) -> None:
        super().__init__(ENDPOINT_SLICES.api_version, ENDPOINT_SLICES.kind, name, namespace)
        if service is not None:
            self.label(SERVICE_NAME_LABEL, service)
            self.label(MANAGED_BY_LABEL, MANAGED_BY_CONTROLLER)
        self._obj["addressType"] = address_type
        self._obj["endpoints"] = []
        self._obj["ports"] = []

    def endpoint(self, *addresses: str, ready: bool | None = True, serving: bool | None = None,
                 terminating: bool | None = False, zone: str | None = None,
                 node: str | None = None, hostname: str | None = None,
                 pod: str | None = None) -> Self:
        """One endpoint. Conditions as the controller writes them: ``serving`` follows
        ``ready`` unless given; ``None`` leaves a condition unset (meaning unknown)."""
        entry: Obj = {"addresses": list(addresses)}
        conditions = {"ready": ready, "serving": ready if serving is None else serving,
                      "terminating": terminating}
        entry["conditions"] = {k: v for k, v in conditions.items() if v is not None}
        if hostname is not None:
            entry["hostname"] = hostname
        if pod is not None:
            entry["targetRef"] = {"kind": "Pod", "name": pod,
                                  "namespace": self._obj["metadata"]["namespace"]}
        if node is not None:
            entry["nodeName"] = node
        if zone is not None:
            entry["zone"] = zone
        self._obj["endpoints"].append(entry)
        return self

    def port(self, port: int, *, name: str = "", protocol: str = "TCP",
             app_protocol: str | None = None) -> Self:
        entry: Obj = {"name": name, "port": port, "protocol": protocol}
        if app_protocol is not None:
            entry["appProtocol"] = app_protocol
        self._obj["ports"].append(entry)
        return self


class TrafficPolicyBuilder(_Builder):
    def __init__(self, name: str, namespace: str, target: str, spec: Obj | None) -> None:
        super().__init__(TRAFFIC_POLICIES.api_version, TRAFFIC_POLICIES.kind, name, namespace)
        self._obj["spec"] = {"targetRef": {"kind": SERVICES.kind, "name": target},
                             **copy.deepcopy(spec or {})}

    def set(self, key: str, value: Any) -> Self:
        """One spec field, e.g. ``.set("timeout", "2s")``."""
        self._obj["spec"][key] = copy.deepcopy(value)
        return self

    def status(self, status: Obj) -> Self:
        """Only for objects handed to ``update_status``: create drops status, as the API
        server does for kinds with a status subresource."""
        self._obj["status"] = copy.deepcopy(status)
        return self


class SidecarBuilder(_Builder):
    def __init__(self, name: str, namespace: str, hosts: list[str],
                 service: str | None) -> None:
        super().__init__(SIDECARS.api_version, SIDECARS.kind, name, namespace)
        self._obj["spec"] = {"egress": [{"hosts": list(hosts)}]}
        if service is not None:
            self._obj["spec"]["workloadSelector"] = {"service": service}

    def spec(self, spec: Obj) -> Self:
        """The whole spec, as given (for invalid ones)."""
        self._obj["spec"] = copy.deepcopy(spec)
        return self


class SecurityPolicyBuilder(_Builder):
    def __init__(self, name: str, namespace: str, target: str | None, spec: Obj | None) -> None:
        super().__init__(SECURITY_POLICIES.api_version, SECURITY_POLICIES.kind, name,
                         namespace)
        self._obj["spec"] = copy.deepcopy(spec or {})
        if target is not None:
            self._obj["spec"]["target"] = {"name": target}

    def mtls(self, mode: str) -> Self:
        self._obj["spec"]["mtls"] = {"mode": mode}
        return self

    def rule(self, name: str, action: str = "allow", **fields: Any) -> Self:
        """One authorization rule; ``from_`` is written ``from``."""
        rule: Obj = {"name": name, "action": action}
        for field, value in fields.items():
            rule["from" if field == "from_" else field] = copy.deepcopy(value)
        self._obj["spec"].setdefault("authorization", []).append(rule)
        return self

    def spec(self, spec: Obj) -> Self:
        """The whole spec, as given (for invalid ones)."""
        self._obj["spec"] = copy.deepcopy(spec)
        return self


class PodBuilder(_Builder):
    def __init__(self, name: str, namespace: str) -> None:
        super().__init__(PODS.api_version, PODS.kind, name, namespace)
        self._obj["spec"] = {"containers": [{"name": "app", "image": "registry.example/app:1"}]}

    def ip(self, address: str) -> Self:
        """status.podIP and podIPs, as the kubelet reports them. Only for objects handed
        to ``update_status``: create drops status, as the API server does for Pods."""
        status = self._obj.setdefault("status", {})
        status["podIP"], status["podIPs"] = address, [{"ip": address}]
        return self

    def service_account(self, name: str) -> Self:
        """spec.serviceAccountName: who the pod runs as (its tokens' identity)."""
        self._obj["spec"]["serviceAccountName"] = name
        return self

    def injected(self, account: str = "default") -> Self:
        """As injection leaves it: running as ``account``, annotated with it."""
        return self.service_account(account).annotation(SERVICE_ACCOUNT_ANNOTATION, account)

    def phase(self, phase: str) -> Self:
        """status.phase (Pending, Running, ...); like ``ip``, only for ``update_status``,
        whose status replaces the whole of the stored one."""
        self._obj.setdefault("status", {})["phase"] = phase
        return self


def service(name: str, namespace: str = "default") -> ServiceBuilder:
    """A ClusterIP Service selecting ``app=<name>``; add ports with ``.port()``."""
    return ServiceBuilder(name, namespace)


def endpoint_slice(name: str, service: str | None = None, namespace: str = "default",
                   address_type: str = "IPv4") -> EndpointSliceBuilder:
    """An EndpointSlice; ``service`` sets the kubernetes.io/service-name label."""
    return EndpointSliceBuilder(name, namespace, service, address_type)


def traffic_policy(name: str, target: str, spec: Obj | None = None,
                   namespace: str = "default") -> TrafficPolicyBuilder:
    """A TrafficPolicy whose ``spec.targetRef`` names the Service ``target``; ``spec``
    holds the policy fields (the mesh file's ``policy`` block)."""
    return TrafficPolicyBuilder(name, namespace, target, spec)


def sidecar(name: str, hosts: list[str], service: str | None = None,
            namespace: str = "default") -> SidecarBuilder:
    """A Sidecar: the sidecars of ``namespace`` (of ``service`` there, if given) may
    reach ``hosts`` (``namespace/name`` patterns)."""
    return SidecarBuilder(name, namespace, hosts, service)


def security_policy(name: str, target: str | None = None, spec: Obj | None = None,
                    namespace: str = "default") -> SecurityPolicyBuilder:
    """A SecurityPolicy for the Service ``target`` (None: the whole namespace, or the mesh
    in the control plane's namespace); ``spec``: the mesh file's security block."""
    return SecurityPolicyBuilder(name, namespace, target, spec)


def pod(name: str, namespace: str = "default") -> PodBuilder:
    """A Pod with one container (``app``, ``registry.example/app:1``); add labels with
    ``.label()``/``.labels()``."""
    return PodBuilder(name, namespace)


def service_account(name: str, namespace: str = "default") -> Obj:
    """A ServiceAccount (what pods run as; tokens are requested for it)."""
    return {"apiVersion": SERVICE_ACCOUNTS.api_version, "kind": SERVICE_ACCOUNTS.kind,
            "metadata": {"name": name, "namespace": namespace}}


def http_route(name: str, spec: Obj, namespace: str = "default") -> Obj:
    """An HTTPRoute (gateway.networking.k8s.io/v1) with this ``spec`` as written."""
    return {"apiVersion": HTTP_ROUTES.api_version, "kind": HTTP_ROUTES.kind,
            "metadata": {"name": name, "namespace": namespace}, "spec": copy.deepcopy(spec)}


def grpc_route(name: str, spec: Obj, namespace: str = "default") -> Obj:
    """A GRPCRoute (gateway.networking.k8s.io/v1) with this ``spec`` as written."""
    return {"apiVersion": GRPC_ROUTES.api_version, "kind": GRPC_ROUTES.kind,
            "metadata": {"name": name, "namespace": namespace}, "spec": copy.deepcopy(spec)}


def reference_grant(name: str, namespace: str, from_: list[Obj], to: list[Obj]) -> Obj:
    """A ReferenceGrant (v1beta1): ``from_`` kinds and namespaces may refer to ``to``
    kinds (and names) in ``namespace``."""
    return {"apiVersion": REFERENCE_GRANTS.api_version, "kind": REFERENCE_GRANTS.kind,
            "metadata": {"name": name, "namespace": namespace},
            "spec": {"from": copy.deepcopy(from_), "to": copy.deepcopy(to)}}


def service_parent(name: str, port: int | None = None) -> Obj:
    """A parentRef to a Service (GAMMA), as users write it."""
    ref: Obj = {"group": "", "kind": "Service", "name": name}
    if port is not None:
        ref["port"] = port
    return ref
