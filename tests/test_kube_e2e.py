"""`controlplane serve --source kubernetes` end to end: the official client against the
API server double, real Envoy, real HTTP to backends on test hosts in network namespaces
(a real API server rejects loopback endpoint addresses, and so does the double)."""

from __future__ import annotations

import json
import os
import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from controlplane.sources.kubernetes.kinds import (
    ACCEPTED,
    ENDPOINT_SLICES,
    SIDECARS,
    TRAFFIC_POLICIES,
)
from tests.kube.apiserver import ApiServerDouble
from tests.kube.objects import endpoint_slice, pod, service, sidecar, traffic_policy
from tests.kube.rbac import Rbac
from tests.support import netns
from tests.support.netns import NetnsHost
from tests.support.procs import ControlPlane, Envoy, stop_all, wait_for

pytestmark = pytest.mark.e2e

REVIEWS = "outbound|9080||reviews.default.svc.cluster.local"
FAST = {  # short timings so that faults show within a test's patience
    "CONTROLPLANE_WATCH_TIMEOUT": "20",
    "CONTROLPLANE_WATCH_INACTIVITY": "3",
    "CONTROLPLANE_DEBOUNCE_QUIET": "0.1",
    "CONTROLPLANE_DEBOUNCE_MAX": "2",
}


@pytest.fixture(scope="module")
def hosts() -> Iterator[list[NetnsHost]]:
    reason = netns.available()
    if reason is not None:
        if os.environ.get("CI"):
            pytest.fail(f"test hosts are needed in CI: {reason}")
        pytest.skip(reason)
    made: list[NetnsHost] = []
    try:
        for i in range(3):
            made.append(NetnsHost(f"reviews-{i + 1}").start())
        yield made
    finally:
        for host in made:
            host.stop()


class Cluster:
    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.api = ApiServerDouble(bookmark_interval=0.5).start()
        self.kubeconfig = self.api.kubeconfig(tmp / "kubeconfig")
        self.server: ControlPlane | None = None
        self.envoys: list[Envoy] = []

    def serve(self, wait_ready: bool = True, env: dict[str, str] | None = None,
              extra: list[str] | None = None) -> ControlPlane:
        # Discovery is what these tests are about: plaintext xDS without proxy
        # credentials (the development mode); the secured path has tests of its own
        # (tests/test_identity_kube.py, tests/test_security_*).
        self.server = ControlPlane("kubernetes", self.tmp, env={**FAST, **(env or {})},
                                   extra=["--kubeconfig", str(self.kubeconfig),
                                          "--authentication", "none", *(extra or [])])
        return self.server.start(wait_ready=wait_ready)

    def envoy(self, node_id: str = "frontend-1", delta: bool = False) -> Envoy:
        assert self.server is not None
        envoy = Envoy(self.tmp, node_id, "frontend", self.server.xds_port, delta).start()
        self.envoys.append(envoy)
        return envoy

    def reviews(self, *endpoints: tuple[NetnsHost, dict[str, Any]], name: str = "reviews-abc",
                ) -> None:
        """Set the reviews EndpointSlice to these hosts (with their conditions)."""
        builder = endpoint_slice(name, service="reviews").port(8080, name="http")
        for host, conditions in endpoints:
            builder.endpoint(host.address, **conditions)
        self.api.apply(builder.build())

    def served(self, node: str = "frontend-1") -> dict[str, str]:
        """address -> health status, as the server serves reviews' endpoints to ``node``."""
        assert self.server is not None
        dump = self.server.json(f"/debug/config_dump?node={node}")
        for assignment in dump["resources"]["endpoints"]:
            if assignment["cluster_name"] == REVIEWS:
                return {lb["endpoint"]["address"]["socket_address"]["address"]:
                        lb.get("health_status", "UNKNOWN")
                        for group in assignment.get("endpoints", [])
                        for lb in group.get("lb_endpoints", [])}
        return {}

    def close(self) -> None:
        stop_all(self.envoys, self.server, [self.api])


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[Cluster]:
    made = Cluster(tmp_path)
    yield made
    made.close()


