"""Telemetry from Kubernetes: ``Telemetry`` objects become the mesh's ``telemetry`` (a
Service's block, a namespace's, or the mesh's from the control plane's namespace), each
with a status (Accepted, ResolvedRefs). Conversion in-process, then the source against
the API server double (status written over HTTP, the shipped CRD's schema enforced)."""

from __future__ import annotations

import copy
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import pytest

from controlplane import deploy_examples
from controlplane.mesh.model import Mesh
from controlplane.mesh.telemetry import effective
from controlplane.sources.kubernetes.convert import Converter, convert
from controlplane.sources.kubernetes.crd import telemetry_crd
from controlplane.sources.kubernetes.kinds import ROOT_NAMESPACE, TELEMETRIES
from controlplane.sources.kubernetes.telemetry import choose_telemetry
from tests.kube.apiserver import ApiServerDouble, StatusError
from tests.kube.objects import service
from tests.support.kube_waits import mesh_where, status_of
from tests.test_kube_source import Feed, next_mesh, source

Obj = dict[str, Any]
TRACE = {"address": "otel.observability:4317", "sampling": 10}


def telemetry(name: str, namespace: str = "default", target: str | None = None,
              created: str = "2026-01-01T00:00:00Z", **spec: Any) -> Obj:
    if target is not None:
        spec["targetRef"] = {"kind": "Service", "name": target}
    return {"apiVersion": TELEMETRIES.api_version, "kind": TELEMETRIES.kind,
            "metadata": {"name": name, "namespace": namespace, "uid": f"uid-{name}",
                         "generation": 1, "creationTimestamp": created},
            "spec": spec}


def services(*keys: str) -> list[Obj]:
    found = []
    for service_key in keys:
        name, namespace = service_key.split(".")
        found.append(service(name, namespace).port(9080, name="http").build())
    return found


MESH = ("ratings.default", "reviews.default", "cart.shop")


def test_a_telemetry_applies_to_its_service_its_namespace_or_the_mesh() -> None:
    objs = [telemetry("mesh", ROOT_NAMESPACE, tracing=TRACE),
            telemetry("shop", "shop", accessLog={"enabled": False}),
            telemetry("ratings", target="ratings", tracing={"enabled": False})]
    result = convert(services(*MESH), [], [], telemetries=objs)
    mesh = result.mesh
    ratings, reviews, cart = (mesh.service(*k.split(".")) for k in MESH)
    assert ratings is not None and reviews is not None and cart is not None
    assert effective(mesh, ratings).tracing is None  # its own turns it off
    tracing = effective(mesh, reviews).tracing
    assert tracing is not None and (tracing.address, tracing.sampling) == (
        "otel.observability:4317", 10.0)
    assert effective(mesh, cart).access_log is False  # its namespace's
    assert effective(mesh, cart).tracing == tracing  # the mesh's
    messages = {k[1]: (v.accepted, v.message) for k, v in result.telemetry_verdicts.items()}
    assert messages == {
        "mesh": (True, "applies to every sidecar of the mesh"),
        "shop": (True, "applies to every sidecar of namespace 'shop'"),
        "ratings": (True, "applies to the sidecars of Service 'ratings'")}


@pytest.mark.parametrize(("spec", "said"), [
    ({"tracing": {"address": "nohost"}}, "spec.tracing.address: address 'nohost' must be "
                                         "HOST:PORT"),
    ({"tracing": {"address": "a:4317", "sampling": 200}}, "spec.tracing.sampling"),
    ({"accessLog": {"enabled": "sometimes"}}, "spec.accessLog.enabled"),
    ({"metrics": {}}, "spec.metrics: unknown field"),
    ({"targetRef": {"kind": "Pod", "name": "x"}}, "spec.targetRef: must be {kind: Service"),
])
def test_an_invalid_telemetry_is_refused_naming_the_field(spec: Obj, said: str) -> None:
    obj = telemetry("bad")
    obj["spec"] = spec
    verdict = convert(services(*MESH), [], [], telemetries=[obj]).telemetry_verdicts[
        ("default", "bad")]
    assert not verdict.accepted and verdict.reason == "Invalid"
    assert said in verdict.message, verdict.message
    assert verdict.message.endswith("nothing of this Telemetry applies until it is fixed")


@pytest.mark.parametrize("spec", [None, [], "x", {"tracing": []}, {"targetRef": "ratings"},
                                  {"accessLog": {"enabled": None}}, {"tracing": {"sampling":
                                                                                 "nan"}}])
def test_a_telemetry_of_any_shape_gets_a_verdict(spec: Any) -> None:
    obj = telemetry("odd")
    obj["spec"] = spec
    result = choose_telemetry([obj, {"not": "metadata"}], {})
    assert not result.verdicts[("default", "odd")].accepted


