"""The admin server over real HTTP, with a real cache, registry and xDS stream behind it;
readiness and metrics from a real pipeline and real gRPC pushes."""

from __future__ import annotations

import asyncio
import socket
import threading
import time
import urllib.request
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import grpc
import pytest
from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.core.v3 import base_pb2, config_source_pb2
from envoy.config.endpoint.v3 import endpoint_components_pb2, endpoint_pb2
from envoy.service.discovery.v3 import discovery_pb2
from google.protobuf import struct_pb2

from controlplane import resource
from controlplane.admin import AdminState, start_admin
from controlplane.admin.http import is_loopback
from controlplane.admin.render import Renderer
from controlplane.cache.cache import SnapshotCache
from controlplane.cache.snapshot import Snapshot, build_snapshot
from controlplane.mesh.loader import load_mesh_text
from controlplane.pipeline import Pipeline
from controlplane.proxy import ProxyIdentity
from controlplane.server import XdsServer, create_server
from controlplane.server.registry import StreamRegistry
from controlplane.server.sotw import SotwStream
from tests.support.xds_client import AdsClient, node

NODE_ID = "reviews-1"


@dataclass
class Ready:
    """A readiness the test can flip."""

    ready: bool = False
    reason: str = "waiting for the first mesh from the source"

    def __call__(self) -> tuple[bool, str]:
        return self.ready, self.reason


@dataclass
class Admin:
    session: aiohttp.ClientSession
    base: str
    cache: SnapshotCache
    registry: StreamRegistry
    readiness: Ready
    snapshot: Snapshot
    group: str
    renderer: Renderer
    streams: list[SotwStream] = field(default_factory=list)
    admin_loop: asyncio.AbstractEventLoop | None = None
    """The admin server's own loop (its thread), where its renderer is used."""

    async def get(self, path: str) -> tuple[int, str, str]:
        async with self.session.get(self.base + path) as response:
            return response.status, response.headers["Content-Type"], await response.text()

    async def get_json(self, path: str, status: int = 200) -> Any:
        async with self.session.get(self.base + path) as response:
            assert response.status == status, await response.text()
            assert response.content_type == "application/json"
            return await response.json()


def make_snapshot() -> Snapshot:
    cluster = cluster_pb2.Cluster(
        name="reviews.default",
        type=cluster_pb2.Cluster.EDS,
        eds_cluster_config=cluster_pb2.Cluster.EdsClusterConfig(
            eds_config=config_source_pb2.ConfigSource(
                ads=config_source_pb2.AggregatedConfigSource(),
                resource_api_version=config_source_pb2.V3,
            )
        ),
    )
    cluster.connect_timeout.FromMilliseconds(1000)
    endpoint = endpoint_components_pb2.LbEndpoint()
    endpoint.endpoint.address.socket_address.address = "127.0.0.1"
    endpoint.endpoint.address.socket_address.port_value = 9081
    assignment = endpoint_pb2.ClusterLoadAssignment(
        cluster_name="reviews.default",
        endpoints=[endpoint_components_pb2.LocalityLbEndpoints(lb_endpoints=[endpoint])],
    )
    return build_snapshot(
        {
            resource.CLUSTER: [("reviews.default", cluster)],
            resource.ENDPOINT: [("reviews.default", assignment)],
        }
    )


def connect(registry: StreamRegistry, node_id: str, service: str = "reviews") -> SotwStream:
    """A stream as the gRPC glue would open it: first CDS request with the node."""
    metadata = struct_pb2.Struct()
    metadata.update({"namespace": "default", "egress_port": 15001})
    stream = SotwStream(registry.next_id(), "ads")
    stream.on_request(
        discovery_pb2.DiscoveryRequest(
            node=base_pb2.Node(id=node_id, cluster=service, metadata=metadata),
            type_url=resource.CLUSTER,
        )
    )
    registry.add(stream)
    return stream