def envoy_hosts(envoy: Envoy) -> dict[str, str]:
    """address -> EDS health status, as Envoy itself holds the reviews cluster."""
    status, body, _ = envoy.admin("/clusters?format=json")
    assert status == 200
    for cluster in json.loads(body).get("cluster_statuses", []):
        if cluster["name"] == REVIEWS:
            return {h["address"]["socket_address"]["address"]:
                    h.get("health_status", {}).get("eds_health_status", "HEALTHY")
                    for h in cluster.get("host_statuses", [])}
    return {}


def answers(envoy: Envoy, count: int = 12) -> set[str]:
    return {body for status, body, _ in (envoy.request("reviews") for _ in range(count))
            if status == 200}


def test_services_and_slices_reach_envoy_and_follow_scaling(
        cluster: Cluster, hosts: list[NetnsHost]) -> None:
    one, two, _ = hosts
    cluster.api.create(service("reviews").port(9080, name="http", target="http").build())
    cluster.reviews((one, {"zone": "zone-a"}))
    cluster.serve()
    envoy = cluster.envoy()
    wait_for(lambda: answers(envoy) == {"reviews-1"}, what="reviews routed to its pod")

    cluster.reviews((one, {}), (two, {"zone": "zone-b"}))  # scale up
    wait_for(lambda: answers(envoy, 20) == {"reviews-1", "reviews-2"}, what="scaled up")

    # Terminating but still serving: DRAINING in Envoy, and no new requests go there.
    cluster.reviews((one, {}), (two, {"ready": False, "serving": True, "terminating": True}))
    wait_for(lambda: envoy_hosts(envoy).get(two.address) == "DRAINING", what="DRAINING")
    assert answers(envoy) == {"reviews-1"}
    cluster.reviews((one, {}))  # gone
    wait_for(lambda: two.address not in envoy_hosts(envoy), what="drained host removed")

    cluster.reviews()  # scaled to zero: the cluster stays, with no hosts
    wait_for(lambda: envoy_hosts(envoy) == {}, what="no hosts")
    assert envoy.request("reviews")[0] == 503
    _, body, _ = envoy.admin("/clusters")
    assert REVIEWS in body


def test_served_endpoints_equal_the_api_after_every_fault(
        cluster: Cluster, hosts: list[NetnsHost]) -> None:
    one, two, three = hosts
    cluster.api.create(service("reviews").port(9080, name="http", target="http").build())
    cluster.reviews((one, {}))
    cluster.serve()
    envoy = cluster.envoy()
    wait_for(lambda: answers(envoy) == {"reviews-1"}, what="first route")
    states = [((two, {}),), ((one, {}), (three, {})), ((three, {}),)]

    def expect(*expected: NetnsHost) -> None:
        want = {h.address: "HEALTHY" for h in expected}
        wait_for(lambda: cluster.served() == want, timeout=20, what=f"served == {want}")
        wait_for(lambda: answers(envoy) == {h.name for h in expected}, what="traffic follows")

    def counter(reason: str) -> float:
        assert cluster.server is not None
        found = re.search(rf'watch_restarts_total\{{reason="{reason}",'
                          r'resource="endpointslices"\} (\S+)', cluster.server.get("/metrics")[1])
        return float(found.group(1)) if found else 0.0

    for empty_cache in (False, True):
        # The watch dies mid-stream while the world changes.
        cluster.api.drop_watches()
        cluster.reviews(*states[0])
        expect(two)
        # The resourceVersion expires while we are away: list again, no stale endpoints.
        cluster.api.pause()
        cluster.reviews(*states[1])
        cluster.api.compact()
        cluster.api.drop_watches()
        cluster.api.resume()
        expect(one, three)
        # The API server goes down, the state changes meanwhile, and it comes back: once
        # with its watch history (a network blip), once restarted with an empty watch
        # cache, so the old resourceVersion is gone and the watcher must list again.
        errors = counter("error")
        cluster.api.stop()
        cluster.reviews(*states[2])
        wait_for(lambda errors=errors: counter("error") > errors,
                 what="the watcher meets the refused connection")
        if empty_cache:
            cluster.api.restart()
        else:
            cluster.api.start()
        expect(three)
        cluster.reviews((one, {}))
        expect(one)
    assert counter("gone") >= 2, "expected a relist after each 410"


