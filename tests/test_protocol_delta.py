"""Incremental (delta) ADS, driven by a raw gRPC client (shared/XDS-PITFALLS.md); and
property tests that drive any request sequence through both protocols' logic."""

from __future__ import annotations

from typing import Any

from envoy.config.cluster.v3 import cluster_pb2
from envoy.service.discovery.v3 import discovery_pb2
from hypothesis import given, settings
from hypothesis import strategies as st

from controlplane import resource
from controlplane.cache import Snapshot
from controlplane.server.delta import DeltaStream
from controlplane.server.limits import LimitError, Limits
from controlplane.server.sotw import SotwStream
from controlplane.server.stream import ProtocolError, StreamBase
from tests.conftest import Env
from tests.support.snapshots import snapshot
from tests.support.xds_client import node
from tests.test_protocol_sotw import GROUP


def sent(response: discovery_pb2.DeltaDiscoveryResponse) -> list[str]:
    return sorted(r.name for r in response.resources)


async def test_wildcard_initial_then_ack_is_quiet(env: Env) -> None:
    env.cache.set_snapshot(GROUP, snapshot({"a": (1,), "b": (2,)}))
    client = env.client(delta=True)
    await client.send(node=node(), type_url=resource.CLUSTER)
    response = await client.recv()
    assert sent(response) == ["a", "b"]
    assert response.system_version_info == env.cache.get(GROUP).get(resource.CLUSTER).version
    first = cluster_pb2.Cluster()
    response.resources[0].resource.Unpack(first)
    assert first.name == response.resources[0].name
    assert response.resources[0].version
    await client.ack(response)
    assert await client.nothing()
    await client.close()


async def test_only_changes_are_sent_and_removals_come_last(env: Env) -> None:
    env.cache.set_snapshot(GROUP, snapshot({"a": (1,), "b": (2,)}))
    client = env.client(delta=True)
    await client.send(node=node(), type_url=resource.CLUSTER)
    await client.ack(await client.recv())
    await client.send(type_url=resource.ROUTE, resource_names_subscribe=["egress"])
    await client.ack(await client.recv())

    env.cache.set_snapshot(GROUP, snapshot({"a": (1,), "c": (3,)}))
    added = await client.recv()
    assert added.type_url == resource.CLUSTER and sent(added) == ["c"]
    assert list(added.removed_resources) == []
    routes = await client.recv()
    assert routes.type_url == resource.ROUTE
    removal = await client.recv()
    assert removal.type_url == resource.CLUSTER
    assert list(removal.removed_resources) == ["b"] and sent(removal) == []
    await client.close()


async def test_missing_names_are_answered_as_removed_then_sent_when_they_appear(env: Env) -> None:
    env.cache.set_snapshot(GROUP, snapshot({"a": (1,)}))
    client = env.client(delta=True)
    await client.send(node=node(), type_url=resource.ENDPOINT,
                      resource_names_subscribe=["a", "ghost"])
    response = await client.recv()
    assert sent(response) == ["a"]
    assert list(response.removed_resources) == ["ghost"]
    await client.ack(response)
    assert await client.nothing()
    env.cache.set_snapshot(GROUP, snapshot({"a": (1,), "ghost": (7,)}))
    appeared = await client.recv()
    assert sent(appeared) == ["ghost"]
    await client.close()


async def test_unsubscribe_then_resubscribe_sends_again(env: Env) -> None:
    env.cache.set_snapshot(GROUP, snapshot({"a": (1,), "b": (2,)}))
    client = env.client(delta=True)
    await client.send(node=node(), type_url=resource.ENDPOINT,
                      resource_names_subscribe=["a", "b"])
    response = await client.recv()
    assert sent(response) == ["a", "b"]
    await client.ack(response)
    await client.send(type_url=resource.ENDPOINT, resource_names_unsubscribe=["b"])
    assert await client.nothing()
    await client.send(type_url=resource.ENDPOINT, resource_names_subscribe=["b"])
    again = await client.recv()
    assert sent(again) == ["b"]
    await client.close()


async def test_subscription_change_counts_even_with_a_stale_nonce(env: Env) -> None:
    env.cache.set_snapshot(GROUP, snapshot({"a": (1,), "b": (2,)}))
    client = env.client(delta=True)
    await client.send(node=node(), type_url=resource.ENDPOINT, resource_names_subscribe=["a"])
    await client.recv()
    await client.send(type_url=resource.ENDPOINT, response_nonce="not-a-nonce",
                      resource_names_subscribe=["b"])
    response = await client.recv()
    assert sent(response) == ["b"]
    await client.close()


