"""Mesh states in, published snapshots out: the one place sources meet the cache.

A new mesh is first translated (a MeshBuild: shared resources encoded once) and
assembled for a neutral proxy. A service that cannot be translated is left out (or kept
at its last good version) and named in the logs and in /readyz; if the rest still fails
or is inconsistent the mesh is rejected as a whole and the last good one keeps being
served. Then every group that has a proxy (connected, or gone for less than the group
TTL) is assembled again; unchanged resources keep their encoded bytes.

``apply`` does the translating and assembling on a worker thread and only publishes on
the event loop, so a big change does not hold up xDS streams or /healthz. Nothing here
raises to its caller: a source's mesh is accepted or rejected, never fatal.
"""

from __future__ import annotations

import asyncio
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import structlog
from prometheus_client import Gauge

from controlplane import metrics, resource
from controlplane.assembly import MeshBuild
from controlplane.cache.cache import SnapshotCache
from controlplane.cache.snapshot import Snapshot
from controlplane.cache.store import SnapshotStore
from controlplane.errors import TranslationError
from controlplane.mesh.model import Mesh
from controlplane.mesh.workloads import WorkloadIndex
from controlplane.meshcheck import check_mesh
from controlplane.observe.changes import changed_types
from controlplane.observe.convergence import Convergence
from controlplane.proxy import ProxyIdentity
from controlplane.sources.base import observed_at

log = structlog.get_logger("controlplane.pipeline")
__all__ = ["Pipeline", "check_mesh"]

_BATCH = 32  # new groups built per trip to the worker
_Changes = dict[str, dict[str, str]]  # group -> type URL -> new version, for convergence
_PUBLISHED = metrics.SNAPSHOT_BUILDS.labels("published")
_UNCHANGED = metrics.SNAPSHOT_BUILDS.labels("unchanged")


@dataclass
class _Prepared:
    """A mesh translated and assembled for every known group, ready to publish."""

    build: MeshBuild
    snapshots: dict[str, Snapshot] = field(default_factory=dict)  # the groups that changed
    unchanged: set[str] = field(default_factory=set)  # their snapshot stays as it is
    elapsed: dict[str, float] = field(default_factory=dict)  # seconds, by changed group
    failures: dict[str, str] = field(default_factory=dict)
    seconds: float = 0.0
    workloads: tuple[WorkloadIndex, frozenset[str]] | None = None  # and the pods changed


def _assemble(build: MeshBuild, proxy: ProxyIdentity, reuse: Snapshot | None) -> Snapshot:
    snapshot = build.snapshot(proxy, reuse)
    snapshot.problems()  # computed here, off the loop; the snapshot keeps the answer
    return snapshot


_Built = tuple[str, Snapshot | str, float]  # group, its snapshot or the error, seconds


def _assemble_all(build: MeshBuild, proxies: list[ProxyIdentity],
                  reuse: dict[str, Snapshot | None]) -> list[_Built]:
    """Several new groups in one trip to the worker."""
    done: list[_Built] = []
    for proxy in proxies:
        started = time.perf_counter()
        try:
            made: Snapshot | str = _assemble(build, proxy, reuse.get(proxy.group))
        except Exception as exc:
            made = f"{type(exc).__name__}: {exc}"
        done.append((proxy.group, made, time.perf_counter() - started))
    return done


