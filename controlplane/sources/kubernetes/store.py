"""What the source knows of one kind: the objects, reduced to what matters downstream.

An update that changes nothing Envoy could see (a resourceVersion bump, an annotation,
managedFields, our own status write) leaves the store equal, and so triggers nothing.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

from controlplane.sources.kubernetes.kinds import (
    EXPORT_TO_ANNOTATION,
    SERVICE_ACCOUNT_ANNOTATION,
    SERVICE_TYPE_ANNOTATION,
)
from controlplane.sources.kubernetes.services import Key, key, meta

_KEPT_METADATA = ("name", "namespace", "labels", "creationTimestamp", "generation", "uid")
_DROPPED_TOP = ("metadata", "status", "kind", "apiVersion")
_KEPT_ANNOTATIONS = (EXPORT_TO_ANNOTATION, SERVICE_TYPE_ANNOTATION)  # the latter: Gateways


def relevant(obj: Mapping[str, Any]) -> dict[str, Any]:
    found = meta(obj)
    reduced: dict[str, Any] = {k: v for k, v in obj.items() if k not in _DROPPED_TOP}
    reduced["metadata"] = {k: found[k] for k in _KEPT_METADATA if k in found}
    annotations = found.get("annotations")
    if isinstance(annotations, Mapping):  # only ours: kubectl's own change nothing
        kept = {k: annotations[k] for k in _KEPT_ANNOTATIONS if k in annotations}
        if kept:
            reduced["metadata"]["annotations"] = kept
    return reduced


def labels_only(obj: Mapping[str, Any]) -> dict[str, Any]:
    """A Pod as the mesh sees it: its name, labels (for label subsets) and the service
    account injection wrote on it (its identity). Every status change of a Pod (probes,
    restarts) bumps its resourceVersion; this makes those no change at all."""
    found = meta(obj)
    reduced = {k: found[k] for k in ("name", "namespace", "labels") if k in found}
    annotations = found.get("annotations")
    if isinstance(annotations, Mapping) and SERVICE_ACCOUNT_ANNOTATION in annotations:
        reduced["annotations"] = {
            SERVICE_ACCOUNT_ANNOTATION: annotations[SERVICE_ACCOUNT_ANNOTATION]}
    return {"metadata": reduced}


class ObjectStore:
    def __init__(self, keep_status: bool = False,
                 reduce: Callable[[Mapping[str, Any]], dict[str, Any]] = relevant) -> None:
        self.objects: dict[Key, dict[str, Any]] = {}
        self.status: dict[Key, Any] = {}  # for TrafficPolicy: the status as last seen
        self._keep_status = keep_status
        self._reduce = reduce

    def replace(self, items: Iterable[Mapping[str, Any]], namespace: str | None) -> bool:
        """A fresh list (initial, or after 410 Gone): the truth for ``namespace`` (or for
        all, when None). Objects missing from it were deleted while we were not looking."""
        items = [o for o in items if isinstance(o, Mapping)]  # the API sends only objects
        fresh = {key(o): self._reduce(o) for o in items}
        kept = {k: v for k, v in self.objects.items()
                if namespace is not None and k[0] != namespace}
        merged = {**kept, **fresh}
        changed = merged != self.objects
        self.objects = merged
        if self._keep_status:
            self.status = {k: v for k, v in self.status.items() if k in merged}
            self.status.update({key(o): o.get("status") for o in items})
        return changed

    def apply(self, event_type: str, obj: Mapping[str, Any]) -> bool:
        """An ADDED, MODIFIED or DELETED event; True if something that matters changed."""
        if not isinstance(obj, Mapping):
            return False  # the API sends only objects
        object_key = key(obj)
        if event_type == "DELETED":
            self.status.pop(object_key, None)
            return self.objects.pop(object_key, None) is not None
        if self._keep_status:
            self.status[object_key] = obj.get("status")
        reduced = self._reduce(obj)
        if self.objects.get(object_key) == reduced:
            return False
        self.objects[object_key] = reduced
        return True

    def values(self) -> list[dict[str, Any]]:
        return list(self.objects.values())
