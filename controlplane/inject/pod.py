"""Whether a pod gets a sidecar, and the pod with it: pure functions of plain dicts.

Used by the webhook (a pod from an AdmissionReview) and ``controlplane inject`` (a pod or
a workload's pod template from a manifest), so both inject exactly the same way.

Probes: the app's containers are left as they are. The kubelet's HTTP and TCP probes
reach the pod's IP, so inbound capture sends them through the sidecar to the app, which
works for plain HTTP and TCP. Istio rewrites app probes to its agent because with strict
mTLS the sidecar refuses the kubelet's plaintext, and so that an app's probe does not
fail while the proxy is still starting; here the sidecar takes plaintext and the native
sidecar's startup probe holds the app back until Envoy is ready, so neither applies. Once
strict mTLS arrives, probes need that rewrite (or their ports excluded from capture).
"""

from __future__ import annotations

import copy
import json
import re
from collections.abc import Mapping
from typing import Any

from controlplane.inject import config as names
from controlplane.inject import podspec, proxyless, template
from controlplane.inject.config import InjectConfig, InjectError
from controlplane.inject.patch import json_patch

__all__ = ["InjectConfig", "InjectError", "inject_pod", "inject_template", "json_patch",
           "service_name", "wants_injection"]

STATUS_VERSION = 1

_YES = ("true", "enabled", "yes", "y", "on")
_NO = ("false", "disabled", "no", "n", "off")
_HASH_SUFFIX = re.compile(r"-[a-z0-9]{5}$")


def wants_injection(pod: Mapping[str, Any],
                    namespace_labels: Mapping[str, str] | None) -> tuple[bool, str]:
    """Whether to inject ``pod``, and why (for logs and the webhook's answer).

    Istio's rules: a host-network pod never (its rules would capture the node's own
    traffic); an injected pod never again; the pod's ``mesh.controlplane.io/inject``
    label (or annotation) ``false`` always wins, ``true`` opts in anywhere; otherwise the
    namespace label decides (``enabled``). ``namespace_labels`` None means the caller has
    already chosen the namespace (the webhook's namespaceSelector, or offline
    injection): then the pod is injected unless it opts out. Raises InjectError for an
    opt-in value it cannot read."""
    metadata = _mapping(pod.get("metadata"), "metadata")
    spec = _mapping(pod.get("spec"), "spec")
    if spec.get("hostNetwork") is True:
        return False, "spec.hostNetwork is true: capture would redirect the node's traffic"
    if names.STATUS_ANNOTATION in _strings(metadata.get("annotations"), "annotations"):
        return False, f"already injected ({names.STATUS_ANNOTATION} is set)"
    choice = _pod_choice(metadata)
    if choice is False:
        return False, f"the pod opts out ({names.INJECT_LABEL}: false)"
    if choice is True:
        return True, f"the pod opts in ({names.INJECT_LABEL}: true)"
    if namespace_labels is None:
        return True, "the caller chose the namespace (webhook selector, or offline)"
    value = namespace_labels.get(names.INJECT_LABEL, "")
    if value == "enabled":
        return True, f"the namespace is labelled {names.INJECT_LABEL}=enabled"
    return False, f"the namespace is not labelled {names.INJECT_LABEL}=enabled"


def inject_pod(pod: Mapping[str, Any], namespace: str,
               config: InjectConfig) -> dict[str, Any]:
    """A new pod with the sidecar; an already injected pod comes back equal. Raises
    InjectError (its field says where) for a pod it cannot understand. ``namespace`` is
    the pod's (the AdmissionRequest's); the sidecar reads its own from the downward API,
    so a manifest injected offline works in whichever namespace it is applied to."""
    metadata = _mapping(pod.get("metadata", {}), "metadata")
    return inject_template(pod, namespace, config, fallback_service=_name_base(metadata))


