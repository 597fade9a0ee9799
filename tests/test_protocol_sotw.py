"""State-of-the-world ADS, driven by a raw gRPC client (shared/XDS-PITFALLS.md)."""

from __future__ import annotations

import asyncio

import grpc
import pytest
from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.endpoint.v3 import endpoint_pb2
from envoy.service.discovery.v3 import discovery_pb2

from controlplane import resource
from controlplane.cache import SnapshotCache
from controlplane.cache.snapshot import build_snapshot
from controlplane.errors import TranslationError
from controlplane.proxy import ProxyIdentity
from tests.conftest import Env
from tests.support.snapshots import cluster as make_cluster
from tests.support.snapshots import snapshot
from tests.support.xds_client import node

GROUP = ProxyIdentity(node_id="x", service="frontend").group


def names(response: object, cls: type) -> list[str]:
    result = []
    for any_ in response.resources:  # type: ignore[attr-defined]
        message = cls()
        any_.Unpack(message)
        result.append(getattr(message, "cluster_name", "") or message.name)
    return result


async def test_initial_wildcard_then_ack_gets_no_answer(env: Env) -> None:
    env.cache.set_snapshot(GROUP, snapshot({"a": (1,), "b": (2,)}))
    client = env.client()
    await client.send(node=node(), type_url=resource.CLUSTER)
    response = await client.recv()
    assert response.type_url == resource.CLUSTER
    assert sorted(names(response, cluster_pb2.Cluster)) == ["a", "b"]
    assert response.version_info == env.cache.get(GROUP).get(resource.CLUSTER).version
    assert response.nonce
    await client.ack(response)
    assert await client.nothing()
    [stream] = env.registry.describe()
    assert stream["types"]["cds"]["acked_version"] == response.version_info
    await client.close()


async def test_waits_for_first_snapshot(env: Env) -> None:
    client = env.client()
    await client.send(node=node(), type_url=resource.CLUSTER)
    assert await client.nothing()
    env.cache.set_snapshot(GROUP, snapshot({"a": (1,)}))
    response = await client.recv()
    assert names(response, cluster_pb2.Cluster) == ["a"]
    await client.close()


async def test_change_pushes_clusters_then_only_what_changed(env: Env) -> None:
    env.cache.set_snapshot(GROUP, snapshot({"a": (1,), "b": (2,)}))
    client = env.client()
    await client.send(node=node(), type_url=resource.CLUSTER)
    cds = await client.recv()
    await client.ack(cds)
    await client.send(type_url=resource.ENDPOINT, resource_names=["a", "b"])
    eds = await client.recv()
    await client.ack(eds, resource_names=["a", "b"])
    assert await client.nothing()

    # One endpoint of b changes: one partial EDS response with b alone, no CDS.
    env.cache.set_snapshot(GROUP, snapshot({"a": (1,), "b": (2, 3)}))
    update = await client.recv()
    assert update.type_url == resource.ENDPOINT
    assert names(update, endpoint_pb2.ClusterLoadAssignment) == ["b"]
    await client.ack(update, resource_names=["a", "b"])

    # A new cluster: CDS (whole set) first; its endpoints when Envoy asks for them.
    env.cache.set_snapshot(GROUP, snapshot({"a": (1,), "b": (2, 3), "c": (4,)}))
    cds2 = await client.recv()
    assert cds2.type_url == resource.CLUSTER
    assert sorted(names(cds2, cluster_pb2.Cluster)) == ["a", "b", "c"]
    await client.ack(cds2)
    assert await client.nothing()
    await client.ack(update, resource_names=["a", "b", "c"])
    eds_c = await client.recv()
    assert names(eds_c, endpoint_pb2.ClusterLoadAssignment) == ["c"]
    await client.close()


async def test_changed_cluster_gets_its_endpoints_again(env: Env) -> None:
    first = snapshot({"a": (1,), "b": (2,)})
    env.cache.set_snapshot(GROUP, first)
    client = env.client()
    await client.send(node=node(), type_url=resource.CLUSTER)
    await client.ack(await client.recv())
    await client.send(type_url=resource.ENDPOINT, resource_names=["a", "b"])
    eds = await client.recv()
    await client.ack(eds, resource_names=["a", "b"])
    # Cluster a itself changes (not its endpoints): Envoy re-warms it and waits for EDS.
    tweaked = make_cluster("a")
    tweaked.connect_timeout.seconds = 3
    named = {t: [(n, r.message) for n, r in s.resources.items()] for t, s in first.types.items()}
    named[resource.CLUSTER] = [("a", tweaked), ("b", make_cluster("b"))]
    env.cache.set_snapshot(GROUP, build_snapshot(named, reuse=first))
    cds, eds2 = await client.recv(), await client.recv()
    assert cds.type_url == resource.CLUSTER
    assert (eds2.type_url, names(eds2, endpoint_pb2.ClusterLoadAssignment)) == (
        resource.ENDPOINT, ["a"])
    await client.close()


