"""Security from Kubernetes: ``SecurityPolicy`` objects become the mesh's ``security``
(a Service's block, a namespace's, or the mesh's from the control plane's namespace), each
with a status (Accepted, ResolvedRefs); injected Pods' service-account annotation becomes
their endpoints' identity. Conversion in-process, then the source against the API server
double (status written over HTTP, the shipped CRD's schema enforced)."""

from __future__ import annotations

import asyncio
import copy
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from controlplane import deploy
from controlplane.mesh.model import Mesh
from controlplane.mesh.security import Security, effective
from controlplane.settings import ServeSettings
from controlplane.sources import open_source
from controlplane.sources.kubernetes import Debounce, KubernetesSource
from controlplane.sources.kubernetes.convert import Converter, convert
from controlplane.sources.kubernetes.crd import security_policy_crd
from controlplane.sources.kubernetes.kinds import (
    ROOT_NAMESPACE,
    SECURITY_POLICIES,
    SERVICE_ACCOUNT_ANNOTATION,
)
from controlplane.sources.kubernetes.status import conditions
from controlplane.sources.kubernetes.store import labels_only
from tests.kube.apiserver import ApiServerDouble, StatusError
from tests.kube.objects import endpoint_slice, pod, security_policy, service
from tests.support.kube_waits import mesh_where, status_of
from tests.test_kube_source import Feed, next_mesh, source

Obj = dict[str, Any]
ALLOW_REVIEWS = {"name": "allow-reviews", "from": [
    {"service_accounts": ["default/reviews"]}], "to": [{"methods": ["GET"]}]}


def services(*keys: str) -> list[Obj]:
    found = []
    for service_key in keys:
        name, namespace = service_key.split(".")
        found.append(service(name, namespace).port(9080, name="http").build())
    return found


def aged(obj: Obj, created: str, uid: str = "", generation: int = 1) -> Obj:
    """As the API server stores it: creationTimestamp, uid, generation."""
    obj = copy.deepcopy(obj)
    obj["metadata"].update(creationTimestamp=created, uid=uid or obj["metadata"]["name"],
                           generation=generation)
    return obj


MESH = ("ratings.default", "reviews.default", "frontend.shop", "cart.shop")


# --- conversion --------------------------------------------------------------------------


def test_a_policy_applies_to_its_service_its_namespace_or_the_mesh() -> None:
    objs = [
        security_policy("ratings", target="ratings").mtls("strict")
        .rule(**ALLOW_REVIEWS).build(),
        security_policy("shop-wide", namespace="shop").mtls("disable").build(),
        security_policy("mesh", namespace=ROOT_NAMESPACE).mtls("permissive")
        .rule("no-evil", action="deny", from_=[{"namespaces": ["evil"]}]).build(),
    ]
    result = convert(services(*MESH), [], [], security_policies=objs)
    mesh = result.mesh
    ratings = mesh.service("ratings")
    assert ratings is not None and ratings.security is not None
    assert ratings.security.mtls is not None and ratings.security.mtls.mode == "strict"
    assert [r.name for r in ratings.security.authorization] == ["allow-reviews"]
    assert ratings.security.authorization[0].from_ is not None
    assert mesh.security.namespaces["shop"].mtls is not None
    assert [r.name for r in mesh.security.authorization] == ["no-evil"]
    # Istio's precedence, through the model's own rule.
    cart, reviews = mesh.service("cart", "shop"), mesh.service("reviews")
    assert cart is not None and reviews is not None
    assert effective(mesh, ratings).mode == "strict"
    assert effective(mesh, cart).mode == "disable"
    assert effective(mesh, reviews).mode == "permissive"
    assert [r.policy_name for r in effective(mesh, ratings).rules] == [
        "mesh:no-evil", "ratings.default:allow-reviews"]
    messages = {k[1]: v.message for k, v in result.security_verdicts.items()}
    assert messages == {"ratings": "applies to Service 'ratings'",
                        "shop-wide": "applies to every service of namespace 'shop'",
                        "mesh": "applies to every service of the mesh"}
    assert all(v.accepted for v in result.security_verdicts.values())


