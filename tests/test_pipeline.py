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
    real = routes._virtual_hosts

    def broken(service: Service, namespace: str) -> Any:
        if service.name == "reviews" and service.policy is not None:
            raise ValueError("route bug")
        return real(service, namespace)

    monkeypatch.setattr(routes, "_virtual_hosts", broken)
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


# -- per-change cost follows the change (issue 9): counted, never timed ------------------

def _ring(count: int, moved: int | None = None, order: int = 1) -> Mesh:
    """``count`` services; the sidecar of svc-i reaches svc-i+1 only (scoped). ``moved``:
    that service's endpoint is on another port. ``order`` -1 lists services backwards."""
    services = [f"  - {{name: svc-{i:02d}, port: 9080, endpoints: [{{address: 10.0.0.{i + 1}, "
                f"port: {9999 if i == moved else 8080}}}]}}" for i in range(count)]
    sidecars = [f"  - {{name: svc-{i:02d}, namespace: default, workloadSelector: "
                f"{{service: svc-{i:02d}}}, egress: [{{hosts: ['./svc-{(i + 1) % count:02d}']}}]}}"
                for i in range(count)]
    return load_mesh_text("services:\n" + "\n".join(services[::order]) + "\nsidecars:\n"
                          + "\n".join(sidecars[::order]) + "\n")


def _cluster_of(index: int) -> str:
    return f"outbound|9080||svc-{index:02d}.default.svc.cluster.local"


async def _connect(cache: SnapshotCache, proxies: list[ProxyIdentity]) -> None:
    """Streams open, and each group's first snapshot is there."""
    for proxy in proxies:
        cache.connect(proxy)
    await asyncio.wait_for(asyncio.gather(*(cache.next_snapshot(p, None) for p in proxies)), 10)


def _sidecars(count: int, zone: str = "") -> list[ProxyIdentity]:
    return [ProxyIdentity(node_id=f"n{i}", service=f"svc-{i:02d}", inbound_port=15006,
                          app_port=8080, zone=zone) for i in range(count)]


async def test_a_scoped_endpoint_change_touches_only_the_groups_that_see_it() -> None:
    cache = SnapshotCache()
    pipeline = Pipeline(cache)
    assert pipeline.set_mesh(_ring(12))
    proxies = _sidecars(12)
    await _connect(cache, proxies)
    before = {p.group: cache.get(p.group) for p in proxies}
    seen = before[proxies[4].group].get(resource.CLUSTER).resources  # type: ignore[union-attr]
    assert {n for n in seen if n.startswith("outbound")} == {_cluster_of(4), _cluster_of(5)}
    with capture_logs() as logs:
        assert pipeline.set_mesh(_ring(12, moved=5))
    after = {p.group: cache.get(p.group) for p in proxies}
    changed = sorted(g for g in after if after[g] is not before[g])
    assert changed == [proxies[4].group, proxies[5].group]  # svc-04 calls it, svc-05 is it
    [accepted] = [e for e in logs if e["event"] == "mesh.accepted"]
    assert accepted["groups"] == 2 and accepted["unchanged_groups"] == 10
    # One cluster and one load assignment serialized, whatever the number of groups.
    build = pipeline.current
    assert build is not None
    svc5 = after[proxies[5].group]
    assert svc5 is not None
    assert build.encoded_bytes == (svc5.get(resource.CLUSTER).resources[_cluster_of(5)].size
                                   + svc5.get(resource.ENDPOINT).resources[_cluster_of(5)].size)
    caller = after[proxies[4].group]
    assert caller is not None and caller.encoded_bytes == 0  # nothing of its own changed
    assert _endpoint_port(svc5, "svc-05") == 9999