class Pipeline:
    def __init__(self, cache: SnapshotCache, store: SnapshotStore | None = None,
                 convergence: Convergence | None = None) -> None:
        self.cache = cache
        self.store = store
        self.convergence = convergence  # told what each mesh change published
        self.current: MeshBuild | None = None
        self.generation = 0
        self.last_error = ""
        self._lock = asyncio.Lock()
        # One worker: builds run one at a time, in order, and never crowd out the loop.
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="pipeline")
        self._tasks: set[asyncio.Task[None]] = set()
        self._arrivals: dict[str, ProxyIdentity] = {}  # new groups waiting to be built
        self._draining = False
        self._gauges: dict[str, dict[str, Gauge]] = {}  # group -> type -> its size gauge
        self._groups_shown = -1  # the proxy-groups gauge as last set by this pipeline
        cache.on_new_group = self.on_new_group

    @property
    def mesh(self) -> Mesh | None:
        return self.current.mesh if self.current is not None else None

    def readiness(self) -> tuple[bool, str]:
        if self.current is None:
            detail = "waiting for the first valid mesh from the source"
            if self.last_error:
                detail += f"; the last one was rejected: {self.last_error[:500]}"
            return False, detail
        services = len(self.current.mesh.services)
        detail = f"mesh generation {self.generation} with {services} services"
        if self.last_error:
            detail += (f"; the latest change was rejected (still serving generation "
                       f"{self.generation}): {self.last_error[:500]}")
        if self.current.rejected:
            left = "; ".join(f"{k}: {e}" for k, e in sorted(self.current.rejected.items()))
            detail += f"; not translated (last good version served, if any): {left[:500]}"
        return True, detail

    def set_mesh(self, mesh: Mesh) -> bool:
        """Accept ``mesh`` if it translates into a consistent snapshot; rebuild every group.
        All on the calling thread; True when accepted. Never raises."""
        observed = observed_at(mesh) or time.time()
        try:
            prepared = self._prepare(mesh, self.current, self.cache.groups())
        except Exception as exc:
            return self._rejected(exc)
        try:
            self._publish(prepared, observed)
        except Exception as exc:
            return self._rejected(exc)
        return True

    async def apply(self, mesh: Mesh) -> bool:
        """``set_mesh`` with the translation and assembly on a worker thread; snapshots
        are published on the event loop, a slice of groups at a time. A change's clock
        starts at its source event (or now, for a mesh the source did not stamp)."""
        observed = observed_at(mesh) or time.time()
        async with self._lock:
            try:
                prepared = await asyncio.get_running_loop().run_in_executor(
                    self._worker, self._prepare, mesh, self.current, self.cache.groups())
            except Exception as exc:
                return self._rejected(exc)
            try:
                await self._publish_async(prepared, observed)
            except Exception as exc:
                return self._rejected(exc)
            return True

    def _rejected(self, exc: Exception) -> bool:
        metrics.MESH_UPDATES.labels("rejected").inc()
        self.last_error = str(exc)
        if isinstance(exc, TranslationError):
            log.error("mesh.rejected", error=str(exc),
                      hint="the last good mesh is still served; fix the input and save again")
        else:  # a bug of ours, not the input's: the traceback helps us
            log.exception("mesh.failed", error=f"{type(exc).__name__}: {exc}",
                          hint="the last good mesh is still served; please report this")
        return False

    def _prepare(self, mesh: Mesh, previous: MeshBuild | None,
                 groups: dict[str, ProxyIdentity]) -> _Prepared:
        """Pure work (no publishing), safe on a worker thread."""
        started = time.perf_counter()
        # The whole-mesh route table of each namespace whose groups see everything (by
        # the last view): built first, so a service that breaks one is isolated.
        namespaces = {p.namespace for p in groups.values()
                      if previous is None or previous.sees_all(p)}
        prepared = _Prepared(check_mesh(mesh, previous, namespaces, strict=False))
        prepared.workloads = self.cache.identities.index.update(mesh.by_key)
        for group, proxy in groups.items():
            current = self.cache.get(group)
            began = time.perf_counter()
            try:
                snapshot = _assemble(prepared.build, proxy, current)
            except Exception as exc:
                prepared.failures[group] = f"{type(exc).__name__}: {exc}"
                continue
            if snapshot is current:
                prepared.unchanged.add(group)  # none of its layers changed: O(1) so far
            else:
                prepared.snapshots[group] = snapshot
                prepared.elapsed[group] = time.perf_counter() - began
        prepared.build.settle()  # every layer in use is derived: the old build may go
        prepared.seconds = time.perf_counter() - started
        return prepared

    def _accept(self, prepared: _Prepared) -> None:
        build = prepared.build
        self.current = build
        self.generation += 1
        self.last_error = ""
        metrics.MESH_UPDATES.labels("accepted").inc()
        metrics.ENCODED_BYTES.inc(build.encoded_bytes)
        metrics.SERVICES_REJECTED.set(len(build.rejected))
        for key, error in sorted(build.rejected.items()):
            kept = build.last_good(key) is not None
            log.error("service.rejected", service=key, error=error,
                      hint=("its last good version is still served" if kept else
                            "it is left out") + "; fix its definition and save again")
        for group, error in prepared.failures.items():
            self._group_failed(group, error)
        if prepared.workloads is not None:  # streams of changed pods resolve again
            self.cache.identities.update(*prepared.workloads, build.mesh.by_key)

    def _publish(self, prepared: _Prepared, observed: float) -> None:
        self._accept(prepared)
        self._converging(observed, prepared)
        for group, snapshot in prepared.snapshots.items():
            self._publish_group(group, snapshot, prepared.elapsed.get(group, 0.0))
        self._build_missing(prepared)
        self._accepted_log(prepared)

    async def _publish_async(self, prepared: _Prepared, observed: float) -> None:
        self._accept(prepared)
        self._converging(observed, prepared)
        for index, (group, snapshot) in enumerate(prepared.snapshots.items()):
            self._publish_group(group, snapshot, prepared.elapsed.get(group, 0.0))
            if index % 50 == 49:
                await asyncio.sleep(0)  # let streams write between slices of groups
        self._build_missing(prepared)
        self._accepted_log(prepared)

    def _converging(self, observed: float, prepared: _Prepared) -> None:
        """Follow the change to the proxies (groups built for new arrivals are not).
        Told before the first group is published: the streams of the first slices ACK
        while later ones are published, and each ACK is timed when it is read."""
        if self.convergence is None:
            return
        changes: _Changes = {}
        for group, snapshot in prepared.snapshots.items():
            if self.cache.known(group):
                changed = changed_types(self.cache.get(group), snapshot)
                if changed:
                    changes[group] = changed
        if changes:
            try:
                self.convergence.published(self.generation, observed, changes)
            except Exception:
                log.exception("convergence.failed", hint="a bug; this change is not measured")

    def _build_missing(self, prepared: _Prepared) -> None:
        """Groups that arrived while the mesh was being built got the old one."""
        for group, proxy in self.cache.groups().items():
            if (group not in prepared.snapshots and group not in prepared.failures
                    and group not in prepared.unchanged):
                self.build(proxy)

    def _accepted_log(self, prepared: _Prepared) -> None:
        build = prepared.build
        versions = {s.version for s in prepared.snapshots.values()}
        log.info("mesh.accepted", generation=self.generation,
                 services=len(build.mesh.services), groups=len(prepared.snapshots),
                 unchanged_groups=len(prepared.unchanged),
                 versions=len(versions), rejected_services=len(build.rejected),
                 seconds=round(prepared.seconds, 4))

    def on_new_group(self, proxy: ProxyIdentity) -> None:
        """A group's first proxy: build its snapshot on the worker when there is an event
        loop (a new namespace means a new route table: tens of ms at 1,000 services)."""
        if self.current is None:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            self.build(proxy)
            return
        self._arrivals[proxy.group] = proxy
        if not self._draining:
            self._draining = True
            task = loop.create_task(self._build_arrivals())
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _build_arrivals(self) -> None:
        """New groups, up to ``_BATCH`` per trip to the worker: when a thousand sidecars
        reconnect at once, the loop hands work over a few dozen times, not a thousand,
        and each batch is published as soon as it is built."""
        loop = asyncio.get_running_loop()
        try:
            while self._arrivals:
                build = self.current
                assert build is not None
                batch = list(self._arrivals.values())[:_BATCH]
                for proxy in batch:
                    del self._arrivals[proxy.group]
                reuse = {p.group: self.cache.get(p.group) for p in batch}
                done = await loop.run_in_executor(self._worker, _assemble_all, build, batch,
                                                  reuse)
                if self.current is not build:
                    continue  # the newer mesh's publish built these groups
                for group, made, seconds in done:
                    if isinstance(made, str):
                        self._group_failed(group, made)
                    else:
                        self._publish_group(group, made, seconds)
        finally:
            self._draining = False

    def close(self) -> None:
        """Stop the worker (pending builds are dropped)."""
        for task in self._tasks:
            task.cancel()
        self._worker.shutdown(wait=False, cancel_futures=True)

    def build(self, proxy: ProxyIdentity) -> None:
        """Assemble and publish one group; on failure keep its last good snapshot."""
        assert self.current is not None
        group = proxy.group
        started = time.perf_counter()
        try:
            snapshot = self.current.snapshot(proxy, self.cache.get(group))
        except Exception as exc:
            self._group_failed(group, f"{type(exc).__name__}: {exc}")
            return
        self._publish_group(group, snapshot, time.perf_counter() - started)

    def _group_failed(self, group: str, error: str) -> None:
        metrics.SNAPSHOT_BUILDS.labels("rejected").inc()
        log.error("snapshot.rejected", group=group, error=error,
                  hint="this group keeps its last good snapshot; fix the mesh")

    def _publish_group(self, group: str, snapshot: Snapshot, elapsed: float) -> None:
        if not self.cache.known(group):
            return  # expired while it was being built
        before = self.cache.get(group)
        try:
            published = self.cache.set_snapshot(group, snapshot)
        except Exception as exc:
            self._group_failed(group, str(exc))
            return
        metrics.SNAPSHOT_BUILD_SECONDS.observe(elapsed)
        (_PUBLISHED if published else _UNCHANGED).inc()
        groups = len(self.cache)
        if groups != self._groups_shown:  # (not a gauge write per group per change)
            self._groups_shown = groups
            metrics.PROXY_GROUPS.set(groups)
        if published:
            metrics.ENCODED_BYTES.inc(snapshot.encoded_bytes)
            for type_url, typed in snapshot.types.items():  # sizes are kept per layer
                if before is None or before.types.get(type_url) is not typed:
                    self._config_bytes(group, type_url).set(typed.size)
            # debug: one line per group per change would let clients set the log volume
            log.debug("snapshot.published", group=group, version=snapshot.version,
                      seconds=round(elapsed, 4))
            if self.store is not None:
                self.store.save(group, snapshot)

    def _config_bytes(self, group: str, type_url: str) -> Gauge:
        """The group's size gauge of a type (labels() looked up once, not per change)."""
        mine = self._gauges.setdefault(group, {})
        short = resource.short_name(type_url)
        found = mine.get(short)
        if found is None:
            found = mine[short] = metrics.CONFIG_BYTES.labels(group, short)
        return found

    def expire_groups(self, ttl: float, now: float | None = None) -> list[str]:
        """Forget groups with no proxy connected for ``ttl`` seconds: their snapshot, their
        metric series, their stored snapshots, and the route tables and zone variants
        only they used."""
        gone = self.cache.expire(ttl, now)
        self._groups_shown = len(self.cache)
        metrics.PROXY_GROUPS.set(self._groups_shown)
        if not gone:
            return gone
        metrics.GROUPS_EXPIRED.inc(len(gone))
        for group in gone:
            for short in {*resource.SHORT_NAMES.values(), *self._gauges.pop(group, {})}:
                metrics.CONFIG_BYTES.remove(group, short)
            if self.store is not None:
                self.store.forget(group)
        if self.current is not None:
            self.current.forget(self.cache.groups().values())
        log.info("groups.expired", count=len(gone), groups=sorted(gone)[:10],
                 remaining=len(self.cache.groups()), ttl=ttl)
        return gone

