"""Traffic split, header and path routes (policy.split, policy.match): canary, blue-green,
a split across services, through real Envoy; and the validation of targets and weights."""

from __future__ import annotations

import threading
import time
from collections import Counter
from typing import Any

import pytest
import yaml

from controlplane import resource
from controlplane.errors import MeshError
from controlplane.mesh import load_mesh_data, load_mesh_text
from controlplane.proxy import ProxyIdentity
from controlplane.translator import translate
from tests.support.procs import Envoy, wait_for
from tests.test_e2e import Lab, lab  # noqa: F401 (fixture)

# Every test here is bounded: a hung Envoy or backend fails the test, not the suite.
pytestmark = pytest.mark.timeout(180)

V1_V2 = {"labels": {"version": "v1"}}, {"labels": {"version": "v2"}}


def mesh(lab: Lab, policy: dict[str, Any]) -> dict[str, Any]:  # noqa: F811
    """reviews: backends ``reviews-v1`` and ``reviews-v2`` labelled by version; and
    ``reviews-next``, a service of its own with one backend."""
    by_name = {b.name: b for b in lab.backends}
    return {"services": [
        {"name": "reviews", "port": 9080, "policy": policy, "endpoints": [
            {"address": "127.0.0.1", "port": by_name[f"reviews-{v}"].port,
             "labels": {"version": v}} for v in ("v1", "v2")]},
        {"name": "reviews-next", "port": 9080, "endpoints": [
            {"address": "127.0.0.1", "port": by_name["reviews-next"].port}]},
    ]}


def write(lab: Lab, policy: dict[str, Any]) -> None:  # noqa: F811
    """Atomically, as editors save, so the server never reads half a file."""
    tmp = lab.mesh.with_suffix(".tmp")
    tmp.write_text(yaml.safe_dump(mesh(lab, policy)))
    tmp.replace(lab.mesh)


def split(v1: int, v2: int) -> dict[str, Any]:
    return {"split": [{**V1_V2[0], "weight": v1}, {**V1_V2[1], "weight": v2}]}


def start(lab: Lab, policy: dict[str, Any], delta: bool = False) -> Envoy:  # noqa: F811
    for name in ("reviews-v1", "reviews-v2", "reviews-next"):
        lab.backend(name)
    write(lab, policy)
    lab.serve()
    envoy = lab.envoy("frontend-1", delta=delta)
    wait_for(lambda: envoy.request("reviews")[0] == 200, what="reviews routed")
    return envoy


def bodies(envoy: Envoy, count: int, headers: dict[str, str] | None = None) -> Counter[str]:
    seen: Counter[str] = Counter()
    for _ in range(count):
        status, body, _ = envoy.request("reviews", headers=headers)
        seen[body if status == 200 else f"status {status}"] += 1
    return seen


@pytest.mark.e2e
def test_canary_90_10_and_a_header_route_to_v2(lab: Lab) -> None:  # noqa: F811
    """400 requests at 10%: the v2 share has a binomial sd of sqrt(.1*.9/400) = 1.5
    points; +-5 points is 3.3 sd, a false failure about once in a thousand runs."""
    envoy = start(lab, {**split(90, 10), "match": [
        {"headers": {"x-canary": "true"}, **V1_V2[1]}]})
    seen = bodies(envoy, 400)
    assert set(seen) == {"reviews-v1", "reviews-v2"}, seen
    assert abs(seen["reviews-v2"] / 400 - 0.10) <= 0.05, seen
    assert bodies(envoy, 50, {"x-canary": "true"}) == {"reviews-v2": 50}
    other = bodies(envoy, 100, {"x-canary": "yes"})  # not the exact value: the split
    assert set(other) == {"reviews-v1", "reviews-v2"}, other


