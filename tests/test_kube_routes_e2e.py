"""Gateway API routes from Kubernetes end to end: the API server double, ``controlplane
serve --source kubernetes``, a real Envoy, real HTTP to backends on test hosts (network
namespaces). An HTTPRoute canary on a Service splits real traffic, its status is written
as the spec says through the status subresource, a missing backend's share answers 500
while the route is still served, and the TrafficPolicy on the same Service says the
route overrides its timeout.

Follows the upstream conformance tests MeshTrafficSplit and MeshHTTPRouteWeight
(weighted backendRefs on a Service parent, each share within tolerance) and
HTTPRouteInvalidNonExistentBackendRef (500 for the missing backend's share, ResolvedRefs
False BackendNotFound)."""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from controlplane.sources.kubernetes.kinds import HTTP_ROUTES, TRAFFIC_POLICIES
from tests.kube.objects import endpoint_slice, http_route, service, service_parent, traffic_policy
from tests.support.netns import NetnsHost
from tests.support.procs import Envoy, wait_for
from tests.test_kube_e2e import Cluster, hosts  # noqa: F401  (hosts: the module's test hosts)

pytestmark = [pytest.mark.e2e, pytest.mark.xdist_group("kube_routes_e2e")]

REQUESTS = 400  # the canary's sample: 10% expected, so 40 +- 6 (one standard deviation)


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[Cluster]:
    made = Cluster(tmp_path)
    yield made
    made.close()


def backend(cluster: Cluster, name: str, host: NetnsHost) -> None:
    cluster.api.create(service(name).port(9080, name="http", target="http").build())
    cluster.api.apply(endpoint_slice(f"{name}-abc", service=name)
                      .endpoint(host.address).port(8080, name="http").build())


def route(backends: list[dict[str, Any]]) -> dict[str, Any]:
    return http_route("reviews-canary", {"parentRefs": [service_parent("reviews", 9080)],
                                         "rules": [{"backendRefs": backends}]})


def parent_conditions(cluster: Cluster) -> dict[str, dict[str, Any]]:
    """Our entry's conditions by type (empty until written)."""
    found = cluster.api.get(HTTP_ROUTES, "default", "reviews-canary")
    for entry in (found.get("status") or {}).get("parents") or []:
        if entry.get("controllerName") == "mesh.controlplane.io/gateway-controller":
            return {c["type"]: c for c in entry["conditions"]}
    return {}


def tally(envoy: Envoy, count: int) -> Counter[str]:
    """What ``count`` requests to reviews got: the backend's name, or the status."""
    seen: Counter[str] = Counter()
    for _ in range(count):
        status, body, _ = envoy.request("reviews")
        seen[body if status == 200 else str(status)] += 1
    return seen


def test_an_httproute_canary_splits_real_traffic_and_reports_its_status(
        cluster: Cluster, hosts: list[NetnsHost]) -> None:  # noqa: F811
    one, two, _ = hosts
    backend(cluster, "reviews", one)  # answers "reviews-1"
    backend(cluster, "reviews-v2", two)  # answers "reviews-2"
    cluster.api.create(traffic_policy("reviews", "reviews", {"timeout": "2s"}).build())
    cluster.api.create(route([{"name": "reviews", "port": 9080, "weight": 90},
                              {"name": "reviews-v2", "port": 9080, "weight": 10}]))
    cluster.serve()
    envoy = cluster.envoy()
    wait_for(lambda: tally(envoy, 30).keys() <= {"reviews-1", "reviews-2"}
             and "reviews-2" in tally(envoy, 60), what="both backends reached")

    seen = tally(envoy, REQUESTS)
    assert set(seen) == {"reviews-1", "reviews-2"}, seen
    # Binomial: mean 40, sd 6; 4 sd either way fails once in ~30,000 runs.
    mean, sd = REQUESTS * 0.1, math.sqrt(REQUESTS * 0.1 * 0.9)
    print(f"HTTPRoute canary in Kubernetes, {sum(seen.values())} requests: {dict(seen)}")
    assert abs(seen["reviews-2"] - mean) <= 4 * sd, seen

    conditions = wait_for(lambda: parent_conditions(cluster) or None,
                          what="the route's status written")
    assert (conditions["Accepted"]["status"], conditions["Accepted"]["reason"]) == (
        "True", "Accepted")
    assert (conditions["ResolvedRefs"]["status"], conditions["ResolvedRefs"]["reason"]) == (
        "True", "ResolvedRefs")
    writes = [r for r in cluster.api.requests if r.kind == HTTP_ROUTES and r.verb == "patch"]
    assert writes and {r.subresource for r in writes} == {"status"}

    def overridden() -> dict[str, Any] | None:
        policy = cluster.api.get(TRAFFIC_POLICIES, "default", "reviews")
        return next((c for c in (policy.get("status") or {}).get("conditions") or []
                     if c["type"] == "Overridden"), None)

    found = wait_for(overridden, what="Overridden on the TrafficPolicy")
    assert (found["status"], found["reason"]) == ("True", "RouteAttached")
    assert found["message"].startswith(
        "timeout set by HTTPRoute default/reviews-canary on port 9080: the route wins")

    # HTTPRouteInvalidNonExistentBackendRef: the missing backend's share answers 500, the
    # rest is still served, and the status says which reference does not resolve.
    cluster.api.apply(route([{"name": "reviews", "port": 9080, "weight": 1},
                             {"name": "reviews-v3", "port": 9080, "weight": 1}]))
    wait_for(lambda: parent_conditions(cluster).get("ResolvedRefs", {}).get("reason")
             == "BackendNotFound", what="BackendNotFound in the status")
    conditions = parent_conditions(cluster)
    assert conditions["Accepted"]["status"] == "True"
    assert conditions["ResolvedRefs"]["status"] == "False"
    assert "reviews-v3" in conditions["ResolvedRefs"]["message"]
    assert {c["observedGeneration"] for c in conditions.values()} == {2}
    wait_for(lambda: "500" in tally(envoy, 20), what="the missing share answering 500")
    seen = tally(envoy, 100)
    assert set(seen) == {"reviews-1", "500"}, seen
    assert 20 <= seen["500"] <= 80, seen  # half expected: mean 50, sd 5
