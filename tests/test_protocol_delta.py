"""Incremental (delta) ADS, driven by a raw gRPC client (shared/XDS-PITFALLS.md)."""

from __future__ import annotations

from envoy.config.cluster.v3 import cluster_pb2
from envoy.service.discovery.v3 import discovery_pb2

from controlplane import resource
from tests.conftest import Env
from tests.support.snapshots import snapshot
from tests.support.xds_client import node
from tests.test_protocol_sotw import GROUP


def sent(response: discovery_pb2.DeltaDiscoveryResponse) -> list[str]:
    return sorted(r.name for r in response.resources)


async def test_wildcard_initial_then_ack_is_quiet(env: Env) -> None:
    env.cache.set_snapshot(GROUP, snapshot({"a": (1,), "b": (2,)}))
    client = env.client(delta=True)
    await client.send(node=node(), type_url=resource.CLUSTER)
    response = await client.recv()
    assert sent(response) == ["a", "b"]
    assert response.system_version_info == env.cache.get(GROUP).get(resource.CLUSTER).version
    first = cluster_pb2.Cluster()
    response.resources[0].resource.Unpack(first)
    assert first.name == response.resources[0].name
    assert response.resources[0].version
    await client.ack(response)
    assert await client.nothing()
    await client.close()


async def test_only_changes_are_sent_and_removals_come_last(env: Env) -> None:
    env.cache.set_snapshot(GROUP, snapshot({"a": (1,), "b": (2,)}))
    client = env.client(delta=True)
    await client.send(node=node(), type_url=resource.CLUSTER)
    await client.ack(await client.recv())
    await client.send(type_url=resource.ROUTE, resource_names_subscribe=["egress"])
    await client.ack(await client.recv())

    env.cache.set_snapshot(GROUP, snapshot({"a": (1,), "c": (3,)}))
    added = await client.recv()
    assert added.type_url == resource.CLUSTER and sent(added) == ["c"]
    assert list(added.removed_resources) == []
    routes = await client.recv()
    assert routes.type_url == resource.ROUTE
    removal = await client.recv()
    assert removal.type_url == resource.CLUSTER
    assert list(removal.removed_resources) == ["b"] and sent(removal) == []
    await client.close()


async def test_missing_names_are_answered_as_removed_then_sent_when_they_appear(env: Env) -> None:
    env.cache.set_snapshot(GROUP, snapshot({"a": (1,)}))
    client = env.client(delta=True)
    await client.send(node=node(), type_url=resource.ENDPOINT,
                      resource_names_subscribe=["a", "ghost"])
    response = await client.recv()
    assert sent(response) == ["a"]
    assert list(response.removed_resources) == ["ghost"]
    await client.ack(response)
    assert await client.nothing()
    env.cache.set_snapshot(GROUP, snapshot({"a": (1,), "ghost": (7,)}))
    appeared = await client.recv()
    assert sent(appeared) == ["ghost"]
    await client.close()


async def test_unsubscribe_then_resubscribe_sends_again(env: Env) -> None:
    env.cache.set_snapshot(GROUP, snapshot({"a": (1,), "b": (2,)}))
    client = env.client(delta=True)
    await client.send(node=node(), type_url=resource.ENDPOINT,
                      resource_names_subscribe=["a", "b"])
    response = await client.recv()
    assert sent(response) == ["a", "b"]
    await client.ack(response)
    await client.send(type_url=resource.ENDPOINT, resource_names_unsubscribe=["b"])
    assert await client.nothing()
    await client.send(type_url=resource.ENDPOINT, resource_names_subscribe=["b"])
    again = await client.recv()
    assert sent(again) == ["b"]
    await client.close()