def test_the_root_namespace_is_the_servers_own() -> None:
    wide = security_policy("wide", namespace="mesh-admin").mtls("strict").build()
    assert convert(services(*MESH), [], [], security_policies=[wide]).mesh.security \
        .namespaces["mesh-admin"].mtls is not None
    mesh = convert(services(*MESH), [], [], security_policies=[wide],
                   root_namespace="mesh-admin").mesh
    assert mesh.security.mtls is not None and mesh.security.mtls.mode == "strict"
    assert mesh.security.namespaces == {}


@pytest.mark.parametrize(("spec", "field"), [
    ({"mtls": {"mode": "strickt"}}, "spec.mtls.mode"),
    ({"authorization": [{"name": "r", "from": [{"service_accounts": ["reviews"]}]}]},
     "spec.authorization[0].from[0].service_accounts[0]: 'reviews' must be namespace/name"),
    ({"authorization": [{"name": "Bad_Name"}]}, "spec.authorization[0].name"),
    ({"authorization": [{"name": "r", "to": [{"methods": ["get"]}]}]},
     "spec.authorization[0].to[0].methods[0]"),
    ({"authorization": [{"name": "r"}, {"name": "r"}]}, "spec.authorization"),
    ({"target": "ratings"}, "spec.target: must be {name: <service>}"),
    ({"mtls": {"mode": "strict"}, "namespaces": {}}, "spec.namespaces: unknown field"),
])
def test_an_invalid_policy_is_refused_naming_the_field(spec: Obj, field: str) -> None:
    obj = security_policy("bad").spec(spec).build()
    result = convert(services(*MESH), [], [], security_policies=[obj])
    verdict = result.security_verdicts[("default", "bad")]
    assert (verdict.accepted, verdict.reason) == (False, "Invalid")
    assert field in verdict.message, verdict.message
    assert "nothing of this policy applies until it is fixed" in verdict.message
    assert result.mesh.security == convert(services(*MESH), [], []).mesh.security
    assert all(s.security is None for s in result.mesh.services)


def test_an_invalid_edit_keeps_the_last_valid_spec() -> None:
    """Security fails closed: a typo in an edit does not drop a strict mode or a rule."""
    converter = Converter()
    good = aged(security_policy("ratings", target="ratings").mtls("strict")
                .rule(**ALLOW_REVIEWS).build(), "2026-01-01T00:00:00Z", uid="u1")
    first = converter.convert(services(*MESH), [], [], security_policies=[good]).mesh
    bad = aged(security_policy("ratings", target="ratings").mtls("strikt").build(),
               "2026-01-01T00:00:00Z", uid="u1", generation=2)
    result = converter.convert(services(*MESH), [], [], security_policies=[bad])
    assert result.mesh.service("ratings") == first.service("ratings")
    verdict = result.security_verdicts[("default", "ratings")]
    assert not verdict.accepted and verdict.generation == 2
    assert verdict.message.startswith("spec.mtls.mode:")
    assert verdict.message.endswith("its last valid spec (generation 1) still applies to "
                                    "Service 'ratings' until this is fixed")
    # Deleted and created again (another uid): nothing earlier to keep.
    again = aged(bad, "2026-01-02T00:00:00Z", uid="u2")
    fresh = converter.convert(services(*MESH), [], [], security_policies=[again])
    ratings = fresh.mesh.service("ratings")
    assert ratings is not None and ratings.security is None
    # Fixed: the new spec applies.
    fixed = aged(security_policy("ratings", target="ratings").mtls("disable").build(),
                 "2026-01-02T00:00:00Z", uid="u2", generation=2)
    ratings = converter.convert(services(*MESH), [], [], security_policies=[fixed]) \
        .mesh.service("ratings")
    assert ratings is not None and ratings.security is not None
    assert ratings.security.mtls is not None and ratings.security.mtls.mode == "disable"


