"""Mesh states in, published snapshots out: the one place sources meet the cache.

A new mesh is first translated (a MeshBuild: shared resources encoded once) and
assembled for a neutral proxy; if that fails or is inconsistent the mesh is rejected as
a whole and the last good one keeps being served. Then every group that has a connected
proxy is assembled again; unchanged resources keep their encoded bytes.
"""

from __future__ import annotations

import time

import structlog

from controlplane import metrics, resource
from controlplane.assembly import MeshBuild
from controlplane.cache.cache import SnapshotCache
from controlplane.cache.store import SnapshotStore
from controlplane.errors import TranslationError
from controlplane.mesh.model import Mesh
from controlplane.proxy import ProxyIdentity

log = structlog.get_logger("controlplane.pipeline")

_PROBE = ProxyIdentity(node_id="(probe)", service="(probe)")


def check_mesh(mesh: Mesh, previous: MeshBuild | None = None) -> MeshBuild:
    """Translate ``mesh`` and assemble it for a neutral proxy; TranslationError if that
    fails or is not consistent. The returned build is then shared by every group."""
    try:
        build = MeshBuild(mesh, previous)
        snapshot = build.snapshot(_PROBE)
    except Exception as exc:  # a translator bug is reported like any bad mesh
        raise TranslationError(f"{type(exc).__name__}: {exc}") from exc
    problems = snapshot.problems()
    if problems:
        raise TranslationError("inconsistent snapshot: " + "; ".join(problems))
    return build


class Pipeline:
    def __init__(self, cache: SnapshotCache, store: SnapshotStore | None = None) -> None:
        self.cache = cache
        self.store = store
        self.current: MeshBuild | None = None
        self.generation = 0
        cache.on_new_group = self.on_new_group

    @property
    def mesh(self) -> Mesh | None:
        return self.current.mesh if self.current is not None else None

    def readiness(self) -> tuple[bool, str]:
        if self.current is None:
            return False, "waiting for the first valid mesh from the source"
        services = len(self.current.mesh.services)
        return True, f"mesh generation {self.generation} with {services} services"

    def set_mesh(self, mesh: Mesh) -> bool:
        """Accept ``mesh`` if it translates into a consistent snapshot; rebuild every group."""
        started = time.perf_counter()
        try:
            build = check_mesh(mesh, self.current)
        except TranslationError as exc:
            metrics.MESH_UPDATES.labels("rejected").inc()
            log.error("mesh.rejected", error=str(exc),
                      hint="the last good mesh is still served; fix the input and save again")
            return False
        self.current = build
        self.generation += 1
        metrics.MESH_UPDATES.labels("accepted").inc()
        metrics.ENCODED_BYTES.inc(build.encoded_bytes)
        groups = self.cache.groups()
        for proxy in groups.values():
            self.build(proxy)
        log.info("mesh.accepted", generation=self.generation, services=len(mesh.services),
                 groups=len(groups), seconds=round(time.perf_counter() - started, 4))
        return True

    def on_new_group(self, proxy: ProxyIdentity) -> None:
        if self.current is not None:
            self.build(proxy)

    def build(self, proxy: ProxyIdentity) -> None:
        """Assemble and publish one group; on failure keep its last good snapshot."""
        assert self.current is not None
        group = proxy.group
        started = time.perf_counter()
        try:
            snapshot = self.current.snapshot(proxy, self.cache.get(group))
            published = self.cache.set_snapshot(group, snapshot)
        except Exception as exc:
            metrics.SNAPSHOT_BUILDS.labels("rejected").inc()
            log.error("snapshot.rejected", group=group, error=str(exc),
                      hint="this group keeps its last good snapshot; fix the mesh")
            return
        elapsed = time.perf_counter() - started
        metrics.SNAPSHOT_BUILD_SECONDS.observe(elapsed)
        metrics.SNAPSHOT_BUILDS.labels("published" if published else "unchanged").inc()
        if published:
            metrics.ENCODED_BYTES.inc(snapshot.encoded_bytes)
            for type_url, typed in snapshot.types.items():
                metrics.CONFIG_BYTES.labels(group, resource.short_name(type_url)).set(typed.size)
            log.info("snapshot.published", group=group, version=snapshot.version,
                     versions=snapshot.versions(), seconds=round(elapsed, 4))
            if self.store is not None:
                self.store.save(group, snapshot)
