"""The stream hook (server/observer.py): every ACK (SotW quick or parsed, delta), every
NACK and every stream's end reaches the observers; an observer that raises is logged and
neither the stream nor the other observers notice."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import grpc
import pytest
from structlog.testing import capture_logs

from controlplane import resource
from controlplane.cache import SnapshotCache
from controlplane.proxy import ProxyIdentity
from controlplane.server import StreamRegistry, XdsServer, create_server
from controlplane.server.observer import fan_out
from controlplane.server.stream import StreamBase
from tests.support.snapshots import snapshot
from tests.support.xds_client import AdsClient, node

GROUP = ProxyIdentity(node_id="x", service="frontend").group


@dataclass
class Recorder:
    """Writes down what it is told, with what the stream held at that moment."""

    calls: list[tuple[str, str, str]] = field(default_factory=list)

    def acked(self, stream: StreamBase, type_url: str) -> None:
        version = stream.type_states()[type_url].acked_version
        self.calls.append(("acked", resource.short_name(type_url), version))

    def nacked(self, stream: StreamBase, type_url: str, error: str) -> None:
        nack = stream.type_states()[type_url].last_nack
        assert nack is not None and nack.error == error
        self.calls.append(("nacked", resource.short_name(type_url), error))

    def closed(self, stream: StreamBase) -> None:
        assert stream.proxy is not None
        self.calls.append(("closed", stream.proxy.node_id, ""))


class Broken:
    def acked(self, stream: StreamBase, type_url: str) -> None:
        raise RuntimeError("broken observer")

    nacked = closed = acked  # type: ignore[assignment]


@dataclass
class Rig:
    cache: SnapshotCache
    channel: grpc.aio.Channel
    recorder: Recorder


@pytest.fixture
async def rig() -> AsyncIterator[Rig]:
    cache, recorder = SnapshotCache(), Recorder()
    xds = XdsServer(cache, StreamRegistry(), observers=[Broken(), recorder])
    server, port = await create_server("127.0.0.1:0", xds)
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    yield Rig(cache, channel, recorder)
    await channel.close()
    await server.stop(0)


async def _until(recorder: Recorder, count: int) -> None:
    for _ in range(100):
        if len(recorder.calls) >= count:
            return
        await asyncio.sleep(0.02)
    raise AssertionError(f"expected {count} observer calls, got {recorder.calls}")


async def test_sotw_acks_quick_and_parsed_nack_and_close(rig: Rig) -> None:
    rig.cache.set_snapshot(GROUP, snapshot({"a": (1,)}))
    client = AdsClient(rig.channel)
    with capture_logs() as logs:
        await client.send(node=node("x"), type_url=resource.CLUSTER)
        first = await client.recv()
        await client.ack(first)  # parsed: the names changed since the last request
        await _until(rig.recorder, 1)  # (else the next push makes this ACK stale)
        rig.cache.set_snapshot(GROUP, snapshot({"a": (1,), "b": (2,)}))
        second = await client.recv()
        await client.ack(second)  # byte for byte the ACK of the last push: the quick way
        await _until(rig.recorder, 2)
        rig.cache.set_snapshot(GROUP, snapshot({"a": (1,), "b": (2,), "c": (3,)}))
        third = await client.recv()
        await client.nack(third, message="bad cluster c")
        await _until(rig.recorder, 3)
        assert await client.nothing(0.2)  # the stream is still fine
        await client.close()
        await _until(rig.recorder, 4)
    assert rig.recorder.calls == [
        ("acked", "cds", first.version_info),
        ("acked", "cds", second.version_info),
        ("nacked", "cds", "bad cluster c"),
        ("closed", "x", ""),
    ]
    failed = [e for e in logs if e["event"] == "xds.observer_failed"]
    assert failed and failed[0]["observer"] == "Broken" and failed[0]["log_level"] == "error"


async def test_delta_ack_and_nack(rig: Rig) -> None:
    rig.cache.set_snapshot(GROUP, snapshot({"a": (1,)}))
    client = AdsClient(rig.channel, delta=True)
    await client.send(node=node("x"), type_url=resource.CLUSTER)
    first = await client.recv()
    await client.ack(first)
    await _until(rig.recorder, 1)
    rig.cache.set_snapshot(GROUP, snapshot({"a": (1,), "b": (2,)}))
    second = await client.recv()
    await client.nack(second, message="no")
    await _until(rig.recorder, 2)
    version = rig.cache.get(GROUP).get(resource.CLUSTER).version
    assert rig.recorder.calls[0][:2] == ("acked", "cds") and rig.recorder.calls[0][2]
    assert rig.recorder.calls[1] == ("nacked", "cds", "no")
    assert rig.recorder.calls[0][2] != version  # the first snapshot's, not the second's
    await client.close()


def test_no_observers_is_none() -> None:
    assert fan_out([]) is None
