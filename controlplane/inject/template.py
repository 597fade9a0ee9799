"""The two containers injection adds, built from the config and the pod's annotations.

``controlplane-init`` runs ``controlplane capture`` as root with NET_ADMIN and NET_RAW
and exits; ``controlplane-proxy`` is a native sidecar (an init container with
``restartPolicy: Always``): Kubernetes starts it before the app's containers, waits for
its startup probe, and stops it after them. Its bootstrap is inline (``--config-yaml``);
the node id and identity are ``$(VAR)`` references Kubernetes expands from downward-API
environment variables before Envoy starts, so one template serves every replica.

With the mesh CA's bundle (``InjectConfig.xds_ca``) the proxy dials xDS over TLS and
sends its projected ServiceAccount token (audience ``controlplane``, an hour, renewed by
the kubelet; Envoy reads the file again for every stream). Mounted in the proxy only.
The token file is readable by the proxy's user: the pod's containers run as different
users (capture as root), so the kubelet writes it 0644, or 0640 to the pod's fsGroup.
"""

from __future__ import annotations

import functools
import ipaddress
from collections.abc import Mapping
from typing import Any, Final

import yaml

from controlplane.bootstrap import HEALTH_PATH, build_bootstrap, capture_options
from controlplane.inject import config as names
from controlplane.inject.config import InjectConfig, InjectError

_DUMPER: Final = getattr(yaml, "CSafeDumper", yaml.SafeDumper)  # libyaml's, when built in

NODE_ID = "$(POD_NAME).$(POD_NAMESPACE)"

DOWNWARD_ENV = (
    ("POD_NAME", "metadata.name"),
    ("POD_NAMESPACE", "metadata.namespace"),
    ("SERVICE_ACCOUNT", "spec.serviceAccountName"),
    ("INSTANCE_IP", "status.podIP"),
)

# What capture itself needs: a few seconds of one core, and the memory of ``controlplane
# capture`` (it loads only its own modules): 30 MiB resident at peak, iptables-restore
# beside it 2 MiB (bench/cli_startup.py); the limit is three times that, as page cache
# from reading the package counts against it too.
INIT_RESOURCES = {"requests": {"cpu": "10m", "memory": "32Mi"},
                  "limits": {"cpu": "100m", "memory": "96Mi"}}


def capture_args(annotations: Mapping[str, str], config: InjectConfig) -> list[str]:
    """``controlplane capture`` flags for this pod: the sidecar's ports and user, the
    pod's own exclusions (annotations), and the xDS server, which the proxy must always
    reach directly."""
    args = ["--proxy-uid", str(config.proxy_uid),
            "--outbound-port", str(names.OUTBOUND_PORT),
            "--inbound-port", str(names.INBOUND_PORT)]
    include_inbound = annotations.get(names.INCLUDE_INBOUND_PORTS)
    if include_inbound is not None:
        value = include_inbound.strip()
        if value != "*":
            value = _ports(names.INCLUDE_INBOUND_PORTS, include_inbound)
        args += ["--include-inbound-ports", value]
    for key, flag in ((names.EXCLUDE_INBOUND_PORTS, "--exclude-inbound-ports"),
                      (names.EXCLUDE_OUTBOUND_PORTS, "--exclude-outbound-ports")):
        if key in annotations and (ports := _ports(key, annotations[key])):
            args += [flag, ports]
    if names.EXCLUDE_OUTBOUND_CIDRS in annotations and (
            cidrs := _cidrs(names.EXCLUDE_OUTBOUND_CIDRS,
                            annotations[names.EXCLUDE_OUTBOUND_CIDRS])):
        args += ["--exclude-outbound-cidrs", cidrs]
    include_outbound = annotations.get(names.INCLUDE_OUTBOUND_CIDRS)
    if include_outbound is not None:
        value = include_outbound.strip()
        if value != "*":
            value = _cidrs(names.INCLUDE_OUTBOUND_CIDRS, include_outbound)
        args += ["--include-outbound-cidrs", value]
    return [*args, "--exclude-address", config.xds_address]


