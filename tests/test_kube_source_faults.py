"""The Kubernetes source under faults: namespaces it may not read, policies deleted and
re-created, subsets that select nothing, API outages and relists."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from structlog.testing import capture_logs

from controlplane.mesh.model import Mesh
from controlplane.sources.kubernetes import Debounce, KubernetesSource, WatchTiming, api_client
from controlplane.sources.kubernetes.kinds import ENDPOINT_SLICES, TRAFFIC_POLICIES, WATCHED
from tests.kube.apiserver import ApiServerDouble
from tests.kube.objects import endpoint_slice, pod, service, traffic_policy
from tests.kube.rbac import Rbac
from tests.test_kube_source import Feed, next_mesh


@pytest.fixture
def api() -> Iterator[ApiServerDouble]:
    double = ApiServerDouble(bookmark_interval=0.5).start()
    yield double
    double.stop()


def source(api: ApiServerDouble, tmp_path: Path, namespaces: list[str] | None = None,
           timing: WatchTiming | None = None) -> KubernetesSource:
    client = api_client(api.kubeconfig(tmp_path / "kubeconfig"))
    return KubernetesSource(client, namespaces, timing or WatchTiming(
        server_timeout=30, inactivity=5, backoff_initial=0.1),
        Debounce(quiet=0.05, max_delay=3.0))


async def mesh_where(feed: Feed, check: Any, timeout: float = 15) -> Mesh:
    """The first mesh for which ``check(mesh)`` holds; every wait is bounded."""
    deadline = time.monotonic() + timeout
    while True:
        mesh = await next_mesh(feed, max(0.1, deadline - time.monotonic()))
        if check(mesh):
            return mesh


async def conditions_of(api: ApiServerDouble, name: str, check: Any,
                        timeout: float = 10) -> dict[str, dict[str, Any]]:
    """The policy's conditions by type, once ``check(them)`` holds."""
    deadline = time.monotonic() + timeout
    while True:
        status = api.get(TRAFFIC_POLICIES, "default", name).get("status") or {}
        found = {c["type"]: c for c in status.get("conditions") or []}
        if check(found):
            return found
        if time.monotonic() > deadline:
            raise AssertionError(f"status of {name} never matched: {found}")
        await asyncio.sleep(0.05)


async def test_a_namespace_it_may_not_read_is_reported_and_the_others_served(
        api: ApiServerDouble, tmp_path: Path) -> None:
    api.rbac = Rbac(namespaces=["a"])  # RoleBindings in a only
    api.create(service("reviews", namespace="a").port(9080, name="http").build())
    api.create(service("ratings", namespace="b").port(9080, name="http").build())
    watched = source(api, tmp_path, ["a", "b"])
    with capture_logs() as logs:
        updates = Feed(watched.updates())
        mesh = await next_mesh(updates)
    assert [(s.namespace, s.name) for s in mesh.services] == [("a", "reviews")]
    problems = watched.problems()
    assert len(problems) == len(WATCHED)  # every kind in b
    services = next(p for p in problems if "services in namespace 'b'" in p)
    assert "cannot list resource \"services\" in API group \"\" in the namespace \"b\"" in (
        services)
    assert "{apiGroups: [''], resources: ['services'], verbs: [get, list, watch]}" in services
    assert "RoleBinding in namespace 'b'" in services
    assert sum(1 for e in logs if e["event"] == "watch.forbidden") == len(WATCHED)
    await updates.aclose()


async def test_a_namespace_allowed_later_is_picked_up(api: ApiServerDouble,
                                                      tmp_path: Path) -> None:
    api.rbac = Rbac(namespaces=["a"])
    api.create(service("ratings", namespace="b").port(9080, name="http").build())
    watched = source(api, tmp_path, ["a", "b"], WatchTiming(
        server_timeout=30, inactivity=5, backoff_initial=0.1, forbidden_retry=0.3))
    updates = Feed(watched.updates())
    assert (await next_mesh(updates)).services == []
    api.rbac = Rbac()
    mesh = await mesh_where(updates, lambda m: m.services)
    assert [(s.namespace, s.name) for s in mesh.services] == [("b", "ratings")]
    # Each kind's watcher retries on its own: the others may be a retry behind the
    # Services that made this mesh.
    deadline = time.monotonic() + 10
    while watched.problems() and time.monotonic() < deadline:
        await asyncio.sleep(0.1)
    assert watched.problems() == []
    await updates.aclose()


