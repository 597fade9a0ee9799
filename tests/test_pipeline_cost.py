"""The pipeline's cost follows the change (issue 9): an endpoint change re-encodes that
service once (per zone with proxies), republishes only the groups that see it, and
shares one diff between groups; versions depend only on the state. Counted, never timed."""

from __future__ import annotations

import asyncio

from structlog.testing import capture_logs

from controlplane import resource
from controlplane.cache import Snapshot, SnapshotCache
from controlplane.mesh import Mesh, load_mesh_text
from controlplane.pipeline import Pipeline
from controlplane.proxy import ProxyIdentity

TWO = """services:
  - {name: reviews, port: 9080, endpoints: [{address: 127.0.0.1, port: %d}]}
  - {name: ratings, port: 9080, endpoints: [{address: 127.0.0.1, port: %d}]}
"""


def _endpoint_port(snapshot: Snapshot, service: str) -> int:
    name = f"outbound|9080||{service}.default.svc.cluster.local"
    assignment = snapshot.get(resource.ENDPOINT).resources[name].message  # type: ignore[union-attr]
    return int(assignment.endpoints[0].lb_endpoints[0].endpoint.address.socket_address
               .port_value)

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