def inject_template(pod: Mapping[str, Any], namespace: str, config: InjectConfig,
                    fallback_service: str) -> dict[str, Any]:
    """:func:`inject_pod` for a pod or a workload's pod template, whose pods have no name
    yet: ``fallback_service`` (the workload's name) is the service when no label says."""
    result: dict[str, Any] = copy.deepcopy(dict(pod))
    metadata = _mapping(result.setdefault("metadata", {}), "metadata")
    annotations = _strings(metadata.get("annotations"), "annotations")
    if names.STATUS_ANNOTATION in annotations:
        return result
    spec = _mapping(result.get("spec"), "spec")
    if spec.get("hostNetwork") is True:
        raise InjectError("spec.hostNetwork", "a host-network pod shares the node's "
                          "network, which capture must not touch; it is never injected")
    if proxyless.kind_of(annotations) is not None:  # no Envoy, no capture: proxyless.py
        return proxyless.inject_template(result, config,
                                         service_name(metadata, fallback_service),
                                         service_account(spec))
    containers = _containers(spec, "containers", required=True)
    init_containers = _containers(spec, "initContainers", required=False)
    _check_users(spec, containers, init_containers, config.proxy_uid)
    service = service_name(metadata, fallback_service)
    ours = [template.init_container(annotations, config),
            template.proxy_container(service, annotations, config)]
    spec["initContainers"] = ours + init_containers
    if config.xds_ca is not None:
        token = podspec.volumes(spec, (names.TOKEN_VOLUME,),
                                "the volume injection adds (the sidecar's token)")
        spec["volumes"] = [*token, template.token_volume()]
    metadata["annotations"] = {**annotations, **scrape_annotations(annotations),
                               names.SERVICE_ACCOUNT_ANNOTATION: service_account(spec),
                               names.STATUS_ANNOTATION: _status(config)}
    return result


def service_account(spec: Mapping[str, Any]) -> str:
    """The pod's ServiceAccount: ``serviceAccountName`` (or the deprecated
    ``serviceAccount``), else the namespace's ``default``, as the API server admits it."""
    for key in ("serviceAccountName", "serviceAccount"):
        value = spec.get(key)
        if value is not None and not isinstance(value, str):
            raise InjectError(f"spec.{key}", "must be the name of a ServiceAccount")
        if value:
            return value
    return "default"


def service_name(metadata: Mapping[str, Any], fallback: str) -> str:
    """The service a pod belongs to: label ``app.kubernetes.io/name``, else ``app``, else
    annotation ``mesh.controlplane.io/service``, else ``fallback`` (its name's base)."""
    labels = _strings(metadata.get("labels"), "labels")
    annotations = _strings(metadata.get("annotations"), "annotations")
    for value in (labels.get("app.kubernetes.io/name"), labels.get("app"),
                  annotations.get(names.SERVICE_ANNOTATION)):
        if value:
            return value
    if not fallback:
        raise InjectError("metadata", "no service name: set the label "
                          "app.kubernetes.io/name (or app), or the annotation "
                          f"{names.SERVICE_ANNOTATION}, or give the pod a name")
    return fallback


def _pod_choice(metadata: Mapping[str, Any]) -> bool | None:
    """The pod's own say: label first, then annotation (as Istio reads both)."""
    for where in ("labels", "annotations"):
        value = _strings(metadata.get(where), where).get(names.INJECT_LABEL)
        if value is None:
            continue
        lowered = value.strip().lower()
        if lowered in _YES:
            return True
        if lowered in _NO:
            return False
        raise InjectError(f'metadata.{where}["{names.INJECT_LABEL}"]',
                          f"{value!r} is neither true nor false; set \"true\" to opt in "
                          "or \"false\" to opt out")
    return None