async def test_status_is_written_again_after_delete_and_recreate(
        api: ApiServerDouble, tmp_path: Path) -> None:
    api.create(service("reviews").port(9080, name="http").build())
    api.create(traffic_policy("p", "reviews", {"timeout": "1s"}).build())
    updates = Feed(source(api, tmp_path).updates())
    await next_mesh(updates)
    first = await conditions_of(api, "p", lambda c: "Accepted" in c)
    assert first["Accepted"]["status"] == "True"
    api.delete(TRAFFIC_POLICIES, "default", "p")
    await mesh_where(updates, lambda m: m.services[0].policy.timeout is None)
    api.create(traffic_policy("p", "reviews", {"timeout": "1s"}).build())
    await mesh_where(updates, lambda m: m.services[0].policy.timeout is not None)
    again = await conditions_of(api, "p", lambda c: "Accepted" in c)
    assert again["Accepted"]["status"] == "True"
    assert again["ResolvedRefs"]["status"] == "True"
    await updates.aclose()


async def test_a_subset_no_endpoint_has_says_so_in_the_status(
        api: ApiServerDouble, tmp_path: Path) -> None:
    api.create(service("reviews").port(9080, name="http").build())
    api.create(pod("reviews-1").labels(version="v1").build())
    api.create(endpoint_slice("reviews-abc", service="reviews").port(8080, name="http")
               .endpoint("10.0.0.1", pod="reviews-1").build())
    api.create(traffic_policy("canary", "reviews", {"split": [
        {"labels": {"version": "v1"}, "weight": 9},
        {"labels": {"version": "v2"}, "weight": 1}]}).build())
    with capture_logs() as logs:
        updates = Feed(source(api, tmp_path).updates())
        await next_mesh(updates)
        found = await conditions_of(api, "canary", lambda c: "ResolvedRefs" in c)
    assert found["Accepted"]["status"] == "True"
    refs = found["ResolvedRefs"]
    assert (refs["status"], refs["reason"]) == ("False", "NoMatchingEndpoints")
    assert refs["message"].startswith("spec.split[1].labels (version=v2): no endpoint")
    assert [e["event"] for e in logs].count("policy.no_matching_endpoints") == 1
    api.create(pod("reviews-2").labels(version="v2").build())
    api.apply(endpoint_slice("reviews-abc", service="reviews").port(8080, name="http")
              .endpoint("10.0.0.1", pod="reviews-1").endpoint("10.0.0.2", pod="reviews-2")
              .build())
    fixed = await conditions_of(api, "canary",
                                lambda c: c.get("ResolvedRefs", {}).get("status") == "True")
    assert fixed["ResolvedRefs"]["reason"] == "ResolvedRefs"
    await updates.aclose()


async def test_every_watch_is_back_within_about_a_second_after_an_outage(
        api: ApiServerDouble, tmp_path: Path) -> None:
    """The default back-off: after several seconds of refused connections, a change made
    as the API returns reaches the mesh within a couple of seconds (uncapped exponential
    back-off took up to 17 s)."""
    api.create(service("reviews").port(9080, name="http").build())
    slice_ = (endpoint_slice("reviews-abc", service="reviews").port(8080, name="http")
              .endpoint("10.0.0.1").endpoint("10.0.0.2"))
    api.create(slice_.build())
    updates = Feed(source(api, tmp_path, timing=WatchTiming(server_timeout=30,
                                                            inactivity=5)).updates())
    await next_mesh(updates)
    api.stop()
    await asyncio.sleep(8)  # every watcher fails over and over, backing off
    api.apply(endpoint_slice("reviews-abc", service="reviews").port(8080, name="http")
              .endpoint("10.0.0.1").build())
    returned = time.monotonic()
    api.start()
    await mesh_where(updates, lambda m: len(m.services[0].endpoints) == 1)
    took = time.monotonic() - returned
    print(f"endpoint removed during the outage reached the mesh {took:.2f}s after the API "
          "returned")
    assert took < 4, took
    await updates.aclose()


async def test_after_a_relist_no_mesh_mixes_fresh_and_stale_kinds(
        api: ApiServerDouble, tmp_path: Path) -> None:
    """A Service and its endpoints created during an outage arrive in one mesh, even when
    the EndpointSlice list fails a few times after the API returns."""
    api.create(service("reviews").port(9080, name="http").build())
    updates = Feed(source(api, tmp_path).updates())
    await next_mesh(updates)
    api.stop()
    api.create(service("ratings").port(9080, name="http").build())
    api.create(endpoint_slice("ratings-abc", service="ratings").port(8080, name="http")
               .endpoint("10.0.0.5").build())
    api.fail_next(3, 500, path=ENDPOINT_SLICES.path())
    api.restart()  # up again, with an empty watch cache: every kind lists again
    mesh = await mesh_where(updates, lambda m: m.service("ratings") is not None)
    ratings = mesh.service("ratings")
    assert ratings is not None and [e.address for e in ratings.endpoints] == ["10.0.0.5"]
    await updates.aclose()


