"""Published snapshots written to disk, for inspection and ``diff``.

One folder per group under the store directory; one JSON file per published version;
the newest ``keep`` kept. Writing happens on a worker thread: a slow disk never holds up
a push.
"""

from __future__ import annotations

import json
import re
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import structlog
from google.protobuf.json_format import MessageToDict

from controlplane import resource
from controlplane.cache.snapshot import Snapshot

log = structlog.get_logger("controlplane.store")
_UNSAFE = re.compile(r"[^A-Za-z0-9._=-]+")


def snapshot_to_dict(group: str, snapshot: Snapshot) -> dict[str, Any]:
    return {
        "group": group,
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

    def save(self, group: str, snapshot: Snapshot) -> None:
        if self.keep <= 0:
            return
        self._seq += 1
        self._pool.submit(self._write, group, snapshot, self._seq)

    def folder(self, group: str) -> Path:
        """Where ``group``'s snapshots go (the group key made safe as a file name)."""
        return self.directory / _UNSAFE.sub("_", group)

    def close(self) -> None:
        self._pool.shutdown(wait=True)

    def _write(self, group: str, snapshot: Snapshot, seq: int) -> None:
        folder = self.folder(group)
        try:
            folder.mkdir(parents=True, exist_ok=True)
            stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime())
            path = folder / f"{stamp}-{seq:06d}-{snapshot.version}.json"
            path.write_text(json.dumps(snapshot_to_dict(group, snapshot), indent=2) + "\n")
            for old in sorted(folder.glob("*.json"))[: -self.keep]:
                old.unlink(missing_ok=True)
        except OSError as exc:
            log.error("store.write_failed", group=group, directory=str(self.directory),
                      error=str(exc), hint="check that the snapshot directory is writable, "
                      "or pass --snapshot-keep 0 to turn the store off")