async def test_reconnect_with_initial_versions_sends_only_the_difference(env: Env) -> None:
    env.cache.set_snapshot(GROUP, snapshot({"a": (1,), "b": (2,)}))
    client = env.client(delta=True)
    await client.send(node=node(), type_url=resource.CLUSTER)
    held = {r.name: r.version for r in (await client.recv()).resources}
    await client.close()

    # While the proxy is away: b is deleted, c is added, a stays.
    env.cache.set_snapshot(GROUP, snapshot({"a": (1,), "c": (3,)}))
    back = env.client(delta=True)
    await back.send(node=node(), type_url=resource.CLUSTER, initial_resource_versions=held)
    response = await back.recv()
    assert sent(response) == ["c"]
    assert list(response.removed_resources) == ["b"]
    await back.close()

    # Reconnect holding exactly what is served: nothing to send.
    current = env.cache.get(GROUP).get(resource.CLUSTER)
    same = env.client(delta=True)
    await same.send(node=node(), type_url=resource.CLUSTER,
                    initial_resource_versions={n: r.version for n, r in current.resources.items()})
    assert await same.nothing()
    await same.close()


async def test_nack_is_recorded_and_not_resent(env: Env) -> None:
    env.cache.set_snapshot(GROUP, snapshot({"a": (1,)}))
    client = env.client(delta=True)
    await client.send(node=node(), type_url=resource.CLUSTER)
    response = await client.recv()
    await client.nack(response, message="cluster a: bad lb policy")
    assert await client.nothing()
    [stream] = env.registry.describe()
    assert stream["protocol"] == "delta"
    assert stream["types"]["cds"]["last_nack"]["error"] == "cluster a: bad lb policy"
    await client.close()


async def test_explicit_wildcard_and_its_removal(env: Env) -> None:
    env.cache.set_snapshot(GROUP, snapshot({"a": (1,), "b": (2,)}))
    client = env.client(delta=True)
    await client.send(node=node(), type_url=resource.CLUSTER, resource_names_subscribe=["a"])
    response = await client.recv()
    assert sent(response) == ["a"]
    await client.ack(response)
    await client.send(type_url=resource.CLUSTER, resource_names_subscribe=["*"])
    assert sent(await client.recv()) == ["b"]
    await client.close()


async def test_updated_cluster_gets_its_endpoints_again(env: Env) -> None:
    first = snapshot({"a": (1,)})
    env.cache.set_snapshot(GROUP, first)
    client = env.client(delta=True)
    await client.send(node=node(), type_url=resource.CLUSTER)
    await client.ack(await client.recv())
    await client.send(type_url=resource.ENDPOINT, resource_names_subscribe=["a"])
    await client.ack(await client.recv())
    # Change cluster "a" itself (not its endpoints): endpoints must follow the cluster.
    changed = snapshot({"a": (1,)})
    from controlplane.cache.snapshot import build_snapshot
    from tests.support.snapshots import cluster as make_cluster
    tweaked = make_cluster("a")
    tweaked.connect_timeout.seconds = 3
    named = {t: [(n, r.message) for n, r in s.resources.items()] for t, s in changed.types.items()}
    named[resource.CLUSTER] = [("a", tweaked)]
    env.cache.set_snapshot(GROUP, build_snapshot(named, reuse=first))
    cds = await client.recv()
    eds = await client.recv()
    assert (cds.type_url, sent(cds)) == (resource.CLUSTER, ["a"])
    assert (eds.type_url, sent(eds)) == (resource.ENDPOINT, ["a"])
    await client.close()


# Any sequence of requests a client can send, against the protocol logic itself: each
# is handled or refused with ProtocolError / LimitError (a clean status), never a crash.
_TYPES = st.sampled_from([*resource.PUSH_ORDER, "", "type.googleapis.com/made.up.T",
                          "x" * 300, "type.googleapis.com/made.up.U"])
_NAMES = st.lists(st.sampled_from(["a", "b", "*", "", "zzz", "x" * 250]), max_size=12)
_NODES = st.one_of(st.none(), st.builds(
    lambda i, c, ns, port: node(i, c, namespace=ns, egress_port=port),
    st.text(max_size=80), st.text(max_size=80), st.text(max_size=20),
    st.one_of(st.floats(allow_nan=True), st.integers(-10, 70000).map(float))))


