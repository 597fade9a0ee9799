"""The pipeline: readiness, whole-mesh rejection, per-group builds, the snapshot store."""

from __future__ import annotations

import asyncio
import json
import threading
from pathlib import Path
from typing import Any

import pytest
from structlog.testing import capture_logs

from controlplane import resource
from controlplane.assembly import build as assembly
from controlplane.assembly import services as encoding
from controlplane.cache import Snapshot, SnapshotCache
from controlplane.cache.store import SnapshotStore
from controlplane.mesh import CircuitBreaker, Mesh, Policy, load_mesh_text
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


def _endpoint_port(snapshot: Snapshot, service: str) -> int:
    name = f"outbound|9080||{service}.default.svc.cluster.local"
    assignment = snapshot.get(resource.ENDPOINT).resources[name].message
    return int(assignment.endpoints[0].lb_endpoints[0].endpoint.address.socket_address
               .port_value)


TWO = """services:
  - {name: reviews, port: 9080, endpoints: [{address: 127.0.0.1, port: %d}]}
  - {name: ratings, port: 9080, endpoints: [{address: 127.0.0.1, port: %d}]}
"""


async def test_a_translator_bug_in_one_service_keeps_its_last_good_version(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    cache = SnapshotCache()
    pipeline = Pipeline(cache)
    assert pipeline.set_mesh(load_mesh_text(TWO % (9081, 9091)))
    await cache.next_snapshot(PROXY, None)
    real = encoding.service_resources

    def broken(service: Service) -> ServiceResources:
        if service.name == "reviews":
            raise RuntimeError("translator bug")
        return real(service)

    monkeypatch.setattr(encoding, "service_resources", broken)
    with capture_logs() as logs:
        assert pipeline.set_mesh(load_mesh_text(TWO % (9082, 9092))) is True
    snapshot = cache.get(PROXY.group)
    assert _endpoint_port(snapshot, "reviews") == 9081  # its last good version
    assert _endpoint_port(snapshot, "ratings") == 9092  # the rest moved on
    [rejected] = [e for e in logs if e["event"] == "service.rejected"]
    assert rejected["service"] == "reviews.default" and "translator bug" in rejected["error"]
    assert rejected["log_level"] == "error" and "last good" in rejected["hint"]
    ready, detail = pipeline.readiness()
    assert ready and "reviews.default" in detail and "translator bug" in detail


async def test_a_new_service_that_cannot_be_translated_is_left_out(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    cache = SnapshotCache()
    pipeline = Pipeline(cache)
    real = encoding.service_resources

    def broken(service: Service) -> ServiceResources:
        if service.name == "reviews":
            raise RuntimeError("translator bug")
        return real(service)

    monkeypatch.setattr(encoding, "service_resources", broken)
    # Starting with it: the rest is served and the server is ready.
    assert pipeline.set_mesh(load_mesh_text(TWO % (9081, 9091)))
    snapshot = await cache.next_snapshot(PROXY, None)
    clusters = snapshot.get(resource.CLUSTER).resources
    assert "outbound|9080||ratings.default.svc.cluster.local" in clusters
    assert "outbound|9080||reviews.default.svc.cluster.local" not in clusters
    assert pipeline.readiness()[0] is True
    assert [s.name for s in pipeline.mesh.services] == ["ratings"]  # type: ignore[union-attr]


async def test_a_route_table_bug_in_one_service_is_isolated(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from controlplane.translator import routes

    cache = SnapshotCache()
    pipeline = Pipeline(cache)
    assert pipeline.set_mesh(load_mesh_text(TWO % (9081, 9091)))
    await cache.next_snapshot(PROXY, None)
    # (public since capture mode's registry-only routes reuse it; private before)
    target = "virtual_hosts" if hasattr(routes, "virtual_hosts") else "_virtual_hosts"
    real = getattr(routes, target)

    def broken(service: Service, namespace: str) -> Any:
        if service.name == "reviews" and service.policy is not None:
            raise ValueError("route bug")
        return real(service, namespace)

    monkeypatch.setattr(routes, target, broken)
    timed = (TWO % (9082, 9092)).replace("port: 9080, endpoints: [{address: 127.0.0.1, "
                                         "port: 9082}]", "port: 9080, policy: {timeout: 1s}, "
                                         "endpoints: [{address: 127.0.0.1, port: 9082}]")
    with capture_logs() as logs:
        assert pipeline.set_mesh(load_mesh_text(timed)) is True
    snapshot = cache.get(PROXY.group)
    assert _endpoint_port(snapshot, "reviews") == 9081  # last good: no policy, old endpoint
    assert _endpoint_port(snapshot, "ratings") == 9092
    assert [e["service"] for e in logs if e["event"] == "service.rejected"] == [
        "reviews.default"]


async def test_set_mesh_never_raises_and_keeps_the_last_good_snapshot(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    cache = SnapshotCache()
    pipeline = Pipeline(cache)
    pipeline.set_mesh(mesh(9081))
    first = await cache.next_snapshot(PROXY, None)

    def broken(*args: object, **kwargs: object) -> Snapshot:
        raise RuntimeError("assembly bug")

    monkeypatch.setattr(assembly.MeshBuild, "probe", broken)
    with capture_logs() as logs:
        assert pipeline.set_mesh(mesh(9082)) is False
        assert await pipeline.apply(mesh(9083)) is False
    assert [e["event"] for e in logs] == ["mesh.rejected", "mesh.rejected"]
    assert "assembly bug" in logs[0]["error"]
    assert cache.get(PROXY.group) is first  # the last good snapshot stays
    assert pipeline.mesh == mesh(9081)


async def test_apply_translates_off_the_event_loop(monkeypatch: pytest.MonkeyPatch) -> None:
    cache = SnapshotCache()
    pipeline = Pipeline(cache)
    threads: list[str] = []
    real = encoding.service_resources

    def spy(service: Service) -> ServiceResources:
        threads.append(threading.current_thread().name)
        return real(service)

    monkeypatch.setattr(encoding, "service_resources", spy)
    waiting = asyncio.ensure_future(cache.next_snapshot(PROXY, None))
    assert await pipeline.apply(mesh(9081))
    snapshot = await asyncio.wait_for(waiting, 5)
    assert _endpoint_port(snapshot, "reviews") == 9081
    assert threads and threading.main_thread().name not in threads

    # A group's first proxy: its snapshot (its namespace's route table) is built there too.
    routes: list[str] = []
    real_route = assembly.egress_route

    def route_spy(built: Mesh, namespace: str, visible: Any = None) -> Any:
        routes.append(threading.current_thread().name)
        return real_route(built, namespace, visible)

    monkeypatch.setattr(assembly, "egress_route", route_spy)
    other = ProxyIdentity(node_id="shop-1", service="frontend", namespace="shop")
    snapshot = await asyncio.wait_for(cache.next_snapshot(other, None), 5)
    assert snapshot.get(resource.ROUTE) is not None
    assert routes and threading.main_thread().name not in routes
    pipeline.close()


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
    # The group serialized nothing of its own: its service did not change.
    assert second.encoded_bytes == 0


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


async def test_a_value_the_translator_cannot_encode_stays_with_its_service() -> None:
    """No monkeypatching: a circuit-breaker limit past uint32 (the issue's 99999999999,
    which made every later update fail while /readyz said 200) slipped past validation
    (built with model_copy, as a bug in a source could) fails in protobuf itself."""
    cache = SnapshotCache()
    pipeline = Pipeline(cache)
    good = load_mesh_text(TWO % (9081, 9091))
    assert pipeline.set_mesh(good)
    await cache.next_snapshot(PROXY, None)
    changed = load_mesh_text(TWO % (9082, 9092))
    reviews = changed.services[0]
    policy = Policy.model_construct(
        circuit_breaker=CircuitBreaker.model_construct(max_connections=99999999999))
    broken = changed.model_copy(update={"services": [
        reviews.model_copy(update={"policy": policy}), changed.services[1]]})
    with capture_logs() as logs:
        assert pipeline.set_mesh(broken)
    snapshot = cache.get(PROXY.group)
    assert snapshot is not None
    assert _endpoint_port(snapshot, "reviews") == 9081
    assert _endpoint_port(snapshot, "ratings") == 9092
    [rejected] = [e for e in logs if e["event"] == "service.rejected"]
    assert "out of range" in rejected["error"]
    from prometheus_client import REGISTRY

    assert REGISTRY.get_sample_value("controlplane_services_rejected") == 1
    # and the next good change is accepted as usual
    assert pipeline.set_mesh(load_mesh_text(TWO % (9083, 9093)))
    snapshot = cache.get(PROXY.group)
    assert snapshot is not None and _endpoint_port(snapshot, "reviews") == 9083
    assert "reviews.default" not in pipeline.readiness()[1]
    assert REGISTRY.get_sample_value("controlplane_services_rejected") == 0


async def test_readiness_says_when_the_latest_change_was_rejected(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    pipeline = Pipeline(SnapshotCache())
    pipeline.set_mesh(mesh(9081))

    def broken(*args: object, **kwargs: object) -> Snapshot:
        raise RuntimeError("assembly bug")

    monkeypatch.setattr(assembly.MeshBuild, "probe", broken)
    assert not pipeline.set_mesh(mesh(9082))
    ready, detail = pipeline.readiness()
    assert ready and "latest change was rejected" in detail and "assembly bug" in detail


def test_validate_is_strict_about_services_the_server_would_leave_out(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """`controlplane validate` (check_mesh) fails on what the server would serve around."""
    from controlplane.errors import TranslationError
    from controlplane.pipeline import check_mesh

    real = encoding.service_resources

    def broken(service: Service) -> ServiceResources:
        if service.name == "reviews":
            raise RuntimeError("translator bug")
        return real(service)

    monkeypatch.setattr(encoding, "service_resources", broken)
    with pytest.raises(TranslationError, match=r"service reviews\.default: RuntimeError"):
        check_mesh(mesh(9081))
    assert check_mesh(mesh(9081), strict=False).rejected == {
        "reviews.default": "RuntimeError: translator bug"}
