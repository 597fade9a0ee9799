"""``controlplane serve``: wires source -> pipeline -> cache -> xDS server, plus admin."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import signal
from dataclasses import dataclass
from typing import Any

import grpc
import structlog

from controlplane.admin import AdminState, start_admin
from controlplane.cache.cache import SnapshotCache
from controlplane.cache.store import SnapshotStore
from controlplane.pipeline import Pipeline
from controlplane.server import StreamRegistry, XdsServer, create_server
from controlplane.settings import ServeSettings, split_address
from controlplane.sources import Source, open_source

log = structlog.get_logger("controlplane.serve")


@dataclass
class Running:
    """A started server, for the CLI and for tests that run it in-process."""

    settings: ServeSettings
    pipeline: Pipeline
    cache: SnapshotCache
    registry: StreamRegistry
    grpc_server: grpc.aio.Server
    xds_port: int
    admin_runner: Any
    admin_port: int
    source_task: asyncio.Task[None]
    store: SnapshotStore | None

    async def stop(self, grace: float = 1.0) -> None:
        self.source_task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self.source_task
        await self.grpc_server.stop(grace)
        await self.admin_runner.cleanup()
        if self.store is not None:
            self.store.close()


async def start(settings: ServeSettings, source: Source | None = None) -> Running:
    source = source or open_source(settings)
    admin_host, admin_port = split_address(settings.admin_address, "--admin-address")
    split_address(settings.xds_address, "--xds-address")
    store = SnapshotStore(settings.snapshot_dir, settings.snapshot_keep) \
        if settings.snapshot_keep else None
    cache = SnapshotCache()
    pipeline = Pipeline(cache, store)
    registry = StreamRegistry()
    grpc_server, xds_port = await create_server(
        settings.xds_address, XdsServer(cache, registry, settings.identifier))
    try:
        runner, bound_admin = await start_admin(
            AdminState(registry=registry, cache=cache, readiness=pipeline.readiness),
            admin_host, admin_port)
    except BaseException:  # e.g. the admin port is taken: release the xDS port too
        await grpc_server.stop(0)
        raise

    async def follow() -> None:
        frozen = False
        async for mesh in source.updates():
            if pipeline.set_mesh(mesh) and not frozen:
                # What the first mesh built lives as long as the process: keep it out of
                # every later collection (half of a change's CPU went to the collector).
                gc.freeze()
                frozen = True

    task = asyncio.create_task(follow(), name="source")
    host = settings.xds_address.rpartition(":")[0]
    log.info("serve.started", source=source.name, xds=f"{host}:{xds_port}",
             admin=f"http://{admin_host}:{bound_admin}/", snapshot_dir=str(settings.snapshot_dir))
    return Running(settings, pipeline, cache, registry, grpc_server, xds_port, runner,
                   bound_admin, task, store)


async def serve(settings: ServeSettings) -> None:
    """Run until SIGINT or SIGTERM, then stop gracefully."""
    # A change allocates many short-lived objects; collect the young generation less often.
    gc.set_threshold(10_000, 20, 20)
    running = await start(settings)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    done, _ = await asyncio.wait(
        [asyncio.create_task(stop.wait()), running.source_task],
        return_when=asyncio.FIRST_COMPLETED)
    if running.source_task in done and running.source_task.exception() is not None:
        log.error("serve.source_failed", error=str(running.source_task.exception()))
    log.info("serve.stopping")
    await running.stop()
    log.info("serve.stopped")
