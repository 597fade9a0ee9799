"""Workload kinds and where their pod template is: one injection for all of them.

A Deployment's pods are made from ``spec.template``, a CronJob's from
``spec.jobTemplate.spec.template``; injecting that template injects every pod the
workload will make. Kinds that hold no pods pass through unchanged.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from controlplane.inject.config import InjectConfig, InjectError
from controlplane.inject.pod import inject_pod, inject_template, wants_injection

TEMPLATE_PATHS: dict[str, tuple[str, ...]] = {
    "Deployment": ("spec", "template"),
    "StatefulSet": ("spec", "template"),
    "DaemonSet": ("spec", "template"),
    "ReplicaSet": ("spec", "template"),
    "ReplicationController": ("spec", "template"),
    "Job": ("spec", "template"),
    "CronJob": ("spec", "jobTemplate", "spec", "template"),
}
"""Where each workload kind keeps the pod template (apps/v1, batch/v1, core/v1)."""


@dataclass(frozen=True)
class Outcome:
    """One object's fate: what ``controlplane inject`` reports for it."""

    what: str
    """``Deployment shop/reviews``."""
    injected: bool
    reason: str


def describe(obj: Mapping[str, Any], namespace: str) -> str:
    metadata = obj.get("metadata")
    metadata = metadata if isinstance(metadata, Mapping) else {}
    name = metadata.get("name") or metadata.get("generateName") or "(unnamed)"
    return f"{obj.get('kind', '(no kind)')} {metadata.get('namespace') or namespace}/{name}"


def inject_object(obj: Mapping[str, Any], namespace: str, config: InjectConfig,
                  namespace_labels: Mapping[str, str] | None = None,
                  ) -> tuple[dict[str, Any], list[Outcome]]:
    """``obj`` with its pods injected (a Pod, a workload, or a List of them), and what
    happened to each; InjectError (its field from ``obj``'s root) when a pod template
    cannot be understood."""
    kind = obj.get("kind")
    what = describe(obj, namespace)
    metadata = obj.get("metadata")
    own_namespace = (metadata.get("namespace") if isinstance(metadata, Mapping) else None
                     ) or namespace
    if kind == "List" or (isinstance(kind, str) and kind.endswith("List")
                          and isinstance(obj.get("items"), list)):
        return _inject_list(obj, namespace, config, namespace_labels)
    if kind == "Pod":
        wanted, reason = wants_injection(obj, namespace_labels)
        if not wanted:
            return copy.deepcopy(dict(obj)), [Outcome(what, False, reason)]
        return inject_pod(obj, own_namespace, config), [Outcome(what, True, reason)]
    path = TEMPLATE_PATHS.get(kind) if isinstance(kind, str) else None
    if path is None:
        return copy.deepcopy(dict(obj)), []
    result = copy.deepcopy(dict(obj))
    parent: Any = result
    for step in path[:-1]:
        parent = parent.get(step)
        if not isinstance(parent, dict):
            raise InjectError(".".join(path), f"{kind} without a pod template; give "
                              f"{'.'.join(path)} with metadata and spec")
    pod_template = parent.get(path[-1])
    if not isinstance(pod_template, dict):
        raise InjectError(".".join(path), f"{kind} without a pod template; give "
                          f"{'.'.join(path)} with metadata and spec")
    try:
        wanted, reason = wants_injection(pod_template, namespace_labels)
        if not wanted:
            return result, [Outcome(what, False, reason)]
        name = metadata.get("name") if isinstance(metadata, Mapping) else None
        parent[path[-1]] = inject_template(pod_template, own_namespace, config,
                                           fallback_service=str(name or ""))
    except InjectError as exc:
        raise exc.under(".".join(path)) from None
    return result, [Outcome(what, True, reason)]


def _inject_list(obj: Mapping[str, Any], namespace: str, config: InjectConfig,
                 namespace_labels: Mapping[str, str] | None,
                 ) -> tuple[dict[str, Any], list[Outcome]]:
    result = copy.deepcopy(dict(obj))
    outcomes: list[Outcome] = []
    items = []
    for index, item in enumerate(result["items"]):
        if not isinstance(item, Mapping):
            items.append(item)
            continue
        try:
            injected, done = inject_object(item, namespace, config, namespace_labels)
        except InjectError as exc:
            raise exc.under(f"items[{index}]") from None
        items.append(injected)
        outcomes += done
    result["items"] = items
    return result, outcomes