def test_unchanged_objects_convert_to_the_very_same_services() -> None:
    """A batch that changes nothing of a service or its SecurityPolicy validates nothing
    again: downstream sees the same objects."""
    converter, objs = Converter(), services(*MESH)
    policy = aged(security_policy("ratings", target="ratings").mtls("strict").build(),
                  "2026-01-01T00:00:00Z")
    first = converter.convert(objs, [], [], security_policies=[policy]).mesh
    second = converter.convert(objs, [], [], security_policies=[policy]).mesh
    assert all(a is b for a, b in zip(first.services, second.services, strict=True))
    edited = copy.deepcopy(policy)
    edited["spec"]["mtls"]["mode"] = "disable"
    third = converter.convert(objs, [], [], security_policies=[edited]).mesh
    ratings = third.service("ratings")
    assert ratings is not None and ratings.security is not None
    assert ratings.security.mtls is not None and ratings.security.mtls.mode == "disable"
    assert third.service("reviews") is first.service("reviews")


def test_two_policies_for_one_scope_the_oldest_applies() -> None:
    older = aged(security_policy("a", target="ratings").mtls("strict").build(),
                 "2026-01-01T00:00:00Z")
    newer = aged(security_policy("b", target="ratings").mtls("disable").build(),
                 "2026-01-02T00:00:00Z")
    result = convert(services(*MESH), [], [], security_policies=[newer, older])
    ratings = result.mesh.service("ratings")
    assert ratings is not None and ratings.security is not None
    assert ratings.security.mtls is not None and ratings.security.mtls.mode == "strict"
    conflicted = result.security_verdicts[("default", "b")]
    assert (conflicted.accepted, conflicted.reason) == (False, "Conflicted")
    assert conflicted.message == ("SecurityPolicy 'a' already applies to Service 'ratings' "
                                  "(the oldest applies); merge their rules into one")


def test_a_missing_target_is_accepted_said_and_applied_once_it_exists() -> None:
    obj = security_policy("ghost", target="ratngs").mtls("strict").build()
    result = convert(services(*MESH), [], [], security_policies=[obj])
    verdict = result.security_verdicts[("default", "ghost")]
    assert verdict.accepted
    assert verdict.unresolved == ("spec.target: no Service 'ratngs' in namespace 'default'; "
                                  "the policy applies once it exists, so check the spelling")
    made = conditions(verdict, None)
    assert [(c["type"], c["status"], c["reason"]) for c in made] == [
        ("Accepted", "True", "Accepted"), ("ResolvedRefs", "False", "TargetNotFound")]
    later = convert([*services(*MESH), *services("ratngs.default")], [], [],
                    security_policies=[obj])
    ratngs = later.mesh.service("ratngs")
    assert ratngs is not None and ratngs.security is not None
    assert later.security_verdicts[("default", "ghost")].unresolved == ""


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(spec=st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(
        st.sampled_from(["mtls", "mode", "authorization", "name", "from", "to", "target",
                         "action", "principals", "ports", "methods"]), inner, max_size=4),
    max_leaves=12))
def test_a_policy_of_any_shape_gets_a_verdict(spec: Any) -> None:
    obj = security_policy("any").build()
    obj["spec"] = spec
    result = convert(services(*MESH), [], [], security_policies=[obj])
    assert ("default", "any") in result.security_verdicts
    assert isinstance(result.mesh, Mesh)


# --- identities from Pods ----------------------------------------------------------------


def reviews_endpoints(*pods: tuple[str, str]) -> list[Obj]:
    builder = endpoint_slice("reviews-a", service="reviews")
    for address, name in pods:
        builder.endpoint(address, pod=name)
    return [builder.port(9080, name="http").build()]


def pods_of(*built: Obj) -> dict[tuple[str, str], Obj]:
    return {(p["metadata"]["namespace"], p["metadata"]["name"]): labels_only(p) for p in built}