@pytest.mark.e2e
def test_split_across_services_reaches_both(lab: Lab) -> None:  # noqa: F811
    envoy = start(lab, {"split": [{**V1_V2[0], "weight": 50},
                                  {"service": "reviews-next", "weight": 50}]})
    seen = bodies(envoy, 100)  # missing one side: 2 * 2**-100
    assert set(seen) == {"reviews-v1", "reviews-next"}, seen


@pytest.mark.e2e
def test_header_route_to_another_service(lab: Lab) -> None:  # noqa: F811
    envoy = start(lab, {"match": [{"headers": {"x-user": "tester"}, "service": "reviews-next"}]})
    assert bodies(envoy, 20, {"x-user": "tester"}) == {"reviews-next": 20}
    assert set(bodies(envoy, 40)) == {"reviews-v1", "reviews-v2"}  # the plain cluster


def paths(envoy: Envoy, path: str, count: int,
          headers: dict[str, str] | None = None) -> Counter[str]:
    seen: Counter[str] = Counter()
    for _ in range(count):
        status, body, _ = envoy.request("reviews", path=path, headers=headers)
        seen[body if status == 200 else f"status {status}"] += 1
    return seen


@pytest.mark.e2e
def test_path_routes_by_prefix_and_exact_path(lab: Lab) -> None:  # noqa: F811
    envoy = start(lab, {**split(100, 0), "match": [
        {"path": {"prefix": "/v2/"}, **V1_V2[1]},
        {"path": {"exact": "/next"}, "headers": {"x-user": "tester"},
         "service": "reviews-next"},
    ]})
    assert paths(envoy, "/v2/stars?x=1", 20) == {"reviews-v2": 20}  # the query is ignored
    assert paths(envoy, "/v2", 20) == {"reviews-v1": 20}  # not under /v2/: the split
    assert paths(envoy, "/next", 10, {"x-user": "tester"}) == {"reviews-next": 10}
    assert paths(envoy, "/next/page", 10, {"x-user": "tester"}) == {"reviews-v1": 10}
    assert paths(envoy, "/next", 10) == {"reviews-v1": 10}  # both conditions, or neither


@pytest.mark.e2e
def test_first_match_wins_and_prefixes_match_characters(lab: Lab) -> None:  # noqa: F811
    """``/api`` takes ``/apiary`` too (a prefix of characters, as in Envoy and Istio);
    of two matching routes the first listed wins; no match falls to the split."""
    envoy = start(lab, {**split(100, 0), "match": [
        {"path": {"prefix": "/api"}, **V1_V2[1]},
        {"path": {"prefix": "/a"}, "service": "reviews-next"},
    ]})
    assert paths(envoy, "/apiary", 10) == {"reviews-v2": 10}
    assert paths(envoy, "/api/v1", 10) == {"reviews-v2": 10}
    assert paths(envoy, "/about", 10) == {"reviews-next": 10}
    assert paths(envoy, "/b", 10) == {"reviews-v1": 10}


@pytest.mark.e2e
def test_weights_are_relative_in_traffic(lab: Lab) -> None:  # noqa: F811
    """1 and 3 split like 25 and 75: over 400 requests the v2 share has a binomial sd
    of 2.2 points; +-8 points is 3.7 sd."""
    envoy = start(lab, split(1, 3))
    seen = bodies(envoy, 400)
    assert abs(seen["reviews-v2"] / 400 - 0.75) <= 0.08, seen
    assert seen["reviews-v1"] + seen["reviews-v2"] == 400, seen