async def test_an_endpoint_change_in_a_full_mesh_is_one_shared_diff() -> None:
    """Every group sees the service, so every group gets a new snapshot; but they share one
    new endpoints TypeSnapshot (its diff computed once for all streams) and keep every
    other type as the very object they had."""
    text = "services:\n" + "".join(
        f"  - {{name: svc-{i:02d}, port: 9080, endpoints: [{{address: 10.0.0.1, "
        f"port: %d}}]}}\n" if i == 3 else
        f"  - {{name: svc-{i:02d}, port: 9080, endpoints: [{{address: 10.0.0.1, port: 80}}]}}\n"
        for i in range(8))
    cache = SnapshotCache()
    pipeline = Pipeline(cache)
    assert pipeline.set_mesh(load_mesh_text(text % 8080))
    proxies = _sidecars(8)
    await _connect(cache, proxies)
    before = {p.group: cache.get(p.group) for p in proxies}
    assert pipeline.set_mesh(load_mesh_text(text % 8081))
    after = {p.group: cache.get(p.group) for p in proxies}
    endpoints = {id(s.get(resource.ENDPOINT)) for s in after.values() if s is not None}
    assert len(endpoints) == 1
    for group, snapshot in after.items():
        old = before[group]
        assert snapshot is not None and old is not None and snapshot is not old
        for type_url in (resource.CLUSTER, resource.LISTENER, resource.ROUTE):
            assert snapshot.get(type_url) is old.get(type_url)
        assert snapshot.get(resource.ENDPOINT).changed_since(  # type: ignore[union-attr]
            old.get(resource.ENDPOINT)) == {_cluster_of(3)}


def _versions(pipeline: Pipeline, proxies: list[ProxyIdentity]) -> dict[str, dict[str, str]]:
    found = {}
    for proxy in proxies:
        snapshot = pipeline.cache.get(proxy.group)
        assert snapshot is not None
        found[proxy.group] = {"": snapshot.version, **snapshot.versions()}
    return found


def test_versions_depend_on_the_state_not_on_history_or_order() -> None:
    """Two replicas: one saw every step, in one order; the other starts from the last
    mesh, services listed the other way round. Same versions for every group and type."""
    proxies = [*_sidecars(6), *_sidecars(6, zone="zone-a")]
    one, two = Pipeline(SnapshotCache()), Pipeline(SnapshotCache())
    assert one.set_mesh(_ring(6))
    for proxy in proxies:
        one.cache.connect(proxy)
    for step in (2, 4, None, 1):
        assert one.set_mesh(_ring(6, moved=step))
    assert two.set_mesh(_ring(6, moved=1, order=-1))
    for proxy in proxies:
        two.cache.connect(proxy)
    assert _versions(one, proxies) == _versions(two, proxies)


async def test_layers_nobody_uses_go_with_their_groups() -> None:
    cache = SnapshotCache()
    pipeline = Pipeline(cache)
    assert pipeline.set_mesh(_ring(6))
    keep, *gone = _sidecars(6)
    await _connect(cache, [keep, *gone])
    for proxy in gone:
        cache.disconnect(proxy)
    build = pipeline.current
    assert build is not None
    views = {build.visible(p) for p in (keep, *gone)}
    assert len(views) == 6 and views <= build._clusters.keys()
    pipeline.expire_groups(0.0, now=float("inf"))
    assert [*cache.groups()] == [keep.group]
    assert build._clusters.keys() == {build.visible(keep), None}  # None: the probe's
    assert {k for k, _ in build._endpoints} == {build.visible(keep), None}
    assert keep.group in build._own and not {p.group for p in gone} & build._own.keys()


async def test_a_new_group_costs_its_own_resources_and_shares_the_rest() -> None:
    cache = SnapshotCache()
    pipeline = Pipeline(cache)
    assert pipeline.set_mesh(load_mesh_text(TWO % (9081, 9091)))
    first = ProxyIdentity(node_id="a", service="frontend", namespace="shop")
    second = ProxyIdentity(node_id="b", service="backend", namespace="shop", inbound_port=1,
                           app_port=2)
    await _connect(cache, [first, second])
    one, two = cache.get(first.group), cache.get(second.group)
    assert one is not None and two is not None
    # The cluster and endpoint layers are the mesh's; the route table of the namespace
    # was encoded once for both.
    for type_url in (resource.CLUSTER, resource.ENDPOINT, resource.ROUTE):
        assert one.get(type_url).layers == two.get(type_url).layers  # type: ignore[union-attr]
    assert one.get(resource.ENDPOINT) is two.get(resource.ENDPOINT)
    # What the second group serialized: its own listeners and inbound cluster, no more.
    own = two.get(resource.LISTENER).size + two.get(resource.CLUSTER).own.size  # type: ignore[union-attr]
    assert two.encoded_bytes == own