@pytest.fixture
async def admin() -> AsyncIterator[Admin]:
    registry = StreamRegistry()
    cache = SnapshotCache()
    readiness = Ready()
    snapshot = make_snapshot()
    stream = connect(registry, NODE_ID)
    assert stream.proxy is not None
    group = stream.proxy.group
    cache.set_snapshot(group, snapshot)
    stream.on_snapshot(snapshot)
    renderer = Renderer(limit=2)
    runner, port = await start_admin(AdminState(registry, cache, readiness, renderer),
                                     "127.0.0.1", 0)
    assert port > 0
    try:
        async with aiohttp.ClientSession() as session:
            yield Admin(session, f"http://127.0.0.1:{port}", cache, registry, readiness,
                        snapshot, group, renderer, [stream], runner.loop)
    finally:
        await runner.cleanup()


async def test_index_lists_endpoints(admin: Admin) -> None:
    status, content_type, text = await admin.get("/")
    assert status == 200
    assert content_type.startswith("text/plain")
    for path in ("/healthz", "/readyz", "/metrics", "/debug/proxies", "/debug/snapshots",
                 "/debug/config_dump?node=ID"):
        assert path in text


async def test_healthz(admin: Admin) -> None:
    assert (await admin.get("/healthz"))[::2] == (200, "ok")


async def test_debug_proxies(admin: Admin) -> None:
    (proxy,) = await admin.get_json("/debug/proxies")
    assert proxy["node_id"] == NODE_ID
    assert proxy["service"] == "reviews"
    assert proxy["group"] == admin.group
    assert proxy["protocol"] == "sotw"
    assert proxy["snapshot_version"] == admin.snapshot.version
    cds = proxy["types"]["cds"]
    assert cds["sent_version"] == admin.snapshot.versions()["cds"]
    assert cds["acked_version"] == ""
    assert cds["last_nack"] is None


async def test_debug_snapshots(admin: Admin) -> None:
    body = await admin.get_json("/debug/snapshots")
    assert body == {
        admin.group: {
            "version": admin.snapshot.version,
            "types": admin.snapshot.versions(),
            "resources": {"cds": 1, "eds": 1, "lds": 0, "rds": 0, "sds": 0},
        }
    }


async def test_config_dump_of_a_stream(admin: Admin) -> None:
    body = await admin.get_json(f"/debug/config_dump?node={NODE_ID}")
    assert body["node"] == NODE_ID
    assert body["group"] == admin.group
    assert body["version"] == admin.snapshot.version
    resources = body["resources"]
    assert set(resources) == {"clusters", "endpoints", "listeners", "routes", "secrets",
                              "virtual_hosts"}
    (cluster,) = resources["clusters"]
    assert cluster["name"] == "reviews.default"
    assert cluster["type"] == "EDS"
    assert cluster["connect_timeout"] == "1s"
    (assignment,) = resources["endpoints"]
    assert assignment["cluster_name"] == "reviews.default"
    address = assignment["endpoints"][0]["lb_endpoints"][0]["endpoint"]["address"]
    assert address["socket_address"] == {"address": "127.0.0.1", "port_value": 9081}
    assert resources["listeners"] == resources["routes"] == resources["secrets"] == []


async def test_config_dump_falls_back_to_the_cache(admin: Admin) -> None:
    """A proxy whose stream has no snapshot yet is shown its group's published one."""
    stream = connect(admin.registry, "reviews-2")
    assert stream.snapshot is None
    body = await admin.get_json("/debug/config_dump?node=reviews-2")
    assert body["group"] == admin.group
    assert body["version"] == admin.snapshot.version
    assert [c["name"] for c in body["resources"]["clusters"]] == ["reviews.default"]