@st.composite
def _sotw_requests(draw: st.DrawFn) -> list[discovery_pb2.DiscoveryRequest]:
    requests = []
    for _ in range(draw(st.integers(1, 8))):
        request = discovery_pb2.DiscoveryRequest(
            type_url=draw(_TYPES), resource_names=draw(_NAMES),
            version_info=draw(st.text(max_size=5)), response_nonce=draw(
                st.sampled_from(["", "1", "2", "3", "junk"])))
        made = draw(_NODES)
        if made is not None:
            request.node.CopyFrom(made)
        if draw(st.booleans()):
            request.error_detail.message = draw(st.text(max_size=20))
        requests.append(request)
    return requests


@st.composite
def _delta_requests(draw: st.DrawFn) -> list[discovery_pb2.DeltaDiscoveryRequest]:
    requests = []
    for _ in range(draw(st.integers(1, 8))):
        request = discovery_pb2.DeltaDiscoveryRequest(
            type_url=draw(_TYPES), resource_names_subscribe=draw(_NAMES),
            resource_names_unsubscribe=draw(_NAMES),
            initial_resource_versions={n: "v" for n in draw(_NAMES)},
            response_nonce=draw(st.sampled_from(["", "1", "2", "junk"])))
        made = draw(_NODES)
        if made is not None:
            request.node.CopyFrom(made)
        if draw(st.booleans()):
            request.error_detail.message = draw(st.text(max_size=20))
        requests.append(request)
    return requests


def _drive(stream: StreamBase, requests: list[Any], snapshots: list[Snapshot]) -> None:
    for index, request in enumerate(requests):
        try:
            stream.on_request(request)
        except (ProtocolError, LimitError):
            return  # the stream ends here with a clean status
        if index < len(snapshots):
            stream.on_snapshot(snapshots[index])
        stream.describe()


_SNAPSHOTS = [snapshot({"a": (1,), "b": (2,)}), snapshot({"a": (1, 2)}), snapshot({"zzz": (3,)})]
_FUZZ_LIMITS = Limits(max_names_per_request=8, max_name_bytes=200, max_unknown_types=1,
                      max_node_id_bytes=64)


@settings(max_examples=300, deadline=None)
@given(_sotw_requests(), st.integers(0, 3))
def test_any_sotw_request_sequence_is_handled_or_refused_cleanly(
    requests: list[discovery_pb2.DiscoveryRequest], fixed: int,
) -> None:
    fixed_type = [None, resource.CLUSTER, resource.ENDPOINT, resource.ROUTE][fixed]
    received = [r.SerializeToString() for r in requests]  # (reading one clears fields)
    _drive(SotwStream(1, "ads", fixed_type, limits=_FUZZ_LIMITS), requests, _SNAPSHOTS)
    # As the server receives them: bytes (an ACK of the last push is read unparsed).
    _drive(SotwStream(1, "ads", fixed_type, limits=_FUZZ_LIMITS), received, _SNAPSHOTS)


@settings(max_examples=300, deadline=None)
@given(_delta_requests(), st.integers(0, 3))
def test_any_delta_request_sequence_is_handled_or_refused_cleanly(
    requests: list[discovery_pb2.DeltaDiscoveryRequest], fixed: int,
) -> None:
    fixed_type = [None, resource.CLUSTER, resource.ENDPOINT, resource.ROUTE][fixed]
    _drive(DeltaStream(1, "ads", fixed_type, limits=_FUZZ_LIMITS), requests, _SNAPSHOTS)


def test_a_synced_client_costs_no_copy_of_its_snapshot_and_equal_subscriptions_are_shared(
) -> None:
    """Memory at a thousand streams: a client holding exactly its snapshot's resources
    keeps no name -> version entries of its own (the snapshot's mapping is its view),
    also after a change; streams asking for the same names share one set."""
    names = [f"c{i}" for i in range(50)]
    first = snapshot({n: (i,) for i, n in enumerate(names)})
    streams = []
    for index in range(2):
        stream = DeltaStream(index, "ads")
        stream.on_request(discovery_pb2.DeltaDiscoveryRequest(node=node(),
                                                              type_url=resource.CLUSTER))
        stream.on_request(discovery_pb2.DeltaDiscoveryRequest(
            type_url=resource.ENDPOINT, resource_names_subscribe=list(names)))
        stream.on_snapshot(first)
        streams.append(stream)
    a, b = streams
    for stream in streams:
        for type_url in (resource.CLUSTER, resource.ENDPOINT):
            assert stream.types[type_url].client.own_entries == 0, type_url
    assert a.types[resource.ENDPOINT].subscribed is b.types[resource.ENDPOINT].subscribed

    changed = snapshot({**{n: (i,) for i, n in enumerate(names)}, "c7": (99,)})
    pushes = a.on_snapshot(changed)
    assert {p.type_url: p.names for p in pushes} == {resource.ENDPOINT: ["c7"]}
    assert a.types[resource.ENDPOINT].client.own_entries == 0
    assert a.types[resource.ENDPOINT].client.get("c7") == changed.get(
        resource.ENDPOINT).resources["c7"].version  # type: ignore[union-attr]