def test_an_injected_pods_service_account_is_its_endpoints_identity() -> None:
    slices = reviews_endpoints(("10.0.0.1", "reviews-1"), ("10.0.0.2", "plain-1"),
                               ("10.0.0.3", "bad-1"))
    pods = pods_of(pod("reviews-1").injected("reviews").labels(app="reviews").build(),
                   pod("plain-1").build(),  # not injected: no sidecar, no identity
                   pod("bad-1").annotation(SERVICE_ACCOUNT_ANNOTATION, "Not A Name").build())
    result = convert(services("reviews.default"), slices, [], pods)
    [reviews] = result.mesh.services
    assert [(e.address, e.service_account) for e in reviews.endpoints] == [
        ("10.0.0.1", "reviews"), ("10.0.0.2", None), ("10.0.0.3", None)]
    [problem] = result.skipped
    assert problem.startswith(f"Pod default/bad-1: annotation {SERVICE_ACCOUNT_ANNOTATION}: ")
    assert "served as one without a sidecar until it is fixed" in problem


def test_only_a_service_account_change_converts_the_service_again() -> None:
    slices = reviews_endpoints(("10.0.0.1", "reviews-1"))
    pods = pods_of(pod("reviews-1").injected("reviews").labels(app="reviews").build())
    converter, objs = Converter(), services("reviews.default")
    first = converter.convert(objs, slices, [], pods).mesh
    pods.update(pods_of(pod("reviews-1").injected("reviews").labels(app="reviews",
                                                                    hash="x").build()))
    second = converter.convert(objs, slices, [], pods).mesh
    assert second.services[0] is first.services[0]  # a relabel: nothing converted again
    pods.update(pods_of(pod("reviews-1").injected("reviews-v2").build()))
    third = converter.convert(objs, slices, [], pods).mesh
    assert third.services[0].endpoints[0].service_account == "reviews-v2"


def test_strict_on_a_service_without_sidecars_is_said() -> None:
    """Valid, but every caller would be refused: ResolvedRefs says so, until the Service's
    Pods are injected."""
    slices = reviews_endpoints(("10.0.0.1", "reviews-1"))
    policy = security_policy("reviews", target="reviews").mtls("strict").build()
    plain = pods_of(pod("reviews-1").build())
    verdict = convert(services("reviews.default"), slices, [], plain,
                      security_policies=[policy]).security_verdicts[("default", "reviews")]
    assert verdict.accepted
    made = conditions(verdict, None)
    assert [(c["type"], c["status"], c["reason"]) for c in made] == [
        ("Accepted", "True", "Accepted"), ("ResolvedRefs", "False", "NoSidecars")]
    assert made[1]["message"].startswith("mtls.mode strict: no endpoint of Service 'reviews' "
                                         "has a sidecar")
    injected = pods_of(pod("reviews-1").injected("reviews").build())
    verdict = convert(services("reviews.default"), slices, [], injected,
                      security_policies=[policy]).security_verdicts[("default", "reviews")]
    assert verdict.accepted and verdict.unresolved == ""
    permissive = security_policy("reviews", target="reviews").mtls("permissive").build()
    verdict = convert(services("reviews.default"), slices, [], plain,
                      security_policies=[permissive]).security_verdicts[("default", "reviews")]
    assert verdict.unresolved == ""


def test_the_store_keeps_only_our_annotation_of_a_pod() -> None:
    built = pod("p").injected("reviews").annotation("kubectl.kubernetes.io/restartedAt",
                                                    "now").build()
    assert labels_only(built)["metadata"]["annotations"] == {
        SERVICE_ACCOUNT_ANNOTATION: "reviews"}
    assert "annotations" not in labels_only(pod("p").build())["metadata"]


# --- through the API server double -------------------------------------------------------


@pytest.fixture
def api() -> Iterator[ApiServerDouble]:
    double = ApiServerDouble(bookmark_interval=0.5).start()
    yield double
    double.stop()


def strict(mesh: Mesh, name: str) -> bool:
    found = mesh.service(name)
    return found is not None and effective(mesh, found).mode == "strict"


