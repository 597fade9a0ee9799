"""The admin server over real HTTP, with a real cache, registry and xDS stream behind it."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import pytest
from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.core.v3 import base_pb2, config_source_pb2
from envoy.config.endpoint.v3 import endpoint_components_pb2, endpoint_pb2
from envoy.service.discovery.v3 import discovery_pb2
from google.protobuf import struct_pb2

from controlplane import metrics, resource
from controlplane.admin import AdminState, start_admin
from controlplane.cache.cache import SnapshotCache
from controlplane.cache.snapshot import Snapshot, build_snapshot
from controlplane.proxy import ProxyIdentity
from controlplane.server.registry import StreamRegistry
from controlplane.server.sotw import SotwStream

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
    streams: list[SotwStream] = field(default_factory=list)

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
    runner, port = await start_admin(AdminState(registry, cache, readiness), "127.0.0.1", 0)
    assert port > 0
    try:
        async with aiohttp.ClientSession() as session:
            yield Admin(session, f"http://127.0.0.1:{port}", cache, registry, readiness,
                        snapshot, group, [stream])
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


async def test_readyz_flips(admin: Admin) -> None:
    status, _, text = await admin.get("/readyz")
    assert (status, text) == (503, "waiting for the first mesh from the source")
    admin.readiness.ready, admin.readiness.reason = True, "ready: 1 group built"
    status, _, text = await admin.get("/readyz")
    assert (status, text) == (200, "ready: 1 group built")


async def test_metrics(admin: Admin) -> None:
    metrics.PUSHES.labels("cds").inc()
    status, content_type, text = await admin.get("/metrics")
    assert status == 200
    assert content_type.startswith("text/plain; version=")
    assert "controlplane_" in text
    assert 'controlplane_xds_pushes_total{type="cds"}' in text


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
    assert set(resources) == {"clusters", "endpoints", "listeners", "routes", "secrets"}
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
                      "secrets": []},
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
