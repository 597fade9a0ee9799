"""One AdmissionReview v1 in, one out: the webhook's decision, as a pure function.

The API server sends the object being created (``request.object``) with the namespace
in ``request.namespace``; the answer carries the same ``uid``, ``allowed``, and the
changes as an RFC 6902 JSON patch (base64). A Pod is injected with ``inject_pod``; the
workload kinds' pod templates (when a configuration sends them) with the same code. A
pod injection cannot understand is admitted unchanged with a warning (fail open), or
refused with the reason (closed): never a broken pod.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Final

from controlplane.inject.config import InjectConfig, InjectError
from controlplane.inject.pod import inject_pod, inject_template, json_patch, wants_injection

API_VERSION: Final = "admission.k8s.io/v1"
# Where each workload kind keeps its pod template.
TEMPLATES: Final[Mapping[str, tuple[str, ...]]] = {
    "Deployment": ("spec", "template"), "StatefulSet": ("spec", "template"),
    "DaemonSet": ("spec", "template"), "ReplicaSet": ("spec", "template"),
    "Job": ("spec", "template"), "ReplicationController": ("spec", "template"),
    "CronJob": ("spec", "jobTemplate", "spec", "template"),
}
_WARNING_CHARS: Final = 240  # kubectl prints warnings; keep each one line long


class BadReview(ValueError):
    """Not an AdmissionReview v1 request: answered with HTTP 400 and this message."""


@dataclass(frozen=True)
class Decision:
    """The answer, and what the log line and the metric say about it."""

    response: dict[str, Any]
    result: str  # injected | skipped | error | denied
    reason: str
    kind: str = ""
    namespace: str = ""
    name: str = ""
    warnings: list[str] = field(default_factory=list)


def _short(text: str) -> str:
    return text if len(text) <= _WARNING_CHARS else text[:_WARNING_CHARS - 3] + "..."


def _pod_name(meta: Mapping[str, Any], request: Mapping[str, Any]) -> str:
    """For logs: the name, or ``generateName*`` for pods a controller creates (their name
    is chosen after admission)."""
    name = request.get("name") or meta.get("name")
    if name:
        return str(name)
    return f"{meta.get('generateName', '')}*"


def review(body: Any, config: InjectConfig, fail_closed: bool = False) -> Decision:
    """The webhook's answer to one AdmissionReview (a parsed JSON body)."""
    if not isinstance(body, Mapping) or body.get("kind") != "AdmissionReview":
        raise BadReview("expected an AdmissionReview (kind: AdmissionReview)")
    if body.get("apiVersion") != API_VERSION:
        raise BadReview(f"apiVersion {body.get('apiVersion')!r}: only {API_VERSION} is "
                        "served; set admissionReviewVersions: [v1] in the webhook "
                        "configuration")
    request = body.get("request")
    if not isinstance(request, Mapping) or not isinstance(request.get("uid"), str) \
            or not request["uid"]:
        raise BadReview("request.uid is missing: the answer must carry the request's uid")
    uid = request["uid"]
    obj = request.get("object")
    kind = str((request.get("kind") or {}).get("kind") or "") \
        if isinstance(request.get("kind"), Mapping) else ""
    meta = obj.get("metadata") if isinstance(obj, Mapping) else None
    meta = meta if isinstance(meta, Mapping) else {}
    namespace = str(request.get("namespace") or meta.get("namespace") or "default")
    name = _pod_name(meta, request)

    def answer(result: str, reason: str, patch: list[dict[str, Any]] | None = None,
               warnings: list[str] | None = None) -> Decision:
        response: dict[str, Any] = {"uid": uid, "allowed": result != "denied"}
        if patch:
            response["patchType"] = "JSONPatch"
            response["patch"] = base64.b64encode(
                json.dumps(patch, separators=(",", ":")).encode()).decode()
        if result == "denied":
            response["status"] = {"code": 400, "reason": "BadRequest", "message": reason}
        if warnings:
            response["warnings"] = [_short(w) for w in warnings]
        return Decision({"apiVersion": API_VERSION, "kind": "AdmissionReview",
                         "response": response}, result, reason, kind, namespace, name,
                        list(response.get("warnings", [])))

    operation = request.get("operation", "CREATE")
    if operation != "CREATE":
        return answer("skipped", f"operation {operation}: only CREATE is injected")
    if kind != "Pod" and kind not in TEMPLATES:
        return answer("skipped", f"kind {kind or '(none)'}: only Pods and workloads are "
                      "injected")
    try:
        if not isinstance(obj, Mapping):
            raise InjectError("request.object", "missing: the API server sends the object "
                              "being created")
        if kind == "Pod":
            wanted, why = wants_injection(obj, None)
            after: Any = inject_pod(obj, namespace, config) if wanted else obj
        else:
            wanted, why, after = _workload(obj, kind, namespace, config)
    except Exception as exc:  # InjectError, or a shape no check foresaw: never a broken pod
        detail = str(exc) if isinstance(exc, InjectError) else (
            f"{type(exc).__name__}: {exc} (a bug in injection; please report it with the "
            "pod's spec)")
        reason = f"{kind} {namespace}/{name} was not injected: {detail}"
        if fail_closed:
            return answer("denied", reason)
        return answer("error", reason, warnings=[reason + " (admitted without a sidecar)"])
    if not wanted:
        return answer("skipped", why)
    return answer("injected", why, json_patch(obj, after))


def _workload(obj: Mapping[str, Any], kind: str, namespace: str,
              config: InjectConfig) -> tuple[bool, str, Any]:
    """A workload with its pod template injected (or not, and why)."""
    path = TEMPLATES[kind]
    where = ".".join(path)
    parent: Any = obj
    for step in path[:-1]:
        parent = parent.get(step) if isinstance(parent, Mapping) else None
    pod = parent.get(path[-1]) if isinstance(parent, Mapping) else None
    if not isinstance(pod, Mapping):
        raise InjectError(where, f"a {kind} needs a pod template here")
    try:
        wanted, why = wants_injection(pod, None)
        if not wanted:
            return False, why, obj
        meta = obj.get("metadata")
        workload = str(meta.get("name") or "") if isinstance(meta, Mapping) else ""
        injected = inject_template(pod, namespace, config, fallback_service=workload)
    except InjectError as exc:
        raise exc.under(where) from None
    after = json.loads(json.dumps(obj))
    target = after
    for step in path[:-1]:
        target = target[step]
    target[path[-1]] = injected
    return True, why, after
