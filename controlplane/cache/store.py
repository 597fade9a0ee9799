"""Published snapshots written to disk, for inspection and ``diff``.

One folder per group under the store directory; one JSON file per published version;
the newest ``keep`` kept. Writing happens on a worker thread: a slow disk never holds up
a push. Work is coalesced per group, the latest wins: while a group's write waits, a
newer version replaces it, so the queue never holds more than one job per group. A
group that expires has its folder removed.

A file holds the version and the resources, not the group (its folder says that), so
groups served the same snapshot have the same file: it is written once and hard-linked
into the other folders. Many groups usually share a version (proxies of different
services in one namespace get the same config), and clients can invent groups at will.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import textwrap
import threading
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import structlog
from google.protobuf.json_format import MessageToDict
from google.protobuf.message import Message

from controlplane import resource
from controlplane.cache.layers import Layer
from controlplane.cache.snapshot import Resource, Snapshot

log = structlog.get_logger("controlplane.store")
INLINE = 64 * 1024  # a shared layer this big or bigger gets a file of its own
LAYERS = "layers"  # the folder of those files (no group's folder has this name)
_LAYERS_LINE = re.compile(r'^  "layers": (\{.*\}),$', re.MULTILINE)
_UNSAFE = re.compile(r"[^A-Za-z0-9._=-]+")


class _Rendered:
    """Resources as JSON text, rendered once per shared layer version: groups share
    layers, so at a thousand groups a change renders the few layers that changed and
    each group's own resources, not every group's thousands of resources again."""

    def __init__(self, limit: int = 256, items: int = 50_000) -> None:
        self._layers: dict[tuple[str, str], str] = {}
        self._items: dict[tuple[str, str, str], str] = {}  # by (type, name, version)
        self._limit, self._item_limit = limit, items

    def layer(self, layer: Layer) -> str:
        """A layer's resources, sorted by name; a new version of a layer renders only
        the resources it changed (the others' text is kept by resource version)."""
        key = (layer.type_url, layer.version)
        found = self._layers.get(key)
        if found is None:
            found = ",\n".join(self.item(layer.resources[n]) for n in sorted(layer.resources))
            if len(self._layers) >= self._limit:
                self._layers.clear()
            self._layers[key] = found
        return found

    def item(self, res: Resource) -> str:
        key = (res.type_url, res.name, res.version)
        found = self._items.get(key)
        if found is None:
            found = _items([res.message])
            if len(self._items) >= self._item_limit:
                self._items.clear()
            self._items[key] = found
        return found

    def snapshot(self, snapshot: Snapshot, refer: Callable[[Layer], str] | None = None) -> str:
        """The same document as ``json.dumps(snapshot_to_dict(snapshot), indent=2)``
        (resources by layer, each layer sorted by name); with ``refer``, shared layers
        of ``INLINE`` bytes or more are not written out but named under ``"layers"``
        (``refer`` writes them once and gives their file name)."""
        types = []
        referred: dict[str, list[str]] = {}
        for type_url, typed in snapshot.types.items():
            parts = []
            for layer in typed.layers:
                if refer is not None and layer.size >= INLINE:
                    referred.setdefault(resource.short_name(type_url), []).append(refer(layer))
                else:
                    parts.append(self.layer(layer))
            if typed.own is not None:
                parts.append(_items(typed.own.resources[n].message
                                    for n in sorted(typed.own.resources)))
            elif not typed.parts:
                parts.append(_items(typed.resources[n].message for n in sorted(typed.resources)))
            body = ",\n".join(p for p in parts if p)
            short = json.dumps(resource.short_name(type_url))
            types.append(f"    {short}: [\n{body}\n    ]" if body else f"    {short}: []")
        head = json.dumps({"version": snapshot.version, "versions": snapshot.versions()},
                          indent=2)
        if referred:  # one line, read back by ``_layers_of``
            head = head[:-2] + ',\n  "layers": ' + json.dumps(referred) + "\n}"
        joined = ",\n".join(types)
        return head[:-2] + ',\n  "resources": {\n' + joined + "\n  }\n}\n"

    def layer_file(self, layer: Layer) -> str:
        """A shared layer on its own: its version, type and resources."""
        head = json.dumps({"type": resource.short_name(layer.type_url),
                           "version": layer.version}, indent=2)
        body = self.layer(layer).replace("\n      ", "\n    ").removeprefix("  ")
        return head[:-2] + ',\n  "resources": [\n' + body + "\n  ]\n}\n"


def _items(messages: Iterable[Message]) -> str:
    """Each message as an indented JSON object, for a list three levels deep."""
    return ",\n".join(
        textwrap.indent(json.dumps(MessageToDict(m, preserving_proto_field_name=True),
                                   indent=2), "      ")
        for m in messages)


def snapshot_to_dict(snapshot: Snapshot) -> dict[str, Any]:
    return {
        "version": snapshot.version,
        "versions": snapshot.versions(),
        "resources": {
            resource.short_name(t): [
                MessageToDict(r.message, preserving_proto_field_name=True)
                for r in typed.resources.values()
            ]
            for t, typed in snapshot.types.items()
        },
    }


class SnapshotStore:
    def __init__(self, directory: str | Path, keep: int = 10) -> None:
        self.directory = Path(directory)
        self.keep = keep
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="snapshot-store")
        self._seq = 0
        self._lock = threading.Lock()
        self._pending: dict[str, tuple[Snapshot, int] | None] = {}  # None: remove the folder
        self._files: dict[str, Path] = {}  # version -> a file holding it (writer thread only)
        self.links = 0  # files hard-linked rather than written
        self._rendered = _Rendered()  # writer thread only
        self._users: dict[str, int] | None = None  # layer file -> group files naming it

    def save(self, group: str, snapshot: Snapshot) -> None:
        if self.keep <= 0:
            return
        self._seq += 1
        self._queue(group, (snapshot, self._seq))

    def forget(self, group: str) -> None:
        """Remove the group's folder (after any write of it still waiting)."""
        self._queue(group, None)

    def pending(self) -> int:
        """Groups with work waiting (at most one job each)."""
        with self._lock:
            return len(self._pending)

    def _queue(self, group: str, job: tuple[Snapshot, int] | None) -> None:
        with self._lock:
            waiting = group in self._pending
            self._pending[group] = job
        if not waiting:
            self._pool.submit(self._run, group)

    def _run(self, group: str) -> None:
        with self._lock:
            if group not in self._pending:
                return
            job = self._pending.pop(group)
        if job is None:
            folder = self.folder(group)
            for path in folder.glob("*.json"):
                self._release(path)
            shutil.rmtree(folder, ignore_errors=True)
        else:
            self._write(group, *job)

    def folder(self, group: str) -> Path:
        """Where ``group``'s snapshots go (the group key made safe as a file name)."""
        return self.directory / _UNSAFE.sub("_", group)

    def close(self) -> None:
        self._pool.shutdown(wait=True)

    def _link(self, version: str, path: Path) -> bool:
        """Hard-link a file already written for ``version``; False if there is none."""
        existing = self._files.get(version)
        if existing is None:
            return False
        try:
            os.link(existing, path)
        except OSError:  # pruned meanwhile, or a file system without hard links
            self._files.pop(version, None)
            return False
        self.links += 1
        return True

    def _write(self, group: str, snapshot: Snapshot, seq: int) -> None:
        folder = self.folder(group)
        try:
            folder.mkdir(parents=True, exist_ok=True)
            stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime())
            path = folder / f"{stamp}-{seq:06d}-{snapshot.version}.json"
            if not self._link(snapshot.version, path):
                path.write_text(self._rendered.snapshot(snapshot, self._layer_file))
                if len(self._files) >= 1024:
                    self._files.clear()
                self._files[snapshot.version] = path
            self._hold(path)
            for old in sorted(folder.glob("*.json"))[: -self.keep]:
                self._release(old)
                old.unlink(missing_ok=True)
        except OSError as exc:
            log.error("store.write_failed", group=group, directory=str(self.directory),
                      error=str(exc), hint="check that the snapshot directory is writable, "
                      "or pass --snapshot-keep 0 to turn the store off")

    # -- shared layers, one file each, kept while a group file names them -----------------

    def _counts(self) -> dict[str, int]:
        """How many group files name each layer file; counted from the files on disk
        the first time (a restart finds the last run's), and orphans removed then."""
        if self._users is None:
            self._users = {}
            for path in self.directory.glob("*/*.json"):
                if path.parent.name != LAYERS:
                    for name in _layers_of(path):
                        self._users[name] = self._users.get(name, 0) + 1
            for path in (self.directory / LAYERS).glob("*.json"):
                if path.name not in self._users:
                    path.unlink(missing_ok=True)
        return self._users

    def _layer_file(self, layer: Layer) -> str:
        """Write ``layer``'s file unless it is there; its name."""
        name = f"{resource.short_name(layer.type_url)}-{layer.version}.json"
        path = self.directory / LAYERS / name
        if name not in self._counts() or not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(self._rendered.layer_file(layer))
        return name

    def _hold(self, path: Path) -> None:
        counts = self._counts()
        for name in _layers_of(path):
            counts[name] = counts.get(name, 0) + 1

    def _release(self, path: Path) -> None:
        """``path`` is about to go: the layer files only it named go too."""
        counts = self._counts()
        removed = False
        for name in _layers_of(path):
            left = counts.get(name, 0) - 1
            if left > 0:
                counts[name] = left
                continue
            counts.pop(name, None)
            (self.directory / LAYERS / name).unlink(missing_ok=True)
            removed = True
        if removed:
            with contextlib.suppress(OSError):  # only when empty
                (self.directory / LAYERS).rmdir()


def _layers_of(path: Path) -> list[str]:
    """The layer files a stored group file names (none for small meshes)."""
    try:
        with path.open(encoding="utf-8") as stream:
            head = stream.read(16384)
    except OSError:
        return []
    found = _LAYERS_LINE.search(head)
    if found is None:
        return []
    try:
        named = json.loads(found.group(1))
    except ValueError:
        return []
    return [n for names in named.values() for n in names if isinstance(n, str)
            and "/" not in n and n.endswith(".json")]
