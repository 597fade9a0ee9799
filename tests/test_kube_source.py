"""The Kubernetes source in-process, against the API server double: what it yields."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from controlplane import resource
from controlplane.cache import SnapshotCache
from controlplane.mesh.model import Mesh
from controlplane.pipeline import Pipeline
from controlplane.proxy import ProxyIdentity
from controlplane.sources.kubernetes import Debounce, KubernetesSource, WatchTiming, api_client
from controlplane.sources.kubernetes.kinds import PODS, TRAFFIC_POLICIES
from tests.kube.apiserver import ApiServerDouble
from tests.kube.objects import endpoint_slice, pod, service, traffic_policy


@pytest.fixture
def api(tmp_path: Path) -> Iterator[ApiServerDouble]:
    double = ApiServerDouble(bookmark_interval=0.5, crd_installed=False).start()
    yield double
    double.stop()


def source(api: ApiServerDouble, tmp_path: Path, namespaces: list[str] | None = None,
           pod_labels: bool = True) -> KubernetesSource:
    client = api_client(api.kubeconfig(tmp_path / "kubeconfig"))
    return KubernetesSource(client, namespaces, WatchTiming(server_timeout=30, inactivity=5,
                                                            backoff_initial=0.1),
                            Debounce(quiet=0.05, max_delay=1.0), pod_labels=pod_labels)


class Feed:
    """Consumes the source into a queue: waiting on a queue can time out harmlessly,
    while cancelling a pending ``anext`` would close the source's generator."""

    def __init__(self, updates: AsyncIterator[Mesh]) -> None:
        self.queue: asyncio.Queue[Mesh] = asyncio.Queue()
        self.updates = updates
        self.task = asyncio.ensure_future(self._pump())

    async def _pump(self) -> None:
        async for mesh in self.updates:
            await self.queue.put(mesh)

    async def aclose(self) -> None:
        """Bounded: a source that loses its cancel fails here, not at the suite's timeout."""
        self.task.cancel()
        done, _ = await asyncio.wait({self.task}, timeout=10)
        assert done, "the source did not stop within 10 s of its cancel"
        with contextlib.suppress(asyncio.CancelledError):
            await self.task


async def next_mesh(feed: Feed, timeout: float = 10) -> Mesh:
    return await asyncio.wait_for(feed.queue.get(), timeout)


async def nothing(feed: Feed, wait: float = 0.6) -> None:
    try:
        mesh = await asyncio.wait_for(feed.queue.get(), wait)
    except TimeoutError:
        return
    raise AssertionError(f"expected no mesh, got {mesh}")


def reviews_slice(*addresses: str, port: int = 8080) -> dict[str, object]:
    builder = endpoint_slice("reviews-abc", service="reviews").port(port, name="http")
    for address in addresses:
        builder.endpoint(address)
    return builder.build()


async def test_namespaces_limit_what_is_watched(api: ApiServerDouble, tmp_path: Path) -> None:
    api.create(service("reviews").port(9080, name="http").build())
    api.create(service("reviews", namespace="other").port(9080, name="http").build())
    updates = Feed(source(api, tmp_path, ["default"]).updates())
    mesh = await next_mesh(updates)
    assert [(s.name, s.namespace) for s in mesh.services] == [("reviews", "default")]
    await updates.aclose()


async def test_missing_crd_serves_services_then_policies_once_installed(
        api: ApiServerDouble, tmp_path: Path) -> None:
    api.create(service("reviews").port(9080, name="http").build())
    updates = Feed(source(api, tmp_path).updates())
    first = await next_mesh(updates)  # ready without the CRD
    assert first.services[0].policy.timeout is None
    api.install_crd()
    api.create(traffic_policy("reviews", "reviews", {"timeout": "2s"}).build())
    mesh = await next_mesh(updates, timeout=15)
    assert mesh.services[0].policy.timeout is not None
    await updates.aclose()


async def test_invisible_changes_yield_nothing(api: ApiServerDouble, tmp_path: Path) -> None:
    api.create(service("reviews").port(9080, name="http").build())
    api.create(reviews_slice("10.0.0.1"))
    updates = Feed(source(api, tmp_path).updates())
    await next_mesh(updates)
    annotated = reviews_slice("10.0.0.1")
    annotated["metadata"]["annotations"] = {"touched": "yes"}  # type: ignore[index]
    api.apply(annotated)
    await nothing(updates)
    api.apply(reviews_slice("10.0.0.1", "10.0.0.2"))
    mesh = await next_mesh(updates)
    assert [e.address for e in mesh.services[0].endpoints] == ["10.0.0.1", "10.0.0.2"]
    await updates.aclose()


