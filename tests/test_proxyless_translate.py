"""A proxyless gRPC client's resources: golden files a reviewer reads, and the rules the
translation keeps (what is left out is noted, once; layers are shared between groups).

Each ``tests/golden/proxyless/in/<case>.yaml`` (a mesh file plus a ``proxy:`` block, as
the translator goldens) is built as the server builds it for a gRPC client (MeshBuild,
``kind: grpc``) and must give ``out/<case>.yaml``. Regenerate with
``pytest --update-golden`` and review the diff like code.
"""

from __future__ import annotations

import dataclasses
import gc
import uuid
from pathlib import Path
from typing import Any

import pytest
import yaml
from envoy.config.route.v3 import route_components_pb2
from structlog.testing import capture_logs

from controlplane import resource
from controlplane.assembly import MeshBuild, proxyless
from controlplane.cache.snapshot import Snapshot
from controlplane.mesh import Mesh, load_mesh_data
from controlplane.proxy import GRPC, ProxyIdentity
from controlplane.translator.proxyless import LeftOut, api_listener, grpc_retry_on
from controlplane.translator.proxyless.notes import MAX_NOTES
from controlplane.translator.proxyless.retries import grpc_retry_policy
from tests.support.golden import Goldens, to_dict

GOLDENS = Goldens(Path(__file__).parent / "golden" / "proxyless")
CASES = GOLDENS.cases


def load_case(name: str) -> tuple[Mesh, ProxyIdentity]:
    return GOLDENS.load(name, kind=GRPC)


def build(name: str) -> Snapshot:
    mesh, proxy = load_case(name)
    snapshot = MeshBuild(mesh).snapshot(proxy)
    assert snapshot.problems() == []
    return snapshot


def messages(snapshot: Snapshot, type_url: str) -> list[Any]:
    typed = snapshot.get(type_url)
    assert typed is not None
    return [typed.resources[name].message for name in sorted(typed.resources)]


def render(snapshot: Snapshot) -> str:
    """Every API listener is alike but for its name (a test checks it): the names, then
    one of them in full."""
    listeners = messages(snapshot, resource.LISTENER)
    document = {
        "listener_names": [str(listener.name) for listener in listeners],
        "listener": to_dict(listeners[0]) if listeners else None,
        "routes": [to_dict(m) for m in messages(snapshot, resource.ROUTE)],
        "clusters": [to_dict(m) for m in messages(snapshot, resource.CLUSTER)],
        "endpoints": [to_dict(m) for m in messages(snapshot, resource.ENDPOINT)],
    }
    return yaml.safe_dump(document, sort_keys=False, width=100)


@pytest.mark.parametrize("case", CASES)
def test_golden(case: str, request: pytest.FixtureRequest) -> None:
    GOLDENS.check(case, render(build(case)), request, "the gRPC client's resources differ")


def test_no_stale_golden_files(request: pytest.FixtureRequest) -> None:
    GOLDENS.check_no_stale(request)


@pytest.mark.parametrize("case", CASES)
def test_every_listener_is_the_api_listener_of_its_name(case: str) -> None:
    listeners = messages(build(case), resource.LISTENER)
    assert listeners
    assert all(listener == api_listener(listener.name) for listener in listeners)


def test_names_are_the_sidecar_table_domains() -> None:
    """A name resolves exactly when a sidecar of the namespace would route it."""
    mesh, proxy = load_case("scoped")
    made = MeshBuild(mesh)
    sidecar = dataclasses.replace(proxy, kind="sidecar")
    egress = made.route(sidecar.namespace, made.visible(sidecar)).message
    domains = {d for host in egress.virtual_hosts for d in host.domains}
    names = {str(m.name) for m in messages(made.snapshot(proxy), resource.LISTENER)}
    assert names == domains
    assert {"cart", "cart:80", "cart.shop.svc.cluster.local:80", "payments.pay:9080",
            "payments-canary.pay.svc:9080"} <= names
    assert not any(name.startswith(("ledger", "payments:", "payments-canary:"))
                   for name in names)


def test_groups_that_see_the_same_services_share_every_layer() -> None:
    mesh, proxy = load_case("basic")
    made = MeshBuild(mesh)
    first = made.snapshot(proxy)
    other = made.snapshot(dataclasses.replace(proxy, node_id="client-2", service="other"))
    for type_url in (resource.CLUSTER, resource.ENDPOINT, resource.LISTENER, resource.ROUTE):
        assert first.types[type_url] is other.types[type_url]
    # A second build of the same mesh gives the same snapshot back (nothing converted).
    again = MeshBuild(mesh, previous=made)
    assert again.snapshot(proxy, first) is first


