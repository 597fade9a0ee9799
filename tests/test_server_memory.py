"""What a stream costs the server stays small at a thousand streams: an ACK that
repeats its thousand names is not read again, streams that ask for the same names
share one set, a written response is not kept, and streams end quietly when the
server stops. Real gRPC streams against the real server; counts, identities and
allocations, never timings."""

from __future__ import annotations

import asyncio
import os
import tracemalloc
from collections.abc import Callable
from typing import Any

import grpc
import pytest
from structlog.testing import capture_logs

from controlplane import resource
from controlplane.cache import SnapshotCache
from controlplane.cache.snapshot import Snapshot
from controlplane.proxy import ProxyIdentity
from controlplane.server import (
    StreamRegistry,
    XdsServer,
    create_server,
    limits,
    requests,
    sotw,
    stream,
)
from controlplane.server.sotw import SotwStream
from tests.conftest import Env
from tests.support.snapshots import snapshot
from tests.support.xds_client import AdsClient, node

pytestmark = pytest.mark.timeout(120)

GROUP = ProxyIdentity(node_id="x", service="frontend").group
NAMES = [f"outbound|9080||svc-{i:04d}.default.svc.cluster.local" for i in range(1000)]


def mesh(port: int, reuse: Snapshot | None = None) -> Snapshot:
    """1,000 clusters with their endpoints; the first one's endpoint on ``port``."""
    return snapshot({n: (port if i == 0 else 20000 + i,) for i, n in enumerate(NAMES)},
                    reuse=reuse)


async def until(condition: Callable[[], bool], what: str) -> None:
    for _ in range(400):  # bounded: 20 s
        if condition():
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"never happened: {what}")


def acked(env: Env, count: int, short: str, version: str) -> Callable[[], bool]:
    def check() -> bool:
        streams = env.registry.describe()
        return len(streams) == count and all(
            s["types"].get(short, {}).get("acked_version") == version for s in streams)
    return check


async def subscribe_eds(client: AdsClient, node_id: str) -> None:
    await client.send(node=node(node_id), type_url=resource.CLUSTER)
    await client.ack(await client.recv())
    await client.send(type_url=resource.ENDPOINT, resource_names=NAMES)
    await client.ack(await client.recv(), resource_names=NAMES)


