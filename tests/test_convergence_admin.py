"""/debug/changes and the per-stream convergence entry of /debug/proxies, through the
real admin server: loopback only like every /debug/ view, a clear 404 on a server that
does not follow changes."""

from __future__ import annotations

import time

import aiohttp
import pytest
from envoy.service.discovery.v3 import discovery_pb2

from controlplane import resource
from controlplane.admin import AdminState, start_admin
from controlplane.cache import SnapshotCache
from controlplane.observe.changes import changed_types
from controlplane.observe.convergence import Convergence
from controlplane.server import StreamRegistry
from tests.support.snapshots import snapshot
from tests.test_admin import NODE_ID, Ready, connect, routable_address


async def test_changes_and_proxies_show_convergence_on_loopback_only() -> None:
    registry, cache = StreamRegistry(), SnapshotCache()
    stream = connect(registry, NODE_ID)
    assert stream.proxy is not None
    tracker = Convergence(registry.streams)
    first = snapshot({"a": (1,)})
    [push] = stream.on_snapshot(first)
    tracker.published(1, time.time() - 0.01, {stream.proxy.group: changed_types(None, first)})
    stream.on_request(discovery_pb2.DiscoveryRequest(
        type_url=resource.CLUSTER, version_info=push.version, response_nonce=push.nonce))
    tracker.acked(stream, resource.CLUSTER)
    runner, port = await start_admin(AdminState(registry, cache, Ready(True, "ready"),
                                                convergence=tracker), "0.0.0.0", 0)
    try:
        async with aiohttp.ClientSession() as session:
            async with session.get(f"http://127.0.0.1:{port}/debug/changes") as response:
                assert response.status == 200
                [change] = (await response.json())["changes"]
            assert change["generation"] == 1 and change["complete"]
            assert change["acked"] == 1 and 0.01 <= change["seconds"]["max"] < 60
            async with session.get(f"http://127.0.0.1:{port}/debug/proxies") as response:
                [proxy] = await response.json()
            assert proxy["convergence"]["generation"] == 1
            async with session.get(f"http://127.0.0.1:{port}/") as response:
                assert "/debug/changes" in await response.text()
            address = routable_address()
            if address is None:
                pytest.skip("this host has no non-loopback IPv4 address to connect from")
            async with session.get(f"http://{address}:{port}/debug/changes") as response:
                assert response.status == 403
                assert "only on loopback" in (await response.json())["error"]
    finally:
        await runner.cleanup()


async def test_changes_without_a_tracker_say_where_to_look() -> None:
    runner, port = await start_admin(
        AdminState(StreamRegistry(), SnapshotCache(), Ready(True, "ready")), "127.0.0.1", 0)
    try:
        async with aiohttp.ClientSession() as session, \
                session.get(f"http://127.0.0.1:{port}/debug/changes") as response:
            assert response.status == 404
            assert "/debug/proxies" in (await response.json())["error"]
    finally:
        await runner.cleanup()