@pytest.mark.e2e
@pytest.mark.parametrize("delta", [False, True], ids=["sotw", "delta"])
def test_blue_green_switch_loses_no_request(lab: Lab, delta: bool) -> None:  # noqa: F811
    """A client sends requests back to back (at most 3000, at most 8 s) while the mesh
    goes from 100/0 to 0/100: every answer is a 200, v1 until the switch, v2 after."""
    envoy = start(lab, split(100, 0), delta)
    assert bodies(envoy, 20) == {"reviews-v1": 20}
    answers: list[tuple[int, str]] = []
    stop = threading.Event()

    def client() -> None:
        deadline = time.monotonic() + 8
        while not stop.is_set() and len(answers) < 3000 and time.monotonic() < deadline:
            status, body, _ = envoy.request("reviews")
            answers.append((status, body))

    thread = threading.Thread(target=client, daemon=True)
    thread.start()
    wait_for(lambda: len(answers) >= 20, timeout=5, what="20 answers before the switch")
    write(lab, split(0, 100))
    wait_for(lambda: answers and answers[-1][1] == "reviews-v2", timeout=5, what="switch")
    switched = len(answers)
    wait_for(lambda: len(answers) >= switched + 20, timeout=5, what="20 answers after it")
    stop.set()
    thread.join(10)
    assert not thread.is_alive()
    failed = [a for a in answers if a[0] != 200]
    assert not failed, f"{len(failed)} of {len(answers)} failed: {failed[:5]}"
    switch = next(i for i, a in enumerate(answers) if a[1] == "reviews-v2")
    assert switch >= 20 and len(answers) - switch >= 20, "too few requests on one side"
    assert {a[1] for a in answers[:switch]} == {"reviews-v1"}
    assert {a[1] for a in answers[switch:]} == {"reviews-v2"}  # no flapping back
    assert bodies(envoy, 20) == {"reviews-v2": 20}


def _mesh(policy: dict[str, Any], **endpoint: Any) -> dict[str, Any]:
    return {"services": [
        {"name": "reviews", "port": 9080, "policy": policy, "endpoints": [
            {"address": "10.0.0.1", "port": 9080, "labels": {"version": "v1"}},
            {"address": "10.0.0.2", "port": 9080, "labels": {"version": "v2"}}]},
        {"name": "reviews-v3", "namespace": "other", "port": 9080},
    ]}


def test_a_weight_change_changes_only_the_routes() -> None:
    """Why blue-green loses nothing: both subset clusters exist at 100/0 and at 0/100,
    with the same endpoints, so only RDS changes and no cluster has to warm."""
    proxy = ProxyIdentity(node_id="frontend-1", service="frontend")
    before = translate(load_mesh_data(_mesh(split(100, 0))), proxy)
    after = translate(load_mesh_data(_mesh(split(0, 100))), proxy)
    for type_url in (resource.CLUSTER, resource.ENDPOINT, resource.LISTENER):
        assert before[type_url] == after[type_url], type_url
    assert before[resource.ROUTE] != after[resource.ROUTE]
    names = {c.name for c in before[resource.CLUSTER]}
    assert {"outbound|9080|version=v1|reviews.default.svc.cluster.local",
            "outbound|9080|version=v2|reviews.default.svc.cluster.local",
            "outbound|9080||reviews.default.svc.cluster.local"} <= names
    subset = next(a for a in before[resource.ENDPOINT]
                  if a.cluster_name == "outbound|9080|version=v2|reviews.default.svc.cluster.local")
    hosts = [e.endpoint.address.socket_address.address
             for group in subset.endpoints for e in group.lb_endpoints]
    assert hosts == ["10.0.0.2"]


def problems(policy: dict[str, Any]) -> list[str]:
    with pytest.raises(MeshError) as info:
        load_mesh_data(_mesh(policy))
    return info.value.problems


def test_a_target_must_exist() -> None:
    missing = {"split": [{**V1_V2[0], "weight": 9}, {"service": "reviews-v3", "weight": 1}]}
    assert problems(missing) == [
        "services[0] (reviews.default).policy.split[1].service: "
        "no service 'reviews-v3' in namespace 'default'"]
    assert problems({"match": [{"headers": {"x-a": "1"}, "service": "nope"}]}) == [
        "services[0] (reviews.default).policy.match[0].service: "
        "no service 'nope' in namespace 'default'"]
    load_mesh_data(_mesh({"split": [{"service": "reviews-v3", "namespace": "other", "weight": 1}]}))


