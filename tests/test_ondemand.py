"""On-demand sidecars over delta ADS, driven by a raw gRPC client: what a wildcard
subscription gets, VHDS by alias (found, not found, asked again), clusters and endpoints
by name, updates to what was fetched, and nothing else ever sent."""

from __future__ import annotations

from typing import Any

from envoy.config.route.v3 import route_components_pb2, route_pb2
from envoy.service.discovery.v3 import discovery_pb2
from hypothesis import given, settings
from hypothesis import strategies as st

from controlplane import resource
from controlplane.assembly import MeshBuild
from controlplane.assembly.ondemand import ondemand_snapshot
from controlplane.cache import Snapshot
from controlplane.mesh.model import Mesh
from controlplane.proxy import ProxyIdentity
from controlplane.server.delta import DeltaStream
from controlplane.server.vhds import with_aliases
from tests.conftest import Env
from tests.support.xds_client import AdsClient, node

PROXY = ProxyIdentity(node_id="fe-1", service="frontend", inbound_port=15006, app_port=9080,
                      on_demand=True)
ON_DEMAND_NODE: dict[str, Any] = {"on_demand": True, "inbound_port": 15006, "app_port": 9080}
REVIEWS = "outbound|9080||reviews.default.svc.cluster.local"
RATINGS = "outbound|9080||ratings.default.svc.cluster.local"
INBOUND = "inbound|15006||frontend.default.svc.cluster.local"


def mesh(reviews_port: int = 9081, reviews_timeout: str | None = None,
         reviews_limit: int | None = None) -> Mesh:
    reviews: dict[str, Any] = {"name": "reviews", "port": 9080,
                               "endpoints": [{"address": "127.0.0.1", "port": reviews_port}]}
    if reviews_timeout is not None:
        reviews["policy"] = {"timeout": reviews_timeout}
    if reviews_limit is not None:  # a change of the cluster itself
        reviews["policy"] = {"circuit_breaker": {"max_connections": reviews_limit}}
    return Mesh.model_validate({"services": [
        reviews,
        {"name": "ratings", "port": 9080, "endpoints": [{"address": "127.0.0.1", "port": 9082}]},
        {"name": "frontend", "port": 9080, "endpoints": [{"address": "127.0.0.1", "port": 9080}]},
    ]})


def publish(env: Env, built: Mesh, reuse: Snapshot | None = None) -> Snapshot:
    made = ondemand_snapshot(MeshBuild(built), PROXY, reuse)
    env.cache.set_snapshot(PROXY.group, made)
    return made


def names(response: discovery_pb2.DeltaDiscoveryResponse) -> list[str]:
    return sorted(r.name for r in response.resources)


async def start(env: Env) -> AdsClient:
    """An on-demand sidecar's first requests, as Envoy sends them: wildcard CDS and LDS,
    then RDS for ``egress`` and a VHDS request with no names; each answered."""
    client = env.client(delta=True)
    await client.send(node=node("fe-1", **ON_DEMAND_NODE), type_url=resource.CLUSTER)
    clusters = await client.recv()
    assert clusters.type_url == resource.CLUSTER
    assert names(clusters) == [INBOUND]  # its own cluster only, none of the mesh's
    await client.ack(clusters)
    await client.send(type_url=resource.LISTENER)
    await client.ack(await client.recv())
    await client.send(type_url=resource.ROUTE, resource_names_subscribe=["egress"])
    routes = await client.recv()
    config = route_pb2.RouteConfiguration()
    routes.resources[0].resource.Unpack(config)
    assert config.HasField("vhds") and not config.virtual_hosts
    await client.ack(routes)
    await client.send(type_url=resource.VIRTUAL_HOST)
    first = await client.recv()
    # Nothing to send, but Envoy's VHDS waits for an answer in its namespace.
    assert names(first) == [] and list(first.removed_resources) == ["egress/"]
    await client.ack(first)
    return client


async def test_a_new_sidecar_gets_only_its_own_config(env: Env) -> None:
    publish(env, mesh())
    client = await start(env)
    await client.send(type_url=resource.ENDPOINT)  # a wildcard: answered, with nothing
    endpoints = await client.recv()
    assert names(endpoints) == [] and list(endpoints.removed_resources) == []
    await client.ack(endpoints)
    assert await client.nothing()
    await client.close()


