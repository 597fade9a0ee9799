"""Gateway API routes from Kubernetes: conversion into the mesh (pure), their status
(``status.parents``) and the TrafficPolicy's ``Overridden`` condition, and the source
against the API server double (the CRDs missing, then installed; status written through
the status subresource).

Cases follow the upstream conformance tests where one exists:
HTTPRouteInvalidCrossNamespaceBackendRef and HTTPRouteReferenceGrant (cross-namespace
backends), HTTPRouteInvalidNonExistentBackendRef (BackendNotFound),
HTTPRouteObservedGenerationBump (observedGeneration follows the spec)."""

from __future__ import annotations

import asyncio
import copy
import time
from pathlib import Path
from typing import Any

import pytest
import yaml
from structlog.testing import capture_logs

from controlplane.deploy_examples import example_grpc_route, example_http_route
from controlplane.mesh.route_status import CONTROLLER, ParentStatus, accepted
from controlplane.sources.kubernetes import WatchTiming
from controlplane.sources.kubernetes.convert import Converter
from controlplane.sources.kubernetes.kinds import (
    GATEWAY_API_RELEASE,
    GRPC_ROUTES,
    HTTP_ROUTES,
    REFERENCE_GRANTS,
    TRAFFIC_POLICIES,
)
from controlplane.sources.kubernetes.route_status import (
    needs_write,
    parents,
    service_parents,
    wanted_statuses,
)
from controlplane.sources.kubernetes.routes import RouteConverter, convert_routes
from controlplane.sources.kubernetes.status import conditions
from tests.kube.apiserver import ApiServerDouble, StatusError
from tests.kube.objects import (
    http_route,
    reference_grant,
    service,
    service_parent,
    traffic_policy,
)
from tests.test_kube_source import Feed, next_mesh, source

Obj = dict[str, Any]
OTHER = "example.com/other-controller"


def stored(obj: Obj, created: str = "2026-01-01T00:00:00Z", generation: int = 1) -> Obj:
    """As the API server returns it: creationTimestamp, generation, uid, defaults."""
    made = copy.deepcopy(obj)
    made["metadata"].update(creationTimestamp=created, generation=generation,
                            uid=f"uid-{made['metadata']['name']}")
    return made


def canary(name: str = "canary", namespace: str = "default", backends: list[Obj] | None = None,
           parent: Obj | None = None) -> Obj:
    return http_route(name, {
        "parentRefs": [parent or service_parent("reviews", 9080)],
        "rules": [{"backendRefs": backends or [{"name": "reviews", "port": 9080, "weight": 90},
                                               {"name": "reviews-v2", "port": 9080,
                                                "weight": 10}]}]}, namespace)


def services(*names: str, namespace: str = "default") -> list[Obj]:
    return [stored(service(n, namespace).port(9080, name="http").build()) for n in names]


def statuses(mesh_services: list[Obj], routes: list[Obj], grants: tuple[Obj, ...] = (),
             ) -> dict[tuple[str, str, str], list[Obj]]:
    """Per route: the status.parents the source would write (from nothing)."""
    converted = convert_routes(routes, [], grants)
    mesh = Converter().convert(mesh_services, [], [], routes=converted).mesh
    current = {k: None for k in converted.ours}
    return {k: wanted for k, (_, wanted) in wanted_statuses(mesh, converted, current).items()}


def condition(entry: Obj, type_: str) -> Obj:
    return next(c for c in entry["conditions"] if c["type"] == type_)


# --- conversion ---------------------------------------------------------------------------


def test_routes_are_flattened_oldest_first_then_by_namespace_and_name() -> None:
    routes = [stored(canary("c"), "2026-01-03T00:00:00Z"),
              stored(canary("b", "shop"), "2026-01-02T00:00:00Z"),
              stored(canary("a", "shop"), "2026-01-02T00:00:00Z"),
              stored(canary("z", "default"), "2026-01-02T00:00:00Z")]
    converted = convert_routes(routes, [], [])
    assert [(r.namespace, r.name) for r in converted.http_routes] == [
        ("default", "z"), ("shop", "a"), ("shop", "b"), ("default", "c")]
    first = converted.http_routes[0]
    assert first.parent_refs[0].is_service and first.parent_refs[0].port == 9080
    assert [b.weight for b in first.rules[0].backend_refs or []] == [90, 10]
    assert converted.skipped == [] and converted.refused == {}