def test_an_endpoint_storm_is_batched_and_ends_exact(
        cluster: Cluster, hosts: list[NetnsHost]) -> None:
    one, two, _ = hosts
    cluster.api.create(service("reviews").port(9080, name="http", target="http").build())
    cluster.reviews((one, {}))
    # The storm's gaps stay far below this quiet period on a loaded machine too, so the
    # promise is exact: one push for the whole storm.
    cluster.serve(env={"CONTROLPLANE_DEBOUNCE_QUIET": "1.0", "CONTROLPLANE_DEBOUNCE_MAX": "60"})
    envoy = cluster.envoy()
    wait_for(lambda: answers(envoy) == {"reviews-1"}, what="first route")
    assert cluster.server is not None

    def eds_pushes() -> int:
        [proxy] = [p for p in cluster.server.json("/debug/proxies")  # type: ignore[union-attr]
                   if p["node_id"] == "frontend-1"]
        return int(proxy["types"]["eds"]["pushes"])

    before = eds_pushes()
    started = time.monotonic()
    for i in range(1000):  # flap reviews-2 in and out, 1000 updates
        cluster.reviews((one, {}), (two, {"ready": i % 2 == 1}))
    spent = time.monotonic() - started
    wait_for(lambda: cluster.served() == {one.address: "HEALTHY", two.address: "HEALTHY"},
             what="the final state")
    wait_for(lambda: answers(envoy, 20) == {"reviews-1", "reviews-2"}, what="traffic")
    pushes = eds_pushes() - before
    print(f"1000 EndpointSlice updates in {spent:.2f}s -> {pushes} EDS pushes")
    assert pushes == 1, pushes


def test_invalid_traffic_policy_gets_a_status_and_breaks_nothing(
        cluster: Cluster, hosts: list[NetnsHost]) -> None:
    one, two, _ = hosts
    cluster.api.create(service("reviews").port(9080, name="http", target="http").build())
    cluster.api.create(service("ratings").port(9080, name="http", target="http").build())
    cluster.reviews((one, {}))
    cluster.api.apply(endpoint_slice("ratings-abc", service="ratings")
                      .endpoint(two.address).port(8080, name="http").build())
    cluster.api.create(traffic_policy("ratings-policy", "ratings", {"timeout": "2s"}).build())
    # The CRD schema rejects what it can express (the API server answers 422); what only
    # the model knows, such as weights that add up to nothing, lands in the status.
    bad = traffic_policy("reviews-policy", "reviews", {
        "timeout": "3s", "split": [{"labels": {"version": "v1"}, "weight": 0}]}).build()
    cluster.api.create(bad)
    cluster.serve()
    envoy = cluster.envoy()

    def condition(name: str) -> dict[str, Any] | None:
        obj = cluster.api.get(TRAFFIC_POLICIES, "default", name)
        for item in (obj.get("status") or {}).get("conditions", []):
            if item["type"] == ACCEPTED:
                return dict(item)
        return None

    rejected = wait_for(lambda: condition("reviews-policy"), what="a status on the bad policy")
    assert rejected["status"] == "False" and rejected["reason"] == "Invalid"
    assert "spec.split: split weights add up to 0" in rejected["message"]
    accepted = wait_for(lambda: condition("ratings-policy"), what="a status on the good one")
    assert accepted["status"] == "True"
    # Both services serve; the good policy is in force, the bad one is not.
    wait_for(lambda: answers(envoy) == {"reviews-1"}, what="reviews still routed")
    assert envoy.request("ratings")[1] == "reviews-2"
    assert cluster.server is not None
    routes = cluster.server.json("/debug/config_dump?node=frontend-1")["resources"]["routes"]
    timeouts = {vh["name"]: vh["routes"][0]["route"].get("timeout")
                for vh in routes[0]["virtual_hosts"]}
    assert timeouts == {"ratings.default": "2s", "reviews.default": None}

    # Fixed: accepted, and in force.
    fixed = traffic_policy("reviews-policy", "reviews", {"timeout": "3s"}).build()
    cluster.api.apply(fixed)
    wait_for(lambda: (condition("reviews-policy") or {}).get("status") == "True",
             what="the fixed policy accepted")