CANARY = {"split": [{"labels": {"version": "v1"}, "weight": 9},
                   {"labels": {"version": "v2"}, "weight": 1}]}


async def test_pods_are_read_as_metadata_and_label_the_subsets(
        api: ApiServerDouble, tmp_path: Path) -> None:
    api.install_crd()
    api.create(service("reviews").port(9080, name="http").build())
    for name, version in (("reviews-1", "v1"), ("reviews-2", "v2")):
        api.create(pod(name).labels(app="reviews", version=version).build())
    api.create(endpoint_slice("reviews-abc", service="reviews").port(8080, name="http")
               .endpoint("10.0.0.1", pod="reviews-1").endpoint("10.0.0.2", pod="reviews-2")
               .build())
    api.create(traffic_policy("canary", "reviews", CANARY).build())
    updates = Feed(source(api, tmp_path).updates())
    mesh = await next_mesh(updates)
    assert [(e.address, e.labels) for e in mesh.services[0].endpoints] == [
        ("10.0.0.1", {"version": "v1"}), ("10.0.0.2", {"version": "v2"})]
    asked = {(r.verb, r.accept) for r in api.requests if r.kind == PODS}
    assert asked == {
        ("list", "application/json;as=PartialObjectMetadataList;g=meta.k8s.io;v=v1,"
                 "application/json"),
        ("watch", "application/json;as=PartialObjectMetadata;g=meta.k8s.io;v=v1,"
                  "application/json")}
    relabelled = api.get(PODS, "default", "reviews-2")
    relabelled["metadata"]["labels"]["version"] = "v1"
    api.update(relabelled)
    mesh = await next_mesh(updates)
    assert [e.labels for e in mesh.services[0].endpoints] == [{"version": "v1"}] * 2
    await updates.aclose()


async def test_without_pod_labels_pods_are_not_asked_for(
        api: ApiServerDouble, tmp_path: Path) -> None:
    api.install_crd()
    api.create(service("reviews").port(9080, name="http").build())
    api.create(traffic_policy("canary", "reviews", CANARY).build())
    updates = Feed(source(api, tmp_path, pod_labels=False).updates())
    mesh = await next_mesh(updates)
    assert mesh.services[0].policy.split is None  # refused: Unsupported
    assert not [r for r in api.requests if r.kind == PODS]
    await updates.aclose()


async def test_endpoint_change_moves_only_the_endpoints_version(
        api: ApiServerDouble, tmp_path: Path) -> None:
    api.create(service("reviews").port(9080, name="http").build())
    api.create(reviews_slice("10.0.0.1"))
    updates = Feed(source(api, tmp_path).updates())
    cache = SnapshotCache()
    pipeline = Pipeline(cache)
    proxy = ProxyIdentity(node_id="f-1", service="frontend")
    pipeline.set_mesh(await next_mesh(updates))
    before = await cache.next_snapshot(proxy, None)
    api.apply(reviews_slice("10.0.0.1", "10.0.0.2"))
    pipeline.set_mesh(await next_mesh(updates))
    after = cache.get(proxy.group)
    assert after is not None
    def version(snapshot: object, type_url: str) -> str | None:
        found = snapshot.get(type_url)  # type: ignore[attr-defined]
        return None if found is None else str(found.version)  # a type it does not serve

    changed = {t for t in resource.PUSH_ORDER if version(before, t) != version(after, t)}
    assert changed == {resource.ENDPOINT}
    await updates.aclose()


async def test_multiport_headless_and_external_name(api: ApiServerDouble, tmp_path: Path) -> None:
    api.create(service("api").headless().port(80, name="http", target="web")
               .port(9090, name="grpc", target="rpc").build())
    api.create(endpoint_slice("api-1", service="api").endpoint("10.0.0.7").endpoint("10.0.0.8")
               .port(8080, name="http").port(8090, name="grpc").build())
    billing = service("billing").port(443, name="tls").build()
    billing["spec"] = {"type": "ExternalName", "externalName": "Billing.Example.com.",
                       "ports": [{"name": "tls", "port": 443, "protocol": "TCP"}]}
    api.create(billing)
    updates = Feed(source(api, tmp_path).updates())
    mesh = await next_mesh(updates)
    api_svc, billing_svc = mesh.service("api"), mesh.service("billing")
    assert api_svc is not None and billing_svc is not None
    assert [(p.name, p.port, p.protocol) for p in api_svc.service_ports] == [
        ("http", 80, "http"), ("grpc", 9090, "grpc")]
    assert [dict(e.ports or {}) for e in api_svc.endpoints] == [
        {"grpc": 8090, "http": 8080}, {"grpc": 8090, "http": 8080}]
    assert billing_svc.external_name == "billing.example.com"
    assert billing_svc.protocol == "tls"  # an ExternalName port named tls: by SNI
    await updates.aclose()


