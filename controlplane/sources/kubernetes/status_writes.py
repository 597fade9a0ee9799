"""The source's status writes, from its event loop: each policy's verdict (and
``Programmed`` condition) and each route's ``status.parents``, written only where they
differ from what the object says and are not already on their way. A failed write is
tried again with the next batch."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Collection, Coroutine, Mapping
from typing import Any

import structlog

from controlplane.mesh.model import Mesh
from controlplane.mesh.route_status import RouteKey
from controlplane.sources.kubernetes.convert import Key, Verdict
from controlplane.sources.kubernetes.kinds import ROUTES, Kind
from controlplane.sources.kubernetes.programmed import PolicyKey, RejectedLike, programmed
from controlplane.sources.kubernetes.route_status import (
    RouteStatusWriter,
    Settled,
    StatusSource,
    log_not_accepted,
    service_parents,
    wanted_statuses,
)
from controlplane.sources.kubernetes.route_status import (
    needs_write as needs_route_write,
)
from controlplane.sources.kubernetes.routes import RouteConversion, RouteObject
from controlplane.sources.kubernetes.status import Programmed, StatusWriter, needs_write
from controlplane.sources.kubernetes.store import ObjectStore

log = structlog.get_logger("controlplane.source.kubernetes")
PROGRAMMED_DEBOUNCE = 1.0  # seconds: NACKs of one change arrive together, written once
Tasks = set[asyncio.Task[None]]


def spawn(tasks: Tasks, work: Coroutine[Any, Any, None]) -> None:
    """Run ``work`` as a task held in ``tasks`` until it is done (the source cancels
    what is left when it stops)."""
    task = asyncio.create_task(work)
    tasks.add(task)
    task.add_done_callback(tasks.discard)


class PolicyStatuses:
    """The custom kinds' verdicts and their status writes."""

    def __init__(self, writer: StatusWriter | None, stores: Mapping[Kind, ObjectStore],
                 replica: str) -> None:
        self.writer = writer
        self.stores = stores
        self.replica = replica  # this server's name in a Programmed condition
        self.verdicts: dict[tuple[Kind, Key], Verdict] = {}
        # Writes sent, not yet seen back, per (custom kind, object).
        self._writing: dict[tuple[Kind, Key], tuple[Verdict, Programmed | None]] = {}
        # What the proxies reject now, per policy object (watch_rejections); None: the
        # Programmed condition is not written.
        self._rejected: Callable[[], Mapping[PolicyKey, RejectedLike]] | None = None
        self._recheck: asyncio.Event | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    def watch_rejections(self, rejected: Callable[[], Mapping[PolicyKey, RejectedLike]],
                         ) -> Callable[[], None]:
        """Write each policy's ``Programmed`` condition from ``rejected``; returns what to
        call when that changes (from any thread)."""
        self._rejected = rejected
        return self._rejections_changed

    def _rejections_changed(self) -> None:
        loop, event = self._loop, self._recheck
        if loop is not None and event is not None:
            with contextlib.suppress(RuntimeError):  # the loop closed: we are stopping
                loop.call_soon_threadsafe(event.set)

    def start(self, tasks: Tasks) -> None:
        """From the source's event loop: follow rejection changes from now on."""
        self._loop, self._recheck = asyncio.get_running_loop(), asyncio.Event()
        spawn(tasks, self._recheck_loop(self._recheck, tasks))

    def update(self, verdicts: dict[tuple[Kind, Key], Verdict], tasks: Tasks) -> None:
        """A batch's verdicts: write those that differ."""
        self._writing = {k: v for k, v in self._writing.items() if k in verdicts}
        self.verdicts = verdicts
        self.write(tasks)

    async def _recheck_loop(self, event: asyncio.Event, tasks: Tasks) -> None:
        """The proxies' rejections changed: write the Programmed conditions that differ,
        once a second at most."""
        while True:
            await event.wait()
            await asyncio.sleep(PROGRAMMED_DEBOUNCE)
            event.clear()
            try:
                self.write(tasks)
            except Exception:
                log.exception("policy.programmed_failed",
                              hint="retried with the next change; please report this")

    def write(self, tasks: Tasks) -> None:
        """Write each verdict (with its Programmed condition) where it differs from what
        the object's status says and is not already on its way."""
        rejected = self._rejected() if self._rejected is not None else None
        for target, verdict in self.verdicts.items():
            kind, (namespace, name) = target
            current = self.stores[kind].status.get(target[1])
            wanted = None if rejected is None else programmed(
                verdict, current, rejected.get((kind.kind, namespace, name)), self.replica)
            if self.writer is None or not needs_write(verdict, current, wanted):
                self._writing.pop(target, None)
                continue
            if self._writing.get(target) == (verdict, wanted):
                continue  # already on its way
            self._writing[target] = (verdict, wanted)
            spawn(tasks, self._write(target, verdict, current, wanted))

    async def _write(self, target: tuple[Kind, Key], verdict: Verdict,
                     current: Mapping[str, Any] | None, wanted: Programmed | None) -> None:
        assert self.writer is not None
        if not await asyncio.to_thread(self.writer.write, target[1], verdict, current,
                                       wanted):
            self._writing.pop(target, None)  # failed: try again with the next batch


class RouteStatuses:
    """Gateway API routes' ``status.parents`` and their writes. ``sources``: where parent
    statuses come from (Service parents; the gateway controller appends its own)."""

    def __init__(self, writer: RouteStatusWriter | None,
                 stores: Mapping[Kind, ObjectStore]) -> None:
        self.writer = writer
        self.stores = stores
        self.sources: list[StatusSource] = [service_parents]
        self._writing: dict[RouteKey, list[dict[str, Any]]] = {}
        self._settled: Settled = {}  # routes whose status needed no write

    def write(self, mesh: Mesh, routes: RouteConversion, gateways: Collection[Key],
              tasks: Tasks) -> None:
        """Write each route's status.parents where it differs and is not on its way."""
        if self.writer is None:
            return
        current = {(kind.kind, *k): status for kind in ROUTES
                   for k, status in self.stores[kind].status.items()}
        changed = wanted_statuses(mesh, routes, current, self.sources, gateways,
                                  self._settled)
        self._writing = {k: v for k, v in self._writing.items() if k in changed}
        for route_key, (route, wanted) in changed.items():
            sent = self._writing.get(route_key)
            if sent is not None and not needs_route_write(wanted, {"parents": sent}):
                continue  # already on its way
            self._writing[route_key] = wanted
            log_not_accepted(route, wanted)
            spawn(tasks, self._write(route, wanted))

    async def _write(self, route: RouteObject, wanted: list[dict[str, Any]]) -> None:
        assert self.writer is not None
        if not await asyncio.to_thread(self.writer.write, route, wanted):
            self._writing.pop((route.kind, route.namespace, route.name), None)