async def test_acks_repeating_a_thousand_names_rebuild_nothing_and_streams_share_them(
        env: Env, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[str] = []

    def counted(name: str, original: Callable[..., Any]) -> Callable[..., Any]:
        def wrapper(*args: Any) -> Any:
            calls.append(name)
            return original(*args)
        return wrapper

    monkeypatch.setattr(sotw, "_update_subscription",
                        counted("subscription", sotw._update_subscription))
    monkeypatch.setattr(sotw, "check_names", counted("check", limits.check_names))
    monkeypatch.setattr(sotw, "read_request", counted("parse", requests.read_request))
    current = mesh(60000)
    env.cache.set_snapshot(GROUP, current)
    clients = [env.client(), env.client()]
    for i, client in enumerate(clients):
        await subscribe_eds(client, f"p{i}")
    [one], [two] = env.registry.by_node("p0"), env.registry.by_node("p1")
    assert isinstance(one, SotwStream) and isinstance(two, SotwStream)
    assert one.types[resource.ENDPOINT].subscribed == frozenset(NAMES)
    assert one.types[resource.ENDPOINT].subscribed is two.types[resource.ENDPOINT].subscribed

    version = current.types[resource.ENDPOINT].version
    await until(acked(env, 2, "eds", version), "both streams ACKed their endpoints")
    calls.clear()
    for change in range(10):  # 10 endpoint changes, each ACKed by both with 1000 names
        current = mesh(60001 + change, reuse=current)
        env.cache.set_snapshot(GROUP, current)
        for client in clients:
            update = await client.recv()
            assert update.type_url == resource.ENDPOINT and len(update.resources) == 1
            await client.ack(update, resource_names=NAMES)
        # (An ACK read after the next push would be stale, and stale requests are parsed.)
        version = current.types[resource.ENDPOINT].version
        await until(acked(env, 2, "eds", version), "both streams ACKed the change")
    assert calls == []  # 20 ACKs of 1000 names: none parsed, no set built, no name checked

    # A changed subscription is still seen: one more name, and the set is no longer shared.
    await clients[0].send(type_url=resource.ENDPOINT, version_info=version,
                          response_nonce=one.types[resource.ENDPOINT].nonce,
                          resource_names=[*NAMES, "later"])
    assert list((await clients[0].recv()).resources) == []  # "later" does not exist yet
    assert calls == ["parse", "check", "subscription"]
    assert "later" in one.types[resource.ENDPOINT].subscribed
    assert "later" not in two.types[resource.ENDPOINT].subscribed
    for client in clients:
        await client.close()


async def test_a_written_response_is_not_kept(env: Env) -> None:
    current = mesh(60000)
    env.cache.set_snapshot(GROUP, current)
    routes_version = current.types[resource.ROUTE].version
    largest = max(t.size for t in current.types.values())
    clients = [env.client() for _ in range(10)]
    tracemalloc.start()
    try:
        for i, client in enumerate(clients):  # CDS, LDS, RDS: ~100 KB responses each
            await client.send(node=node(f"p{i}"), type_url=resource.CLUSTER)
            await client.ack(await client.recv())
            await client.send(type_url=resource.LISTENER)
            await client.ack(await client.recv())
            await client.send(type_url=resource.ROUTE, resource_names=["egress"])
            await client.ack(await client.recv(), resource_names=["egress"])
        await until(acked(env, 10, "rds", routes_version), "every stream ACKed its routes")
        taken = tracemalloc.take_snapshot()
    finally:
        tracemalloc.stop()
    server_code = os.path.join(os.path.dirname(stream.__file__), "*")
    encoded = taken.filter_traces([tracemalloc.Filter(True, server_code)])
    kept = sum(s.size for s in encoded.statistics("filename"))
    assert largest > 50_000
    assert kept < largest, f"{kept} bytes of 30 written responses are still held"
    for client in clients:
        await client.close()


async def test_streams_end_quietly_when_the_server_stops() -> None:
    """The server's own shutdown (gRPC stops with a grace, then every stream is asked
    to end) while the clients are leaving too: some calls are over before their
    stream ends them."""
    cache = SnapshotCache()
    registry = StreamRegistry()
    xds = XdsServer(cache, registry)
    server, port = await create_server("127.0.0.1:0", xds)
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    cache.set_snapshot(GROUP, snapshot({"a": (1,)}))
    clients = [AdsClient(channel) for _ in range(50)]
    for i, client in enumerate(clients):
        await client.send(node=node(f"p{i}"), type_url=resource.CLUSTER)
        await client.ack(await client.recv())
    with capture_logs() as logs:
        for client in clients[::2]:
            client.call.cancel()
        stopping = asyncio.ensure_future(server.stop(1))
        xds.shutdown()
        await stopping
        await until(lambda: len(registry) == 0, "every stream ended")
    assert not [e for e in logs if e["log_level"] in ("error", "critical") or "exc_info" in e]
    assert not [e for e in logs if e["event"] == "xds.stream_failed"]
    for client in clients:
        await client.close()
    await channel.close()


@pytest.mark.parametrize("version", ["", "v", "0123456789abcdef", "x" * 300])
def test_the_hand_encoded_response_header_is_what_protobuf_encodes(version: str) -> None:
    from envoy.config.core.v3 import base_pb2
    from envoy.service.discovery.v3 import discovery_pb2

    sotw_stream = SotwStream(1, "ads", identifier="controlplane-" + "y" * 200)
    for nonce in ("1", "1" * 130):
        header = sotw_stream._header(version, resource.ENDPOINT, nonce)
        assert header == discovery_pb2.DiscoveryResponse(
            version_info=version, type_url=resource.ENDPOINT, nonce=nonce,
            control_plane=base_pb2.ControlPlane(identifier="controlplane-" + "y" * 200),
        ).SerializeToString()