def test_not_ready_until_listed_and_early_streams_wait(
        cluster: Cluster, hosts: list[NetnsHost]) -> None:
    one = hosts[0]
    cluster.api.create(service("reviews").port(9080, name="http", target="http").build())
    cluster.reviews((one, {}))
    # The first lists of EndpointSlices fail: not ready yet. (Only those: the CA Secret
    # read at start is not retried by the server, a start-up fault of its own.)
    cluster.api.fail_next(6, status=503, path=ENDPOINT_SLICES.path())
    server = cluster.serve(wait_ready=False)
    envoy = cluster.envoy()  # connects before the first snapshot: it waits, gets no empty config
    wait_for(lambda: server.get("/readyz")[0] == 200, what="ready after the lists succeed")
    wait_for(lambda: answers(envoy) == {"reviews-1"}, what="the early proxy configured")
    assert cluster.api.count("list", ENDPOINT_SLICES) >= 1


def test_label_subsets_follow_pod_labels(cluster: Cluster, hosts: list[NetnsHost]) -> None:
    """A canary by Pod label, as in Istio: the slice's endpoints name their Pods, the Pods'
    labels (read as metadata) choose the subset, and a relabelled Pod moves with them."""
    one, two, _ = hosts
    cluster.api.create(service("reviews").port(9080, name="http", target="http").build())
    for host, version in ((one, "v1"), (two, "v2")):
        cluster.api.create(pod(host.name).labels(app="reviews", version=version).build())
    cluster.api.apply(endpoint_slice("reviews-abc", service="reviews")
                      .endpoint(one.address, pod=one.name)
                      .endpoint(two.address, pod=two.name).port(8080, name="http").build())
    cluster.api.create(traffic_policy("reviews-canary", "reviews", {
        "split": [{"labels": {"version": "v1"}, "weight": 100},
                  {"labels": {"version": "v2"}, "weight": 0}],
        "match": [{"headers": {"x-canary": "true"}, "labels": {"version": "v2"}}],
    }).build())
    cluster.serve()
    envoy = cluster.envoy()

    def canary(count: int = 12) -> set[str]:
        return {body if status == 200 else str(status) for status, body, _ in (
            envoy.request("reviews", headers={"x-canary": "true"}) for _ in range(count))}

    wait_for(lambda: answers(envoy) == {"reviews-1"}, what="the v1 subset takes traffic")
    assert canary() == {"reviews-2"}
    assert cluster.server is not None
    # Status churn on a Pod (its resourceVersion moves, its labels do not) is not even a
    # batch: the event arrives and is dropped.
    def counter(name: str, labels: str) -> float:
        assert cluster.server is not None
        found = re.search(rf"{name}\{{{labels}\}} (\S+)", cluster.server.get("/metrics")[1])
        return float(found.group(1)) if found else 0.0

    rebuilds = sum(counter("controlplane_kubernetes_rebuilds_total", f'result="{result}"')
                   for result in ("published", "unchanged"))
    modified = counter("controlplane_kubernetes_events_total", 'resource="pods",type="MODIFIED"')
    cluster.api.update_status(pod(two.name).ip(two.address).build())
    wait_for(lambda: counter("controlplane_kubernetes_events_total",
                             'resource="pods",type="MODIFIED"') > modified,
             what="the pod's status event")
    time.sleep(0.5)
    assert sum(counter("controlplane_kubernetes_rebuilds_total", f'result="{result}"')
               for result in ("published", "unchanged")) == rebuilds

    relabelled = cluster.api.get("pods", "default", two.name)
    relabelled["metadata"]["labels"]["version"] = "v1"
    cluster.api.update(relabelled)
    wait_for(lambda: answers(envoy, 20) == {"reviews-1", "reviews-2"},
             what="the relabelled pod joins v1")
    wait_for(lambda: canary() == {"503"}, what="the v2 subset empty")

    def refs() -> dict[str, Any]:
        obj = cluster.api.get(TRAFFIC_POLICIES, "default", "reviews-canary")
        return next((c for c in (obj.get("status") or {}).get("conditions", [])
                     if c["type"] == "ResolvedRefs"), {})

    # The policy still applies, and its status says why its canary answers 503.
    empty = wait_for(lambda: refs() if refs().get("status") == "False" else None,
                     what="ResolvedRefs False on the policy")
    assert empty["reason"] == "NoMatchingEndpoints"
    assert "(version=v2): no endpoint of Service 'reviews'" in empty["message"]