ZONED = """services:
  - {name: reviews, port: 9080, endpoints: [{address: 10.0.0.1, port: %d, zone: zone-a},
                                            {address: 10.0.0.2, port: 8080, zone: zone-b}]}
  - {name: ratings, port: 9080, endpoints: [{address: 10.0.0.3, port: 8080, zone: zone-a},
                                            {address: 10.0.0.4, port: 8080, zone: zone-b}]}
"""


async def test_an_endpoint_change_is_encoded_once_per_zone_that_has_proxies() -> None:
    cache = SnapshotCache()
    pipeline = Pipeline(cache)
    assert pipeline.set_mesh(load_mesh_text(ZONED % 8080))
    proxies = [ProxyIdentity(node_id=f"{zone}-{i}", service=f"app-{i}", zone=zone)
               for zone in ("zone-a", "zone-b") for i in range(3)]
    await _connect(cache, proxies)
    assert pipeline.set_mesh(load_mesh_text(ZONED % 8081))
    build = pipeline.current
    assert build is not None
    reviews = "outbound|9080||reviews.default.svc.cluster.local"
    by_zone = {p.zone: cache.get(p.group) for p in proxies}
    plain = build.endpoint_layer(None).resources[reviews]
    variants = {z: s.get(resource.ENDPOINT).resources[reviews]  # type: ignore[union-attr]
                for z, s in by_zone.items()}
    assert len({id(v) for v in variants.values()} | {id(plain)}) == 3
    cluster = build.cluster_layer(None).resources[reviews]
    # The service (its cluster, its plain assignment) once, then one variant per zone.
    assert build.encoded_bytes == cluster.size + plain.size + sum(
        v.size for v in variants.values())
    # Groups of one zone share one endpoints snapshot.
    for zone in ("zone-a", "zone-b"):
        shared = {id(cache.get(p.group).get(resource.ENDPOINT))  # type: ignore[union-attr]
                  for p in proxies if p.zone == zone}
        assert len(shared) == 1


SPLIT = """services:
  - {name: a1, namespace: ns-a, port: 9080, %s endpoints: [{address: 10.0.0.1, port: 80}]}
  - {name: b1, namespace: ns-b, port: 9080, endpoints: [{address: 10.0.0.2, port: 80}]}
sidecars:
  - {name: own, namespace: ns-a, egress: [{hosts: ["./*"]}]}
  - {name: own, namespace: ns-b, egress: [{hosts: ["./*"]}]}
"""


async def test_scoped_namespaces_get_no_whole_mesh_route_table() -> None:
    """A route table holds every service its namespace sees: built for the visible set
    of the groups there, not also for the whole mesh (which nobody there is served)."""
    cache = SnapshotCache()
    pipeline = Pipeline(cache)
    assert pipeline.set_mesh(load_mesh_text(SPLIT % ""))
    proxies = [ProxyIdentity(node_id="a", service="a1", namespace="ns-a"),
               ProxyIdentity(node_id="b", service="b1", namespace="ns-b")]
    await _connect(cache, proxies)
    assert pipeline.set_mesh(load_mesh_text(SPLIT % "policy: {timeout: 1s},"))
    build = pipeline.current
    assert build is not None
    tables = {(namespace, visible) for namespace, visible in build._routes}
    assert {v for n, v in tables if n in ("ns-a", "ns-b")} == {
        frozenset({"a1.ns-a"}), frozenset({"b1.ns-b"})}
    a = cache.get(proxies[0].group)
    assert a is not None
    [table] = a.get(resource.ROUTE).resources.values()  # type: ignore[union-attr]
    assert [h.name for h in table.message.virtual_hosts] == ["a1.ns-a"]