async def test_config_dump_without_any_snapshot(admin: Admin) -> None:
    connect(admin.registry, "ratings-1", service="ratings")
    body = await admin.get_json("/debug/config_dump?node=ratings-1")
    group = ProxyIdentity(node_id="ratings-1", service="ratings").group
    assert body == {
        "node": "ratings-1",
        "group": group,
        "version": None,
        "resources": {"clusters": [], "endpoints": [], "listeners": [], "routes": [],
                      "secrets": [], "virtual_hosts": []},
    }


async def test_config_dump_unknown_node(admin: Admin) -> None:
    body = await admin.get_json("/debug/config_dump?node=nobody", status=404)
    assert body == {"error": "no connected proxy with node id nobody; see /debug/proxies"}


async def test_config_dump_without_node(admin: Admin) -> None:
    body = await admin.get_json("/debug/config_dump", status=400)
    assert "node=ID" in body["error"]
    assert "/debug/proxies" in body["error"]


async def test_unknown_path_and_method(admin: Admin) -> None:
    body = await admin.get_json("/nope", status=404)
    assert "GET / lists them" in body["error"]
    async with admin.session.post(admin.base + "/healthz") as response:
        assert response.status == 405
        assert "GET" in (await response.json())["error"]


async def test_port_in_use_is_reported() -> None:
    state = AdminState(StreamRegistry(), SnapshotCache(), Ready())
    runner, port = await start_admin(state, "127.0.0.1", 0)
    try:
        with pytest.raises(OSError):
            await start_admin(state, "127.0.0.1", port)
    finally:
        await runner.cleanup()


async def test_config_dump_of_some_types(admin: Admin) -> None:
    body = await admin.get_json(f"/debug/config_dump?node={NODE_ID}&type=clusters")
    assert list(body["resources"]) == ["clusters"]
    assert body["resources"]["clusters"][0]["name"] == "reviews.default"
    body = await admin.get_json(f"/debug/config_dump?node={NODE_ID}&type=eds,cds")
    assert list(body["resources"]) == ["clusters", "endpoints"]
    body = await admin.get_json(f"/debug/config_dump?node={NODE_ID}&type=clusters,bogus",
                                status=400)
    assert "unknown type bogus" in body["error"]
    assert "clusters, endpoints, listeners, routes, secrets, virtual_hosts" in body["error"]


async def test_identical_dumps_are_rendered_once(admin: Admin) -> None:
    """Concurrent and then sequential identical requests: one render, since the rendered
    resources are kept by the snapshot's content-hash version."""
    before = admin.renderer.renders
    bodies = await asyncio.gather(
        *(admin.get_json(f"/debug/config_dump?node={NODE_ID}")
          for _ in range(admin.renderer.limit)))
    bodies += [await admin.get_json(f"/debug/config_dump?node={NODE_ID}") for _ in range(5)]
    assert all(body == bodies[0] for body in bodies)
    assert admin.renderer.renders == before + 1
    # Another proxy of the same content shares the render; a new version renders again.
    connect(admin.registry, "reviews-2")
    assert (await admin.get_json("/debug/config_dump?node=reviews-2"))["resources"] == \
        bodies[0]["resources"]
    assert admin.renderer.renders == before + 1
    changed = build_snapshot({resource.CLUSTER: [], resource.ENDPOINT: []})
    admin.cache.set_snapshot(admin.group, changed)
    admin.streams[0].on_snapshot(changed)
    body = await admin.get_json(f"/debug/config_dump?node={NODE_ID}")
    assert body["version"] == changed.version and body["resources"]["clusters"] == []
    assert admin.renderer.renders == before + 2