def test_a_change_to_one_service_converts_only_its_resources() -> None:
    mesh, proxy = load_case("basic")
    made = MeshBuild(mesh)
    before = made.snapshot(proxy)
    ratings = mesh.service("ratings", "default")
    assert ratings is not None
    changed = ratings.model_copy(update={"endpoints": [
        ratings.endpoints[0].model_copy(update={"address": "10.0.1.9"})]})
    after_mesh = mesh.model_copy(update={"services": [
        changed if s.key == ratings.key else s for s in mesh.services]})
    after = MeshBuild(after_mesh, previous=made).snapshot(proxy, before)
    assert after.types[resource.ENDPOINT].changed_since(before.types[resource.ENDPOINT]) == {
        "outbound|9090||ratings.default.svc.cluster.local"}
    assert after.types[resource.LISTENER] is before.types[resource.LISTENER]
    kept = before.types[resource.ENDPOINT].resources
    for name, res in after.types[resource.ENDPOINT].resources.items():
        if not name.endswith("ratings.default.svc.cluster.local"):
            assert res is kept[name]


def test_what_is_left_out_is_logged_once_per_change() -> None:
    """Logged when a resource is converted; conversions are kept by content, so a
    second group (or build) of the same mesh logs nothing. A service only this test has
    makes its mesh's table new."""
    mesh, proxy = load_case("basic")
    extra = mesh.services[0].model_copy(update={"name": f"only-{uuid.uuid4().hex[:8]}"})
    mesh = load_mesh_data({"services": [*(s.model_dump(exclude_defaults=True, by_alias=True)
                                          for s in mesh.services),
                                        extra.model_dump(exclude_defaults=True,
                                                         by_alias=True)]}, origin="fresh")
    with capture_logs() as logs:
        made = MeshBuild(mesh)
        made.snapshot(proxy)
        made.snapshot(dataclasses.replace(proxy, node_id="client-2", service="other"))
    notes = [n for entry in logs if entry["event"] == "proxyless.left_out"
             for n in entry["left_out"]]
    assert "rate_limit: route (default) of ratings.default" in notes
    assert "fallback: route (default) of ratings.default" in notes
    assert "hash on cookie: route (default) of ratings.default" in notes
    assert len(notes) == len(set(notes))  # the second group logged nothing


def test_left_out_is_bounded() -> None:
    left = LeftOut()
    for index in range(MAX_NOTES):
        left.add("rate_limit", f"route of svc-{index}")
        left.add("rate_limit", f"route of svc-{index}")  # a repeat of a kept note: nothing
    for index in range(MAX_NOTES, MAX_NOTES * 3):
        left.add("rate_limit", f"route of svc-{index}")
    assert len(left.notes) == MAX_NOTES
    assert left.more == MAX_NOTES * 2
    assert left.summary()[-1] == f"... and {MAX_NOTES * 2} more"


@pytest.mark.parametrize(("retry_on", "codes", "expected"), [
    (["5xx"], [], ["unavailable"]),
    (["reset", "connect-failure", "refused-stream", "gateway-error"], [], ["unavailable"]),
    (["retriable-status-codes"], [503], ["unavailable"]),
    (["retriable-status-codes"], [500, 409], []),
    (["retriable-4xx"], [], []),
    (["internal", "cancelled", "deadline-exceeded", "resource-exhausted"], [],
     ["cancelled", "deadline-exceeded", "internal", "resource-exhausted"]),
    (["unavailable", "5xx"], [], ["unavailable"]),
])
def test_retry_conditions_map_to_grpc_status_codes(retry_on: list[str], codes: list[int],
                                                   expected: list[str]) -> None:
    assert grpc_retry_on(retry_on, codes) == expected


@pytest.mark.parametrize(("retry_on", "retries"), [("retriable-4xx", 3), ("5xx", 0)])
def test_a_retry_policy_with_nothing_for_grpc_is_left_out(retry_on: str, retries: int) -> None:
    """Nothing gRPC retries on, or no retry allowed (gRPC NACKs num_retries 0, found by
    the NACK matrix)."""
    policy = route_components_pb2.RetryPolicy(retry_on=retry_on)
    policy.num_retries.value = retries
    assert grpc_retry_policy(policy) is None


def test_a_dropped_build_takes_its_grpc_layers_with_it() -> None:
    """The gRPC layers live with the build that made them: a mesh that shrinks (a new
    build, the old one dropped) keeps no old gRPC layer alive."""
    mesh, proxy = load_case("basic")
    before = len(proxyless._BUILDS)
    made = MeshBuild(mesh)
    snapshot = made.snapshot(proxy)
    assert len(proxyless._BUILDS) == before + 1
    del made, snapshot
    gc.collect()
    assert len(proxyless._BUILDS) == before
