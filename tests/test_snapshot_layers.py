"""Layered snapshots: set-hash versions, recorded diffs, per-layer consistency checks,
wildcard and aliases, and reuse of what did not change."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from controlplane import resource
from controlplane.cache.layers import Layer, diff, empty_layer
from controlplane.cache.snapshot import (
    Resource,
    Snapshot,
    TypeSnapshot,
    build_snapshot,
    encode_resource,
    type_version,
)
from tests.support.snapshots import cluster, endpoints, listener, routes


def _cla(name: str, port: int) -> Resource:
    return encode_resource(resource.ENDPOINT, name, endpoints(name, port))


def _cluster(name: str) -> Resource:
    return encode_resource(resource.CLUSTER, name, cluster(name))


def test_a_layer_version_is_a_set_hash_independent_of_order() -> None:
    members = [_cla(f"svc-{i}", 9000 + i) for i in range(6)]
    one = Layer.of(resource.ENDPOINT, members)
    other = Layer.of(resource.ENDPOINT, reversed(members))
    assert one.version == other.version == type_version(members)
    assert one.size == sum(r.size for r in members)
    # Split over two layers, a type snapshot has the version of the whole set.
    split = TypeSnapshot.layered(resource.ENDPOINT, [Layer.of(resource.ENDPOINT, members[:2])],
                                 Layer.of(resource.ENDPOINT, members[2:]))
    assert split.version == one.version
    assert dict(split.resources) == dict(one.resources)
    # A different endpoint is a different version; so is one resource fewer.
    changed = Layer.of(resource.ENDPOINT, [*members[:5], _cla("svc-5", 1)])
    assert changed.version != one.version
    assert Layer.of(resource.ENDPOINT, members[:5]).version != one.version
    assert empty_layer(resource.ENDPOINT).version == "0" * 16


def test_replacing_one_resource_records_what_changed() -> None:
    base = Layer.of(resource.ENDPOINT, [_cla(f"svc-{i}", 9000) for i in range(100)])
    moved = base.replace(["svc-7"], [_cla("svc-7", 9999)])
    assert moved.version == Layer.of(resource.ENDPOINT, moved.resources.values()).version
    assert moved.changed_since(base.version) == {"svc-7"}
    assert moved.resources["svc-3"] is base.resources["svc-3"]  # shared, not copied
    # Two steps on: the stream that skipped one version still gets an O(k) answer.
    again = moved.replace(["svc-9"], [])
    assert again.changed_since(base.version) == {"svc-7", "svc-9"}
    assert again.changed_since(moved.version) == {"svc-9"}
    assert again.changed_since("not-an-ancestor") is None
    # The same bytes again: nothing changed, the very same layer comes back.
    assert again.replace(["svc-1"], [_cla("svc-1", 9000)]) is again
    assert again.replace(["not-there"], []) is again


def test_duplicate_names_are_refused() -> None:
    with pytest.raises(ValueError, match="duplicate eds resource 'a'"):
        Layer.of(resource.ENDPOINT, [_cla("a", 1), _cla("a", 2)])
    shared = Layer.of(resource.ENDPOINT, [_cla("a", 1)])
    with pytest.raises(ValueError, match="duplicate eds resource 'a'"):
        TypeSnapshot.layered(resource.ENDPOINT, [shared], Layer.of(resource.ENDPOINT,
                                                                    [_cla("a", 1)]))


def test_the_resources_view_reads_like_a_mapping() -> None:
    shared = Layer.of(resource.CLUSTER, [_cluster("a"), _cluster("b")])
    own = Layer.of(resource.CLUSTER, [_cluster("inbound")])
    typed = TypeSnapshot.layered(resource.CLUSTER, [shared], own)
    view = typed.resources
    assert len(view) == 3 and sorted(view) == ["a", "b", "inbound"]
    assert "inbound" in view and "nope" not in view and view.get("nope") is None
    assert view["a"] is shared.resources["a"] and view["inbound"] is own.resources["inbound"]
    assert sorted(r.name for r in view.values()) == ["a", "b", "inbound"]
    assert {n for n, _ in view.items()} == {"a", "b", "inbound"}
    assert typed.size == shared.size + own.size
    assert typed.wildcard is None and dict(typed.aliases) == {}


def test_a_type_snapshot_is_reused_when_made_of_the_same() -> None:
    shared = Layer.of(resource.CLUSTER, [_cluster("a")])
    own = Layer.of(resource.CLUSTER, [_cluster("inbound")])
    first = TypeSnapshot.layered(resource.CLUSTER, [shared], own)
    same_own = Layer.of(resource.CLUSTER, [_cluster("inbound")])  # equal, another object
    assert TypeSnapshot.layered(resource.CLUSTER, [shared], same_own, reuse=first) is first
    wild = TypeSnapshot.layered(resource.CLUSTER, [shared], own, wildcard=frozenset({"inbound"}),
                                aliases={"x": "a"}, reuse=first)
    assert wild is not first and wild.wildcard == {"inbound"} and wild.aliases["x"] == "a"
    assert wild.version == first.version  # what a wildcard gets is not content
    types = {resource.CLUSTER: first}
    snapshot = Snapshot.of(types)
    assert Snapshot.of(types, reuse=snapshot) is snapshot
    assert Snapshot.of({resource.CLUSTER: wild}, reuse=snapshot) is not snapshot


def test_changed_since_follows_the_layers_and_falls_back_to_a_full_diff() -> None:
    shared = Layer.of(resource.ENDPOINT, [_cla(f"svc-{i}", 9000) for i in range(50)])
    before = TypeSnapshot.layered(resource.ENDPOINT, [shared])
    after = TypeSnapshot.layered(resource.ENDPOINT,
                                 [shared.replace(["svc-4"], [_cla("svc-4", 1)])])
    assert after.changed_since(before) == {"svc-4"}
    assert after.changed_since(after) == frozenset()
    assert after.changed_since(None) == frozenset(after.resources)
    # A snapshot of another shape (plain, not layered) is diffed in full.
    plain = TypeSnapshot(resource.ENDPOINT, "plain", dict(before.resources))
    assert after.changed_since(plain) == {"svc-4"}


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["add", "remove", "change"]),
                          st.integers(0, 11), st.integers(1, 4)), max_size=12),
       st.integers(0, 5))
def test_diffs_and_versions_agree_with_a_full_recomputation(
    steps: list[tuple[str, int, int]], cut: int,
) -> None:
    """Whatever the edits, a derived layer's version is the set hash of its content and
    its recorded diff holds every real change since each ancestor it knows (a name
    changed and changed back may be named too: sending it again is harmless)."""
    layer = Layer.of(resource.ENDPOINT, [_cla(f"s{i}", 1) for i in range(6)])
    history = [layer]
    for action, index, port in steps:
        name = f"s{index}"
        if action == "remove":
            layer = layer.replace([name], [])
        else:
            layer = layer.replace([], [_cla(name, port)])
        history.append(layer)
        assert layer.version == type_version(layer.resources.values())
    for ancestor in history[-5:]:
        known = layer.changed_since(ancestor.version)
        if known is not None:
            assert known >= diff(layer.resources, ancestor.resources)
    if len(history) > 1:
        assert layer.changed_since(history[-2].version) == diff(layer.resources,
                                                                 history[-2].resources)
    # Split in two parts, a type snapshot diffs to the same answer.
    names = sorted(layer.resources)
    one = Layer.of(resource.ENDPOINT, [layer.resources[n] for n in names[:cut]])
    two = Layer.of(resource.ENDPOINT, [layer.resources[n] for n in names[cut:]])
    typed = TypeSnapshot.layered(resource.ENDPOINT, [one], two)
    first = TypeSnapshot.layered(resource.ENDPOINT, [history[0]])
    assert typed.version == layer.version
    assert typed.changed_since(first) >= diff(layer.resources, history[0].resources)


def _typed(type_url: str, shared: list[Resource], own: list[Resource]) -> TypeSnapshot:
    return TypeSnapshot.layered(type_url, [Layer.of(type_url, shared)] if shared else [],
                                Layer.of(type_url, own) if own else None)


def test_consistency_is_checked_per_layer_and_names_what_is_missing() -> None:
    clusters = [_cluster("a"), _cluster("b")]
    route = encode_resource(resource.ROUTE, "egress", routes("egress", "a", "b"))
    lds = encode_resource(resource.LISTENER, "egress", listener("egress", "egress"))

    def snapshot(claims: list[Resource], route_layer: list[Resource]) -> Snapshot:
        return Snapshot.of({
            resource.CLUSTER: _typed(resource.CLUSTER, clusters, []),
            resource.ENDPOINT: _typed(resource.ENDPOINT, claims, []),
            resource.LISTENER: _typed(resource.LISTENER, [], [lds]),
            resource.ROUTE: _typed(resource.ROUTE, route_layer, []),
        })

    good = snapshot([_cla("a", 1), _cla("b", 2)], [route])
    assert good.problems() == []
    no_endpoints = snapshot([_cla("a", 1)], [route])
    assert no_endpoints.problems() == ["cluster 'b' points at missing endpoints 'b'"]
    no_route = snapshot([_cla("a", 1), _cla("b", 2)], [])
    assert no_route.problems() == [
        "listener 'egress' points at missing route configuration 'egress'"]
    # The route's clusters may be in the group's own layer (the check looks there too).
    own_b = Snapshot.of({
        resource.CLUSTER: _typed(resource.CLUSTER, [_cluster("a")], [_cluster("b")]),
        resource.ENDPOINT: _typed(resource.ENDPOINT, [_cla("a", 1), _cla("b", 2)], []),
        resource.LISTENER: _typed(resource.LISTENER, [], [lds]),
        resource.ROUTE: _typed(resource.ROUTE, [route], []),
    })
    assert own_b.problems() == []


def test_the_plain_form_and_build_snapshot_still_work() -> None:
    built = build_snapshot({resource.CLUSTER: [("a", cluster("a"))],
                            resource.ENDPOINT: [("a", endpoints("a", 1))]})
    assert set(built.types) == {resource.CLUSTER, resource.ENDPOINT, resource.LISTENER,
                                resource.ROUTE, resource.SECRET}  # no optional VHDS
    assert built.problems() == []
    again = build_snapshot({resource.CLUSTER: [("a", cluster("a"))],
                            resource.ENDPOINT: [("a", endpoints("a", 2))]}, reuse=built)
    assert again.get(resource.CLUSTER) is built.get(resource.CLUSTER)
    assert again.get(resource.ENDPOINT).changed_since(built.get(resource.ENDPOINT)) == {"a"}
    plain = TypeSnapshot(resource.CLUSTER, "", {})
    assert plain.size == 0 and plain.wildcard is None and not plain.aliases


def test_a_virtual_host_served_alone_points_at_its_clusters() -> None:
    """VHDS: each virtual host is a resource; its clusters must be there too."""
    [vhost] = routes("egress", "a").virtual_hosts
    served = encode_resource(resource.VIRTUAL_HOST, "egress/a", vhost)
    assert served.refs == {resource.CLUSTER: frozenset({"a"})}
    missing = Snapshot.of({
        resource.CLUSTER: _typed(resource.CLUSTER, [_cluster("b")], []),
        resource.ENDPOINT: _typed(resource.ENDPOINT, [_cla("b", 1)], []),
        resource.VIRTUAL_HOST: _typed(resource.VIRTUAL_HOST, [served], []),
    })
    assert missing.problems() == ["virtual host 'egress/a' points at missing cluster 'a'"]


def test_a_change_from_a_consistent_snapshot_is_checked_where_it_changed() -> None:
    """After a consistent snapshot only references into or out of changed types are
    looked at again: what a change breaks is still found, whichever end it is on."""
    lds = encode_resource(resource.LISTENER, "egress", listener("egress", "egress"))
    route = _typed(resource.ROUTE, [encode_resource(resource.ROUTE, "egress",
                                                    routes("egress", "a", "b"))], [])
    listeners = _typed(resource.LISTENER, [], [lds])
    clusters = _typed(resource.CLUSTER, [_cluster("a"), _cluster("b")], [])
    claims = _typed(resource.ENDPOINT, [_cla("a", 1), _cla("b", 2)], [])
    good = Snapshot.of({resource.CLUSTER: clusters, resource.ENDPOINT: claims,
                        resource.LISTENER: listeners, resource.ROUTE: route})
    assert good.problems() == []
    fewer_claims = Snapshot.of({resource.CLUSTER: clusters,
                                resource.ENDPOINT: _typed(resource.ENDPOINT, [_cla("a", 1)], []),
                                resource.LISTENER: listeners, resource.ROUTE: route},
                               reuse=good)
    assert fewer_claims.problems() == ["cluster 'b' points at missing endpoints 'b'"]
    fewer_clusters = Snapshot.of({
        resource.CLUSTER: _typed(resource.CLUSTER, [_cluster("a")], []),
        resource.ENDPOINT: claims, resource.LISTENER: listeners, resource.ROUTE: route},
        reuse=good)
    assert fewer_clusters.problems() == [
        "route configuration 'egress' points at missing cluster 'b'"]
    no_route = Snapshot.of({resource.CLUSTER: clusters, resource.ENDPOINT: claims,
                            resource.LISTENER: listeners,
                            resource.ROUTE: _typed(resource.ROUTE, [], [])}, reuse=good)
    assert no_route.problems() == [
        "listener 'egress' points at missing route configuration 'egress'"]