def external(name: str, host: str, port: int, port_name: str) -> dict[str, object]:
    obj = service(name).build()
    obj["spec"] = {"type": "ExternalName", "externalName": host,
                   "ports": [{"name": port_name, "port": port, "protocol": "TCP"}]}
    return obj


async def test_external_services_sharing_a_tcp_port_are_warned_of(
        api: ApiServerDouble, tmp_path: Path) -> None:
    """As the file source and ``validate`` do (``mesh.egress_port_shared``): two
    ExternalName Services with one tcp port are served, but no sidecar can route that
    port, so the source says so, once, and again only when it changes."""
    api.create(external("db", "db.example.com", 5432, "tcp-pg"))
    api.create(external("other-db", "other.example.com", 5432, "tcp-pg"))
    with capture_logs() as logs:
        updates = Feed(source(api, tmp_path).updates())
        try:
            mesh = await next_mesh(updates)
            assert {s.name for s in mesh.services} >= {"db", "other-db"}  # valid: both served
            api.create(service("reviews").port(9080, name="http").build())  # unrelated
            await next_mesh(updates)
            said = [e for e in logs if e["event"] == "mesh.egress_port_shared"]
            assert len(said) == 1, said
            assert said[0]["log_level"] == "warning"
            assert said[0]["problem"].startswith(
                "port 5432 is a tcp port of several external hosts (db.default (tcp), "
                "other-db.default (tcp))")
            assert "ExternalName Services its own port" in said[0]["hint"]
            # Its own port: nothing shared, nothing said.
            api.update(external("other-db", "other.example.com", 5433, "tcp-pg"))
            fixed = await next_mesh(updates)
            other = fixed.service("other-db")
            assert other is not None and other.port == 5433
            assert len([e for e in logs if e["event"] == "mesh.egress_port_shared"]) == 1
            # Back on 5432, named tls (the app's own TLS): told apart from the others by
            # server name, yet a tcp host's port still cannot be routed. A new problem: said.
            api.update(external("other-db", "other.example.com", 5432, "tls"))
            await next_mesh(updates)
            said = [e for e in logs if e["event"] == "mesh.egress_port_shared"]
            assert len(said) == 2, said
            assert "(db.default (tcp), other-db.default (tls))" in said[1]["problem"]
        finally:
            await updates.aclose()


async def test_policy_status_is_written(api: ApiServerDouble, tmp_path: Path) -> None:
    api.install_crd()
    api.create(service("reviews").port(9080, name="http").build())
    api.create(traffic_policy("orphan", "nothing-here", {"timeout": "1s"}).build())
    updates = Feed(source(api, tmp_path).updates())
    await next_mesh(updates)
    for _ in range(100):
        status = api.get(TRAFFIC_POLICIES, "default", "orphan").get("status") or {}
        if status.get("conditions"):
            break
        await asyncio.sleep(0.05)
    [condition] = status["conditions"]
    assert (condition["status"], condition["reason"]) == ("False", "TargetNotFound")
    assert "spec.targetRef" in condition["message"]
    await updates.aclose()


async def test_a_silent_watch_is_dropped_and_resumed(api: ApiServerDouble,
                                                     tmp_path: Path) -> None:
    api.create(service("reviews").port(9080, name="http").build())
    api.create(reviews_slice("10.0.0.1"))
    client = api_client(api.kubeconfig(tmp_path / "kubeconfig"))
    silent = KubernetesSource(client, None, WatchTiming(server_timeout=60, inactivity=0.8),
                              Debounce(quiet=0.05, max_delay=1.0))
    updates = Feed(silent.updates())
    await next_mesh(updates)
    watches = api.count("watch", "endpointslices")
    api.pause()  # connections stay open, nothing arrives: not even bookmarks
    await asyncio.sleep(2.0)
    assert api.count("watch", "endpointslices") > watches, "the silent watch was not resumed"
    api.resume()
    api.apply(reviews_slice("10.0.0.1", "10.0.0.2"))
    mesh = await next_mesh(updates)
    assert [e.address for e in mesh.services[0].endpoints] == ["10.0.0.1", "10.0.0.2"]
    await updates.aclose()