def init_container(annotations: Mapping[str, str], config: InjectConfig) -> dict[str, Any]:
    """Programs the pod's capture and exits. Root with NET_ADMIN and NET_RAW only (the
    least iptables needs), every other capability dropped."""
    return {
        "name": names.INIT_NAME,
        "image": config.init_image,
        "imagePullPolicy": "IfNotPresent",
        "command": ["controlplane", "capture"],
        "args": capture_args(annotations, config),
        "resources": {kind: dict(values) for kind, values in INIT_RESOURCES.items()},
        "securityContext": {
            "runAsUser": 0,
            "runAsGroup": 0,
            "runAsNonRoot": False,
            "privileged": False,
            "allowPrivilegeEscalation": False,
            "capabilities": {"add": ["NET_ADMIN", "NET_RAW"], "drop": ["ALL"]},
        },
    }


def proxy_container(service: str, annotations: Mapping[str, str],
                    config: InjectConfig) -> dict[str, Any]:
    """The Envoy sidecar. Probes hit the bootstrap's health listener (15021), which
    answers from Envoy's own ``/ready``: the startup probe holds the app's containers
    back until Envoy has its first config, so the app's first call is never refused."""
    log_level = annotations.get(names.PROXY_LOG_LEVEL, config.log_level)
    if log_level not in names.LOG_LEVELS:
        raise InjectError(_annotation(names.PROXY_LOG_LEVEL),
                          f"{log_level!r} is not a log level; use one of "
                          f"{', '.join(names.LOG_LEVELS)}")
    return envoy_container(names.PROXY_NAME, bootstrap_yaml(service, config), log_level,
                           [{"name": "http-envoy-prom", "containerPort": names.STATS_PORT,
                             "protocol": "TCP"}],
                           resources(annotations, config), config, sidecar=True)


def envoy_container(name: str, bootstrap: str, log_level: str, ports: list[dict[str, Any]],
                    resources: dict[str, Any], config: InjectConfig, *,
                    sidecar: bool) -> dict[str, Any]:
    """The Envoy container a sidecar and a gateway Deployment both run: inline bootstrap,
    the downward-API environment its ``$(VAR)`` references need, the xDS token when the
    server has a CA, readiness from the health listener, an unprivileged user. A sidecar
    is also a native sidecar (``restartPolicy: Always``) whose startup probe holds the
    app back, with the RuntimeDefault seccomp profile."""
    def probe() -> dict[str, Any]:
        return {"httpGet": {"path": HEALTH_PATH, "port": names.HEALTH_PORT}}

    return {
        "name": name,
        "image": config.proxy_image,
        "imagePullPolicy": "IfNotPresent",
        **({"restartPolicy": "Always"} if sidecar else {}),
        "command": ["envoy"],
        "args": ["--config-yaml", bootstrap, "--log-level", log_level,
                 "--disable-hot-restart", "--drain-time-s", "5"],
        "env": [{"name": env, "valueFrom": {"fieldRef": {"apiVersion": "v1",
                                                         "fieldPath": path}}}
                for env, path in DOWNWARD_ENV],
        "ports": ports,
        "resources": resources,
        **({"volumeMounts": [{"name": names.TOKEN_VOLUME, "mountPath": names.TOKEN_DIR,
                              "readOnly": True}]} if config.xds_ca is not None else {}),
        **({"startupProbe": {**probe(), "periodSeconds": 1, "timeoutSeconds": 3,
                             "failureThreshold": 600}} if sidecar else {}),
        "readinessProbe": {**probe(), "periodSeconds": 2, "timeoutSeconds": 3,
                           "failureThreshold": 3},
        "securityContext": {
            "runAsUser": config.proxy_uid,
            "runAsGroup": config.proxy_uid,
            "runAsNonRoot": True,
            "privileged": False,
            "allowPrivilegeEscalation": False,
            "readOnlyRootFilesystem": True,
            "capabilities": {"drop": ["ALL"]},
            **({"seccompProfile": {"type": "RuntimeDefault"}} if sidecar else {}),
        },
    }