def test_a_route_only_for_another_controllers_gateway_is_left_alone() -> None:
    theirs = stored(canary("theirs", parent={"group": "gateway.networking.k8s.io",
                                             "kind": "Gateway", "name": "their-gateway"}))
    converted = convert_routes([theirs], [], [])
    assert converted.http_routes == [] and converted.ours == {}
    # Nothing written to it, even with another controller's entry on it.
    current = {("HTTPRoute", "default", "theirs"): {"parents": [
        {"parentRef": {"name": "their-gateway"}, "controllerName": OTHER,
         "conditions": [{"type": "Accepted", "status": "True"}]}]}}
    mesh = Converter().convert(services("reviews"), [], [], routes=converted).mesh
    assert wanted_statuses(mesh, converted, current) == {}
    # A Gateway of our class (the gateway source says which) makes it ours.
    ours = convert_routes([theirs], [], [], gateways={("default", "their-gateway")})
    assert [r.name for r in ours.http_routes] == ["theirs"]


def test_a_route_the_model_refuses_is_left_out_and_each_of_our_parents_says_why() -> None:
    bad = stored(http_route("bad", {
        "parentRefs": [service_parent("reviews"), service_parent("ratings")],
        "rules": [{"matches": [{"path": {"type": "RegularExpression", "value": "(unclosed"}}],
                   "backendRefs": [{"name": "reviews", "port": 9080}]}]}))
    good = stored(canary())
    found = statuses(services("reviews", "ratings", "reviews-v2"), [bad, good])
    entries = found[("HTTPRoute", "default", "bad")]
    assert [e["parentRef"]["name"] for e in entries] == ["reviews", "ratings"]
    for entry in entries:
        accepted = condition(entry, "Accepted")
        assert (accepted["status"], accepted["reason"]) == ("False", "UnsupportedValue")
        assert "spec.rules[0].matches[0].path: regular expression" in accepted["message"]
        assert "not served until it is fixed" in accepted["message"]
    converted = convert_routes([bad, good], [], [])
    assert [r.name for r in converted.http_routes] == ["canary"]  # the rest is served
    assert converted.skipped and converted.skipped[0].startswith("HTTPRoute default/bad: ")


@pytest.mark.parametrize("spec", [[], "text", {"parentRefs": "reviews"},
                                  {"parentRefs": [service_parent("reviews")], "rules": 3},
                                  {"parentRefs": [None, 7, service_parent("reviews")]}])
def test_no_shape_of_route_or_grant_raises(spec: Any) -> None:
    route = stored(http_route("odd", {}))
    route["spec"] = spec
    grant = stored(reference_grant("odd", "default", [], []))
    grant["spec"] = spec
    converted = convert_routes([route, {"metadata": "no"}, 5], [route], [grant])  # type: ignore[list-item]
    assert converted.http_routes == [] and converted.reference_grants == []
    assert any("ReferenceGrant default/odd" in p for p in converted.skipped)


def test_cross_namespace_backend_needs_a_reference_grant() -> None:
    """HTTPRouteInvalidCrossNamespaceBackendRef, then HTTPRouteReferenceGrant."""
    shop = stored(canary("to-payments", "shop",
                         backends=[{"name": "payments", "namespace": "payments",
                                    "port": 9080}],
                         parent={**service_parent("cart", 9080)}))
    world = services("cart", namespace="shop") + services("payments", namespace="payments")
    entry = statuses(world, [shop])[("HTTPRoute", "shop", "to-payments")][0]
    assert condition(entry, "Accepted")["status"] == "True"
    refs = condition(entry, "ResolvedRefs")
    assert (refs["status"], refs["reason"]) == ("False", "RefNotPermitted")
    assert "ReferenceGrant" in refs["message"] and "'payments'" in refs["message"]

    grant = stored(reference_grant(
        "allow-shop", "payments",
        [{"group": "gateway.networking.k8s.io", "kind": "HTTPRoute", "namespace": "shop"}],
        [{"group": "", "kind": "Service"}]))
    entry = statuses(world, [shop], (grant,))[("HTTPRoute", "shop", "to-payments")][0]
    assert (condition(entry, "ResolvedRefs")["status"],
            condition(entry, "ResolvedRefs")["reason"]) == ("True", "ResolvedRefs")
    # A grant for another namespace allows nothing here.
    elsewhere = copy.deepcopy(grant)
    elsewhere["spec"]["from"][0]["namespace"] = "other"
    entry = statuses(world, [shop], (elsewhere,))[("HTTPRoute", "shop", "to-payments")][0]
    assert condition(entry, "ResolvedRefs")["reason"] == "RefNotPermitted"


