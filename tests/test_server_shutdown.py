"""Stopping the server while streams are ending: nothing of theirs is left running.

When the clients leave and the server is told to stop at the same moment (a bench that
cancels its streams then sends SIGTERM, a rollout), gRPC's core can be done with every
call while the stream handlers are still unwinding. If ``Running.stop`` returned then,
``asyncio.run`` would cancel gRPC's task around each handler, and gRPC prints a
``CancelledError`` traceback from ``_schedule_rpc_coro`` for each one.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import grpc

from controlplane import app, resource
from controlplane.settings import ServeSettings
from tests.support.xds_client import AdsClient, node
from tests.test_server_lifecycle import FlakySource, _mesh

STREAMS = 1000


def _rpc_tasks() -> list[asyncio.Task[object]]:
    """gRPC's tasks around the handlers of server calls, still running."""
    return [t for t in asyncio.all_tasks()
            if not t.done() and (t.get_name() == "rpc_task"
                                 or t.get_name().startswith("HandleExceptions["))]


async def test_stop_returns_only_once_every_stream_handler_has_ended(tmp_path: Path) -> None:
    settings = ServeSettings(xds_address="127.0.0.1:0", admin_address="127.0.0.1:0",
                             snapshot_dir=tmp_path / "snapshots",
                             source="file:" + str(tmp_path / "unused.yaml"))
    source = FlakySource([_mesh(9081)])
    source.rounds = 1  # yields one mesh and waits
    running = await app.start(settings, source)
    channels = [grpc.aio.insecure_channel(f"127.0.0.1:{running.xds_port}",
                                          options=[("grpc.use_local_subchannel_pool", 1)])
                for _ in range(STREAMS // 100)]
    stopped = False
    try:
        for _ in range(100):
            if running.pipeline.current is not None:
                break
            await asyncio.sleep(0.05)
        clients = [AdsClient(channels[i % len(channels)]) for i in range(STREAMS)]
        for i, client in enumerate(clients):
            await client.send(node=node(f"p-{i}", "frontend"), type_url=resource.CLUSTER)
        for client in clients:
            await client.recv(30)
        assert len(_rpc_tasks()) >= STREAMS  # the handlers are running
        for client in clients:  # every client leaves, and the server stops at once
            client.call.cancel()
        await running.stop(0)
        stopped = True
        left = _rpc_tasks()
        assert not left, f"{len(left)} of gRPC's handler tasks outlived the server's stop"
    finally:
        for channel in channels:
            await channel.close()
        if not stopped:
            await running.stop(0)