async def test_nack_is_recorded_and_not_answered_with_the_same_config(env: Env) -> None:
    env.cache.set_snapshot(GROUP, snapshot({"a": (1,)}))
    client = env.client()
    await client.send(node=node(), type_url=resource.CLUSTER)
    cds = await client.recv()
    await client.nack(cds, message="bad cluster a")
    assert await client.nothing()
    [stream] = env.registry.describe()
    assert stream["types"]["cds"]["last_nack"]["error"] == "bad cluster a"
    assert stream["types"]["cds"]["last_nack"]["version"] == cds.version_info
    assert stream["types"]["cds"]["acked_version"] == ""
    # A new snapshot is sent.
    env.cache.set_snapshot(GROUP, snapshot({"a": (1,), "c": (3,)}))
    fixed = await client.recv()
    assert fixed.version_info != cds.version_info
    await client.close()


async def test_stale_nonce_is_ignored(env: Env) -> None:
    env.cache.set_snapshot(GROUP, snapshot({"a": (1,), "b": (2,)}))
    client = env.client()
    await client.send(node=node(), type_url=resource.CLUSTER)
    cds = await client.recv()
    await client.ack(cds)
    await client.send(type_url=resource.ENDPOINT, resource_names=["a"])
    first = await client.recv()
    env.cache.set_snapshot(GROUP, snapshot({"a": (1, 5), "b": (2,)}))
    second = await client.recv()
    assert second.type_url == resource.ENDPOINT and second.nonce != first.nonce
    # A request answering the older nonce, asking for more, is stale: no answer.
    await client.send(type_url=resource.ENDPOINT, response_nonce=first.nonce,
                      version_info=first.version_info, resource_names=["a", "b"])
    assert await client.nothing()
    await client.close()


async def test_named_subscriptions_and_resubscription(env: Env) -> None:
    env.cache.set_snapshot(GROUP, snapshot({"a": (1,), "b": (2,)}))
    client = env.client()
    await client.send(node=node(), type_url=resource.ENDPOINT, resource_names=["a"])
    eds = await client.recv()
    assert names(eds, endpoint_pb2.ClusterLoadAssignment) == ["a"]
    await client.ack(eds, resource_names=["a", "b"])  # newly requested: answered although unchanged
    eds2 = await client.recv()
    assert names(eds2, endpoint_pb2.ClusterLoadAssignment) == ["b"]
    await client.ack(eds2, resource_names=["a"])  # unsubscribe b: nothing to send
    assert await client.nothing()
    eds3_request_nonce = eds2
    await client.ack(eds3_request_nonce, resource_names=["a", "b"])  # b again: sent again
    eds3 = await client.recv()
    assert names(eds3, endpoint_pb2.ClusterLoadAssignment) == ["b"]
    await client.close()


async def test_subscription_to_a_missing_name_is_pushed_when_it_appears(env: Env) -> None:
    env.cache.set_snapshot(GROUP, snapshot({"a": (1,)}))
    client = env.client()
    await client.send(node=node(), type_url=resource.ENDPOINT, resource_names=["later"])
    empty = await client.recv()
    assert list(empty.resources) == []
    await client.ack(empty, resource_names=["later"])
    env.cache.set_snapshot(GROUP, snapshot({"a": (1,), "later": (9,)}))
    response = await client.recv()
    assert names(response, endpoint_pb2.ClusterLoadAssignment) == ["later"]
    await client.close()


async def test_explicit_wildcard_mixed_with_names(env: Env) -> None:
    env.cache.set_snapshot(GROUP, snapshot({"a": (1,), "b": (2,)}))
    client = env.client()
    await client.send(node=node(), type_url=resource.CLUSTER, resource_names=["*", "a"])
    response = await client.recv()
    assert sorted(names(response, cluster_pb2.Cluster)) == ["a", "b"]
    await client.close()


async def test_unknown_type_is_ignored_and_the_stream_lives(env: Env) -> None:
    env.cache.set_snapshot(GROUP, snapshot({"a": (1,)}))
    client = env.client()
    await client.send(node=node(), type_url="type.googleapis.com/envoy.service.runtime.v3.Runtime")
    assert await client.nothing()
    await client.send(type_url=resource.CLUSTER)
    assert (await client.recv()).type_url == resource.CLUSTER
    [stream] = env.registry.describe()
    assert stream["unknown_types"] == ["type.googleapis.com/envoy.service.runtime.v3.Runtime"]
    await client.close()


async def test_request_without_type_url_on_ads_is_an_error(env: Env) -> None:
    client = env.client()
    await client.send(node=node())
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await client.call.read()
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "type_url" in (info.value.details() or "")
    await client.close()


