"""The pipeline: readiness, whole-mesh rejection, per-group builds, the snapshot store."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from controlplane import assembly, resource
from controlplane.cache import SnapshotCache
from controlplane.cache.store import SnapshotStore
from controlplane.mesh import Mesh, load_mesh_text
from controlplane.mesh.model import Service
from controlplane.pipeline import Pipeline
from controlplane.proxy import ProxyIdentity
from controlplane.translator import ServiceResources

MESH = """services:
  - {name: reviews, port: 9080, endpoints: [{address: 127.0.0.1, port: %d}]}
  - {name: ratings, port: 9080, endpoints: [{address: 127.0.0.1, port: 9999}]}
"""
PROXY = ProxyIdentity(node_id="frontend-1", service="frontend")


def mesh(port: int) -> Mesh:
    return load_mesh_text(MESH % port)


async def test_ready_only_after_a_valid_mesh_and_groups_built_on_demand() -> None:
    cache = SnapshotCache()
    pipeline = Pipeline(cache)
    assert pipeline.readiness()[0] is False
    waiting = asyncio.ensure_future(cache.next_snapshot(PROXY, None))
    await asyncio.sleep(0.01)
    assert not waiting.done()  # a stream opened early waits instead of getting nothing
    assert pipeline.set_mesh(mesh(9081))
    assert pipeline.readiness()[0] is True
    snapshot = await asyncio.wait_for(waiting, 1)
    assert "outbound|9080||reviews.default.svc.cluster.local" in \
        snapshot.get(resource.CLUSTER).resources


async def test_a_mesh_that_fails_translation_is_rejected_whole(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    cache = SnapshotCache()
    pipeline = Pipeline(cache)
    pipeline.set_mesh(mesh(9081))
    first = await cache.next_snapshot(PROXY, None)

    def broken(service: Service) -> ServiceResources:
        raise RuntimeError("translator bug")

    monkeypatch.setattr(assembly, "service_resources", broken)
    with capture_logs() as logs:
        assert pipeline.set_mesh(mesh(9082)) is False
    assert [entry["event"] for entry in logs] == ["mesh.rejected"]
    assert "translator bug" in logs[0]["error"]
    assert cache.get(PROXY.group) is first  # the last good snapshot stays
    assert pipeline.mesh == mesh(9081)


async def test_unchanged_mesh_publishes_nothing_and_endpoint_change_reuses_the_rest() -> None:
    cache = SnapshotCache()
    pipeline = Pipeline(cache)
    pipeline.set_mesh(mesh(9081))
    first = await cache.next_snapshot(PROXY, None)
    first_build = pipeline.current
    assert first_build is not None
    pipeline.set_mesh(mesh(9081))
    assert cache.get(PROXY.group) is first
    pipeline.set_mesh(mesh(9082))
    second = cache.get(PROXY.group)
    assert second is not first
    assert second.get(resource.CLUSTER) is first.get(resource.CLUSTER)
    assert second.get(resource.LISTENER) is first.get(resource.LISTENER)
    assert second.get(resource.ENDPOINT).version != first.get(resource.ENDPOINT).version
    # Only the changed service's endpoints were serialized again.
    assert pipeline.current is not None
    reviews = "outbound|9080||reviews.default.svc.cluster.local"
    service_bytes = (second.get(resource.CLUSTER).resources[reviews].size
                     + second.get(resource.ENDPOINT).resources[reviews].size)
    assert pipeline.current.encoded_bytes == service_bytes  # only the changed service
    assert pipeline.current.encoded_bytes < first_build.encoded_bytes
    # The group serialized only its own listener, found it unchanged, and reused it.
    assert second.encoded_bytes == second.get(resource.LISTENER).size


async def test_store_writes_each_published_version_and_keeps_the_newest(tmp_path: Path) -> None:
    store = SnapshotStore(tmp_path, keep=2)
    cache = SnapshotCache()
    pipeline = Pipeline(cache, store)
    pipeline.set_mesh(mesh(9081))
    await cache.next_snapshot(PROXY, None)  # the group is built when a proxy asks for it
    for port in (9082, 9083, 9084):
        pipeline.set_mesh(mesh(port))
    store.close()
    files = sorted(store.folder(PROXY.group).glob("*.json"))
    assert len(files) == 2
    newest = json.loads(files[-1].read_text())
    assert newest["version"] == cache.get(PROXY.group).version
    [assignment] = [a for a in newest["resources"]["eds"] if "reviews" in a["cluster_name"]]
    address = assignment["endpoints"][0]["lb_endpoints"][0]["endpoint"]["address"]
    assert address["socket_address"]["port_value"] == 9084


async def test_two_replicas_serve_the_same_versions() -> None:
    """Content-hash versions: a proxy failing over to another replica sees no change."""
    replicas = [Pipeline(SnapshotCache()) for _ in range(2)]
    for replica in replicas:
        replica.set_mesh(mesh(9081))
    one, two = [await r.cache.next_snapshot(PROXY, None) for r in replicas]
    assert one.version == two.version and one.versions() == two.versions()
    # Built in another order of history, the same mesh still has the same versions.
    replicas[1].set_mesh(mesh(9090))
    replicas[1].set_mesh(mesh(9081))
    assert replicas[1].cache.get(PROXY.group).version == one.version


def test_route_tables_carry_over_when_only_endpoints_change() -> None:
    from controlplane.assembly import MeshBuild

    first = MeshBuild(mesh(9081))
    route = first.route("default")
    moved = MeshBuild(mesh(9082), first)  # an endpoint moved: same routes, not rebuilt
    assert moved.route("default") is route
    timed = load_mesh_text((MESH % 9082).replace("port: 9080, endpoints: [{address: 127.0.0.1, "
                                                  "port: 9082}]",
                                                  "port: 9080, policy: {timeout: 1s}, "
                                                  "endpoints: [{address: 127.0.0.1, port: 9082}]"))
    retimed = MeshBuild(timed, moved)  # a policy changed: the route table is built again
    assert retimed.route("default") is not route
    assert retimed.route("default").version != route.version
