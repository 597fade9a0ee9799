"""A connected sidecar moves to its pod's zone when the mesh learns it: over SotW and
delta, on the stream it has open, with an in-process server and pipeline."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import grpc
import pytest
from envoy.config.endpoint.v3 import endpoint_pb2

from controlplane import resource
from controlplane.cache import SnapshotCache
from controlplane.cache.identities import Identities
from controlplane.mesh.model import Mesh
from controlplane.mesh.workloads import WorkloadIndex
from controlplane.pipeline import Pipeline
from controlplane.server import StreamRegistry, XdsServer, create_server
from tests.support.xds_client import AdsClient, node

REVIEWS = "outbound|9080||reviews.shop.svc.cluster.local"


@dataclass
class World:
    pipeline: Pipeline
    registry: StreamRegistry
    channel: grpc.aio.Channel


@pytest.fixture
async def world() -> AsyncIterator[World]:
    cache = SnapshotCache()
    pipeline = Pipeline(cache)
    registry = StreamRegistry()
    server, port = await create_server("127.0.0.1:0", XdsServer(cache, registry))
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    yield World(pipeline, registry, channel)
    await channel.close()
    await server.stop(0)
    pipeline.close()


def mesh(frontend_pod: dict[str, Any], ratings: str = "10.0.2.1") -> Mesh:
    return Mesh.model_validate({"services": [
        {"name": "reviews", "namespace": "shop", "port": 9080, "endpoints": [
            {"address": "10.0.0.1", "port": 8080, "zone": "zone-a", "pod": "reviews-a"},
            {"address": "10.0.0.2", "port": 8080, "zone": "zone-b", "pod": "reviews-b"}]},
        {"name": "ratings", "namespace": "shop", "port": 9080, "endpoints": [
            {"address": ratings, "port": 8080, "pod": "ratings-1"}]},
        {"name": "frontend", "namespace": "shop", "port": 8000, "endpoints": [
            {"address": "10.0.1.1", "port": 8080, **frontend_pod}]},
    ]})


def priorities(response: Any) -> dict[str, int]:
    """address -> priority in the reviews ClusterLoadAssignment of a response."""
    found: dict[str, int] = {}
    for item in response.resources:
        raw = item.resource if hasattr(item, "resource") and item.HasField("resource") else item
        assignment = endpoint_pb2.ClusterLoadAssignment()
        raw.Unpack(assignment)
        if assignment.cluster_name != REVIEWS:
            continue
        for group in assignment.endpoints:
            for lb in group.lb_endpoints:
                found[lb.endpoint.address.socket_address.address] = group.priority
    return found


async def until_endpoints(client: AdsClient, want: dict[str, int],
                          seconds: float = 20.0) -> Any:
    """ACK every push until the reviews endpoints have ``want`` priorities."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + seconds
    while True:
        response = await client.recv(max(0.1, deadline - loop.time()))
        if response.type_url == resource.ENDPOINT and priorities(response) == want:
            return response
        if client.delta:
            await client.ack(response)
        else:
            names = [REVIEWS] if response.type_url == resource.ENDPOINT else []
            await client.ack(response, resource_names=names)


async def subscribe(client: AdsClient, sidecar: Any) -> None:
    await client.send(node=sidecar, type_url=resource.CLUSTER)
    if client.delta:
        await client.send(type_url=resource.ENDPOINT, resource_names_subscribe=[REVIEWS])
    else:
        await client.send(type_url=resource.ENDPOINT, resource_names=[REVIEWS])


@pytest.mark.parametrize("delta", [False, True], ids=["sotw", "delta"])
async def test_a_sidecar_without_a_zone_moves_to_its_pods_zone(world: World,
                                                               delta: bool) -> None:
    assert await world.pipeline.apply(mesh({}))
    client = AdsClient(world.channel, delta=delta)
    sidecar = node("p1.shop", "p1", namespace="shop", capture="true")  # no zone, no service
    try:
        await subscribe(client, sidecar)
        # No zone: every reviews endpoint has priority 0.
        await until_endpoints(client, {"10.0.0.1": 0, "10.0.0.2": 0})
        [stream] = world.registry.describe()
        before = stream["group"]
        assert stream["zone"] == "" and stream["service"] == "p1" and "~zone" not in before

        # The pod's endpoint arrives (a pod is listed once its sidecar is ready).
        assert await world.pipeline.apply(mesh({"pod": "p1", "zone": "zone-b"}))
        await until_endpoints(client, {"10.0.0.1": 1, "10.0.0.2": 0})
        [stream] = world.registry.describe()
        assert stream["zone"] == "zone-b" and stream["service"] == "frontend"
        assert stream["bootstrap"] == {"service": "p1", "zone": ""}
        assert stream["group"] != before and "~zone=zone-b" in stream["group"]
        assert client.error is None  # the same stream, never dropped

        # An unrelated service's endpoints change: the stream stays where it is.
        assert await world.pipeline.apply(mesh({"pod": "p1", "zone": "zone-b"},
                                               ratings="10.0.2.9"))
        await asyncio.sleep(0.2)
        [again] = world.registry.describe()
        assert again["group"] == stream["group"] and again["stream_id"] == stream["stream_id"]
        # A sidecar connecting now (here the same pod again) joins the zoned group at once.
        late = AdsClient(world.channel, delta=delta)
        try:
            await subscribe(late, sidecar)
            await until_endpoints(late, {"10.0.0.1": 1, "10.0.0.2": 0})
        finally:
            await late.close()
    finally:
        await client.close()
    # Closed streams are followed no more (nothing kept per stream after it ends).
    for _ in range(100):
        if not world.registry.describe() and len(world.pipeline.cache.identities) == 0:
            break
        await asyncio.sleep(0.05)
    assert len(world.pipeline.cache.identities) == 0


def test_only_the_streams_of_changed_pods_are_told() -> None:
    identities = Identities()
    told: list[str] = []
    identities.follow("p1.shop", 1, lambda: told.append("p1"))
    identities.follow("p2.shop", 2, lambda: told.append("p2"))
    identities.follow("p2.shop", 3, lambda: told.append("p2 again"))
    m = mesh({"pod": "p1", "zone": "zone-b"})
    index, changed = WorkloadIndex().update(m.by_key)
    assert identities.update(index, changed, m.by_key) == 1 and told == ["p1"]
    identities.unfollow("p1.shop", 1)
    identities.unfollow("p2.shop", 2)
    identities.unfollow("p2.shop", 3)
    assert len(identities) == 0