def _name_base(metadata: Mapping[str, Any]) -> str:
    """The name of the workload a pod came from, without what its controllers appended:
    ``reviews-v1-7d9f8b6c5-x2x4z`` (or generateName ``reviews-v1-7d9f8b6c5-``) ->
    ``reviews-v1``; StatefulSet pod ``db-0`` -> ``db``."""
    labels = _strings(metadata.get("labels"), "labels")
    generated = str(metadata.get("generateName") or "")
    base = generated.rstrip("-") or str(metadata.get("name") or "")
    template_hash = labels.get("pod-template-hash")
    if template_hash:
        if not generated:
            base = _HASH_SUFFIX.sub("", base)
        base = base.removesuffix(f"-{template_hash}")
    elif "statefulset.kubernetes.io/pod-name" in labels:
        base = re.sub(r"-[0-9]+$", "", base)
    return base


def _containers(spec: dict[str, Any], key: str, required: bool) -> list[dict[str, Any]]:
    """The list at ``spec[key]``, checked: named objects, no name of ours, no port of
    the sidecar's."""
    value = podspec.containers(spec, key, required, names.OUR_CONTAINERS, "injection")
    for index, container in enumerate(value):
        where = f"spec.{key}[{index}]"
        ports = container.get("ports") or []
        if not isinstance(ports, list):
            raise InjectError(f"{where}.ports", "must be a list of ports")
        for number, port in enumerate(ports):
            taken = port.get("containerPort") if isinstance(port, Mapping) else None
            if taken in names.RESERVED_PORTS:
                raise InjectError(
                    f"{where}.ports[{number}].containerPort",
                    f"{taken} is a sidecar port ({', '.join(map(str, names.RESERVED_PORTS))}"
                    "); move the app to another port, or opt the pod out with the label "
                    f"{names.INJECT_LABEL}: \"false\"")
    return value


def _check_users(spec: Mapping[str, Any], containers: list[dict[str, Any]],
                 init_containers: list[dict[str, Any]], proxy_uid: int) -> None:
    """An app running as the proxy's user would bypass capture without a word: refuse."""
    pod_context = spec.get("securityContext")
    pod_uid = pod_context.get("runAsUser") if isinstance(pod_context, Mapping) else None
    if pod_uid == proxy_uid:
        raise InjectError("spec.securityContext.runAsUser", _same_user(proxy_uid))
    for key, listed in (("containers", containers), ("initContainers", init_containers)):
        for index, container in enumerate(listed):
            context = container.get("securityContext")
            if isinstance(context, Mapping) and context.get("runAsUser") == proxy_uid:
                raise InjectError(f"spec.{key}[{index}].securityContext.runAsUser",
                                  _same_user(proxy_uid))


def _same_user(uid: int) -> str:
    return (f"{uid} is the sidecar's user, whose traffic capture leaves alone: this app's "
            "calls would bypass the sidecar; run the app as another user")


def scrape_annotations(annotations: Mapping[str, str]) -> dict[str, str]:
    """Prometheus scrapes the sidecar's stats, unless the pod already says where its own
    metrics are (then it keeps them: one scrape target per pod)."""
    if any(key.startswith("prometheus.io/") for key in annotations):
        return {}
    return {"prometheus.io/scrape": "true", "prometheus.io/port": str(names.STATS_PORT),
            "prometheus.io/path": "/stats/prometheus"}


def _status(config: InjectConfig) -> str:
    return json.dumps({"version": STATUS_VERSION,
                       "initContainers": list(names.OUR_CONTAINERS),
                       "proxyImage": config.proxy_image}, separators=(",", ":"))


def _mapping(value: Any, field: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise InjectError(field, "missing or not an object; give a pod (or a pod "
                          "template) with metadata and spec")
    return value


def _strings(value: Any, where: str) -> dict[str, str]:
    """Labels or annotations: a map of strings (absent is empty)."""
    if value is None:
        return {}
    if not isinstance(value, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in value.items()):
        raise InjectError(f"metadata.{where}", "must map strings to strings; quote values "
                          "such as \"true\" or \"8080\" in YAML")
    return value