def test_two_for_one_scope_the_oldest_applies_and_a_missing_target_is_said() -> None:
    old = telemetry("a", "shop", created="2026-01-01T00:00:00Z", tracing=TRACE)
    new = telemetry("b", "shop", created="2026-02-01T00:00:00Z", accessLog={"enabled": False})
    ghost = telemetry("ghost", target="nosuch", tracing=TRACE)
    result = choose_telemetry([new, old, ghost], {("default", "ratings"): {}})
    assert result.mesh.namespaces["shop"].tracing is not None
    conflicted = result.verdicts[("shop", "b")]
    assert (conflicted.accepted, conflicted.reason) == (False, "Conflicted")
    assert "Telemetry 'a' already applies" in conflicted.message
    unresolved = result.verdicts[("default", "ghost")]
    assert unresolved.accepted and "no Service 'nosuch'" in unresolved.unresolved


def test_unchanged_objects_convert_to_the_very_same_services() -> None:
    converter = Converter()
    svcs = services(*MESH)
    objs = [telemetry("ratings", target="ratings", tracing=TRACE)]
    first = converter.convert(svcs, [], [], telemetries=objs).mesh
    again = converter.convert(svcs, [], [], telemetries=copy.deepcopy(objs)).mesh
    assert first.service("ratings") is again.service("ratings")


def test_the_shipped_example_passes_the_crd_and_the_model() -> None:
    example = deploy_examples.example_telemetry()
    [version] = telemetry_crd()["spec"]["versions"]
    jsonschema.Draft4Validator(version["schema"]["openAPIV3Schema"]).validate(example)
    example["metadata"].update(uid="u", generation=1)
    result = convert(services(*MESH), [], [], telemetries=[example])
    assert result.telemetry_verdicts[("default", "reviews")].accepted
    reviews = result.mesh.service("reviews")
    assert reviews is not None and reviews.telemetry is not None


# --- through the API server double -------------------------------------------------------


@pytest.fixture
def api() -> Iterator[ApiServerDouble]:
    double = ApiServerDouble(bookmark_interval=0.5).start()
    yield double
    double.stop()


def traced(mesh: Mesh, name: str) -> bool:
    found = mesh.service(name)
    return found is not None and effective(mesh, found).tracing is not None


async def test_a_telemetry_through_the_api_changes_the_mesh_and_gets_a_status(
        api: ApiServerDouble, tmp_path: Path) -> None:
    for obj in services(*MESH):
        api.create(obj)
    updates = Feed(source(api, tmp_path).updates())
    mesh = await next_mesh(updates)
    assert not traced(mesh, "ratings")

    made = telemetry("ratings", target="ratings", tracing=TRACE)
    del made["metadata"]["uid"], made["metadata"]["creationTimestamp"]
    api.create(made)
    mesh = await mesh_where(updates, lambda m: traced(m, "ratings"))
    assert not traced(mesh, "reviews")
    found = await status_of(api, TELEMETRIES, "default", "ratings", lambda c: len(c) == 2)
    assert [(c["type"], c["status"], c["reason"]) for c in found] == [
        ("Accepted", "True", "Accepted"), ("ResolvedRefs", "True", "ResolvedRefs")]
    assert found[0]["message"] == "applies to the sidecars of Service 'ratings'"

    # The mesh-wide one, from the control plane's namespace.
    mesh_wide = telemetry("mesh", ROOT_NAMESPACE, accessLog={"enabled": False})
    del mesh_wide["metadata"]["uid"], mesh_wide["metadata"]["creationTimestamp"]
    api.create(mesh_wide)
    mesh = await mesh_where(updates, lambda m: m.telemetry.access_log is not None)
    reviews = mesh.service("reviews")
    assert reviews is not None and effective(mesh, reviews).access_log is False

    api.delete(TELEMETRIES, "default", "ratings")
    await mesh_where(updates, lambda m: not traced(m, "ratings"))
    await updates.aclose()


def test_the_api_server_double_applies_the_shipped_schema(api: ApiServerDouble) -> None:
    """What ``kubectl apply`` would be told: the CRD refuses a sampling over 100 and a
    target that is not a Service at once."""
    with pytest.raises(StatusError) as caught:
        api.create(telemetry("bad", tracing={"address": "a:1", "sampling": 101}))
    assert caught.value.code == 422 and "spec.tracing.sampling" in caught.value.message
    with pytest.raises(StatusError) as kind:
        api.create(telemetry("bad", target="x") | {"spec": {
            "targetRef": {"kind": "Pod", "name": "x"}}})
    assert kind.value.code == 422 and "spec.targetRef.kind" in kind.value.message
