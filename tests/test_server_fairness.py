"""A thousand sidecars at once: a slow reader gets the latest config, not every version;
large writes take turns while small updates never wait; a client that does not read
cannot hold a turn. Real gRPC streams against the real server; what is asserted is
counts and order, never how long something took."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import grpc
import pytest
from envoy.config.cluster.v3 import cluster_pb2
from envoy.service.discovery.v3 import ads_pb2_grpc, discovery_pb2

from controlplane import resource
from controlplane.cache import SnapshotCache
from controlplane.cache.snapshot import Snapshot, build_snapshot
from controlplane.proxy import ProxyIdentity
from controlplane.server import StreamRegistry, XdsServer, create_server
from controlplane.server.limits import Limits
from tests.support.snapshots import snapshot
from tests.support.xds_client import AdsClient, node

pytestmark = pytest.mark.timeout(120)

SMALL = ProxyIdentity(node_id="x", service="small").group
BIG = ProxyIdentity(node_id="x", service="big").group
MEDIUM = ProxyIdentity(node_id="x", service="medium").group
MB = 1024 * 1024
# More than the transport buffers for a client that does not read (a few MB here), so
# a write of it waits until the client reads.
BLOCKING = 24 * MB


def big(tag: int, size: int) -> Snapshot:
    """One STATIC cluster of about ``size`` bytes (no references: always consistent)."""
    padded = cluster_pb2.Cluster(name="big", type=cluster_pb2.Cluster.STATIC,
                                 alt_stat_name=f"{tag}-" + "x" * size)
    return build_snapshot({resource.CLUSTER: [("big", padded)]})


@dataclass
class Rig:
    cache: SnapshotCache
    registry: StreamRegistry
    xds: XdsServer
    channel: grpc.aio.Channel

    def client(self) -> AdsClient:
        return AdsClient(self.channel)

    def raw(self) -> Any:
        """An ADS stream nobody reads from."""
        return ads_pb2_grpc.AggregatedDiscoveryServiceStub(self.channel) \
            .StreamAggregatedResources()


async def rig_with(limits: Limits) -> tuple[Rig, grpc.aio.Server]:
    cache = SnapshotCache()
    registry = StreamRegistry()
    xds = XdsServer(cache, registry, limits=limits)
    server, port = await create_server("127.0.0.1:0", xds)
    channel = grpc.aio.insecure_channel(
        f"127.0.0.1:{port}", options=[("grpc.max_receive_message_length", 64 * MB)])
    return Rig(cache, registry, xds, channel), server


@pytest.fixture
async def rig(request: pytest.FixtureRequest) -> AsyncIterator[Rig]:
    limits: Limits = getattr(request, "param", Limits())
    made, server = await rig_with(limits)
    yield made
    await made.channel.close()
    await server.stop(0)


async def until(condition: Callable[[], bool], what: str, tries: int = 400) -> None:
    """Wait for a condition of the server (bounded: 400 looks, 20 s)."""
    for _ in range(tries):
        if condition():
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"never happened: {what}")


async def synced_small_client(rig: Rig) -> AdsClient:
    rig.cache.set_snapshot(SMALL, snapshot({"a": (1,)}))
    client = rig.client()
    await client.send(node=node("small-1", service="small"), type_url=resource.CLUSTER)
    await client.ack(await client.recv())
    await client.send(type_url=resource.ENDPOINT, resource_names=["a"])
    await client.ack(await client.recv(), resource_names=["a"])
    return client


async def test_a_stream_that_does_not_read_gets_the_latest_version_not_every_one(
        rig: Rig) -> None:
    rig.cache.set_snapshot(BIG, big(0, 2 * MB))
    call = rig.raw()
    await call.write(discovery_pb2.DiscoveryRequest(node=node("slow", service="big"),
                                                    type_url=resource.CLUSTER))
    latest = ""
    for tag in range(1, 51):  # 50 versions of 2 MB while the client reads nothing
        published = big(tag, 2 * MB)
        rig.cache.set_snapshot(BIG, published)
        latest = published.types[resource.CLUSTER].version
        await asyncio.sleep(0.02)  # room for the server to push each, if it could
    received: list[str] = []
    while not received or received[-1] != latest:
        response = await asyncio.wait_for(call.read(), 20)
        received.append(response.version_info)
    # What the transport held before the client read, then the latest: not 51 pushes.
    assert len(received) < 20, len(received)
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(call.read(), 0.5)
    [stream] = rig.registry.describe()
    assert stream["types"]["cds"]["pushes"] == len(received)
    call.cancel()


@pytest.mark.parametrize("rig", [Limits(max_large_writes=1, large_write_turn_seconds=60)],
                         indirect=True)
async def test_small_updates_do_not_wait_for_large_writes_which_take_turns(rig: Rig) -> None:
    connected = await synced_small_client(rig)
    # A stream that does not read takes the only turn with a write that cannot finish.
    rig.cache.set_snapshot(BIG, big(0, BLOCKING))
    blocker = rig.raw()
    await blocker.write(discovery_pb2.DiscoveryRequest(node=node("blocker", service="big"),
                                                       type_url=resource.CLUSTER))
    await until(lambda: rig.xds.turns.held == 1, "the blocker's write holds the turn")
    # A new sidecar whose initial config is large waits for a turn...
    rig.cache.set_snapshot(MEDIUM, big(0, 256 * 1024))
    newcomer = rig.client()
    await newcomer.send(node=node("new-1", service="medium"), type_url=resource.CLUSTER)
    await until(lambda: rig.xds.turns.waiting == 1, "the newcomer waits for a turn")
    # ...while a small endpoint update to a connected sidecar goes out at once.
    rig.cache.set_snapshot(SMALL, snapshot({"a": (1, 2)}))
    update = await connected.recv()
    assert update.type_url == resource.ENDPOINT
    assert await newcomer.nothing()
    # The blocker leaves: its turn goes to the newcomer.
    blocker.cancel()
    initial = await newcomer.recv(timeout=20)
    assert initial.type_url == resource.CLUSTER
    assert rig.xds.turns.turns_timed_out == 0
    await connected.close()
    await newcomer.close()


@pytest.mark.parametrize("rig", [Limits(max_large_writes=1, large_write_turn_seconds=0.5)],
                         indirect=True)
async def test_a_client_that_does_not_read_cannot_keep_a_turn(rig: Rig) -> None:
    rig.cache.set_snapshot(BIG, big(0, BLOCKING))
    blocker = rig.raw()
    await blocker.write(discovery_pb2.DiscoveryRequest(node=node("blocker", service="big"),
                                                       type_url=resource.CLUSTER))
    await until(lambda: rig.xds.turns.large_writes == 1, "the blocker's write starts")
    rig.cache.set_snapshot(MEDIUM, big(0, 256 * 1024))
    newcomer = rig.client()
    await newcomer.send(node=node("new-1", service="medium"), type_url=resource.CLUSTER)
    initial = await newcomer.recv(timeout=20)  # the blocker never reads
    assert initial.type_url == resource.CLUSTER
    assert rig.xds.turns.turns_timed_out == 1
    assert len(rig.registry) == 2  # the blocker is still connected, still being written to
    blocker.cancel()
    await newcomer.close()


@pytest.mark.parametrize("rig", [Limits(max_large_writes=0)], indirect=True)
async def test_with_no_bound_large_writes_do_not_wait(rig: Rig) -> None:
    rig.cache.set_snapshot(BIG, big(0, BLOCKING))
    blocker = rig.raw()
    await blocker.write(discovery_pb2.DiscoveryRequest(node=node("blocker", service="big"),
                                                       type_url=resource.CLUSTER))
    rig.cache.set_snapshot(MEDIUM, big(0, 256 * 1024))
    newcomer = rig.client()
    await newcomer.send(node=node("new-1", service="medium"), type_url=resource.CLUSTER)
    assert (await newcomer.recv(timeout=20)).type_url == resource.CLUSTER
    assert rig.xds.turns.large_writes == 0
    blocker.cancel()
    await newcomer.close()
