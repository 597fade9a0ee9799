"""Mesh states in, published snapshots out: the one place sources meet the cache.

A new mesh is first translated for a neutral proxy; if that fails or is inconsistent the
mesh is rejected as a whole and the last good one keeps being served. Then every group
that has a connected proxy is rebuilt; unchanged resources keep their encoded bytes.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import structlog

from controlplane import metrics, resource
from controlplane.cache.cache import SnapshotCache
from controlplane.cache.snapshot import Snapshot, build_snapshot
from controlplane.cache.store import SnapshotStore
from controlplane.errors import TranslationError
from controlplane.mesh.model import Mesh
from controlplane.proxy import ProxyIdentity
from controlplane.translator import Resources, resource_name, translate

log = structlog.get_logger("controlplane.pipeline")

Translate = Callable[[Mesh, ProxyIdentity], Resources]
_PROBE = ProxyIdentity(node_id="(probe)", service="(probe)")


def check_mesh(mesh: Mesh, translator: Translate = translate) -> Snapshot:
    """Translate ``mesh`` for a neutral proxy; TranslationError if it is not consistent."""
    resources = translator(mesh, _PROBE)
    named = {t: [(resource_name(m), m) for m in msgs] for t, msgs in resources.items()}
    try:
        snapshot = build_snapshot(named)
    except ValueError as exc:
        raise TranslationError(str(exc)) from exc
    problems = snapshot.problems()
    if problems:
        raise TranslationError("inconsistent snapshot: " + "; ".join(problems))
    return snapshot


class Pipeline:
    def __init__(self, cache: SnapshotCache, store: SnapshotStore | None = None,
                 translator: Translate = translate) -> None:
        self.cache = cache
        self.store = store
        self.translator = translator
        self.mesh: Mesh | None = None
        self.generation = 0
        cache.on_new_group = self.on_new_group

    def readiness(self) -> tuple[bool, str]:
        if self.mesh is None:
            return False, "waiting for the first valid mesh from the source"
        return True, f"mesh generation {self.generation} with {len(self.mesh.services)} services"

    def set_mesh(self, mesh: Mesh) -> bool:
        """Accept ``mesh`` if it translates into a consistent snapshot; rebuild every group."""
        try:
            check_mesh(mesh, self.translator)
        except Exception as exc:  # a translator bug must not take the server down
            metrics.MESH_UPDATES.labels("rejected").inc()
            log.error("mesh.rejected", error=str(exc),
                      hint="the last good mesh is still served; fix the input and save again")
            return False
        self.mesh = mesh
        self.generation += 1
        metrics.MESH_UPDATES.labels("accepted").inc()
        log.info("mesh.accepted", generation=self.generation, services=len(mesh.services),
                 groups=len(self.cache.groups()))
        for proxy in self.cache.groups().values():
            self.build(proxy)
        return True

    def on_new_group(self, proxy: ProxyIdentity) -> None:
        if self.mesh is not None:
            self.build(proxy)

    def build(self, proxy: ProxyIdentity) -> None:
        """Translate and publish one group; on failure keep its last good snapshot."""
        assert self.mesh is not None
        group = proxy.group
        started = time.perf_counter()
        try:
            snapshot = self._snapshot(self.mesh, proxy, self.cache.get(group))
            published = self.cache.set_snapshot(group, snapshot)
        except Exception as exc:
            metrics.SNAPSHOT_BUILDS.labels("rejected").inc()
            log.error("snapshot.rejected", group=group, error=str(exc),
                      hint="this group keeps its last good snapshot; fix the mesh")
            return
        elapsed = time.perf_counter() - started
        metrics.SNAPSHOT_BUILD_SECONDS.observe(elapsed)
        metrics.ENCODED_BYTES.inc(snapshot.encoded_bytes)
        metrics.SNAPSHOT_BUILDS.labels("published" if published else "unchanged").inc()
        if published:
            for type_url, typed in snapshot.types.items():
                metrics.CONFIG_BYTES.labels(group, resource.short_name(type_url)).set(typed.size)
            log.info("snapshot.published", group=group, version=snapshot.version,
                     versions=snapshot.versions(), seconds=round(elapsed, 4))
            if self.store is not None:
                self.store.save(group, snapshot)

    def _snapshot(self, mesh: Mesh, proxy: ProxyIdentity, reuse: Snapshot | None) -> Snapshot:
        resources = self.translator(mesh, proxy)
        named = {t: [(resource_name(m), m) for m in msgs] for t, msgs in resources.items()}
        snapshot = build_snapshot(named, reuse=reuse)
        problems = snapshot.problems()
        if problems:
            raise TranslationError("inconsistent snapshot: " + "; ".join(problems))
        return snapshot