async def test_a_policy_through_the_api_changes_the_mesh_and_gets_a_status(
        api: ApiServerDouble, tmp_path: Path) -> None:
    for obj in services(*MESH):
        api.create(obj)
    api.create(pod("reviews-1").injected("reviews").build())
    api.create(endpoint_slice("reviews-a", service="reviews").endpoint(
        "10.1.0.1", pod="reviews-1").port(9080, name="http").build())
    updates = Feed(source(api, tmp_path).updates())
    mesh = await next_mesh(updates)
    reviews = mesh.service("reviews")
    assert reviews is not None and reviews.endpoints[0].service_account == "reviews"

    api.create(security_policy("ratings", target="ratings").mtls("strict")
               .rule(**ALLOW_REVIEWS).build())
    mesh = await mesh_where(updates, lambda m: strict(m, "ratings"))
    found = await status_of(api, SECURITY_POLICIES, "default", "ratings", lambda c: len(c) == 2)
    assert [(c["type"], c["status"], c["reason"]) for c in found] == [
        ("Accepted", "True", "Accepted"), ("ResolvedRefs", "True", "ResolvedRefs")]
    assert found[0]["message"] == "applies to Service 'ratings'"

    # An edit the CRD's schema lets through but the model refuses: the status says
    # which field, and the last valid spec keeps applying.
    broken = security_policy("ratings", target="ratings").mtls("strict").rule("r").rule(
        "r", action="deny").build()
    api.apply(broken)
    found = await status_of(api, SECURITY_POLICIES, "default", "ratings",
                            lambda c: c[0]["status"] == "False")
    message = found[0]["message"]
    assert message.startswith("spec.authorization") and "'r' repeats" in message, message
    assert "its last valid spec (generation 1) still applies" in found[0]["message"]
    assert strict(await mesh_or(updates, mesh), "ratings")

    api.delete(SECURITY_POLICIES, "default", "ratings")
    mesh = await mesh_where(updates, lambda m: not strict(m, "ratings"))
    ratings = mesh.service("ratings")
    assert ratings is not None and ratings.security is None
    await updates.aclose()


async def mesh_or(feed: Feed, last: Mesh, wait: float = 0.5) -> Mesh:
    """The next mesh if one comes within ``wait``, else ``last`` (nothing changed)."""
    try:
        return await asyncio.wait_for(feed.queue.get(), wait)
    except TimeoutError:
        return last


async def test_a_mesh_wide_policy_in_the_control_planes_namespace(
        api: ApiServerDouble, tmp_path: Path) -> None:
    for obj in services(*MESH):
        api.create(obj)
    updates = Feed(source(api, tmp_path).updates())
    await next_mesh(updates)
    api.create(security_policy("mesh", namespace=ROOT_NAMESPACE).mtls("strict").build())
    mesh = await mesh_where(updates, lambda m: m.security.mtls is not None)
    assert all(strict(mesh, s.name) for s in mesh.services if s.namespace == "default")
    found = await status_of(api, SECURITY_POLICIES, ROOT_NAMESPACE, "mesh", lambda c: len(c) == 2)
    assert found[0]["message"] == "applies to every service of the mesh"
    await updates.aclose()


async def test_serve_takes_the_root_namespace_from_its_own(
        api: ApiServerDouble, tmp_path: Path) -> None:
    """``serve`` in namespace mesh-admin (CONTROLPLANE_WEBHOOK_NAMESPACE, from the downward
    API in the manifests): a SecurityPolicy without target there is mesh-wide."""
    for obj in services(*MESH):
        api.create(obj)
    api.create(security_policy("mesh", namespace="mesh-admin").mtls("strict").build())
    settings = ServeSettings(source="kubernetes", webhook_namespace="mesh-admin",
                             kubeconfig=api.kubeconfig(tmp_path / "kubeconfig"))
    opened = open_source(settings)
    assert isinstance(opened, KubernetesSource)
    opened.debounce = Debounce(quiet=0.05, max_delay=1.0)
    updates = Feed(opened.updates())
    mesh = await next_mesh(updates)
    assert mesh.security.mtls is not None and mesh.security.mtls.mode == "strict"
    assert mesh.security.namespaces == {}
    await updates.aclose()