async def test_a_host_is_answered_by_its_virtual_host_with_the_alias_asked(env: Env) -> None:
    publish(env, mesh())
    client = await start(env)
    await client.send(type_url=resource.VIRTUAL_HOST,
                      resource_names_subscribe=["egress/reviews:9080"])
    response = await client.recv()
    [found] = response.resources
    assert found.name == "egress/reviews.default"
    assert list(found.aliases) == ["egress/reviews:9080"]
    vhost = route_components_pb2.VirtualHost()
    found.resource.Unpack(vhost)
    assert vhost.name == found.name  # Envoy keys what it holds by this name
    assert "reviews:9080" in vhost.domains
    assert vhost.routes[-1].route.cluster == REVIEWS
    await client.ack(response)
    assert await client.nothing()

    # Its cluster and endpoints, by name.
    await client.send(type_url=resource.CLUSTER, resource_names_subscribe=[REVIEWS])
    assert names(await client.recv()) == [REVIEWS]
    await client.send(type_url=resource.ENDPOINT, resource_names_subscribe=[REVIEWS])
    assert names(await client.recv()) == [REVIEWS]
    await client.close()


async def test_an_unknown_host_is_answered_as_unresolved_each_time_it_is_asked(env: Env) -> None:
    publish(env, mesh())
    client = await start(env)
    for _ in range(2):  # Envoy asks again on the next call: it waits for an answer each time
        await client.send(type_url=resource.VIRTUAL_HOST,
                          resource_names_subscribe=["egress/nowhere"])
        response = await client.recv()
        [entry] = response.resources
        assert entry.name == "egress/nowhere" and list(entry.aliases) == ["egress/nowhere"]
        assert not entry.HasField("resource")  # "cannot resolve": Envoy answers 404
        assert list(response.removed_resources) == []
        await client.ack(response)
    await client.close()


async def test_a_host_in_capitals_finds_its_virtual_host(env: Env) -> None:
    """Envoy asks with the Host as sent and matches domains regardless of case."""
    publish(env, mesh())
    client = await start(env)
    await client.send(type_url=resource.VIRTUAL_HOST,
                      resource_names_subscribe=["egress/Reviews.Default:9080"])
    response = await client.recv()
    [found] = response.resources
    assert found.name == "egress/reviews.default"
    assert list(found.aliases) == ["egress/Reviews.Default:9080"]
    await client.close()


async def test_asked_again_a_host_is_sent_again(env: Env) -> None:
    publish(env, mesh())
    client = await start(env)
    for _ in range(2):
        await client.send(type_url=resource.VIRTUAL_HOST,
                          resource_names_subscribe=["egress/reviews"])
        response = await client.recv()
        assert names(response) == ["egress/reviews.default"]
        assert list(response.resources[0].aliases) == ["egress/reviews"]
        await client.ack(response)
    await client.close()


async def test_what_was_fetched_is_updated_and_nothing_else_is_sent(env: Env) -> None:
    before = publish(env, mesh())
    client = await start(env)
    await client.send(type_url=resource.VIRTUAL_HOST, resource_names_subscribe=["egress/reviews"])
    await client.ack(await client.recv())
    await client.send(type_url=resource.CLUSTER, resource_names_subscribe=[REVIEWS])
    await client.ack(await client.recv())
    await client.send(type_url=resource.ENDPOINT, resource_names_subscribe=[REVIEWS])
    await client.ack(await client.recv())

    # reviews' endpoint moves and its routes change; ratings was never fetched.
    publish(env, mesh(reviews_port=9091, reviews_timeout="3s"), before)
    seen: dict[str, list[str]] = {}
    for _ in range(2):
        response = await client.recv()
        seen[response.type_url] = names(response)
        await client.ack(response)
    assert seen == {resource.ENDPOINT: [REVIEWS], resource.VIRTUAL_HOST: ["egress/reviews.default"]}
    assert await client.nothing()
    await client.close()


async def test_a_state_of_the_world_stream_of_an_on_demand_sidecar_gets_everything(
        env: Env) -> None:
    """On demand needs delta; over SotW the sidecar is an ordinary one (its group has no
    ``~on-demand``), so it is served the full config of that group."""
    full = MeshBuild(mesh()).snapshot(ProxyIdentity("fe-1", "frontend", inbound_port=15006,
                                                    app_port=9080))
    env.cache.set_snapshot(ProxyIdentity("x", "frontend", inbound_port=15006,
                                         app_port=9080).group, full)
    client = env.client()
    await client.send(node=node("fe-1", **ON_DEMAND_NODE), type_url=resource.CLUSTER)
    response = await client.recv()
    assert len(response.resources) == 4  # three services' clusters and the inbound one
    await client.close()


def test_aliases_added_to_a_prepared_resource_read_back_as_one_resource() -> None:
    made = ondemand_snapshot(MeshBuild(mesh()), PROXY)
    typed = made.types[resource.VIRTUAL_HOST]
    res = typed.resources["egress/ratings.default"]
    asked = {"egress/ratings", "egress/ratings.default.svc:9080", "egress/reviews"}
    [chunk] = with_aliases([res], typed.aliases, asked)
    parsed = discovery_pb2.DeltaDiscoveryResponse.FromString(chunk)
    [one] = parsed.resources
    assert one.name == res.name and one.version == res.version
    assert sorted(one.aliases) == ["egress/ratings", "egress/ratings.default.svc:9080"]
    assert one.resource.value == discovery_pb2.DeltaDiscoveryResponse.FromString(
        res.delta_chunk).resources[0].resource.value


