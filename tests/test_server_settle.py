"""Once streams stop arriving, what they made is frozen out of the garbage collector's
way (in a process that freezes, as ``serve`` does); when many frozen streams have ended,
the next settle collects over everything first. Real gRPC streams against the real
server; counts, never timings."""

from __future__ import annotations

import asyncio
import gc
from collections.abc import AsyncIterator, Callable

import pytest

from controlplane import resource
from controlplane.cache import SnapshotCache
from controlplane.proxy import ProxyIdentity
from controlplane.server import StreamRegistry, XdsServer, create_server
from tests.support.snapshots import snapshot
from tests.support.xds_client import AdsClient, node

pytestmark = pytest.mark.timeout(120)


async def until(condition: Callable[[], bool], what: str) -> None:
    for _ in range(400):  # bounded: 20 s
        if condition():
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"never happened: {what}")


@pytest.fixture
async def rig() -> AsyncIterator[tuple[XdsServer, SnapshotCache, str]]:
    cache = SnapshotCache()
    xds = XdsServer(cache, StreamRegistry())
    xds.settle.settle_seconds, xds.settle.min_churn = 0.2, 3
    server, port = await create_server("127.0.0.1:0", xds)
    yield xds, cache, f"127.0.0.1:{port}"
    await server.stop(0)


async def _connect(address: str, count: int, cache: SnapshotCache) -> list[AdsClient]:
    import grpc

    channel = grpc.aio.insecure_channel(address)
    clients = []
    for i in range(count):
        proxy = node(f"p{i}", service=f"svc{i}")
        cache.set_snapshot(ProxyIdentity.from_node(proxy).group, snapshot({"a": (1,)}))
        client = AdsClient(channel)
        await client.send(node=proxy, type_url=resource.CLUSTER)
        await client.ack(await client.recv())
        clients.append(client)
    return clients


async def test_settled_streams_are_frozen_and_collected_after_they_end(
        rig: tuple[XdsServer, SnapshotCache, str]) -> None:
    xds, cache, address = rig
    gc.freeze()  # as serve does once the first mesh is built
    try:
        clients = await _connect(address, 4, cache)
        await until(lambda: xds.settle.freezes == 1, "the streams' state frozen")
        assert xds.settle.collections == 0

        for client in clients:
            await client.close()
        await until(lambda: len(xds.registry) == 0, "the streams closed")
        await until(lambda: xds.settle.freezes == 2, "frozen again after they ended")
        assert xds.settle.collections == 1  # what the ended streams left was looked at
    finally:
        gc.unfreeze()


async def test_a_process_that_does_not_freeze_is_left_alone(
        rig: tuple[XdsServer, SnapshotCache, str]) -> None:
    xds, cache, address = rig
    gc.unfreeze()
    clients = await _connect(address, 4, cache)
    await asyncio.sleep(0.6)  # three settle periods: nothing happens, whatever the time
    assert (xds.settle.freezes, gc.get_freeze_count()) == (0, 0)
    for client in clients:
        await client.close()
