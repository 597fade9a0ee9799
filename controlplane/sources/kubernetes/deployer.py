"""Automated deployment: each Gateway of our class gets its own Envoy.

Per Gateway, three objects in its namespace, named ``<gateway>-<class>`` (Istio's
convention, so a Service named like the Gateway is never taken over): a ServiceAccount
(the gateway's workload identity in the mesh), a Deployment running Envoy with the
bootstrap ``controlplane bootstrap --gateway`` prints (inline, as injection does for
sidecars: one image, no init container) and a Service exposing the listener ports (type
LoadBalancer unless the Gateway's annotation ``mesh.controlplane.io/service-type`` says
ClusterIP or NodePort). Each carries an ownerReference to the Gateway, so deleting the
Gateway deletes them (Kubernetes' garbage collector), and the labels and annotations of
the Gateway's ``spec.infrastructure`` (GEP-1867).

:func:`desired` is pure (Gateway JSON in, object JSON out); ``deploy_writer.Deployer`` is the
edge: GET, then create or merge-patch only what differs (a hash of what we want rides on
each object as an annotation, so an unchanged Gateway costs one GET per object and no
write), and never touches an object of that name that the Gateway does not own.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Mapping
from typing import Any, Final

import structlog
import yaml

from controlplane.bootstrap import (
    CAPTURE_ADMIN_PORT,
    CAPTURE_HEALTH_PORT,
    CAPTURE_STATS_PORT,
    BootstrapOptions,
    build_bootstrap,
)
from controlplane.inject import config as names
from controlplane.inject.config import INJECT_LABEL, InjectConfig
from controlplane.inject.pod import scrape_annotations
from controlplane.inject.template import (
    _DUMPER,
    NODE_ID,
    envoy_container,
    resources,
    token_volume,
)
from controlplane.mesh.gateways import gateway_account
from controlplane.sources.kubernetes.kinds import (
    DEPLOYMENTS,
    GATEWAY_LABEL,
    GATEWAYS,
    INGRESS,
    POLICY_GROUP,
    SECRETS,
    SERVICE_ACCOUNTS,
    SERVICE_TYPE_ANNOTATION,
    SERVICES,
    Kind,
)
from controlplane.sources.kubernetes.services import meta

log = structlog.get_logger("controlplane.source.kubernetes")

Obj = dict[str, Any]
HASH_ANNOTATION: Final = f"{POLICY_GROUP}/gateway-hash"
MANAGED_BY: Final = {"app.kubernetes.io/managed-by": "controlplane"}
SERVICE_TYPES: Final = ("LoadBalancer", "ClusterIP", "NodePort")
CONTAINER: Final = "envoy"
MERGE_PATCH: Final = "application/merge-patch+json"
_PORT_NAMES: Final = {"HTTP": "http", "HTTPS": "https", "TLS": "tls", "TCP": "tcp"}
# Every label or annotation a Gateway's infrastructure may add: the Gateway API's bound.
MAX_INFRASTRUCTURE: Final = 8

# (gateway namespace, gateway name, bootstrap flags) -> the bootstrap's YAML text.
Bootstrap = Callable[[str, str, InjectConfig], str]


def gateway_bootstrap(namespace: str, gateway: str, config: InjectConfig) -> str:
    """The bootstrap ``controlplane bootstrap --gateway GATEWAY`` prints, for a pod of
    the Deployment: node id and identity from the downward API (``$(POD_NAME)``...,
    expanded by Kubernetes), the health and stats listeners at the sidecar's ports,
    xDS over TLS with the projected token when the mesh has a CA."""
    options = BootstrapOptions(
        node_id=NODE_ID, service=gateway, namespace=namespace,
        xds_address=config.xds_address, admin_port=CAPTURE_ADMIN_PORT,
        delta=config.delta, stats_port=CAPTURE_STATS_PORT, health_port=CAPTURE_HEALTH_PORT,
        service_account="$(SERVICE_ACCOUNT)", instance_ip="$(INSTANCE_IP)",
        xds_ca=config.xds_ca,
        token_file=names.TOKEN_PATH if config.xds_ca is not None else None,
        gateway=gateway)
    return yaml.dump(build_bootstrap(options), Dumper=_DUMPER, sort_keys=False,
                     default_flow_style=False)


class NotDeployable(ValueError):
    """A Gateway the deployer cannot make objects for: ``field: what to do``."""


def resource_name(gateway: str, gateway_class: str) -> str:
    """``<gateway>-<class>`` (``mesh.gateways.gateway_account``: the proxies' identity)."""
    return gateway_account(gateway, gateway_class)


def listener_ports(gateway: Mapping[str, Any]) -> list[tuple[int, str]]:
    """Each distinct listener port with the protocol of its first listener, in order."""
    spec = gateway.get("spec") if isinstance(gateway.get("spec"), Mapping) else {}
    listeners = spec.get("listeners") if isinstance(spec, Mapping) else None
    found: dict[int, str] = {}
    for listener in listeners if isinstance(listeners, list) else []:
        if not isinstance(listener, Mapping):
            continue
        port = listener.get("port")
        if isinstance(port, int) and not isinstance(port, bool) and 1 <= port <= 65535:
            found.setdefault(port, str(listener.get("protocol") or ""))
    return sorted(found.items())


def _infrastructure(gateway: Mapping[str, Any], field: str) -> dict[str, str]:
    spec = gateway.get("spec")
    infra = spec.get("infrastructure") if isinstance(spec, Mapping) else None
    values = infra.get(field) if isinstance(infra, Mapping) else None
    if not isinstance(values, Mapping):
        return {}
    kept = {str(k): str(v) for k, v in values.items() if isinstance(v, str)}
    if len(kept) > MAX_INFRASTRUCTURE:
        raise NotDeployable(f"spec.infrastructure.{field}: {len(kept)} entries; at most "
                            f"{MAX_INFRASTRUCTURE} (the Gateway API's bound)")
    return kept


def service_type(gateway: Mapping[str, Any]) -> str:
    annotations = meta(gateway).get("annotations")
    wanted = annotations.get(SERVICE_TYPE_ANNOTATION) if isinstance(annotations,
                                                                   Mapping) else None
    if wanted is None:
        return "LoadBalancer"
    if wanted not in SERVICE_TYPES:
        raise NotDeployable(f'metadata.annotations["{SERVICE_TYPE_ANNOTATION}"]: '
                            f"{wanted!r} is not a Service type; use one of "
                            f"{', '.join(SERVICE_TYPES)}")
    return str(wanted)


def desired(gateway: Mapping[str, Any], config: InjectConfig,
            bootstrap: Bootstrap) -> list[tuple[Kind, Obj]]:
    """The ServiceAccount, Deployment and Service of one Gateway (of our class), each
    stamped with the hash of what it says. Raises NotDeployable naming the field."""
    data = meta(gateway)
    namespace, gateway_name = str(data.get("namespace") or "default"), str(data["name"])
    spec: Mapping[str, Any] = gateway["spec"] if isinstance(gateway.get("spec"),
                                                             Mapping) else {}
    name = resource_name(gateway_name, str(spec.get("gatewayClassName") or ""))
    ports = listener_ports(gateway)
    if not ports:
        raise NotDeployable("spec.listeners: no listener with a valid port; give each "
                            "listener a port from 1 to 65535")
    selector = {GATEWAY_LABEL: gateway_name}
    labels = {**_infrastructure(gateway, "labels"), **MANAGED_BY, **selector}
    annotations = _infrastructure(gateway, "annotations")
    owner = {"apiVersion": GATEWAYS.api_version, "kind": GATEWAYS.kind,
             "name": gateway_name, "uid": str(data.get("uid") or ""), "controller": True}

    def metadata() -> Obj:
        return {"name": name, "namespace": namespace, "labels": dict(labels),
                "annotations": dict(annotations), "ownerReferences": [dict(owner)]}

    account: Obj = {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": metadata()}
    container = _container(gateway_name, namespace, ports, config, bootstrap)
    pod: Obj = {
        "serviceAccountName": name,
        "containers": [container],
        "securityContext": {
            # Envoy runs unprivileged and binds the listener ports themselves (80, 443):
            # the kernel allows it in this pod only (a namespaced, "safe" sysctl).
            "sysctls": [{"name": "net.ipv4.ip_unprivileged_port_start", "value": "0"}],
            "runAsNonRoot": True,
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        **({"volumes": [token_volume()]} if config.xds_ca is not None else {}),
    }
    deployment: Obj = {
        "apiVersion": "apps/v1", "kind": "Deployment", "metadata": metadata(),
        "spec": {"replicas": 1, "selector": {"matchLabels": dict(selector)},
                 "template": {"metadata": {
                     "labels": {**labels, INJECT_LABEL: "false"},  # no sidecar: it is one
                     # Scraped like an injected pod (its stats listener on 15090), unless
                     # the Gateway's infrastructure says where to scrape.
                     "annotations": {**annotations, **scrape_annotations(annotations)}},
                     "spec": pod}},
    }
    service: Obj = {
        "apiVersion": "v1", "kind": "Service", "metadata": metadata(),
        "spec": {"type": service_type(gateway), "selector": dict(selector),
                 "ports": [{"name": f"{_PORT_NAMES.get(protocol, 'port')}-{port}",
                            "port": port, "targetPort": port, "protocol": "TCP"}
                           for port, protocol in ports]},
    }
    made: list[tuple[Kind, Obj]] = [(SERVICE_ACCOUNTS, account), (DEPLOYMENTS, deployment),
                                    (SERVICES, service)]
    for _, obj in made:
        obj["metadata"]["annotations"][HASH_ANNOTATION] = digest(obj)
    return made


def digest(obj: Mapping[str, Any]) -> str:
    """What we want of an object, hashed (our own hash annotation left out)."""
    copy = json.loads(json.dumps(obj))
    copy.get("metadata", {}).get("annotations", {}).pop(HASH_ANNOTATION, None)
    text = json.dumps(copy, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _container(gateway: str, namespace: str, ports: list[tuple[int, str]],
               config: InjectConfig, bootstrap: Bootstrap) -> Obj:
    return envoy_container(
        CONTAINER, bootstrap(namespace, gateway, config), config.log_level,
        [*({"name": f"listener-{port}", "containerPort": port, "protocol": "TCP"}
           for port, _ in ports),
         {"name": "http-envoy-prom", "containerPort": CAPTURE_STATS_PORT, "protocol": "TCP"}],
        resources({}, config), config, sidecar=False)


def rbac_rules() -> list[Obj]:
    """What the gateway controller needs in the server's ClusterRole (deploy/kubernetes):
    read our Gateway API kinds and write their status; make each Gateway's three objects
    (no list or watch of them: each is read by name). Secrets are in a ClusterRole of
    their own (``certificate_rules``)."""
    watch = ["get", "list", "watch"]
    write = ["get", "create", "patch", "delete"]
    return [
        *({"apiGroups": [kind.group], "resources": [kind.plural], "verbs": watch}
          for kind in INGRESS),
        {"apiGroups": [GATEWAYS.group],
         "resources": [f"{kind.plural}/status" for kind in INGRESS],
         "verbs": ["get", "update", "patch"]},
        {"apiGroups": [DEPLOYMENTS.group], "resources": [DEPLOYMENTS.plural], "verbs": write},
        {"apiGroups": [SERVICES.group],
         "resources": [SERVICES.plural, SERVICE_ACCOUNTS.plural], "verbs": write},
    ]


def certificate_rules() -> list[Obj]:
    """Reading the Secrets Gateway listeners name (certificateRefs). RBAC cannot name
    them ahead (users do, later), so this is every Secret, in a ClusterRole of its own
    that the manifests do not bind cluster-wide: a RoleBinding grants it in each
    namespace whose Gateways terminate TLS. The server itself watches only the named
    Secrets, one watch each (certificates.py)."""
    return [{"apiGroups": [SECRETS.group], "resources": [SECRETS.plural],
             "verbs": ["get", "list", "watch"]}]
