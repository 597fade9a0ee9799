"""The file source: a mesh YAML file, reloaded when it changes.

Filesystem notifications on the file's directory (controlplane.sources.notify) wake it
within about 10 ms of a save; it then compares the file's stat and reads the file only
when mtime, size or inode moved, so it follows editors that save by renaming a
temporary file and ConfigMap volumes that swap a symlink. Without notifications (none
left, a file system inotify does not see, ``WATCHFILES_FORCE_POLLING``) it polls the
stat every ``poll_interval``; with them, it still checks at a slow interval as a safety
net. Then it hashes the bytes and parses only content it has not seen, and of that only
the services whose text changed (controlplane.mesh.incremental). Reading, parsing and
validating run in a worker thread, so a big file never holds up the event loop (xDS
pushes, health checks).

The last good mesh keeps being served through every kind of bad save, each logged once:
an invalid mesh (an error listing every problem), an empty file or one without
``services`` (a warning: usually a save caught half-way; a mesh of no services says
``services: []``), a file that is gone or unreadable for a while (a warning). A file
written in place (same inode: ``>`` redirects, some editors) is read once its stat holds
still for ``settle`` seconds (one poll when polling), since a half-written mesh file can
be a valid, smaller mesh; a save by rename is read at once. A read that the file changed
under is done again.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import structlog

from controlplane import metrics
from controlplane.errors import EmptyMeshError, MeshError
from controlplane.mesh.attach import attach, not_accepted
from controlplane.mesh.egress import shared_port_warnings
from controlplane.mesh.gateway_attach import (
    gateway_attachments,
    not_served,
    shadowed_tcp_routes,
)
from controlplane.mesh.incremental import MeshLoader
from controlplane.mesh.loader import MAX_FILE_BYTES, too_big
from controlplane.mesh.model import Mesh, empty_subsets
from controlplane.sources.base import stamp
from controlplane.sources.notify import Wakeups

log = structlog.get_logger("controlplane.source.file")

_Signature = tuple[int, int, int]
_SERVED_HINT = "the last good mesh is still served"


@dataclass(frozen=True, slots=True)
class _Read:
    """What one read of the file found: a mesh, or why not (``problem``), or nothing
    new (``digest`` seen before); ``torn`` when the file changed while it was read."""

    digest: str
    mesh: Mesh | None = None
    problem: MeshError | None = None
    error: str | None = None
    torn: bool = False


def _signature(path: Path) -> _Signature:
    stat = os.stat(path)
    return stat.st_mtime_ns, stat.st_size, stat.st_ino


def _saved_at(current: _Signature, before: _Signature | None, noticed: float) -> float:
    """When the change was made: the file's new mtime, when it moved forward since the
    last look and lies in the few seconds before ``noticed`` (the watch hands a save
    over 10-20 ms after it; that wait is part of what an edit waits for). Otherwise
    (``cp -p``, ``touch -d``, a clock step) the time the change was noticed."""
    mtime = current[0] / 1e9
    if before is not None and current[0] > before[0] and noticed - 5.0 < mtime <= noticed:
        return mtime
    return noticed


def read_mesh(path: Path, loader: MeshLoader, seen: str, served: str = "") -> _Read:
    """Read, hash and parse the file, unless its content is the one read last (``seen``)
    or the one served (``served``): blocking, run off the loop. ``loader`` parses only
    the services whose text changed since its last load."""
    try:
        before = _signature(path)
        if before[1] > MAX_FILE_BYTES:  # not read at all
            return _Read(f"size:{before}", problem=too_big(before[1], str(path)))
        data = path.read_bytes()
        torn = _signature(path) != before
    except OSError as exc:
        return _Read(seen, error=exc.strerror or str(exc))
    digest = hashlib.sha256(data).hexdigest()
    if torn:
        return _Read(seen, torn=True)
    if digest in (seen, served):
        return _Read(digest)
    try:
        return _Read(digest, mesh=loader.load(data, origin=str(path)))
    except MeshError as exc:
        return _Read(digest, problem=exc)


SETTLE = 0.05
"""With notifications, how long a file written in place must hold still before it is
read: every write of the writer wakes the source, so a pause this long means done."""


class FileSource:
    def __init__(self, path: str | Path, poll_interval: float = 0.2, *,
                 notify: bool = True, settle: float = SETTLE) -> None:
        self.path = Path(path)
        self.poll_interval = poll_interval
        self.notify = notify
        """Watch for filesystem notifications (else poll every ``poll_interval``)."""
        self.settle = settle
        self.wakeups: Wakeups | None = None
        """While ``updates()`` runs: what wakes it, and whether notifications work."""
        self.name = f"file:{self.path}"
        self.loader = MeshLoader()
        self.problem: str | None = None
        """What is wrong with the file now (None when its mesh is served), for views
        and readiness details; cleared by the next good save."""

    async def updates(self) -> AsyncIterator[Mesh]:
        self.wakeups = wakeups = Wakeups(self.path, self.poll_interval, self.notify)
        wakeups.start()
        try:
            async for mesh in self._reads(wakeups):
                yield mesh
                del mesh  # the pipeline holds the mesh it serves; nothing else here
        finally:
            wakeups.close()

    async def _reads(self, wakeups: Wakeups) -> AsyncIterator[Mesh]:
        """The source's loop: look, read what changed, yield what is new, wait."""
        signature: _Signature | None = None
        settling: _Signature | None = None
        seen = served = ""  # digests: the content last read, the content last yielded
        seen_at: float | None = None  # when the change being read was first noticed
        while True:
            try:
                current = _signature(self.path)
            except OSError as exc:
                self._report("source.file_missing", f"cannot read {self.path}: {exc.strerror}",
                             hint=f"create the file or fix --source file:PATH; {_SERVED_HINT}")
                signature = None
                await wakeups.next()
                continue
            if current != signature:
                if seen_at is None:  # the save's time, else the notification's, else now
                    seen_at = _saved_at(current, signature, wakeups.woken_at or time.time())
                if signature is not None and current[2] == signature[2] and current != settling:
                    # Written in place (same inode): maybe half-way, and half a mesh file
                    # can be a valid, smaller mesh. Read it once it holds still.
                    settling = current
                    log.info("source.file_settling", path=str(self.path))
                    await asyncio.sleep(self.settle if wakeups.notifying else self.poll_interval)
                    continue
                settling = None
                found = await asyncio.to_thread(read_mesh, self.path, self.loader, seen, served)
                signature = None if found.torn or found.error else current
                mesh = self._outcome(found, served)
                seen = found.digest
                changed_at, seen_at = seen_at, (seen_at if found.torn else None)
                if mesh is not None:
                    served = found.digest
                    yield stamp(mesh, changed_at or time.time())
                del mesh, found  # keep nothing of a replaced mesh alive here
            await wakeups.next()

    def _outcome(self, found: _Read, served: str) -> Mesh | None:
        """Log what the read found; the mesh to yield, if any."""
        if found.error is not None:
            self._report("source.file_missing", f"cannot read {self.path}: {found.error}",
                         hint=f"check the file's permissions; {_SERVED_HINT}")
            return None
        if found.torn:
            return None  # changed while read: read again on the next poll
        if isinstance(found.problem, EmptyMeshError):
            metrics.MESH_UPDATES.labels("rejected").inc()
            self._report("source.file_empty", "; ".join(found.problem.problems),
                         hint=f"{_SERVED_HINT}; write services: [] to serve no services")
            return None
        if found.problem is not None:
            metrics.MESH_UPDATES.labels("rejected").inc()
            self.problem = str(found.problem)
            log.error("mesh.invalid", path=str(self.path), problems=found.problem.problems,
                      hint=f"fix the file and save again; {_SERVED_HINT}")
            return None
        if found.mesh is None:
            if found.digest == served and self.problem is not None:
                log.info("source.file_restored", path=str(self.path),
                         detail="the file is back to the mesh being served")
                self.problem = None
            return None  # nothing new
        self.problem = None
        log.info("source.file_loaded", path=str(self.path), services=len(found.mesh.services))
        empty = empty_subsets(found.mesh)
        if empty:
            log.warning("mesh.subset_empty", path=str(self.path), subsets=empty,
                        hint="no endpoint has these labels, so their share of the traffic "
                        "fails with 503; fix the labels or add endpoints")
        shared = shared_port_warnings(found.mesh.services)
        if shared:
            log.warning("mesh.egress_port_shared", path=str(self.path), ports=shared,
                        hint="give each external host its own tcp port, or use protocol "
                        "tls for those that speak TLS first")
        _log_routes(found.mesh, str(self.path))
        return found.mesh

    def _report(self, event: str, problem: str, hint: str) -> None:
        """A warning, once per problem: a file that stays empty or missing is not news."""
        if self.problem != problem:
            self.problem = problem
            log.warning(event, path=str(self.path), problem=problem, hint=hint)