def test_a_namespace_without_rbac_leaves_the_others_served(
        cluster: Cluster, hosts: list[NetnsHost]) -> None:
    """--namespace default --namespace other, with a RoleBinding in default only: default is
    served (and the server ready), and the log names the rule other needs."""
    one = hosts[0]
    cluster.api.rbac = Rbac(namespaces=["default"])
    cluster.api.create(service("reviews").port(9080, name="http", target="http").build())
    cluster.reviews((one, {}))
    server = cluster.serve(extra=["--namespace", "default", "--namespace", "other"])
    envoy = cluster.envoy()
    wait_for(lambda: answers(envoy) == {"reviews-1"}, what="default served")
    assert server.get("/readyz")[0] == 200

    def forbidden() -> list[str]:
        return [e["problem"] for e in server.logs() if e.get("event") == "watch.forbidden"]

    problems = wait_for(lambda: forbidden() if len(forbidden()) >= 4 else None,
                        what="every kind in the forbidden namespace logged")
    services = next(p for p in problems if "services in namespace 'other'" in p)
    assert "{apiGroups: [''], resources: ['services'], verbs: [get, list, watch]}" in services
    # /readyz stays 200 and names what it cannot read, with the rule to add.
    status, text = server.get("/readyz")[:2]
    assert status == 200 and "cannot read:" in text and "namespace 'other'" in text, text


def test_a_sidecar_object_scopes_a_real_envoy(cluster: Cluster, hosts: list[NetnsHost]) -> None:
    """A Sidecar in the API server narrows what the frontend's Envoy holds and reaches:
    ratings answers 404 and its cluster is gone from Envoy; deleting the Sidecar brings
    it back. Delta xDS, so the cluster really leaves (SotW would too)."""
    one, _, three = hosts
    cluster.api.create(service("reviews").port(9080, name="http", target="http").build())
    cluster.api.create(service("ratings").port(9080, name="http", target="http").build())
    cluster.reviews((one, {}))
    cluster.api.apply(endpoint_slice("ratings-abc", service="ratings").port(8080, name="http")
                      .endpoint(three.address).build())
    cluster.serve()
    envoy = cluster.envoy(delta=True)
    ratings = "outbound|9080||ratings.default.svc.cluster.local"

    def held() -> str:
        return envoy.admin("/clusters")[1]

    wait_for(lambda: envoy.request("ratings")[0] == 200, what="ratings reachable unscoped")
    cluster.api.create(sidecar("frontend", ["./reviews"], service="frontend").build())
    wait_for(lambda: envoy.request("ratings")[0] == 404, what="ratings out of scope: 404")
    assert answers(envoy) == {"reviews-1"}
    wait_for(lambda: ratings not in held(), what="the ratings cluster gone from Envoy")
    assert REVIEWS in held()
    conditions = wait_for(lambda: (cluster.api.get(SIDECARS, "default", "frontend")
                                   .get("status") or {}).get("conditions"),
                          what="the Sidecar's status")
    assert conditions[0]["type"] == ACCEPTED and conditions[0]["status"] == "True"

    cluster.api.delete(SIDECARS, "default", "frontend")
    wait_for(lambda: envoy.request("ratings")[0] == 200, what="ratings back once unscoped")
    assert ratings in held()