async def test_debug_renders_run_off_the_loop_and_are_bounded(admin: Admin) -> None:
    """While the render worker is stuck, /healthz, /readyz and /metrics still answer
    (the loop is free), and debug requests beyond the limit get 503 with Retry-After."""
    release = threading.Event()

    def stuck() -> bytes:
        release.wait(20)
        return b"{}"

    async def occupy() -> None:
        async with admin.renderer.slot():
            await admin.renderer.run(stuck)

    assert admin.admin_loop is not None
    blockers = [asyncio.wrap_future(asyncio.run_coroutine_threadsafe(occupy(),
                                                                     admin.admin_loop))
                for _ in range(2)]
    try:
        for _ in range(250):  # both take their slot, on the admin loop
            if admin.renderer.running == 2:
                break
            await asyncio.sleep(0.02)
        assert admin.renderer.running == 2
        for path in ("/healthz", "/readyz", "/metrics"):
            status, _, _ = await asyncio.wait_for(admin.get(path), 5)
            assert status in (200, 503), path  # /readyz is 503: never made ready here
        for path in ("/debug/proxies", "/debug/snapshots",
                     f"/debug/config_dump?node={NODE_ID}&type=routes"):
            async with admin.session.get(admin.base + path) as response:
                assert response.status == 503, path
                assert response.headers["Retry-After"] == "1"
                error = (await response.json())["error"]
                assert "busy" in error and "at most 2 at a time" in error
                assert "retry" in error
    finally:
        release.set()
        await asyncio.gather(*blockers)
    assert (await admin.get_json("/debug/snapshots"))[admin.group]["version"] == \
        admin.snapshot.version


MESH = """
services:
  - name: reviews
    port: 9080
    endpoints: [{address: 127.0.0.1, port: 9081}]
"""


@dataclass
class Served:
    """A real pipeline and xDS server over gRPC, with the admin server reading them."""

    admin: Admin
    pipeline: Pipeline
    channel: grpc.aio.Channel


@pytest.fixture
async def served() -> AsyncIterator[Served]:
    cache = SnapshotCache()
    pipeline = Pipeline(cache)
    registry = StreamRegistry()
    server, port = await create_server("127.0.0.1:0", XdsServer(cache, registry))
    renderer = Renderer()
    runner, admin_port = await start_admin(
        AdminState(registry, cache, pipeline.readiness, renderer), "127.0.0.1", 0)
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    try:
        async with aiohttp.ClientSession() as session:
            admin = Admin(session, f"http://127.0.0.1:{admin_port}", cache, registry,
                          Ready(), make_snapshot(), "", renderer)
            yield Served(admin, pipeline, channel)
    finally:
        await channel.close()
        await server.stop(0)
        await runner.cleanup()


async def test_readyz_is_503_until_the_pipeline_has_a_mesh(served: Served) -> None:
    status, _, text = await served.admin.get("/readyz")
    assert status == 503
    assert "waiting for the first valid mesh" in text
    assert served.pipeline.set_mesh(load_mesh_text(MESH))
    status, _, text = await served.admin.get("/readyz")
    assert status == 200
    assert "1 services" in text


def pushes(text: str, type_: str) -> float:
    for line in text.splitlines():
        if line.startswith(f'controlplane_xds_pushes_total{{type="{type_}"}} '):
            return float(line.rpartition(" ")[2])
    return 0.0


async def test_metrics_count_real_pushes(served: Served) -> None:
    """The counter moves because the server pushed to a real gRPC client, not because
    the test touched it."""
    served.pipeline.set_mesh(load_mesh_text(MESH))
    status, content_type, text = await served.admin.get("/metrics")
    assert status == 200
    assert content_type.startswith("text/plain; version=")
    before = pushes(text, "cds")
    client = AdsClient(served.channel)
    try:
        await client.send(node=node("frontend-1"), type_url=resource.CLUSTER)
        response = await client.recv(10)
        assert response.type_url == resource.CLUSTER
        after = pushes((await served.admin.get("/metrics"))[2], "cds")
        assert after == before + 1
        (proxy,) = await served.admin.get_json("/debug/proxies")
        assert proxy["node_id"] == "frontend-1"
    finally:
        await client.close()