def test_a_missing_backend_is_backend_not_found_and_the_route_still_accepted() -> None:
    """HTTPRouteInvalidNonExistentBackendRef."""
    entry = statuses(services("reviews"), [stored(canary())])[
        ("HTTPRoute", "default", "canary")][0]
    assert entry["controllerName"] == CONTROLLER
    assert entry["parentRef"] == {"group": "", "kind": "Service", "name": "reviews",
                                  "port": 9080}
    assert condition(entry, "Accepted")["status"] == "True"
    refs = condition(entry, "ResolvedRefs")
    assert (refs["status"], refs["reason"]) == ("False", "BackendNotFound")
    assert "reviews-v2" in refs["message"]
    assert {c["observedGeneration"] for c in entry["conditions"]} == {1}


# --- status -------------------------------------------------------------------------------


def test_status_keeps_other_controllers_entries_and_unchanged_transition_times() -> None:
    route = stored(canary(), generation=4)
    converted = convert_routes([route], [], [])
    mesh = Converter().convert(services("reviews", "reviews-v2"), [], [],
                               routes=converted).mesh
    key = ("HTTPRoute", "default", "canary")
    theirs = {"parentRef": {"group": "gateway.networking.k8s.io", "kind": "Gateway",
                            "name": "edge"}, "controllerName": OTHER,
              "conditions": [{"type": "Accepted", "status": "True", "reason": "Accepted",
                              "message": "", "lastTransitionTime": "2020-01-01T00:00:00Z"}]}
    ours_before = {"parentRef": {"group": "", "kind": "Service", "name": "reviews",
                                 "port": 9080}, "controllerName": CONTROLLER,
                   "conditions": [
                       {"type": "Accepted", "status": "True", "reason": "Accepted",
                        "message": "x", "observedGeneration": 3,
                        "lastTransitionTime": "2021-01-01T00:00:00Z"},
                       {"type": "ResolvedRefs", "status": "False", "reason": "BackendNotFound",
                        "message": "x", "observedGeneration": 3,
                        "lastTransitionTime": "2021-01-01T00:00:00Z"}]}
    current = {"parents": [theirs, ours_before]}
    (route_obj, wanted), = wanted_statuses(mesh, converted, {key: current}).values()
    assert wanted[0] == theirs  # another controller's entry, as it was
    accepted, refs = wanted[1]["conditions"]
    assert accepted["lastTransitionTime"] == "2021-01-01T00:00:00Z"  # still True: kept
    assert accepted["observedGeneration"] == 4  # HTTPRouteObservedGenerationBump
    assert refs["status"] == "True" and refs["lastTransitionTime"] != "2021-01-01T00:00:00Z"
    # Written once: the same status again needs no write.
    assert not needs_write(wanted, {"parents": wanted})
    assert parents(route_obj, [], {"parents": wanted}) == [theirs]


def test_an_entry_of_ours_goes_when_the_route_is_ours_no_more() -> None:
    moved = stored(canary(parent={"group": "gateway.networking.k8s.io", "kind": "Gateway",
                                  "name": "edge"}))
    converted = convert_routes([moved], [], [])
    mesh = Converter().convert(services("reviews"), [], [], routes=converted).mesh
    key = ("HTTPRoute", "default", "canary")
    stale = {"parents": [{"parentRef": {"group": "", "kind": "Service", "name": "reviews"},
                          "controllerName": CONTROLLER, "conditions": []}]}
    changed = wanted_statuses(mesh, converted, {key: stale})
    assert changed[key][1] == []
    assert wanted_statuses(mesh, converted, {key: {"parents": []}}) == {}


def test_a_route_replacing_policy_fields_marks_the_policy_overridden() -> None:
    policy = stored(traffic_policy("reviews", "reviews", {
        "timeout": "2s", "rate_limit": {"requests_per_second": 10, "burst": 10}}).build())
    world = services("reviews", "reviews-v2")
    routed = Converter().convert(world, [], [policy],
                                 routes=convert_routes([stored(canary())], [], []))
    verdict = routed.verdicts[("default", "reviews")]
    assert verdict.accepted
    assert verdict.overridden is not None
    assert verdict.overridden.startswith("timeout set by HTTPRoute default/canary on port 9080:"
                                         " the route wins")
    made = {c["type"]: c for c in conditions(verdict, None)}
    assert (made["Overridden"]["status"], made["Overridden"]["reason"]) == ("True",
                                                                            "RouteAttached")
    plain = Converter().convert(world, [], [policy], routes=convert_routes([], [], []))
    made = {c["type"]: c for c in conditions(plain.verdicts[("default", "reviews")], None)}
    assert (made["Overridden"]["status"], made["Overridden"]["reason"]) == ("False",
                                                                            "NotOverridden")


