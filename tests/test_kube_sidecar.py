"""Scoping from Kubernetes: ``Sidecar`` objects become the mesh's ``sidecars`` entries,
the ``mesh.controlplane.io/export-to`` Service annotation its ``exportTo``; each Sidecar
gets a status (Accepted, ResolvedRefs). Conversion in-process, then the source against
the API server double, then the shipped CRD's schema."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from controlplane import deploy
from controlplane.mesh.model import Mesh
from controlplane.sources.kubernetes.convert import convert
from controlplane.sources.kubernetes.crd import sidecar_crd
from controlplane.sources.kubernetes.kinds import EXPORT_TO_ANNOTATION, SIDECARS
from controlplane.sources.kubernetes.status import conditions
from controlplane.sources.kubernetes.store import relevant
from tests.kube.apiserver import ApiServerDouble
from tests.kube.objects import service, sidecar
from tests.support.kube_waits import mesh_where, status_of
from tests.test_kube_source import Feed, next_mesh, source

Obj = dict[str, Any]
EVERY = None  # what visible() says for a sidecar that sees every service


def services(*keys: str, export: dict[str, str] | None = None) -> list[Obj]:
    """Services ``name.namespace`` with one HTTP port; ``export``: annotations by key."""
    found = []
    for service_key in keys:
        name, namespace = service_key.split(".")
        builder = service(name, namespace).port(9080, name="http")
        if export and service_key in export:
            builder.annotation(EXPORT_TO_ANNOTATION, export[service_key])
        found.append(builder.build())
    return found


MESH = ("frontend.shop", "cart.shop", "payments.pay", "ratings.default", "ratings.pay",
        "reviews.default")


def seen(mesh: Mesh, service_name: str, namespace: str) -> set[str] | None:
    visible = mesh.scope.visible(service_name, namespace)
    return None if visible is None else set(visible)


# --- conversion --------------------------------------------------------------------------


def test_a_sidecar_limits_what_its_sidecars_see() -> None:
    frontend = sidecar("frontend", ["./*", "pay/payments", "*/ratings"], service="frontend",
                       namespace="shop").build()
    result = convert(services(*MESH), [], [], sidecars=[frontend])
    [entry] = result.mesh.sidecars
    assert (entry.name, entry.namespace, entry.workload_selector) == (
        "frontend", "shop", entry.workload_selector)
    assert entry.workload_selector is not None and entry.workload_selector.service == "frontend"
    assert seen(result.mesh, "frontend", "shop") == {
        "frontend.shop", "cart.shop", "payments.pay", "ratings.default", "ratings.pay"}
    assert seen(result.mesh, "cart", "shop") is EVERY  # not selected: everything
    verdict = result.sidecar_verdicts[("shop", "frontend")]
    assert verdict.accepted and verdict.unresolved == ""
    assert [c["reason"] for c in conditions(verdict, None)] == ["Accepted", "ResolvedRefs"]


def test_the_sidecar_for_a_service_wins_over_the_one_for_its_namespace() -> None:
    namespace_wide = sidecar("default", ["./*"], namespace="shop").build()
    for_cart = sidecar("cart", ["pay/payments"], service="cart", namespace="shop").build()
    mesh = convert(services(*MESH), [], [], sidecars=[namespace_wide, for_cart]).mesh
    assert seen(mesh, "frontend", "shop") == {"frontend.shop", "cart.shop"}
    assert seen(mesh, "cart", "shop") == {"cart.shop", "payments.pay"}  # and its own


@pytest.mark.parametrize(("spec", "field"), [
    ({"egress": [{"hosts": ["payments"]}]}, "spec.egress[0].hosts[0]"),
    ({"egress": []}, "spec.egress"),
    ({"egress": [{"hosts": []}]}, "spec.egress[0].hosts"),
    ({"egress": [{"hosts": ["./*"]}], "workloadSelector": {"service": "Bad_Name"}},
     "spec.workloadSelector.service"),
    ({"egress": [{"hosts": ["./*"]}], "ingress": []}, "spec.ingress"),
    ({}, "spec.egress"),
])
def test_an_invalid_sidecar_is_refused_naming_the_field(spec: Obj, field: str) -> None:
    """Refused objects leave their sidecars as they would be without them (seeing
    everything here), and the Accepted condition names the field and what to write."""
    bad = sidecar("frontend", ["./*"], namespace="shop").spec(spec).build()
    result = convert(services(*MESH), [], [], sidecars=[bad])
    assert result.mesh.sidecars == []
    assert seen(result.mesh, "frontend", "shop") is EVERY
    verdict = result.sidecar_verdicts[("shop", "frontend")]
    assert (verdict.accepted, verdict.reason) == (False, "Invalid")
    assert verdict.message.startswith(field), verdict.message
    [accepted] = conditions(verdict, None)
    assert (accepted["type"], accepted["status"]) == ("Accepted", "False")


@pytest.mark.parametrize("spec", [None, "egress", ["./*"], {"egress": "./*"},
                                  {"egress": [None]}, {"egress": [{"hosts": [7]}]}])
def test_a_sidecar_of_any_shape_gets_a_verdict(spec: Any) -> None:
    bad: Obj = {"metadata": {"name": "x", "namespace": "shop"}, "spec": spec}
    result = convert(services(*MESH), [], [], sidecars=[bad, "junk", 7])  # type: ignore[list-item]
    assert not result.sidecar_verdicts[("shop", "x")].accepted
    assert result.mesh.sidecars == []


def test_two_sidecars_for_the_same_sidecars_the_oldest_applies() -> None:
    older = sidecar("first", ["./*"], namespace="shop").build()
    older["metadata"]["creationTimestamp"] = "2026-01-01T00:00:00Z"
    newer = sidecar("second", ["pay/*"], namespace="shop").build()
    newer["metadata"]["creationTimestamp"] = "2026-02-01T00:00:00Z"
    result = convert(services(*MESH), [], [], sidecars=[newer, older])
    assert [s.name for s in result.mesh.sidecars] == ["first"]
    assert result.sidecar_verdicts[("shop", "first")].accepted
    conflicted = result.sidecar_verdicts[("shop", "second")]
    assert conflicted.reason == "Conflicted" and "'first'" in conflicted.message
    assert "merge" in conflicted.message


def test_a_host_that_matches_no_service_is_accepted_but_said() -> None:
    """A typo (``pay/paymnts``) is valid, since Services come later, but ResolvedRefs
    says which host matches nothing, until a Service by that name exists."""
    typo = sidecar("frontend", ["./*", "pay/paymnts", "*/ratings"], namespace="shop").build()
    result = convert(services(*MESH), [], [], sidecars=[typo])
    verdict = result.sidecar_verdicts[("shop", "frontend")]
    assert verdict.accepted
    assert verdict.unresolved.startswith("spec.egress[0].hosts[1] (pay/paymnts): matches no "
                                         "Service"), verdict.unresolved
    resolved = conditions(verdict, None)[1]
    assert (resolved["type"], resolved["status"], resolved["reason"]) == (
        "ResolvedRefs", "False", "NoMatchingServices")
    later = convert(services(*MESH, "paymnts.pay"), [], [], sidecars=[typo])
    assert later.sidecar_verdicts[("shop", "frontend")].unresolved == ""


def test_the_export_to_annotation_keeps_a_service_to_some_namespaces() -> None:
    result = convert(services(*MESH, export={"payments.pay": ".", "cart.shop": "shop, pay"}),
                     [], [])
    by_key = result.mesh.by_key
    assert by_key["payments.pay"].export_to == ["."]
    assert by_key["cart.shop"].export_to == ["shop", "pay"]
    assert by_key["reviews.default"].export_to is None
    assert "payments.pay" not in (seen(result.mesh, "frontend", "shop") or set())
    assert "payments.pay" in (seen(result.mesh, "ratings", "pay") or set(MESH))
    assert "cart.shop" not in (seen(result.mesh, "reviews", "default") or set())
    assert not result.skipped


def test_an_invalid_export_to_keeps_the_service_to_its_namespace_and_says_so() -> None:
    """Closed rather than open: the annotation was meant to narrow who sees it."""
    result = convert(services(*MESH, export={"payments.pay": "*, shop"}), [], [])
    assert result.mesh.by_key["payments.pay"].export_to == ["."]
    [problem] = result.skipped
    assert problem.startswith(f"service pay/payments: annotation {EXPORT_TO_ANNOTATION}")
    assert "own namespace only until the annotation is fixed" in problem


def test_only_our_annotation_is_kept_by_the_store() -> None:
    """Other annotations (kubectl's last-applied configuration) change nothing."""
    plain = services("payments.pay")[0]
    noisy = {**plain, "metadata": {**plain["metadata"], "annotations": {"kubectl": "x"}}}
    assert relevant(noisy) == relevant(plain)
    [exported] = services("payments.pay", export={"payments.pay": "."})
    assert relevant(exported)["metadata"]["annotations"] == {EXPORT_TO_ANNOTATION: "."}


# --- the source, against the API server double -------------------------------------------


@pytest.fixture
def api() -> Iterator[ApiServerDouble]:
    double = ApiServerDouble(bookmark_interval=0.5).start()
    yield double
    double.stop()


async def test_a_sidecar_created_changed_and_deleted_changes_what_sidecars_see(
        api: ApiServerDouble, tmp_path: Path) -> None:
    for obj in services(*MESH):
        api.create(obj)
    updates = Feed(source(api, tmp_path).updates())
    mesh = await next_mesh(updates)
    assert seen(mesh, "frontend", "shop") is EVERY

    api.create(sidecar("frontend", ["./*", "pay/paymnts"], service="frontend",
                       namespace="shop").build())
    mesh = await mesh_where(updates, lambda m: bool(m.sidecars))
    assert seen(mesh, "frontend", "shop") == {"frontend.shop", "cart.shop"}
    found = await status_of(api, SIDECARS, "shop", "frontend", lambda c: len(c) == 2)
    assert [(c["type"], c["status"]) for c in found] == [("Accepted", "True"),
                                                         ("ResolvedRefs", "False")]
    assert "pay/paymnts" in found[1]["message"] and found[1]["reason"] == "NoMatchingServices"

    api.apply(sidecar("frontend", ["./*", "pay/payments"], service="frontend",
                      namespace="shop").build())
    mesh = await mesh_where(updates, lambda m: "payments.pay" in (
        m.scope.visible("frontend", "shop") or ()))
    assert seen(mesh, "frontend", "shop") == {"frontend.shop", "cart.shop", "payments.pay"}
    await status_of(api, SIDECARS, "shop", "frontend", lambda c: len(c) == 2 and all(
        x["status"] == "True" for x in c))

    api.delete(SIDECARS, "shop", "frontend")
    mesh = await mesh_where(updates, lambda m: not m.sidecars)
    assert seen(mesh, "frontend", "shop") is EVERY
    await updates.aclose()


async def test_an_invalid_sidecar_is_refused_in_its_status_and_the_rest_served(
        api: ApiServerDouble, tmp_path: Path) -> None:
    """The CRD's schema catches most mistakes at ``kubectl apply``; what it cannot (two
    Sidecars for the same sidecars) the status says."""
    for obj in services(*MESH):
        api.create(obj)
    api.create(sidecar("first", ["./*"], namespace="shop").build())
    api.create(sidecar("second", ["pay/*"], namespace="shop").build())
    updates = Feed(source(api, tmp_path).updates())
    mesh = await mesh_where(updates, lambda m: bool(m.sidecars))
    assert [s.name for s in mesh.sidecars] == ["first"]
    found = await status_of(api, SIDECARS, "shop", "second", bool)
    [accepted] = found
    assert (accepted["status"], accepted["reason"]) == ("False", "Conflicted")
    await updates.aclose()


async def test_the_export_to_annotation_through_the_api(
        api: ApiServerDouble, tmp_path: Path) -> None:
    for obj in services(*MESH):
        api.create(obj)
    updates = Feed(source(api, tmp_path).updates())
    mesh = await next_mesh(updates)
    assert "payments.pay" in (seen(mesh, "frontend", "shop") or set(MESH))
    [private] = services("payments.pay", export={"payments.pay": "."})
    api.apply(private)
    mesh = await mesh_where(updates, lambda m: m.by_key["payments.pay"].export_to == ["."])
    assert "payments.pay" not in (seen(mesh, "frontend", "shop") or set())
    await updates.aclose()


# --- the CRD -----------------------------------------------------------------------------


def sidecar_errors(spec: Any) -> list[str]:
    """What the API server would say about this spec (the schema, as OpenAPI 3.0)."""
    schema = sidecar_crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    obj = {"apiVersion": "mesh.controlplane.io/v1alpha1", "kind": "Sidecar",
           "metadata": {"name": "s", "namespace": "shop"}, "spec": spec}
    return [e.message for e in jsonschema.Draft4Validator(schema).iter_errors(obj)]


@pytest.mark.parametrize("spec", [
    deploy.example_sidecar()["spec"],
    {"egress": [{"hosts": ["*/*"]}]},
    {"egress": [{"hosts": ["./*", "pay/payments", "*/ratings"]}, {"hosts": ["a-b/c-d"]}]},
])
def test_the_crd_accepts_what_the_model_accepts(spec: Obj) -> None:
    assert sidecar_errors(spec) == []
    result = convert([], [], [], sidecars=[sidecar("s", []).spec(spec).build()])
    assert result.sidecar_verdicts[("default", "s")].accepted


@pytest.mark.parametrize("spec", [
    {"egress": [{"hosts": ["payments"]}]},
    {"egress": [{"hosts": ["pay/Payments"]}]},
    {"egress": [{"hosts": ["pay/."]}]},
    {"egress": []},
    {"egress": [{"hosts": []}]},
    {"egress": [{"hosts": ["./*"]}], "workloadSelector": {"service": "a_b"}},
    {"workloadSelector": {"service": "a"}},
])
def test_the_crd_refuses_what_the_model_refuses(spec: Obj) -> None:
    assert sidecar_errors(spec)
    result = convert([], [], [], sidecars=[sidecar("s", []).spec(spec).build()])
    assert not result.sidecar_verdicts[("default", "s")].accepted


async def test_the_api_server_double_applies_the_shipped_sidecar_schema(
        api: ApiServerDouble) -> None:
    from tests.kube.errors import StatusError

    with pytest.raises(StatusError) as refused:
        api.create(sidecar("bad", ["payments"]).build())
    assert "spec.egress[0].hosts[0]" in str(refused.value)
    api.create(sidecar("good", ["./*"]).build())
    assert api.get(SIDECARS, "default", "good")["spec"] == {"egress": [{"hosts": ["./*"]}]}


# --- any shape ---------------------------------------------------------------------------

_NAMES = st.sampled_from(["shop", "pay", "default", "frontend", "cart", "x", "", "A_b"])
_HOSTS = st.lists(st.sampled_from(["./*", "*/*", "pay/payments", "*/ratings", "shop/*",
                                   "payments", "", "pay/", "/x", "a/b/c"]) | st.text(max_size=8),
                  max_size=4)
_SPECS = st.one_of(
    st.fixed_dictionaries({"egress": st.lists(st.fixed_dictionaries({"hosts": _HOSTS}),
                                              max_size=3)},
                          optional={"workloadSelector": st.fixed_dictionaries(
                              {"service": _NAMES}) | st.none() | st.integers()}),
    st.none(), st.integers(), st.text(max_size=5), st.lists(st.integers(), max_size=2))


@settings(max_examples=150, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(st.lists(st.fixed_dictionaries({
    "metadata": st.fixed_dictionaries({"name": _NAMES, "namespace": _NAMES},
                                      optional={"creationTimestamp": st.text(max_size=4)}),
    "spec": _SPECS}), max_size=4),
    st.dictionaries(st.sampled_from(MESH), st.sampled_from(
        [".", "*", "shop", "pay,shop", "*,x", "", ",", "Bad", ". , pay"]), max_size=3))
def test_any_sidecars_and_annotations_convert_to_a_result(sidecars: list[Obj],
                                                          export: dict[str, str]) -> None:
    """Every object gets a verdict, nothing raises, and every sidecar's visible set is
    made of services of the mesh (its own always among them)."""
    result = convert(services(*MESH, export=export), [], [], sidecars=sidecars)
    assert {(o["metadata"]["namespace"] or "default", o["metadata"]["name"])
            for o in sidecars} == set(result.sidecar_verdicts)
    assert len(result.mesh.services) == len(MESH)
    for service_key in MESH:
        name, namespace = service_key.split(".")
        visible = result.mesh.scope.visible(name, namespace)
        assert visible is None or (service_key in visible and visible <= set(MESH))