def test_a_target_is_labels_or_service() -> None:
    both = problems({"split": [{"labels": {"version": "v1"}, "service": "x", "weight": 1}]})
    neither = problems({"split": [{"weight": 1}]})
    for found in (both, neither):
        assert len(found) == 1 and found[0].startswith(
            "services[0] (reviews.default).policy.split[0]: give labels"), found
        assert "exactly one of them" in found[0]
    assert "exactly one" in problems({"match": [{"headers": {"x-a": "1"}}]})[0]
    assert "namespace: only with service" in problems(
        {"split": [{**V1_V2[0], "namespace": "other", "weight": 1}]})[0]


def test_weights_and_headers_are_checked() -> None:
    assert "add up to 0" in problems(split(0, 0))[0]
    assert "less than or equal to 10000" in problems(split(10001, 0))[0]
    assert "greater than or equal to 0" in problems(split(-1, 10))[0]
    assert "lower-case" in problems({"match": [{"headers": {"X-Canary": "1"}, **V1_V2[1]}]})[0]
    assert "headers" in problems({"match": [{"headers": {}, **V1_V2[1]}]})[0]
    assert "give headers, path or both" in problems({"match": [V1_V2[1]]})[0]


def test_paths_are_checked() -> None:
    def path_problems(path: dict[str, Any]) -> list[str]:
        return problems({"match": [{"path": path, **V1_V2[1]}]})

    assert path_problems({"prefix": "api"}) == [
        "services[0] (reviews.default).policy.match[0].path.prefix: path "
        "'api' must start with '/' and hold no spaces, '?' or '#' (the query string is "
        "not matched)"]
    assert "must start with '/'" in path_problems({"exact": "/a?b=1"})[0]
    assert "exactly one of them" in path_problems({"prefix": "/a", "exact": "/a"})[0]
    assert "exactly one of them" in path_problems({})[0]
    assert "path.regex: unknown field" in path_problems({"regex": "/a.*"})[0]


def test_a_target_service_needs_the_same_port() -> None:
    found = problems_text("""
services:
  - {name: a, port: 80, policy: {split: [{service: b, weight: 1}]}}
  - {name: b, port: 8080}
""")
    assert found == ["services[0] (a.default).policy.split[0].service: b.default has no "
                     "HTTP or gRPC port 80; a split or match to another service calls it "
                     "on the same port number"]


def test_an_external_service_has_no_label_subsets() -> None:
    found = problems_text("""
services:
  - {name: a, port: 80, external_name: a.example.com,
     policy: {split: [{labels: {version: v1}, weight: 1}]}}
""")
    assert found[0].startswith("services[0] (a.default).policy.split[0].labels: an external")


def problems_text(text: str) -> list[str]:
    with pytest.raises(MeshError) as info:
        load_mesh_text(text)
    return info.value.problems


def test_weights_are_relative() -> None:
    """9/1 gives the same route as 90/10 in proportion; 0-weight legs are left out of
    the route but keep their cluster."""
    proxy = ProxyIdentity(node_id="frontend-1", service="frontend")
    routes = translate(load_mesh_data(_mesh(split(9, 1))), proxy)[resource.ROUTE]
    vhost = next(h for h in routes[0].virtual_hosts if h.name == "reviews.default")
    legs = [(c.name.split("|")[2], c.weight.value)
            for c in vhost.routes[-1].route.weighted_clusters.clusters]
    assert legs == [("version=v1", 9), ("version=v2", 1)]
    routes = translate(load_mesh_data(_mesh(split(0, 5))), proxy)[resource.ROUTE]
    vhost = next(h for h in routes[0].virtual_hosts if h.name == "reviews.default")
    assert [c.name.split("|")[2] for c in vhost.routes[-1].route.weighted_clusters.clusters] == [
        "version=v2"]
