"""Bounds on what an xDS client controls, each refused over a real gRPC stream with a
status that says what to do; and a client leaving mid-write is a normal event."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass

import grpc
import pytest
from envoy.config.core.v3 import base_pb2
from envoy.service.discovery.v3 import ads_pb2_grpc, discovery_pb2
from prometheus_client import REGISTRY
from structlog.testing import capture_logs

from controlplane import resource
from controlplane.cache import SnapshotCache
from controlplane.proxy import ProxyIdentity
from controlplane.server import StreamRegistry, XdsServer, create_server
from controlplane.server.limits import Limits
from tests.support.snapshots import snapshot
from tests.support.xds_client import AdsClient, node

pytestmark = pytest.mark.timeout(60)

GROUP = ProxyIdentity(node_id="x", service="frontend").group
LIMITS = Limits(max_node_id_bytes=64, max_node_bytes=2048, max_names_per_request=10,
                max_name_bytes=200, max_unknown_types=3, max_streams=4,
                log_lines_per_second=2)


@dataclass
class Limited:
    cache: SnapshotCache
    registry: StreamRegistry
    channel: grpc.aio.Channel
    xds: XdsServer

    def client(self, delta: bool = False) -> AdsClient:
        return AdsClient(self.channel, delta=delta)


@pytest.fixture
async def limited() -> AsyncIterator[Limited]:
    cache = SnapshotCache()
    registry = StreamRegistry()
    xds = XdsServer(cache, registry, limits=LIMITS)
    server, port = await create_server("127.0.0.1:0", xds)
    channel = grpc.aio.insecure_channel(
        f"127.0.0.1:{port}", options=[("grpc.max_receive_message_length", 1 << 28)])
    cache.set_snapshot(GROUP, snapshot({"a": (1,)}))
    yield Limited(cache, registry, channel, xds)
    await channel.close()
    await server.stop(0)


async def refused(client: AdsClient) -> grpc.aio.AioRpcError:
    """The status the server ended the stream with (reading until it does)."""
    for _ in range(20):
        if client.error is not None:
            return client.error
        await asyncio.sleep(0.05)
    with pytest.raises(grpc.aio.AioRpcError) as info:
        while True:
            await asyncio.wait_for(client.call.read(), 3)
    return info.value


@pytest.mark.parametrize("delta", [False, True], ids=["sotw", "delta"])
async def test_a_long_node_id_is_refused_before_it_is_logged(
    limited: Limited, delta: bool,
) -> None:
    client = limited.client(delta)
    with capture_logs() as logs:
        await client.send(node=node("n" * 10_000), type_url=resource.CLUSTER)
        error = await refused(client)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "node.id is 10000 bytes" in (error.details() or "")
    assert "short id" in (error.details() or "")
    assert not any("n" * 100 in str(entry) for entry in logs)  # never written out
    assert len(limited.registry) == 0 and limited.cache.groups() == {}
    await client.close()


async def test_big_node_metadata_is_refused(limited: Limited) -> None:
    client = limited.client()
    await client.send(node=node("p1", blob="x" * 5000), type_url=resource.CLUSTER)
    error = await refused(client)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "node.metadata" in (error.details() or "")
    await client.close()


async def test_a_long_cluster_or_zone_is_refused(limited: Limited) -> None:
    client = limited.client()
    big = base_pb2.Node(id="p1", cluster="c" * 100)
    await client.send(node=big, type_url=resource.CLUSTER)
    error = await refused(client)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "node.cluster" in (error.details() or "")
    await client.close()


def refusals(reason: str) -> float:
    return REGISTRY.get_sample_value("controlplane_xds_streams_refused_total",
                                     {"reason": reason}) or 0.0


@pytest.mark.parametrize("delta", [False, True], ids=["sotw", "delta"])
async def test_too_many_names_in_one_request(limited: Limited, delta: bool) -> None:
    before = refusals("names")
    client = limited.client(delta)
    names = [f"name-{i}" for i in range(11)]
    if delta:
        await client.send(node=node(), type_url=resource.ENDPOINT,
                          resource_names_subscribe=names)
    else:
        await client.send(node=node(), type_url=resource.ENDPOINT, resource_names=names)
    error = await refused(client)
    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "11 resource names in one request" in (error.details() or "")
    assert "wildcard" in (error.details() or "")
    assert refusals("names") == before + 1
    await client.close()


async def test_a_delta_reconnect_counts_its_initial_versions(limited: Limited) -> None:
    client = limited.client(delta=True)
    await client.send(node=node(), type_url=resource.CLUSTER,
                      initial_resource_versions={f"c{i}": "1" for i in range(11)})
    assert (await refused(client)).code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    await client.close()


async def test_a_huge_name_is_refused(limited: Limited) -> None:
    client = limited.client()
    await client.send(node=node(), type_url=resource.ENDPOINT, resource_names=["x" * 500])
    error = await refused(client)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "resource name of 500 characters" in (error.details() or "")
    await client.close()


async def test_unknown_types_are_bounded_per_stream_and_logged_within_a_budget(
    limited: Limited,
) -> None:
    before = REGISTRY.get_sample_value("controlplane_xds_requests_total",
                                       {"type": "unknown", "kind": "unknown_type"}) or 0
    client = limited.client()
    with capture_logs() as logs:
        await client.send(node=node(), type_url=resource.CLUSTER)
        await client.recv()
        for i in range(3):  # up to the limit: ignored, the stream lives
            await client.send(type_url=f"type.googleapis.com/made.up.Type{i}")
        await client.send(type_url="type.googleapis.com/made.up.Type0")  # known already
        assert await client.nothing(0.3)
        assert client.error is None
        await client.send(type_url="type.googleapis.com/made.up.Type3")  # one too many
        error = await refused(client)
    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "more than 3 type URLs" in (error.details() or "")
    # Two warnings a second at most: the rest are counted, not written.
    warnings = [e for e in logs if e["log_level"] == "warning"]
    assert [e["event"] for e in warnings] == ["xds.unknown_type", "xds.unknown_type"]
    [closed] = [e for e in logs if e["event"] == "xds.stream_closed"]
    assert closed["suppressed_logs"] == 3
    # The made-up URLs are not metric labels: one series for all of them.
    after = REGISTRY.get_sample_value("controlplane_xds_requests_total",
                                      {"type": "unknown", "kind": "unknown_type"})
    assert after == before + 4
    assert REGISTRY.get_sample_value("controlplane_xds_requests_total",
                                     {"type": "made.up.Type0", "kind": "unknown_type"}) is None
    await client.close()


async def test_nack_warnings_are_rate_limited_per_stream(limited: Limited) -> None:
    client = limited.client()
    with capture_logs() as logs:
        await client.send(node=node(), type_url=resource.CLUSTER)
        response = await client.recv()
        for _ in range(10):
            await client.nack(response, "rejected")
        await client.nothing(0.3)
        await client.close()
        for _ in range(40):
            if any(e["event"] == "xds.stream_closed" for e in logs):
                break
            await asyncio.sleep(0.05)
    assert len([e for e in logs if e["event"] == "xds.nack"]) == 2
    [closed] = [e for e in logs if e["event"] == "xds.stream_closed"]
    assert closed["suppressed_logs"] == 8


async def test_streams_beyond_the_cap_are_refused(limited: Limited) -> None:
    before = refusals("streams")
    clients = [limited.client() for _ in range(4)]
    for i, client in enumerate(clients):
        await client.send(node=node(f"p{i}"), type_url=resource.CLUSTER)
        await client.recv()
    extra = limited.client()
    try:  # the refusal may end the call before the request is even written
        await extra.send(node=node("p9"), type_url=resource.CLUSTER)
    except grpc.aio.AioRpcError as exc:
        error = exc
    else:
        error = await refused(extra)
    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "another replica" in (error.details() or "")
    assert refusals("streams") == before + 1
    await clients[0].close()
    for _ in range(40):  # a slot frees up when a stream ends
        if len(limited.registry) < 4:
            break
        await asyncio.sleep(0.05)
    again = limited.client()
    await again.send(node=node("p10"), type_url=resource.CLUSTER)
    assert (await again.recv()).type_url == resource.CLUSTER
    for client in (*clients, extra, again):
        await client.close()


async def test_a_client_that_leaves_during_a_write_is_an_info_line(limited: Limited) -> None:
    """The client stops reading while big responses pile up, then goes: no ERROR, no
    traceback, and its stream and group membership are released."""
    stub = ads_pb2_grpc.AggregatedDiscoveryServiceStub(limited.channel)
    with capture_logs() as logs:
        call = stub.StreamAggregatedResources()
        await call.write(discovery_pb2.DiscoveryRequest(node=node("slow"),
                                                        type_url=resource.CLUSTER))
        await call.write(discovery_pb2.DiscoveryRequest(type_url=resource.ENDPOINT))
        for i in range(30):  # ~30 pushes of a few hundred KB each; nobody reads them
            limited.cache.set_snapshot(GROUP, snapshot({f"c{i}-{j}": (i,) for j in range(2000)}))
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.3)
        call.cancel()
        for _ in range(100):
            if len(limited.registry) == 0:
                break
            await asyncio.sleep(0.05)
    assert len(limited.registry) == 0
    assert limited.cache.connected(GROUP) == 0
    events = {e["event"]: e for e in logs}
    assert "xds.stream_failed" not in events
    assert not [e for e in logs if e["log_level"] in ("error", "critical") or "exc_info" in e]
    assert events["xds.client_gone"]["log_level"] == "info"


async def test_shutdown_ends_streams_with_unavailable(limited: Limited) -> None:
    client = limited.client()
    await client.send(node=node(), type_url=resource.CLUSTER)
    await client.recv()
    limited.xds.shutdown()
    error = await refused(client)
    assert error.code() == grpc.StatusCode.UNAVAILABLE
    assert "reconnect" in (error.details() or "")
    late = limited.client()  # and no new stream is taken meanwhile
    try:  # refused before or after the request is written, depending on timing
        await late.send(node=node("late"), type_url=resource.CLUSTER)
        late_error = await refused(late)
    except grpc.aio.AioRpcError as exc:
        late_error = exc
    assert late_error.code() == grpc.StatusCode.UNAVAILABLE
    await client.close()
    await late.close()


async def test_metadata_the_server_reads_is_checked(limited: Limited) -> None:
    client = limited.client()
    await client.send(node=node("p1", namespace="n" * 100), type_url=resource.CLUSTER)
    error = await refused(client)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "node.metadata.namespace is 100 bytes" in (error.details() or "")
    await client.close()
    client = limited.client()
    await client.send(node=node("p2", inbound_address="localhost", inbound_port=15006,
                                app_port=9080), type_url=resource.CLUSTER)
    error = await refused(client)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "not an IP address" in (error.details() or "")
    await client.close()


@pytest.mark.parametrize("port", [float("inf"), float("nan"), 1e300, -5.0])
async def test_odd_port_numbers_in_metadata_do_not_break_the_stream(
    limited: Limited, port: float,
) -> None:
    client = limited.client()
    with capture_logs() as logs:
        await client.send(node=node("p1", egress_port=port, inbound_port=port, app_port=port),
                          type_url=resource.CLUSTER)
        response = await client.recv()  # the bootstrap defaults stand in for them
    assert response.type_url == resource.CLUSTER
    assert not [e for e in logs if e["log_level"] == "error"]
    [stream] = limited.registry.describe()
    assert stream["group"] == GROUP
    await client.close()


async def test_a_request_that_does_not_parse_is_invalid_argument(limited: Limited) -> None:
    before = refusals("malformed")
    for method in ("/envoy.service.discovery.v3.AggregatedDiscoveryService/"
                   "StreamAggregatedResources",
                   "/envoy.service.discovery.v3.AggregatedDiscoveryService/"
                   "DeltaAggregatedResources"):
        call = limited.channel.stream_stream(
            method, request_serializer=lambda b: b, response_deserializer=lambda b: b)()
        with capture_logs() as logs:
            await call.write(b"\xff\xff\xff\xff not protobuf")
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await asyncio.wait_for(call.read(), 5)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "not a valid" in (info.value.details() or "")
        assert not [e for e in logs if e["log_level"] == "error" or "exc_info" in e]
    assert refusals("malformed") == before + 2
    fetch = limited.channel.unary_unary(
        "/envoy.service.cluster.v3.ClusterDiscoveryService/FetchClusters",
        request_serializer=lambda b: b, response_deserializer=lambda b: b)
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await asyncio.wait_for(fetch(b"\xff\xff\xff"), 5)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_what_a_client_reports_is_kept_bounded(limited: Limited) -> None:
    """A NACK's error and an ACK's version are the client's text: kept short."""
    client = limited.client()
    await client.send(node=node(), type_url=resource.CLUSTER)
    response = await client.recv()
    await client.nack(response, "e" * 100_000)
    await client.nothing(0.2)
    [stream] = limited.registry.describe()
    assert len(stream["types"]["cds"]["last_nack"]["error"]) == 4096
    await client.send(type_url=resource.CLUSTER, version_info="v" * 10_000,
                      response_nonce=response.nonce)
    await client.nothing(0.2)
    [stream] = limited.registry.describe()
    assert len(stream["types"]["cds"]["acked_version"]) == 256
    await client.close()
    delta = limited.client(delta=True)
    await delta.send(node=node("d1"), type_url=resource.CLUSTER,
                     initial_resource_versions={"a": "v" * 1000})
    error = await refused(delta)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "send back the versions it sent" in (error.details() or "")
    await delta.close()


def test_the_write_turn_settings_reach_the_server_limits() -> None:
    from controlplane.app import limits
    from controlplane.cli import build_parser
    from controlplane.settings import ServeSettings

    args = build_parser().parse_args(["serve", "--max-large-writes", "3",
                                      "--large-write-bytes", "1000",
                                      "--large-write-turn-seconds", "0.5"])
    settings = ServeSettings(source="file:x.yaml", max_large_writes=args.max_large_writes,
                             large_write_bytes=args.large_write_bytes,
                             large_write_turn_seconds=args.large_write_turn_seconds)
    bounds = limits(settings)
    assert (bounds.max_large_writes, bounds.large_write_bytes,
            bounds.large_write_turn_seconds) == (3, 1000, 0.5)
