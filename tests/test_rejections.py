"""Rejections (observe/rejections.py): a NACK is traced to the services whose resources
it rejected and the policy objects that shaped them, kept until the proxy ACKs that type
again or leaves, and bounded. Driven through the real xDS server, fed by the real
pipeline from real meshes; a raw gRPC client plays the proxy that NACKs."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import grpc
import pytest
from prometheus_client import REGISTRY
from structlog.testing import capture_logs

from controlplane import resource
from controlplane.cache import SnapshotCache
from controlplane.mesh.model import Mesh
from controlplane.observe import origins
from controlplane.observe.rejections import LOG_LINES_PER_SECOND, Rejected, Rejections
from controlplane.pipeline import Pipeline
from controlplane.proxy import ProxyIdentity
from controlplane.server import StreamRegistry, XdsServer, create_server
from tests.support.xds_client import AdsClient, node

REVIEWS = "outbound|9080||reviews.default.svc.cluster.local"
RATINGS = "outbound|9080||ratings.default.svc.cluster.local"
POLICY = ("TrafficPolicy", "default", "reviews-policy")


def mesh(reviews_policy: dict[str, Any] | None = None, ratings_port: int = 9091,
         reviews_port: int = 9090) -> Mesh:
    return Mesh.model_validate({"services": [
        {"name": "reviews", "port": 9080, "policy": reviews_policy or {},
         "endpoints": [{"address": "127.0.0.1", "port": reviews_port}]},
        {"name": "ratings", "port": 9080,
         "endpoints": [{"address": "127.0.0.1", "port": ratings_port}]},
    ]})


def resolve(service: str) -> list[tuple[str, str, str]]:
    return [POLICY] if service == "default/reviews" else []


@dataclass
class Rig:
    pipeline: Pipeline
    rejections: Rejections
    channel: grpc.aio.Channel
    changes: list[int] = field(default_factory=list)
    registry: StreamRegistry = field(default_factory=StreamRegistry)

    async def settle(self, check: Any, what: str) -> None:
        for _ in range(150):
            if check():
                return
            await asyncio.sleep(0.02)
        raise AssertionError(f"timed out waiting for {what}: {self.rejections.summary()}")


@pytest.fixture
async def rig() -> AsyncIterator[Rig]:
    cache = SnapshotCache()
    pipeline = Pipeline(cache)
    assert pipeline.set_mesh(mesh())
    rejections = Rejections(resolve)
    registry = StreamRegistry()
    xds = XdsServer(cache, registry, observers=[rejections])
    server, port = await create_server("127.0.0.1:0", xds)
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    made = Rig(pipeline, rejections, channel, registry=registry)
    rejections.on_change = lambda: made.changes.append(len(rejections.by_policy()))
    yield made
    await channel.close()
    await server.stop(0)
    pipeline.close()


def gauge() -> float | None:
    return REGISTRY.get_sample_value("controlplane_proxy_nacks")


async def _subscribed(rig: Rig, delta: bool = False, node_id: str = "frontend-1",
                      type_url: str = resource.CLUSTER, names: list[str] | None = None,
                      ) -> tuple[AdsClient, Any]:
    client = AdsClient(rig.channel, delta=delta)
    if delta:
        await client.send(node=node(node_id), type_url=type_url,
                          resource_names_subscribe=names or [])
    else:
        await client.send(node=node(node_id), type_url=type_url, resource_names=names or [])
    first = await client.recv()
    await client.ack(first, **({} if delta else {"resource_names": names or []}))
    # Until the server has read the ACK, a push of a newer version makes it a stale one
    # (its nonce is no longer the latest): what the proxy held would then be unknown.
    await rig.settle(lambda: any(
        s.proxy is not None and s.proxy.node_id == node_id
        and s.type_states().get(type_url) is not None and s.type_states()[type_url].acked_version
        for s in rig.registry.streams()), "the ACK")
    return client, first


@pytest.mark.parametrize("delta", [False, True], ids=["sotw", "delta"])
async def test_nack_of_a_changed_cluster_names_its_service_and_policy(rig: Rig,
                                                                     delta: bool) -> None:
    client, _ = await _subscribed(rig, delta)
    await rig.pipeline.apply(mesh({"circuit_breaker": {"max_connections": 7}}))
    pushed = await client.recv()
    await client.nack(pushed, message="Envoy said no to something")
    await rig.settle(lambda: rig.rejections.by_policy(), "the rejection")
    assert rig.rejections.by_policy() == {
        ("Service", "default", "reviews"): Rejected(1, "Envoy said no to something", ["cds"]),
        POLICY: Rejected(1, "Envoy said no to something", ["cds"])}
    [standing] = rig.rejections.summary()["rejections"]
    assert standing["node_id"] == "frontend-1" and standing["services"] == ["default/reviews"]
    assert delta or standing["version"] == pushed.version_info
    assert gauge() == 1
    assert rig.changes and rig.changes[-1] == 2

    # The fix: a newer version, ACKed, clears it.
    await rig.pipeline.apply(mesh({"circuit_breaker": {"max_connections": 8}}))
    fixed = await client.recv()
    await client.ack(fixed)
    await rig.settle(lambda: not rig.rejections.by_policy(), "the rejection to clear")
    assert gauge() == 0 and rig.changes[-1] == 0
    await client.close()


async def test_error_text_wins_over_the_diff(rig: Rig) -> None:
    """Envoy names the cluster it refused: that service, though others changed too."""
    client, _ = await _subscribed(rig)
    await rig.pipeline.apply(mesh({"timeout": "3s", "circuit_breaker": {"max_requests": 3}},
                                  ratings_port=9092))
    pushed = await client.recv()
    await client.nack(pushed, message=f"Error adding/updating cluster(s) {RATINGS}: bad")
    await rig.settle(lambda: rig.rejections.by_policy(), "the rejection")
    assert set(rig.rejections.by_policy()) == {("Service", "default", "ratings")}
    await client.close()


async def test_route_table_nack_names_the_virtual_host_that_changed(rig: Rig) -> None:
    client, _ = await _subscribed(rig, type_url=resource.ROUTE, names=["egress"])
    await rig.pipeline.apply(mesh({"timeout": "3s"}))
    pushed = await client.recv()
    assert pushed.type_url == resource.ROUTE
    await client.nack(pushed, message="route rejected", resource_names=["egress"])
    await rig.settle(lambda: rig.rejections.by_policy(), "the rejection")
    assert rig.rejections.by_policy()[POLICY] == Rejected(1, "route rejected", ["rds"])
    await client.close()


async def test_close_clears_and_two_proxies_count_twice(rig: Rig) -> None:
    one, _ = await _subscribed(rig, node_id="frontend-1")
    two, _ = await _subscribed(rig, node_id="frontend-2")
    await rig.pipeline.apply(mesh({"circuit_breaker": {"max_connections": 7}}))
    for client in (one, two):
        await client.nack(await client.recv(), message="no")
    await rig.settle(lambda: rig.rejections.proxies() == 2, "two rejecting proxies")
    assert rig.rejections.by_policy()[POLICY].proxies == 2
    assert gauge() == 2
    await one.close()
    await rig.settle(lambda: rig.rejections.proxies() == 1, "the first to leave")
    await two.close()
    await rig.settle(lambda: not rig.rejections.by_policy(), "both gone")
    assert gauge() == 0


async def test_bounds_error_size_and_origins(rig: Rig) -> None:
    rig.rejections.max_origins = 1
    client, _ = await _subscribed(rig)
    await rig.pipeline.apply(mesh({"circuit_breaker": {"max_connections": 7}}))
    await client.nack(await client.recv(), message=f"{REVIEWS}, {RATINGS}: " + "x" * 5000)
    await rig.settle(lambda: rig.rejections.by_policy(), "the rejection")
    summary = rig.rejections.summary()
    [standing] = summary["rejections"]
    assert len(standing["error"]) == 1024
    assert standing["services"] == ["default/reviews"]  # the first named; one fits
    assert summary["untracked_origins"] == 1
    await client.close()


def test_names_map_to_services() -> None:
    own = ProxyIdentity(node_id="r-1", service="reviews", namespace="shop")
    assert origins.of_name(REVIEWS, resource.CLUSTER) == "default/reviews"
    assert origins.of_name("outbound|80|v2|a-b.ns-1.svc.cluster.local",
                           resource.ENDPOINT) == "ns-1/a-b"
    assert origins.of_name("inbound|9080||reviews.shop.svc.cluster.local", resource.CLUSTER,
                           own) == "shop/reviews"
    assert origins.of_name("inbound", resource.LISTENER, own) == "shop/reviews"
    assert origins.of_name("inbound", resource.ROUTE, own) == "shop/reviews"
    assert origins.of_name("reviews.default:9080", resource.ROUTE) == "default/reviews"
    assert origins.of_name("egress/reviews.default", resource.VIRTUAL_HOST) == "default/reviews"
    for unowned in ("egress", "passthrough", "blackhole", "default", "ROOTCA"):
        assert origins.of_name(unowned, resource.LISTENER, own) is None
        assert origins.of_name(unowned, resource.SECRET, own) is None
    assert origins.in_error(
        "Error adding/updating listener(s) inbound: cannot bind '127.0.0.1:1': in use",
        own) == ["shop/reviews"]
    assert origins.in_error(f"cluster {REVIEWS} and x.y.svc.cluster.local") == [
        "default/reviews", "y/x"]
    assert origins.in_error("nothing named here") == []
    assert origins.shown(["default/reviews"]) == "service default/reviews"
    assert origins.shown([]) == "unknown"


def test_a_broken_resolver_or_consumer_never_raises() -> None:
    def broken(service: str) -> list[tuple[str, str, str]]:
        raise RuntimeError("bug")

    rejections = Rejections(broken)
    assert rejections._policies(("default/reviews",)) == [("Service", "default", "reviews")]


def test_origin_lines_are_bounded_per_second() -> None:
    now = [1000.0]
    rejections = Rejections(clock=lambda: now[0])
    with capture_logs() as logs:
        for _ in range(LOG_LINES_PER_SECOND + 5):
            rejections._log(resource.CLUSTER, "v1", ("default/reviews",))
        now[0] += 1
        rejections._log(resource.CLUSTER, "v2", ("default/reviews",))
    lines = [e for e in logs if e["event"] == "xds.nack_origin"]
    assert len(lines) == LOG_LINES_PER_SECOND + 1
    assert lines[-1]["suppressed_before"] == 5 and lines[-1]["version"] == "v2"
    assert lines[0]["origin"] == "service default/reviews" and lines[0]["policies"] == []


async def test_a_request_that_still_holds_the_old_version_does_not_clear(rig: Rig) -> None:
    """SotW: after a NACK Envoy asks for new names with the version it still holds; the
    server takes that as an ACK of the old version, which fixes nothing."""
    client, first = await _subscribed(rig, type_url=resource.ENDPOINT, names=[REVIEWS])
    await rig.pipeline.apply(mesh(reviews_port=9094))
    pushed = await client.recv()
    assert pushed.type_url == resource.ENDPOINT
    await client.nack(pushed, message=f"bad endpoints of {REVIEWS}", resource_names=[REVIEWS])
    await rig.settle(lambda: rig.rejections.by_policy(), "the rejection")
    await client.send(type_url=resource.ENDPOINT, version_info=first.version_info,
                      response_nonce=pushed.nonce, resource_names=[REVIEWS, RATINGS])
    wider = await client.recv()  # the server answers the new names
    assert rig.rejections.proxies() == 1  # still standing
    await client.ack(wider, resource_names=[REVIEWS, RATINGS])
    await rig.settle(lambda: not rig.rejections.by_policy(), "cleared by the real ACK")
    await client.close()