@functools.lru_cache(maxsize=256)
def bootstrap_yaml(service: str, config: InjectConfig) -> str:
    """The sidecar's bootstrap: a captured proxy whose node id and identity Kubernetes
    fills in from the downward API. The same text for every pod of a service, so it is
    made once (a webhook answering a rollout's pods pays for it once), with libyaml's
    emitter when PyYAML has it (six times faster than the pure-Python one)."""
    options = capture_options(
        NODE_ID, service, namespace="$(POD_NAMESPACE)", xds_address=config.xds_address,
        delta=config.delta, service_account="$(SERVICE_ACCOUNT)",
        instance_ip="$(INSTANCE_IP)", xds_ca=config.xds_ca,
        token_file=names.TOKEN_PATH if config.xds_ca is not None else None)
    return yaml.dump(build_bootstrap(options), Dumper=_DUMPER, sort_keys=False,
                     default_flow_style=False)


def token_volume() -> dict[str, Any]:
    """The projected ServiceAccount token the proxy authenticates with."""
    return {"name": names.TOKEN_VOLUME, "projected": {"sources": [{"serviceAccountToken": {
        "audience": names.TOKEN_AUDIENCE, "expirationSeconds": names.TOKEN_SECONDS,
        "path": "token"}}]}}


def resources(annotations: Mapping[str, str], config: InjectConfig) -> dict[str, Any]:
    """Requests and limits from the config, each overridable per pod by annotation (as
    Istio's ``sidecar.istio.io/proxyCPU`` ...). No CPU limit unless asked: a throttled
    proxy slows every call of the app."""
    requests = {"cpu": _quantity(annotations, names.PROXY_CPU, config.proxy_cpu),
                "memory": _quantity(annotations, names.PROXY_MEMORY, config.proxy_memory)}
    limits = {"memory": _quantity(annotations, names.PROXY_MEMORY_LIMIT,
                                  config.proxy_memory_limit)}
    if names.PROXY_CPU_LIMIT in annotations:
        limits = {"cpu": _quantity(annotations, names.PROXY_CPU_LIMIT, ""), **limits}
    return {"requests": requests, "limits": limits}


def _quantity(annotations: Mapping[str, str], key: str, default: str) -> str:
    value = annotations.get(key, default).strip()
    if not names.QUANTITY.match(value):
        raise InjectError(_annotation(key), f"{value!r} is not a Kubernetes quantity; "
                          "write it like 100m, 0.5 or 128Mi")
    return value


def _ports(key: str, text: str) -> str:
    """A comma list of ports, normalised (``"80, 443"`` -> ``"80,443"``)."""
    ports = []
    for item in (part.strip() for part in text.split(",")):
        if not item:
            continue
        if not item.isdigit() or not 0 < int(item) < 65536:
            raise InjectError(_annotation(key), f"{item!r} is not a port; give a comma "
                              "list of port numbers from 1 to 65535, e.g. \"8080,9090\"")
        ports.append(str(int(item)))
    return ",".join(ports)


def _cidrs(key: str, text: str) -> str:
    """A comma list of CIDRs (an address alone is one host), normalised."""
    cidrs = []
    for item in (part.strip() for part in text.split(",")):
        if not item:
            continue
        try:
            network = ipaddress.ip_network(item, strict=False)
        except ValueError:
            raise InjectError(_annotation(key), f"{item!r} is not a CIDR; give a comma "
                              "list such as \"10.0.0.0/8,192.168.1.1/32\"") from None
        cidrs.append(str(network))
    return ",".join(cidrs)


def _annotation(key: str) -> str:
    return f'metadata.annotations["{key}"]'