async def test_lists_are_consistent_reads(api: ApiServerDouble, tmp_path: Path) -> None:
    """No list asks for a resourceVersion, so a lagging API server replica (or one restored
    from a backup) never answers "Too large resource version" to a list."""
    api.create(service("reviews").port(9080, name="http").build())
    updates = Feed(source(api, tmp_path).updates())
    await next_mesh(updates)
    lists = [r for r in api.requests if r.verb == "list"]
    assert lists and all("resourceVersion" not in r.query for r in lists)
    await updates.aclose()


async def test_a_converter_bug_keeps_the_last_mesh_and_the_source_alive(
        api: ApiServerDouble, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A bug (not an input) in one batch's conversion: logged, the last good mesh stays
    served, and the next change converts again."""
    api.create(service("reviews").port(9080, name="http").build())
    watched = source(api, tmp_path)
    updates = Feed(watched.updates())
    await next_mesh(updates)

    def broken(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("a bug")

    monkeypatch.setattr(watched.converter, "convert", broken)
    with capture_logs() as logs:
        api.create(service("ratings").port(9080, name="http").build())
        deadline = time.monotonic() + 10
        while not any(e["event"] == "source.convert_failed" for e in logs):
            assert time.monotonic() < deadline, "the failure was not logged"
            await asyncio.sleep(0.05)
    assert not updates.task.done()
    api.create(service("details").port(9080, name="http").build())
    mesh = await mesh_where(updates, lambda m: m.service("details") is not None)
    assert {s.name for s in mesh.services} == {"reviews", "ratings", "details"}
    await updates.aclose()


async def test_a_server_behind_the_source_is_listed_again(
        api: ApiServerDouble, tmp_path: Path) -> None:
    """Moved to a replica restored from an etcd backup, the source's watches are from a
    resourceVersion the server has not reached: silent (no events, no bookmarks), as the
    real cacher is. The source lists again after the inactivity timeout rather than wait
    forever, and serves what the server now holds."""
    api.create(service("reviews").port(9080, name="http").build())
    backup = api.backup()
    api.create(service("ratings").port(9080, name="http").build())
    updates = Feed(source(api, tmp_path, timing=WatchTiming(
        server_timeout=30, inactivity=1.5, backoff_initial=0.1)).updates())
    first = await next_mesh(updates)
    assert {s.name for s in first.services} == {"reviews", "ratings"}
    with capture_logs() as logs:
        api.restore(backup, restart=False)  # the connections stay open
        mesh = await mesh_where(updates, lambda m: m.service("ratings") is None)
    assert {s.name for s in mesh.services} == {"reviews"}
    assert any(e["event"] == "watch.silent" for e in logs)
    await updates.aclose()


async def test_a_status_the_server_may_not_write_is_reported_once(
        api: ApiServerDouble, tmp_path: Path) -> None:
    """Without the trafficpolicies/status rule the policy still applies; the missing rule
    is logged once and reported by problems(), not logged again with every change."""
    api.rbac = Rbac([r for r in Rbac().rules if "trafficpolicies/status" not in r.resources])
    api.create(service("reviews").port(9080, name="http").build())
    api.create(traffic_policy("p", "reviews", {"timeout": "1s"}).build())
    watched = source(api, tmp_path)
    with capture_logs() as logs:
        updates = Feed(watched.updates())
        mesh = await next_mesh(updates)
        assert mesh.services[0].policy.timeout is not None
        deadline = time.monotonic() + 10
        while not watched.problems():
            assert time.monotonic() < deadline, "the missing rule was not reported"
            await asyncio.sleep(0.05)
        for port in (9081, 9082):  # more batches: each would try the write again
            api.apply(service("reviews").port(9080, name="http").port(port, name="x").build())
            await next_mesh(updates)
    [problem] = watched.problems()
    assert "resources: ['trafficpolicies/status'], verbs: [get, update, patch]" in problem
    assert [e["event"] for e in logs].count("policy.status_forbidden") == 1
    assert not [e for e in logs if e["event"] == "policy.status_failed"]
    await updates.aclose()