async def test_subscription_change_counts_even_with_a_stale_nonce(env: Env) -> None:
    env.cache.set_snapshot(GROUP, snapshot({"a": (1,), "b": (2,)}))
    client = env.client(delta=True)
    await client.send(node=node(), type_url=resource.ENDPOINT, resource_names_subscribe=["a"])
    await client.recv()
    await client.send(type_url=resource.ENDPOINT, response_nonce="not-a-nonce",
                      resource_names_subscribe=["b"])
    response = await client.recv()
    assert sent(response) == ["b"]
    await client.close()


async def test_reconnect_with_initial_versions_sends_only_the_difference(env: Env) -> None:
    env.cache.set_snapshot(GROUP, snapshot({"a": (1,), "b": (2,)}))
    client = env.client(delta=True)
    await client.send(node=node(), type_url=resource.CLUSTER)
    held = {r.name: r.version for r in (await client.recv()).resources}
    await client.close()

    # While the proxy is away: b is deleted, c is added, a stays.
    env.cache.set_snapshot(GROUP, snapshot({"a": (1,), "c": (3,)}))
    back = env.client(delta=True)
    await back.send(node=node(), type_url=resource.CLUSTER, initial_resource_versions=held)
    response = await back.recv()
    assert sent(response) == ["c"]
    assert list(response.removed_resources) == ["b"]
    await back.close()

    # Reconnect holding exactly what is served: nothing to send.
    current = env.cache.get(GROUP).get(resource.CLUSTER)
    same = env.client(delta=True)
    await same.send(node=node(), type_url=resource.CLUSTER,
                    initial_resource_versions={n: r.version for n, r in current.resources.items()})
    assert await same.nothing()
    await same.close()


async def test_nack_is_recorded_and_not_resent(env: Env) -> None:
    env.cache.set_snapshot(GROUP, snapshot({"a": (1,)}))
    client = env.client(delta=True)
    await client.send(node=node(), type_url=resource.CLUSTER)
    response = await client.recv()
    await client.nack(response, message="cluster a: bad lb policy")
    assert await client.nothing()
    [stream] = env.registry.describe()
    assert stream["protocol"] == "delta"
    assert stream["types"]["cds"]["last_nack"]["error"] == "cluster a: bad lb policy"
    await client.close()


async def test_explicit_wildcard_and_its_removal(env: Env) -> None:
    env.cache.set_snapshot(GROUP, snapshot({"a": (1,), "b": (2,)}))
    client = env.client(delta=True)
    await client.send(node=node(), type_url=resource.CLUSTER, resource_names_subscribe=["a"])
    response = await client.recv()
    assert sent(response) == ["a"]
    await client.ack(response)
    await client.send(type_url=resource.CLUSTER, resource_names_subscribe=["*"])
    assert sent(await client.recv()) == ["b"]
    await client.close()


async def test_updated_cluster_gets_its_endpoints_again(env: Env) -> None:
    first = snapshot({"a": (1,)})
    env.cache.set_snapshot(GROUP, first)
    client = env.client(delta=True)
    await client.send(node=node(), type_url=resource.CLUSTER)
    await client.ack(await client.recv())
    await client.send(type_url=resource.ENDPOINT, resource_names_subscribe=["a"])
    await client.ack(await client.recv())
    # Change cluster "a" itself (not its endpoints): endpoints must follow the cluster.
    changed = snapshot({"a": (1,)})
    from controlplane.cache.snapshot import build_snapshot
    from tests.support.snapshots import cluster as make_cluster
    tweaked = make_cluster("a")
    tweaked.connect_timeout.seconds = 3
    named = {t: [(n, r.message) for n, r in s.resources.items()] for t, s in changed.types.items()}
    named[resource.CLUSTER] = [("a", tweaked)]
    env.cache.set_snapshot(GROUP, build_snapshot(named, reuse=first))
    cds = await client.recv()
    eds = await client.recv()
    assert (cds.type_url, sent(cds)) == (resource.CLUSTER, ["a"])
    assert (eds.type_url, sent(eds)) == (resource.ENDPOINT, ["a"])
    await client.close()
