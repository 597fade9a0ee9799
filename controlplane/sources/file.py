"""The file source: a mesh YAML file, reloaded when it changes.

Polls the file's stat (cheap) and reads it only when mtime, size or inode moved, so it
follows editors that save by renaming a temporary file. A bad save is logged once, as
one error listing every problem, and the last good mesh keeps being served.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
from collections.abc import AsyncIterator
from pathlib import Path

import structlog

from controlplane import metrics
from controlplane.errors import MeshError
from controlplane.mesh.loader import load_mesh_text
from controlplane.mesh.model import Mesh

log = structlog.get_logger("controlplane.source.file")


class FileSource:
    def __init__(self, path: str | Path, poll_interval: float = 0.2) -> None:
        self.path = Path(path)
        self.poll_interval = poll_interval
        self.name = f"file:{self.path}"

    async def updates(self) -> AsyncIterator[Mesh]:
        signature: tuple[int, int, int] | None = None
        digest = ""
        missing_logged = False
        while True:
            try:
                stat = os.stat(self.path)
                current = (stat.st_mtime_ns, stat.st_size, stat.st_ino)
            except OSError as exc:
                if not missing_logged:
                    log.error("source.file_unreadable", path=str(self.path), error=exc.strerror,
                              hint="create the file or fix --source file:PATH; "
                              "the last good mesh is still served")
                    missing_logged = True
                signature = None
                await asyncio.sleep(self.poll_interval)
                continue
            missing_logged = False
            if current != signature:
                signature = current
                mesh, digest = self._read(digest)
                if mesh is not None:
                    yield mesh
            await asyncio.sleep(self.poll_interval)

    def _read(self, digest: str) -> tuple[Mesh | None, str]:
        try:
            text = self.path.read_text(encoding="utf-8")
        except OSError as exc:
            log.error("source.file_unreadable", path=str(self.path), error=exc.strerror)
            return None, digest
        fresh = hashlib.sha256(text.encode()).hexdigest()
        if fresh == digest:
            return None, digest
        try:
            mesh = load_mesh_text(text, origin=str(self.path))
        except MeshError as exc:
            metrics.MESH_UPDATES.labels("rejected").inc()
            log.error("mesh.invalid", path=str(self.path), problems=exc.problems,
                      hint="fix the file and save again; the last good mesh is still served")
            return None, fresh
        log.info("source.file_loaded", path=str(self.path), services=len(mesh.services))
        return mesh, fresh