def test_the_api_server_double_applies_the_shipped_schema(api: ApiServerDouble) -> None:
    """What ``kubectl apply`` would be told: the CRD refuses a bad mode or a service
    account that is not namespace/name at once."""
    with pytest.raises(StatusError) as caught:
        api.create(security_policy("bad", target="ratings").mtls("strickt").build())
    assert caught.value.code == 422
    assert "spec.mtls.mode" in caught.value.message
    with pytest.raises(StatusError) as unqualified:
        api.create(security_policy("bad", target="ratings").rule(
            "r", from_=[{"service_accounts": ["reviews"]}]).build())
    assert unqualified.value.code == 422
    assert "spec.authorization[0].from[0].service_accounts[0]" in unqualified.value.message


# --- the CRD -----------------------------------------------------------------------------


def crd_schema() -> Obj:
    [version] = security_policy_crd()["spec"]["versions"]
    schema: Obj = version["schema"]["openAPIV3Schema"]
    return schema


def test_the_crd_spec_is_the_security_block_plus_target() -> None:
    spec = crd_schema()["properties"]["spec"]
    model = set(Security.model_json_schema(by_alias=True)["properties"])
    assert set(spec["properties"]) == {"target", *model}
    crd = security_policy_crd()
    assert crd["spec"]["names"]["shortNames"] == ["secpol"]
    assert crd["spec"]["scope"] == "Namespaced"
    assert crd["spec"]["versions"][0]["subresources"] == {"status": {}}


@pytest.mark.parametrize("spec", [
    {"target": {"name": "ratings"}, "mtls": {"mode": "strict"}},
    {"authorization": [ALLOW_REVIEWS, {"name": "deny-evil", "action": "deny",
                                       "from": [{"namespaces": ["evil"]}],
                                       "to": [{"paths": [{"prefix": "/admin"}],
                                               "ports": [9080],
                                               "headers": [{"name": "x-user",
                                                            "present": True}]}]}]},
])
def test_the_crd_accepts_what_the_model_accepts(spec: Obj) -> None:
    obj = security_policy("ok").spec(spec).build()
    jsonschema.Draft4Validator(crd_schema()).validate(obj)
    Security.model_validate({k: v for k, v in spec.items() if k != "target"})


@pytest.mark.parametrize("source", [
    {"principals": ["*"]}, {"principals": ["spiffe://cluster.local/ns/default/sa/reviews"]},
    {"principals": ["spiffe://cluster.local/ns/default/*"]}, {"principals": ["spiffe://*"]},
    {"service_accounts": ["default/reviews", "shop/cart.v2"]}, {"namespaces": ["a-1"]},
])
def test_the_crd_patterns_accept_every_source_the_model_does(source: Obj) -> None:
    spec = {"authorization": [{"name": "r", "from": [source]}]}
    Security.model_validate(spec)
    jsonschema.Draft4Validator(crd_schema()).validate(security_policy("ok").spec(spec).build())


@pytest.mark.parametrize(("rule", "path"), [
    ({"name": "Bad_Name"}, "name"),
    ({"name": "r", "from": [{"service_accounts": ["reviews"]}]}, "service_accounts"),
    ({"name": "r", "from": [{"principals": ["cluster.local/ns/a/sa/b"]}]}, "principals"),
    ({"name": "r", "from": [{"principals": ["spiffe://a*b"]}]}, "principals"),
    ({"name": "r", "from": [{"namespaces": ["Default"]}]}, "namespaces"),
    ({"name": "r", "to": [{"methods": ["get"]}]}, "methods"),
])
def test_the_crd_refuses_what_the_model_refuses(rule: Obj, path: str) -> None:
    spec = {"authorization": [rule]}
    with pytest.raises(ValueError):
        Security.model_validate(spec)
    errors = list(jsonschema.Draft4Validator(crd_schema()).iter_errors(
        security_policy("bad").spec(spec).build()))
    assert errors and any(path in map(str, e.absolute_path) for e in errors), errors


def test_the_shipped_example_passes_the_crd_and_the_model() -> None:
    example = deploy.example_security_policy()
    jsonschema.Draft4Validator(crd_schema()).validate(example)
    result = convert(services(*MESH), [], [], security_policies=[example])
    assert result.security_verdicts[("default", "ratings")].accepted