async def test_render_cache_is_bounded() -> None:
    """Old versions' renders are dropped: the cache holds a few entries and bytes."""
    renderer = Renderer(cache_entries=2, cache_bytes=10)
    try:
        for key in ("a", "b", "c"):
            assert await renderer.cached(key, lambda k=key: k.encode()) == key.encode()
        assert renderer.renders == 3
        await renderer.cached("c", lambda: b"c")
        assert renderer.renders == 3  # still cached
        await renderer.cached("a", lambda: b"a")
        assert renderer.renders == 4  # dropped as the oldest
        await renderer.cached("big", lambda: b"x" * 11)
        await renderer.cached("big", lambda: b"x" * 11)
        assert renderer.renders == 6  # larger than the whole cache: never kept
    finally:
        renderer.close()


async def test_healthz_answers_only_when_the_xds_loop_does(admin: Admin) -> None:
    """The admin server has a loop of its own, but /healthz goes through the xDS loop
    (here the test's): a stuck xDS loop fails the liveness probe."""
    answered: list[float] = []

    def probe() -> None:
        with urllib.request.urlopen(admin.base + "/healthz", timeout=20) as response:
            assert response.status == 200
            answered.append(time.monotonic())

    thread = threading.Thread(target=probe)
    thread.start()
    time.sleep(1.0)  # the xDS loop is stuck: this blocks it on purpose
    unblocked = time.monotonic()
    await asyncio.to_thread(thread.join, 20)
    assert answered and answered[0] >= unblocked


# --- who may ask -------------------------------------------------------------------------


def routable_address() -> str | None:
    """This host's address on its default route (a UDP connect sends nothing), or None."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            probe.connect(("192.0.2.1", 9))
        except OSError:
            return None
        address: str = probe.getsockname()[0]
    return None if address.startswith("127.") else address


@pytest.mark.parametrize(("peer", "loopback"), [
    ("127.0.0.1", True), ("127.5.6.7", True), ("::1", True), ("::ffff:127.0.0.1", True),
    ("10.0.0.5", False), ("192.0.2.2", False), ("::ffff:10.0.0.5", False),
    ("fd00::2", False), ("fe80::1%eth0", False), ("", False), (None, False),
    ("not-an-address", False)])
def test_loopback_peers(peer: str | None, loopback: bool) -> None:
    assert is_loopback(peer) is loopback


async def test_debug_answers_only_loopback_peers_and_probes_answer_anyone() -> None:
    """The admin port bound on every address, as in a pod: a peer on the pod's network
    gets /healthz, /readyz and /metrics, and a 403 that says how to reach /debug/*; the
    same request over loopback (where kubectl port-forward arrives) is served."""
    address = routable_address()
    if address is None:
        pytest.skip("this host has no non-loopback IPv4 address to connect from")
    registry, cache = StreamRegistry(), SnapshotCache()
    connect(registry, NODE_ID)
    runner, port = await start_admin(AdminState(registry, cache, Ready(True, "ready")),
                                     "0.0.0.0", 0)
    try:
        async with aiohttp.ClientSession() as session:
            for path in ("/healthz", "/readyz", "/metrics", "/"):
                async with session.get(f"http://{address}:{port}{path}") as response:
                    assert response.status == 200, path
            for path in ("/debug/proxies", "/debug/snapshots",
                         f"/debug/config_dump?node={NODE_ID}", "/debug/nothing-here"):
                async with session.get(f"http://{address}:{port}{path}",
                                       headers={"X-Forwarded-For": "127.0.0.1"}) as response:
                    assert response.status == 403, path
                    error = (await response.json())["error"]
                    assert "only on loopback" in error and "kubectl port-forward" in error
                    assert NODE_ID not in error.replace(f"node={NODE_ID}", "")
                async with session.get(f"http://127.0.0.1:{port}{path}") as response:
                    assert response.status in (200, 404), path  # served (404: no such view)
            async with session.get(f"http://127.0.0.1:{port}/debug/proxies") as response:
                assert [p["node_id"] for p in await response.json()] == [NODE_ID]
    finally:
        await runner.cleanup()