def _log_routes(mesh: Mesh, path: str) -> None:
    """Each Gateway API route a Service parent did not accept, or whose backends do not
    all resolve: served without it (or with that share answering 500), so say why."""
    if not (mesh.http_routes or mesh.grpc_routes or mesh.tls_routes or mesh.gateways):
        return
    statuses = dict(attach(mesh).statuses())
    gateways = gateway_attachments(mesh)  # Gateway parents, and each Gateway's listeners
    for key, parents in gateways.routes.items():
        statuses[key] = (*statuses.get(key, ()), *parents)
    for key, parent, condition in not_accepted(statuses):
        log.warning("routes.not_accepted", path=path, route="/".join(key),
                    parent=parent.describe(key[1]), condition=condition.type,
                    reason=condition.reason, message=condition.message)
    for gateway, listener, condition in not_served(gateways):
        log.warning("gateway.listener_not_served", path=path, gateway=gateway,
                    listener=listener, condition=condition.type, reason=condition.reason,
                    message=condition.message)
    for gateway, listener, first, unused in shadowed_tcp_routes(gateways):
        log.warning("gateway.tcp_route_unused", path=path, gateway=gateway, listener=listener,
                    route=f"TCPRoute/{unused.namespace}/{unused.name}",
                    served=f"TCPRoute/{first.namespace}/{first.name}",
                    hint="one TCPRoute takes a TCP listener's connections (the first); "
                    "give this route its own listener")