async def test_on_reconnect_a_cluster_that_changed_gets_its_unchanged_endpoints_again(
        env: Env) -> None:
    """Envoy finishes warming an updated cluster only on an EDS response: a sidecar that
    reconnects holding the old cluster and the current endpoints gets both."""
    from controlplane.cache.snapshot import build_snapshot
    from tests.support.snapshots import cluster as make_cluster

    first = snapshot({"a": (1,)})
    tweaked = make_cluster("a")
    tweaked.connect_timeout.seconds = 3
    named = {t: [(n, r.message) for n, r in s.resources.items()] for t, s in first.types.items()}
    named[resource.CLUSTER] = [("a", tweaked)]
    env.cache.set_snapshot(GROUP, build_snapshot(named, reuse=first))

    def held(type_url: str) -> dict[str, str]:
        typed = first.get(type_url)
        assert typed is not None
        return {n: r.version for n, r in typed.resources.items()}

    client = env.client(delta=True)
    await client.send(node=node(), type_url=resource.CLUSTER,
                      initial_resource_versions=held(resource.CLUSTER))
    await client.send(type_url=resource.ENDPOINT, resource_names_subscribe=["a"],
                      initial_resource_versions=held(resource.ENDPOINT))
    got = {}
    for _ in range(2):
        response = await client.recv()
        got[response.type_url] = sent(response)
        await client.ack(response)
    assert got == {resource.CLUSTER: ["a"], resource.ENDPOINT: ["a"]}
    await client.close()


_FEW = st.sampled_from(["a", "b", "c", "d", "e"])


@settings(max_examples=300, deadline=None)
@given(st.sets(_FEW), st.sets(_FEW), st.sets(_FEW), st.sets(_FEW),
       st.one_of(st.none(), st.frozensets(_FEW)), st.booleans())
def test_a_first_answer_is_what_the_look_at_each_name_gives(
    present: set[str], subscribed: set[str], targets: set[str], told: set[str],
    wildcard: frozenset[str] | None, is_wildcard: bool,
) -> None:
    """The set-based answer to a client that holds nothing (delta._first_answer) against
    the general walk, made to run by holding one unrelated name (then removed)."""
    from controlplane.server.delta import DeltaTypeState
    from controlplane.server.held import Held

    typed = snapshot({n: (1,) for n in sorted(present)}).types[resource.CLUSTER]
    typed = type(typed)(typed.type_url, typed.version, typed.resources, wildcard)
    fresh = DeltaTypeState(subscribed=frozenset(subscribed), targets=frozenset(targets),
                           told_absent=set(told), wildcard=is_wildcard)
    general = DeltaTypeState(subscribed=frozenset(subscribed), targets=frozenset(targets),
                             told_absent=set(told), wildcard=is_wildcard,
                             client=Held({"zz-unrelated": "v"}))
    updated, removed, unresolved, whole = DeltaStream._changes(typed, fresh, None)
    g_updated, g_removed, g_unresolved, g_whole = DeltaStream._changes(typed, general, None)
    assert [r.name for r in updated] == [r.name for r in g_updated]
    assert removed == [n for n in g_removed if n != "zz-unrelated"]
    assert (unresolved, whole) == (g_unresolved, g_whole)


@settings(max_examples=100, deadline=None)
@given(st.text(max_size=300), st.lists(st.text(max_size=200), max_size=4),
       st.sampled_from(["1", "7" * 130]))
def test_the_hand_encoded_delta_header_is_what_protobuf_encodes(
        version: str, removed: list[str], nonce: str) -> None:
    from envoy.config.core.v3 import base_pb2

    stream = DeltaStream(1, "ads", identifier="controlplane-" + "y" * 200)
    assert stream._header(version, resource.ENDPOINT, nonce, removed) == (
        discovery_pb2.DeltaDiscoveryResponse(
            system_version_info=version, type_url=resource.ENDPOINT, nonce=nonce,
            removed_resources=removed,
            control_plane=base_pb2.ControlPlane(identifier="controlplane-" + "y" * 200),
        ).SerializeToString())