_OD_NAMES = st.lists(st.sampled_from([
    "*", "egress/reviews", "egress/reviews.default:9080", "egress/ratings", "egress/nowhere",
    REVIEWS, RATINGS, INBOUND, "ghost"]), max_size=6)
_OD_TYPES = st.sampled_from([resource.CLUSTER, resource.ENDPOINT, resource.VIRTUAL_HOST])


@st.composite
def _od_steps(draw: st.DrawFn) -> list[tuple[discovery_pb2.DeltaDiscoveryRequest, int | None]]:
    steps = []
    for _ in range(draw(st.integers(1, 10))):
        request = discovery_pb2.DeltaDiscoveryRequest(
            type_url=draw(_OD_TYPES), resource_names_subscribe=draw(_OD_NAMES),
            resource_names_unsubscribe=draw(_OD_NAMES))
        steps.append((request, draw(st.one_of(st.none(), st.integers(0, 3)))))
    # A reconnect: the first request may say what the client holds (real or stale).
    held = draw(st.dictionaries(st.sampled_from([REVIEWS, RATINGS, INBOUND, "ghost",
                                                 "egress/reviews.default"]),
                                st.sampled_from(["old", *_VERSIONS]), max_size=3))
    steps[0][0].initial_resource_versions.update(held)
    return steps


_OD_SNAPSHOTS = [ondemand_snapshot(MeshBuild(mesh()), PROXY),
                 ondemand_snapshot(MeshBuild(mesh(reviews_port=9091, reviews_timeout="2s")),
                                   PROXY),
                 ondemand_snapshot(MeshBuild(Mesh.model_validate({"services": [
                     {"name": "frontend", "port": 9080, "endpoints": []}]})), PROXY),
                 ondemand_snapshot(MeshBuild(mesh(reviews_limit=7)), PROXY)]
_VERSIONS = sorted({r.version for snap in _OD_SNAPSHOTS for typed in snap.types.values()
                    for r in typed.resources.values()})[:6]


@settings(max_examples=200, deadline=None)
@given(_od_steps())
def test_what_the_stream_thinks_the_client_holds_is_what_it_sent(
        steps: list[tuple[discovery_pb2.DeltaDiscoveryRequest, int | None]]) -> None:
    """Any subscription sequence over on-demand snapshots: applying every response the
    way Envoy does gives exactly the holdings the stream keeps (its view over the
    snapshot included), no response names a resource twice, and every resource held is
    one the client subscribed to, by name, alias or wildcard."""
    stream = DeltaStream(1, "ads")
    stream.on_snapshot(_OD_SNAPSHOTS[0])
    first_request = steps[0][0]
    held: dict[str, dict[str, str]] = {
        first_request.type_url: dict(first_request.initial_resource_versions)}
    first = True
    for request, publish_index in steps:
        if first:
            request.node.CopyFrom(node("fe-1", **ON_DEMAND_NODE))
            first = False
        before = stream.types.get(request.type_url)
        was_wildcard = before is not None and before.wildcard
        pushes = stream.on_request(request).pushes
        # The client forgets what it unsubscribes from (no removal is sent for it), and
        # what it had by wildcard only when it drops the wildcard (an unsubscribe wins).
        mine = held.setdefault(request.type_url, {})
        for name in request.resource_names_unsubscribe:
            mine.pop(name, None)
        if was_wildcard and "*" in request.resource_names_unsubscribe:
            state = stream.types[request.type_url]
            kept = state.subscribed | state.targets
            held[request.type_url] = {n: v for n, v in mine.items() if n in kept}
        if publish_index is not None:
            pushes += stream.on_snapshot(_OD_SNAPSHOTS[publish_index])
        for push in pushes:
            response = discovery_pb2.DeltaDiscoveryResponse.FromString(push.encode())
            names_sent = [r.name for r in response.resources]
            assert len(set(names_sent) | set(response.removed_resources)) == len(
                names_sent) + len(response.removed_resources)
            mine = held.setdefault(response.type_url, {})
            for name in response.removed_resources:
                mine.pop(name, None)
            for entry in response.resources:
                if entry.HasField("resource"):
                    mine[entry.name] = entry.version
        for type_url, state in stream.types.items():
            assert dict(state.client.items()) == held.get(type_url, {}), type_url
            typed = stream.snapshot.get(type_url) if stream.snapshot else None
            for name in held.get(type_url, {}):
                assert typed is not None and name in typed.resources
                by_wildcard = state.wildcard and (typed.wildcard is None
                                                  or name in typed.wildcard)
                assert (name in state.subscribed or name in state.targets or by_wildcard), name