def test_the_double_defaults_and_bounds_routes_as_the_crd_does(tmp_path: Path) -> None:
    with ApiServerDouble() as api:
        made = api.create(http_route("defaults", {"parentRefs": [{"name": "edge"}]}))
        assert made["spec"]["parentRefs"] == [{"name": "edge", "group":
                                               "gateway.networking.k8s.io", "kind": "Gateway"}]
        assert made["spec"]["rules"] == [{"matches": [{"path": {"type": "PathPrefix",
                                                                "value": "/"}}]}]
        with pytest.raises(StatusError) as refused:
            api.create(canary(backends=[{"name": "reviews", "port": 9080, "weight": 2000000}]))
        assert refused.value.code == 422
        assert "spec.rules[0].backendRefs[0].weight" in str(refused.value)


# --- the source, against the API server double --------------------------------------------


async def test_without_the_gateway_api_the_mesh_is_served_and_the_fix_said_once(
        tmp_path: Path) -> None:
    with ApiServerDouble(bookmark_interval=0.5, gateway_api_installed=False) as api:
        api.create(service("reviews").port(9080, name="http").build())
        api.create(service("reviews-v2").port(9080, name="http").build())
        watching = source(api, tmp_path)
        watching.timing = WatchTiming(server_timeout=30, inactivity=5, backoff_initial=0.1,
                                      forbidden_retry=0.3)
        with capture_logs() as logs:
            updates = Feed(watching.updates())
            first = await next_mesh(updates)
            assert [s.name for s in first.services] == ["reviews", "reviews-v2"]
            await asyncio.sleep(1.5)  # the watchers keep asking, quietly
        missing = [e for e in logs if e["event"] == "watch.kind_missing"
                   and e["log_level"] == "warning" and e["kind"] == "HTTPRoute"]
        assert len(missing) == 1
        assert "kubectl apply --server-side -k deploy/gateway-api" in missing[0]["hint"]
        # Asked again, but no batch for it: the mesh is not converted at every look.
        assert api.count("list", HTTP_ROUTES) >= 3
        assert not any(e["event"] == "watch.listed" and e["kind"] == "HTTPRoute"
                       for e in logs)
        assert updates.queue.empty()
        api.install_gateway_api()
        api.create(canary())
        deadline = time.monotonic() + 15
        mesh = await next_mesh(updates, 15)
        while not mesh.http_routes and time.monotonic() < deadline:
            mesh = await next_mesh(updates, 15)
        assert [r.name for r in mesh.http_routes] == ["canary"]
        await updates.aclose()


async def wait_parents(api: ApiServerDouble, name: str, check: Any,
                       timeout: float = 15) -> list[Obj]:
    deadline = time.monotonic() + timeout
    while True:
        found = (api.get(HTTP_ROUTES, "default", name).get("status") or {}).get("parents")
        if found and check(found):
            return list(found)
        assert time.monotonic() < deadline, f"status.parents never as wanted: {found}"
        await asyncio.sleep(0.05)