async def test_first_request_without_node_is_an_error(env: Env) -> None:
    client = env.client()
    await client.send(type_url=resource.CLUSTER)
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await client.call.read()
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "node" in (info.value.details() or "")


async def test_node_only_on_first_message(env: Env) -> None:
    env.cache.set_snapshot(GROUP, snapshot({"a": (1,)}))
    client = env.client()
    await client.send(node=node(), type_url=resource.CLUSTER)
    cds = await client.recv()
    await client.ack(cds)
    await client.send(type_url=resource.LISTENER)  # no node: the stream's node still counts
    assert (await client.recv()).type_url == resource.LISTENER
    await client.close()


async def test_removed_cluster_stays_until_routes_stop_using_it(env: Env) -> None:
    env.cache.set_snapshot(GROUP, snapshot({"a": (1,), "b": (2,)}))
    client = env.client()
    await client.send(node=node(), type_url=resource.CLUSTER)
    cds = await client.recv()
    await client.ack(cds)
    await client.send(type_url=resource.LISTENER)
    lds = await client.recv()
    await client.ack(lds)
    await client.send(type_url=resource.ROUTE, resource_names=["egress"])
    rds = await client.recv()
    await client.ack(rds, resource_names=["egress"])

    env.cache.set_snapshot(GROUP, snapshot({"a": (1,)}))
    pushes = [await client.recv() for _ in range(3)]
    assert [p.type_url for p in pushes] == [resource.CLUSTER, resource.ROUTE, resource.CLUSTER]
    assert sorted(names(pushes[0], cluster_pb2.Cluster)) == ["a", "b"]  # b held
    assert names(pushes[2], cluster_pb2.Cluster) == ["a"]  # released after the routes
    assert pushes[2].version_info == env.cache.get(GROUP).get(resource.CLUSTER).version
    await client.close()


async def test_stream_state_is_released_on_disconnect(env: Env) -> None:
    env.cache.set_snapshot(GROUP, snapshot({"a": (1,)}))
    clients = [env.client() for _ in range(5)]
    for i, client in enumerate(clients):
        await client.send(node=node(f"p{i}"), type_url=resource.CLUSTER)
        await client.recv()
    assert len(env.registry) == 5
    for client in clients:
        await client.close()
    for _ in range(50):
        if len(env.registry) == 0:
            break
        await asyncio.sleep(0.05)
    assert len(env.registry) == 0


async def test_per_type_service_accepts_empty_type_url(env: Env) -> None:
    from envoy.service.cluster.v3 import cds_pb2_grpc
    from envoy.service.discovery.v3 import discovery_pb2

    env.cache.set_snapshot(GROUP, snapshot({"a": (1,)}))
    stub = cds_pb2_grpc.ClusterDiscoveryServiceStub(env.channel)
    call = stub.StreamClusters()
    await call.write(discovery_pb2.DiscoveryRequest(node=node()))
    response = await call.read()
    assert response.type_url == resource.CLUSTER
    call.cancel()
    fetched = await stub.FetchClusters(discovery_pb2.DiscoveryRequest(node=node()))
    assert names(fetched, cluster_pb2.Cluster) == ["a"]


def test_versions_are_content_hashes() -> None:
    one, two = snapshot({"a": (1,), "b": (2,)}), snapshot({"b": (2,), "a": (1,)})
    assert one.version == two.version
    assert one.versions() == two.versions()
    three = snapshot({"a": (1,), "b": (3,)}, reuse=one)
    assert three.get(resource.CLUSTER) is one.get(resource.CLUSTER)  # untouched type reused
    assert three.get(resource.ENDPOINT).version != one.get(resource.ENDPOINT).version
    # unchanged resources keep their encoded bytes
    assert three.get(resource.ENDPOINT).resources["a"] is one.get(resource.ENDPOINT).resources["a"]


def test_inconsistent_snapshot_is_refused() -> None:
    cache = SnapshotCache()
    broken = snapshot({"a": (1,)}, routed=("a", "missing"))
    with pytest.raises(TranslationError, match="missing cluster 'missing'"):
        cache.set_snapshot(GROUP, broken)
    assert cache.get(GROUP) is None


async def test_names_that_are_not_utf8_end_the_stream_with_invalid_argument(env: Env) -> None:
    """Requests are read without their names (an ACK repeats them all); names that do
    not parse are still refused, when they are read."""
    call = env.channel.stream_stream(
        "/envoy.service.discovery.v3.AggregatedDiscoveryService/StreamAggregatedResources",
        request_serializer=None, response_deserializer=None)()
    first = discovery_pb2.DiscoveryRequest(node=node(), type_url=resource.ENDPOINT)
    await call.write(first.SerializeToString() + b"\x1a\x02\xff\xfe")  # resource_names: 2 bad bytes
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await call.read()
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "resource_names" in (info.value.details() or "")
