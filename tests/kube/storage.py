"""The double's etcd and watch cache: objects, resourceVersions, history, watchers.

Part of the API server double (tests/kube/apiserver.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import json
import random
import threading
import time
import uuid
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from controlplane.sources.kubernetes.kinds import (
    ENDPOINT_SLICES,
    MUTATING_WEBHOOKS,
    PODS,
    SECRETS,
    SERVICE_ACCOUNTS,
    SERVICES,
    Kind,
)
from tests.kube.admission import (
    _default_endpoint_slice,
    _default_pod,
    _default_service,
    _prune,
    _qos_class,
    _ServiceIPs,
    _sync_pod_ips,
    _validate_endpoint_slice,
    _validate_name,
    _validate_pod,
    _validate_schema,
    _validate_service,
)
from tests.kube.admission_config import (
    _default_secret,
    _default_webhooks,
    _validate_secret,
    _validate_webhooks,
)
from tests.kube.constants import (
    _FALSE,
    _STATUS_SUBRESOURCE,
    _TRUE,
    SERVED,
    Obj,
)
from tests.kube.errors import (
    _conflict,
    _details,
    _error,
    _invalid,
    _invalid_object,
    _not_found,
    _resource,
    _too_old,
)
from tests.kube.gateway_api import apply_defaults
from tests.kube.negotiation import (
    _Output,
)
from tests.kube.wire import (
    FieldSelector,
    LabelSelector,
)

# --- The store: objects, resourceVersions, history, watchers ----------------------------


@dataclass(frozen=True)
class _Change:
    """One write, as the watch history keeps it (etcd's event plus the previous value)."""

    version: int
    type: str  # ADDED | MODIFIED | DELETED
    kind: Kind
    obj: Obj  # after the write; for DELETED the last state, at the deletion's version
    prev: Obj | None


@dataclass(eq=False)
class _Watcher:
    """One open watch: its filters, and the events waiting to be written to it."""

    kind: Kind
    namespace: str | None
    labels: LabelSelector
    fields: FieldSelector
    bookmarks: bool
    loop: asyncio.AbstractEventLoop
    wakeup: asyncio.Event
    output: _Output = field(default_factory=_Output)  # how its event objects are written
    pending: deque[tuple[str, Obj]] = field(default_factory=deque)  # guarded by the store lock
    bookmark_requested: bool = False
    dropped: bool = False
    since: int = 0  # the resourceVersion asked for: nothing at or below it is sent

    def ahead(self, version: int) -> bool:
        """Whether ``version`` is news to this watcher. A watch from a resourceVersion the
        server has not reached (it was restored from a backup, or lags) gets nothing, not
        even bookmarks, until the server passes it: the real cacher's silence."""
        return version > self.since

    def matches(self, obj: Obj | None) -> bool:
        if obj is None:
            return False
        if self.namespace is not None and obj["metadata"].get("namespace") != self.namespace:
            return False
        return self.labels.matches(obj) and self.fields.matches(obj)

    def translate(self, change: _Change) -> tuple[str, Obj] | None:
        """The event this watcher sees: a selector the object leaves is a DELETED (with
        the previous content), one it enters an ADDED, as the API server's cacher does."""
        if change.kind != self.kind:
            return None
        now, before = self.matches(change.obj), self.matches(change.prev)
        if change.type != "MODIFIED":
            return (change.type, change.obj) if now else None
        if now and before:
            return "MODIFIED", change.obj
        if now:
            return "ADDED", change.obj
        if before:
            assert change.prev is not None
            prev = copy.deepcopy(change.prev)
            prev["metadata"]["resourceVersion"] = str(change.version)
            return "DELETED", prev
        return None

    def wake(self) -> None:
        with contextlib.suppress(RuntimeError):  # the loop is gone: the server stopped
            self.loop.call_soon_threadsafe(self.wakeup.set)


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def _key(obj: Obj) -> tuple[str, str]:
    meta = obj["metadata"]
    return meta.get("namespace", ""), meta.get("name", "")


def _scope(kind: Kind, meta: Obj, namespace: str | None) -> None:
    """A namespaced object's namespace (``default`` when none is given); a cluster-scoped
    one has none, whatever was sent (the real server clears it)."""
    if kind.namespaced:
        meta["namespace"] = namespace or meta.get("namespace") or "default"
    else:
        meta.pop("namespace", None)


def _kind_of(obj: Obj) -> Kind:
    for kind in SERVED:
        if obj.get("apiVersion") == kind.api_version and obj.get("kind") == kind.kind:
            return kind
    raise ValueError(f"not a served kind: apiVersion={obj.get('apiVersion')!r} "
                     f"kind={obj.get('kind')!r}")


def _kind_named(name: Kind | str) -> Kind:
    if isinstance(name, Kind):
        return name
    for kind in SERVED:
        if name in (kind.plural, kind.kind, kind.kind.lower()):
            return kind
    raise ValueError(f"not a served kind: {name!r}")


def _spec_of(kind: Kind, obj: Obj) -> Any:
    """What a generation counts: for CRDs all but metadata and status."""
    if kind == ENDPOINT_SLICES:
        return [obj.get("addressType"), obj.get("endpoints"), obj.get("ports")]
    if kind == PODS:
        return obj.get("spec")
    return {k: v for k, v in obj.items() if k not in ("metadata", "status")}


class _Store:
    """The objects and their history; every method holds one lock, so Python callers and
    HTTP handlers see one order of writes."""

    def __init__(self, history_limit: int, crd_schemas: dict[Kind, Obj]) -> None:
        self.lock = threading.RLock()
        self.changed = threading.Condition(self.lock)
        self.version = 1  # etcd starts above 0; "0" means "any" to the API
        self.compacted = 1  # watches from an older version get 410
        self.objects: dict[Kind, dict[tuple[str, str], Obj]] = {k: {} for k in SERVED}
        self.history: deque[_Change] = deque()
        self.history_limit = history_limit
        self.watchers: set[_Watcher] = set()
        self.paused = False
        self.closing = False  # a graceful shutdown: every watch ends, new ones at once
        self.crd_schemas = crd_schemas  # per custom kind: its CRD's openAPIV3Schema
        self._ips = _ServiceIPs()

    # -- reads

    def get(self, kind: Kind, namespace: str, name: str) -> Obj:
        with self.lock:
            obj = self.objects[kind].get((namespace, name))
            if obj is None:
                raise _not_found(kind, name)
            return copy.deepcopy(obj)

    def state_at(self, kind: Kind, version: int) -> dict[tuple[str, str], Obj]:
        """The objects as they were at ``version``, by undoing the history after it."""
        with self.lock:
            if version < self.compacted:
                raise _too_old(version, self.compacted)
            state = dict(self.objects[kind])
            for change in reversed(self.history):
                if change.version <= version:
                    break
                if change.kind != kind:
                    continue
                key = _key(change.obj)
                if change.prev is None:
                    state.pop(key, None)
                else:
                    state[key] = change.prev
            return state

    # -- writes

    def create(self, obj: Obj, namespace: str | None = None) -> tuple[Obj, list[str]]:
        """Store a new object; returns it and the warnings (pruned fields)."""
        kind = _kind_of(obj)
        with self.lock:
            new = copy.deepcopy(obj)
            meta = new.setdefault("metadata", {})
            _scope(kind, meta, namespace)
            if meta.get("resourceVersion"):
                raise _error(500, "resourceVersion should not be set on objects to be created")
            if not meta.get("name") and meta.get("generateName"):
                alphabet = "bcdfghjklmnpqrstvwxz2456789"  # as names.SimpleNameGenerator
                meta["name"] = meta["generateName"] + "".join(random.choices(alphabet, k=5))
            key = _key(new)
            if key in self.objects[kind]:
                raise _error(409, f'{_resource(kind)} "{key[1]}" already exists',
                             "AlreadyExists", _details(kind, key[1]))
            for system in ("uid", "creationTimestamp", "generation", "deletionTimestamp"):
                meta.pop(system, None)
            if kind in _STATUS_SUBRESOURCE:
                new.pop("status", None)  # set only through /status
            warnings = self._admit(kind, new, None)
            meta["uid"] = str(uuid.uuid4())
            meta["creationTimestamp"] = _now()
            if kind not in (SERVICES, SECRETS, SERVICE_ACCOUNTS):  # none has a generation
                meta["generation"] = 1
            self._commit(kind, "ADDED", new, None)
            return copy.deepcopy(new), warnings

    def update(self, obj: Obj, subresource: str | None = None,
               unconditional: bool = False) -> tuple[Obj, list[str]]:
        """Replace an object (or its status); returns it and the warnings."""
        kind = _kind_of(obj)
        with self.lock:
            new = copy.deepcopy(obj)
            meta = new.setdefault("metadata", {})
            _scope(kind, meta, None)
            key = _key(new)
            old = self.objects[kind].get(key)
            if old is None:
                raise _not_found(kind, key[1])
            wanted = meta.get("resourceVersion")
            if wanted and not unconditional and wanted != old["metadata"]["resourceVersion"]:
                raise _conflict(kind, key[1])
            if subresource == "status":
                status = new.get("status")
                new = copy.deepcopy(old)
                new.pop("status", None)
                if status is not None:
                    new["status"] = status
            elif kind in _STATUS_SUBRESOURCE:
                new.pop("status", None)
                if "status" in old:
                    new["status"] = copy.deepcopy(old["status"])
            for system in ("uid", "creationTimestamp", "generation", "resourceVersion"):
                if system in old["metadata"]:
                    new["metadata"][system] = old["metadata"][system]
            warnings = self._admit(kind, new, old)
            if "generation" in old["metadata"] and _spec_of(kind, new) != _spec_of(kind, old):
                new["metadata"]["generation"] = old["metadata"]["generation"] + 1
            if new == old:
                return copy.deepcopy(old), warnings  # a no-op: no new version, no event
            self._commit(kind, "MODIFIED", new, old)
            return copy.deepcopy(new), warnings

    def delete(self, kind: Kind, namespace: str, name: str) -> Obj:
        with self.lock:
            old = self.objects[kind].get((namespace, name))
            if old is None:
                raise _not_found(kind, name)
            gone = copy.deepcopy(old)
            self._commit(kind, "DELETED", gone, old)
            self._collect_garbage()
            return copy.deepcopy(gone)

    def _collect_garbage(self) -> None:
        """The garbage collector's background deletion: every object whose
        ownerReferences name only owners that are gone (by uid) goes too, and so on down
        (at once here; a real cluster's collector takes a moment)."""
        for _ in range(16):  # an owner chain deeper than this is not modelled
            alive = {obj["metadata"].get("uid") for objects in self.objects.values()
                     for obj in objects.values()}
            orphans = [(kind, key) for kind, objects in self.objects.items()
                       for key, obj in objects.items()
                       if (owners := obj["metadata"].get("ownerReferences"))
                       and not any(o.get("uid") in alive for o in owners)]
            if not orphans:
                return
            for kind, key in orphans:
                gone = self.objects[kind][key]
                self._commit(kind, "DELETED", copy.deepcopy(gone), gone)

    def _admit(self, kind: Kind, obj: Obj, old: Obj | None) -> list[str]:
        """Default, prune and validate as the real server would; returns warnings."""
        obj["apiVersion"], obj["kind"] = kind.api_version, kind.kind
        warnings: list[str] = []
        errors = _validate_name(kind, obj["metadata"].get("name", ""))
        if kind == SERVICES:
            _default_service(obj, old, self._ips)
            obj.setdefault("status", {"loadBalancer": {}})
            errors += _validate_service(obj)
        elif kind == ENDPOINT_SLICES:
            _default_endpoint_slice(obj)
            errors += _validate_endpoint_slice(obj)
            if old is not None and old.get("addressType") != obj.get("addressType"):
                errors.append(_invalid("addressType", obj.get("addressType"),
                                       "field is immutable"))
        elif kind == PODS:
            _default_pod(obj)
            if old is None:  # PrepareForCreate: whatever status was sent, this is it
                obj["status"] = {"phase": "Pending", "qosClass": _qos_class(obj["spec"])}
            _sync_pod_ips(obj.setdefault("status", {}))
            errors += _validate_pod(obj, old)
        elif kind == SECRETS:
            _default_secret(obj)
            errors += _validate_secret(obj, old)
        elif kind == MUTATING_WEBHOOKS:
            _default_webhooks(obj)
            errors += _validate_webhooks(obj)
        elif (schema := self.crd_schemas.get(kind)) is not None:
            pruned: list[str] = []
            meta = obj["metadata"]
            apply_defaults(obj, schema)
            body = _prune({k: v for k, v in obj.items() if k != "metadata"},
                          schema, "", pruned)
            obj.clear()
            obj.update({"apiVersion": kind.api_version, "kind": kind.kind, "metadata": meta})
            obj.update(body)
            warnings = [f'unknown field "{path}"' for path in pruned]
            errors += _validate_schema({k: v for k, v in obj.items() if k != "metadata"},
                                       schema, "")
        if errors:
            raise _invalid_object(kind, obj["metadata"].get("name", ""), errors)
        return warnings

    def _commit(self, kind: Kind, type_: str, obj: Obj, prev: Obj | None) -> None:
        self.version += 1
        obj["metadata"]["resourceVersion"] = str(self.version)
        stored = copy.deepcopy(obj)
        if type_ == "DELETED":
            del self.objects[kind][_key(obj)]
        else:
            self.objects[kind][_key(obj)] = stored
        change = _Change(self.version, type_, kind, stored, copy.deepcopy(prev))
        self.history.append(change)
        while len(self.history) > self.history_limit:
            self.compacted = self.history.popleft().version
        for watcher in self.watchers:
            event = watcher.translate(change) if watcher.ahead(change.version) else None
            if event is not None:
                watcher.pending.append(event)
                watcher.wake()

    def compact(self) -> None:
        with self.lock:
            self.history.clear()
            self.compacted = self.version

    # -- watches

    def open_watch(self, watcher: _Watcher, since: str) -> None:
        """Queue what the watcher missed and register it, in one step, so no write falls
        between; raises the 410 StatusError when ``since`` is older than the history."""
        with self.lock:
            if since in ("", "0"):
                current = self.objects[watcher.kind]
                for key in sorted(current):
                    if watcher.matches(current[key]):
                        watcher.pending.append(("ADDED", current[key]))
            else:
                version = _parse_version(since)
                if version < self.compacted:
                    raise _too_old(version, self.compacted)
                watcher.since = version
                for change in self.history:
                    if change.version > version and (event := watcher.translate(change)):
                        watcher.pending.append(event)
            self.watchers.add(watcher)
            self.changed.notify_all()

    def close_watch(self, watcher: _Watcher) -> None:
        with self.lock:
            self.watchers.discard(watcher)
            self.changed.notify_all()

    def take(self, watcher: _Watcher) -> tuple[list[tuple[str, Obj]], int]:
        """The watcher's pending events, and the version they bring it to (for bookmarks)."""
        with self.lock:
            events = list(watcher.pending)
            watcher.pending.clear()
            return events, self.version


def _parse_version(text: str) -> int:
    try:
        version = int(text)
    except ValueError:
        raise _error(400, f"invalid resource version: {text!r}") from None
    if version < 0:
        raise _error(400, f"invalid resource version: {text!r}")
    return version


def _parse_bool(text: str | None, name: str) -> bool:
    if text is None or text == "":
        return False
    if text in _TRUE:
        return True
    if text in _FALSE:
        return False
    raise _error(400, f"invalid value for {name}: {text!r}")


def _event_line(type_: str, obj: Obj) -> bytes:
    return (json.dumps({"type": type_, "object": obj}, separators=(",", ":")) + "\n").encode()