async def test_route_status_goes_through_the_status_subresource(tmp_path: Path) -> None:
    with ApiServerDouble(bookmark_interval=0.5) as api:
        api.create(service("reviews").port(9080, name="http").build())
        api.create(traffic_policy("reviews", "reviews", {"timeout": "2s"}).build())
        made = api.create(canary())
        # Another implementation's entry, for its own Gateway parent.
        made["status"] = {"parents": [{
            "parentRef": {"group": "gateway.networking.k8s.io", "kind": "Gateway",
                          "name": "edge"}, "controllerName": OTHER,
            "conditions": [{"type": "Accepted", "status": "True", "reason": "Accepted",
                            "message": "theirs", "lastTransitionTime": "2020-01-01T00:00:00Z"}]}]}
        api.update_status(made)
        with capture_logs() as logs:
            updates = Feed(source(api, tmp_path).updates())
            await next_mesh(updates)
            found = await wait_parents(api, "canary", lambda p: len(p) == 2)
        said = [e for e in logs if e["event"] == "routes.not_accepted"]
        assert [(e["route"], e["parent"], e["reason"]) for e in said] == [
            ("HTTPRoute/default/canary", "Service reviews port 9080", "BackendNotFound")]
        assert found[0]["controllerName"] == OTHER and found[0]["conditions"][0]["message"] \
            == "theirs"
        ours = found[1]
        assert condition(ours, "Accepted")["status"] == "True"
        assert condition(ours, "ResolvedRefs")["reason"] == "BackendNotFound"  # no reviews-v2
        writes = [r for r in api.requests if r.verb == "patch" and r.kind == HTTP_ROUTES]
        assert writes and all(r.subresource == "status" for r in writes)
        since = condition(ours, "Accepted")["lastTransitionTime"]

        # The backend appears: ResolvedRefs turns True, Accepted keeps its time stamp.
        api.create(service("reviews-v2").port(9080, name="http").build())
        found = await wait_parents(api, "canary", lambda p: len(p) == 2 and condition(
            p[1], "ResolvedRefs")["status"] == "True")
        assert condition(found[1], "Accepted")["lastTransitionTime"] == since
        # The policy's timeout is the route's business now: Overridden, on the policy.
        policy = api.get(TRAFFIC_POLICIES, "default", "reviews")
        overridden = next(c for c in policy["status"]["conditions"]
                          if c["type"] == "Overridden")
        assert (overridden["status"], overridden["reason"]) == ("True", "RouteAttached")
        assert "HTTPRoute default/canary on port 9080" in overridden["message"]

        # HTTPRouteObservedGenerationBump: an edit's generation reaches every condition.
        edited = api.get(HTTP_ROUTES, "default", "canary")
        edited["spec"]["rules"][0]["backendRefs"][1]["weight"] = 20
        api.update(edited)
        found = await wait_parents(api, "canary", lambda p: len(p) == 2 and all(
            c["observedGeneration"] == 2 for c in p[1]["conditions"]))
        await updates.aclose()


# --- what is shipped ----------------------------------------------------------------------


def test_the_examples_are_accepted_by_the_crd_schema_and_attach_cleanly() -> None:
    examples = [example_http_route(), example_grpc_route()]
    with ApiServerDouble() as api:
        made = [stored(api.create(copy.deepcopy(e))) for e in examples]
    world = services("reviews", "reviews-v2") + [
        stored(service(n).port(9090, name="grpc").build()) for n in ("ratings", "ratings-v2")]
    converted = convert_routes([made[0]], [made[1]], [])
    assert converted.refused == {} and converted.skipped == []
    mesh = Converter().convert(world, [], [], routes=converted).mesh
    current = {k: None for k in converted.ours}
    found = wanted_statuses(mesh, converted, current)
    assert set(found) == {("HTTPRoute", "default", "reviews-canary"),
                          ("GRPCRoute", "default", "ratings-methods")}
    for _, entries in found.values():
        for entry in entries:
            assert {(c["type"], c["status"]) for c in entry["conditions"]} == {
                ("Accepted", "True"), ("ResolvedRefs", "True")}


def test_the_crds_are_pinned_at_the_release_the_source_names() -> None:
    kustomization = yaml.safe_load(
        (Path(__file__).parents[1] / "deploy" / "gateway-api" / "kustomization.yaml")
        .read_text())
    (url,) = kustomization["resources"]
    assert url == ("https://github.com/kubernetes-sigs/gateway-api/releases/download/"
                   f"{GATEWAY_API_RELEASE}/experimental-install.yaml")
    # The versions the source watches are served by that release's experimental channel.
    assert (HTTP_ROUTES.version, GRPC_ROUTES.version, REFERENCE_GRANTS.version) == (
        "v1", "v1", "v1beta1")


def test_gateway_parents_are_written_only_for_our_gateways() -> None:
    """A route may name our Gateway and another implementation's: the gateway source's
    statuses are written for ours only (the other controller writes its own)."""
    route = stored(http_route("both", {"parentRefs": [
        {"name": "edge"}, {"name": "their-edge"}],  # kind Gateway, as the CRD defaults
        "rules": [{"backendRefs": [{"name": "reviews", "port": 9080}]}]}))
    route["spec"]["parentRefs"] = [
        {**p, "group": "gateway.networking.k8s.io", "kind": "Gateway"}
        for p in route["spec"]["parentRefs"]]
    ours = {("default", "edge")}
    converted = convert_routes([route], [], [], gateways=ours)
    mesh = Converter().convert(services("reviews"), [], [], routes=converted).mesh
    key = ("HTTPRoute", "default", "both")

    def gateway_parents(_: Any) -> dict[Any, Any]:
        refs = converted.http_routes[0].parent_refs
        return {key: tuple(ParentStatus(p, (accepted(),)) for p in refs)}

    changed = wanted_statuses(mesh, converted, {key: None},
                              (service_parents, gateway_parents), gateways=ours)
    assert [e["parentRef"]["name"] for e in changed[key][1]] == ["edge"]


async def test_a_grpcroute_is_served_and_its_status_written(tmp_path: Path) -> None:
    with ApiServerDouble(bookmark_interval=0.5) as api:
        for name in ("ratings", "ratings-v2"):
            api.create(service(name).port(9090, name="grpc").build())
        api.create(example_grpc_route())
        updates = Feed(source(api, tmp_path).updates())
        mesh = await next_mesh(updates)
        assert [(r.namespace, r.name) for r in mesh.grpc_routes] == [
            ("default", "ratings-methods")]
        deadline = time.monotonic() + 15
        while True:
            found = (api.get(GRPC_ROUTES, "default", "ratings-methods").get("status")
                     or {}).get("parents") or []
            if found:
                break
            assert time.monotonic() < deadline, "no status on the GRPCRoute"
            await asyncio.sleep(0.05)
        (entry,) = found
        assert entry["parentRef"] == {"group": "", "kind": "Service", "name": "ratings",
                                      "port": 9090}
        assert {(c["type"], c["status"], c["reason"]) for c in entry["conditions"]} == {
            ("Accepted", "True", "Accepted"), ("ResolvedRefs", "True", "ResolvedRefs")}
        await updates.aclose()


def test_routes_past_the_mesh_bound_are_left_out_newest_first(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("controlplane.sources.kubernetes.routes.MAX_ROUTES", 2)
    routes = [stored(canary(f"r{i}"), f"2026-01-0{i + 1}T00:00:00Z") for i in range(3)]
    converted = convert_routes(routes, [], [])
    assert [r.name for r in converted.http_routes] == ["r0", "r1"]
    assert converted.skipped == ["1 HTTPRoutes past the mesh's 2, the newest, are not served; "
                                 "merge routes (each may hold 16 rules)"]


def test_unchanged_objects_are_not_validated_again() -> None:
    """The source's stores keep an unchanged object's dict, so its models are reused (an
    endpoint change converts no route again); a new dict, or new Gateways of ours, is
    judged afresh."""
    converter = RouteConverter()
    route, other = stored(canary()), stored(canary("other"))
    first = converter.convert([route, other], [], [])
    edited = copy.deepcopy(other)
    again = converter.convert([route, edited], [], [], gateways={("default", "edge")})
    assert again.http_routes[0] == first.http_routes[0]
    assert again.http_routes[0] is not first.http_routes[0]  # the Gateways changed
    third = converter.convert([route, edited], [], [], gateways={("default", "edge")})
    assert third.http_routes[0] is again.http_routes[0]
    assert third.http_routes[1] is again.http_routes[1]
    edited["spec"]["rules"][0]["backendRefs"][0]["weight"] = 1
    fourth = converter.convert([route, copy.deepcopy(edited)], [], [],
                               gateways={("default", "edge")})
    assert fourth.http_routes[0] is again.http_routes[0]
    assert fourth.http_routes[1].rules[0].backend_refs[0].weight == 1  # type: ignore[index]


def test_a_settled_status_is_not_computed_again_until_something_changes() -> None:
    world = services("reviews", "reviews-v2")
    converted = convert_routes([stored(canary())], [], [])
    mesh = Converter().convert(world, [], [], routes=converted).mesh
    key = ("HTTPRoute", "default", "canary")
    (_, wanted), = wanted_statuses(mesh, converted, {key: None}).values()
    written = {"parents": wanted}
    settled: dict[Any, Any] = {}
    assert wanted_statuses(mesh, converted, {key: written}, settled=settled) == {}
    assert set(settled) == {key}
    assert wanted_statuses(mesh, converted, {key: written}, settled=settled) == {}
    # An edit (a new generation) is computed again, and needs a write.
    bumped = convert_routes([stored(canary(), generation=2)], [], [])
    changed = wanted_statuses(mesh, bumped, {key: written}, settled=settled)
    assert {c["observedGeneration"] for c in changed[key][1][0]["conditions"]} == {2}
    assert settled == {}
