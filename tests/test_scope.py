"""Scoping: ``sidecars`` entries and ``exportTo`` decide which services a sidecar sees.

The rules (``visible_services``) are checked case by case and, with Hypothesis, against
a plain re-statement of them on random meshes; bad entries are refused with messages
kept as golden files (``testdata/scope/*.yaml`` -> ``*.txt``, what ``controlplane
validate`` prints; regenerate with ``pytest --update-golden``).
"""

from __future__ import annotations

import pickle
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from controlplane import resource
from controlplane.assembly import MeshBuild
from controlplane.errors import MeshError
from controlplane.mesh import (
    Mesh,
    MeshLoader,
    Service,
    load_mesh_data,
    load_mesh_file,
    load_mesh_text,
)
from controlplane.mesh.scope import MAX_EGRESS, MAX_HOSTS, targets, unmatched_hosts
from controlplane.mesh.service import MAX_EXPORTS
from controlplane.proxy import ProxyIdentity
from controlplane.translator import translate
from controlplane.translator.routes import egress_route
from controlplane.translator.visibility import visible_services
from tests.support.golden import Goldens

BAD = Path(__file__).parent / "testdata" / "scope"
GOLDENS = Goldens(BAD, input_dir="", output_dir="", output_suffix=".txt")


def mesh(services: list[dict[str, Any]], sidecars: list[dict[str, Any]] | None = None) -> Mesh:
    data: dict[str, Any] = {"services": services}
    if sidecars is not None:
        data["sidecars"] = sidecars
    return load_mesh_data(data)


def svc(key: str, **extra: Any) -> dict[str, Any]:
    name, _, namespace = key.partition(".")
    return {"name": name, "namespace": namespace, "port": 80, **extra}


def proxy(key: str) -> ProxyIdentity:
    name, _, namespace = key.partition(".")
    return ProxyIdentity(node_id="n", service=name, namespace=namespace)


def seen(m: Mesh, key: str) -> set[str] | None:
    found = visible_services(m, proxy(key))
    return None if found is None else set(found)


SHOP = [svc("web.shop"), svc("cart.shop"), svc("payments.pay"), svc("ledger.pay"),
        svc("ratings.default"), svc("ratings.ops")]


# -- the rules --------------------------------------------------------------------------


def test_no_entries_and_no_export_limits_means_everything() -> None:
    m = mesh(SHOP)
    assert seen(m, "web.shop") is None
    assert seen(m, "nobody.nowhere") is None


def test_a_namespace_entry_applies_to_every_sidecar_of_its_namespace() -> None:
    m = mesh(SHOP, [{"name": "shop", "namespace": "shop",
                     "egress": [{"hosts": ["./*", "pay/payments"]}]}])
    assert seen(m, "web.shop") == {"web.shop", "cart.shop", "payments.pay"}
    assert seen(m, "cart.shop") == {"web.shop", "cart.shop", "payments.pay"}
    assert seen(m, "ledger.pay") is None  # another namespace: no entry there


def test_the_workload_entry_wins_over_the_namespace_one() -> None:
    m = mesh(SHOP, [
        {"name": "shop", "namespace": "shop", "egress": [{"hosts": ["*/*"]}]},
        {"name": "cart", "namespace": "shop", "workloadSelector": {"service": "cart"},
         "egress": [{"hosts": ["pay/*"]}]},
    ])
    assert seen(m, "web.shop") is None  # */*: everything
    assert seen(m, "cart.shop") == {"cart.shop", "payments.pay", "ledger.pay"}


def test_host_patterns() -> None:
    def hosts(*patterns: str) -> set[str] | None:
        m = mesh(SHOP, [{"name": "s", "namespace": "shop", "egress": [{"hosts": list(patterns)}]}])
        return seen(m, "web.shop")

    assert hosts("*/ratings") == {"web.shop", "ratings.default", "ratings.ops"}
    assert hosts("pay/*") == {"web.shop", "payments.pay", "ledger.pay"}
    assert hosts("pay/ledger", "default/ratings") == {"web.shop", "ledger.pay", "ratings.default"}
    assert hosts("./cart") == {"web.shop", "cart.shop"}
    assert hosts("*/*") is None
    # Patterns that match nothing (yet) are fine: services come later.
    assert hosts("nowhere/*", "*/nothing") == {"web.shop"}


def test_egress_entries_add_up() -> None:
    m = mesh(SHOP, [{"name": "s", "namespace": "shop",
                     "egress": [{"hosts": ["pay/ledger"]}, {"hosts": ["ops/ratings"]}]}])
    assert seen(m, "web.shop") == {"web.shop", "ledger.pay", "ratings.ops"}


def test_export_to_limits_who_sees_a_service() -> None:
    m = mesh([svc("web.shop"), svc("audit.pay", exportTo=["."]),
              svc("billing.pay", exportTo=[".", "shop"]), svc("metrics.ops", exportTo=["ops"]),
              svc("reviews.default", exportTo=["*"])])
    assert seen(m, "web.shop") == {"web.shop", "billing.pay", "reviews.default"}
    assert seen(m, "ledger.pay") == {"web.shop", "audit.pay", "billing.pay", "reviews.default"}
    assert seen(m, "tool.ops") == {"web.shop", "metrics.ops", "reviews.default"}
    # An entry cannot reach past exportTo.
    scoped = mesh([svc("web.shop"), svc("audit.pay", exportTo=["."])],
                  [{"name": "s", "namespace": "shop", "egress": [{"hosts": ["*/*"]}]}])
    assert seen(scoped, "web.shop") == {"web.shop"}


def test_a_sidecar_always_sees_its_own_service() -> None:
    m = mesh([svc("web.shop", exportTo=["pay"]), svc("cart.shop")],
             [{"name": "s", "namespace": "shop", "egress": [{"hosts": ["./cart"]}]}])
    assert seen(m, "web.shop") is None  # both: that is everything
    narrow = mesh([svc("web.shop", exportTo=["pay"]), svc("cart.shop"), svc("x.pay")],
                  [{"name": "s", "namespace": "shop", "egress": [{"hosts": ["pay/*"]}]}])
    assert seen(narrow, "web.shop") == {"web.shop", "x.pay"}
    assert seen(narrow, "cart.shop") == {"cart.shop", "x.pay"}  # web is not exported here
    # A proxy whose service is not in the mesh (yet) sees what its entry says.
    assert seen(narrow, "new.shop") == {"x.pay"}


def test_what_a_visible_service_routes_to_comes_along() -> None:
    """Split, match and fallback targets, transitively, even when not exported to the
    caller: its routes name their clusters, and a sidecar without them would fail."""
    m = mesh([
        svc("web.shop"),
        svc("front.pay", policy={"split": [{"service": "canary", "weight": 1},
                                           {"service": "front", "weight": 9}]}),
        svc("canary.pay", exportTo=["."],
            policy={"match": [{"headers": {"x-debug": "1"}, "service": "debug"}]}),
        svc("debug.pay", exportTo=["."], policy={"fallback": {"service": "sorry.default"}}),
        svc("sorry.default"),
        svc("other.pay"),
    ], [{"name": "s", "namespace": "shop", "egress": [{"hosts": ["pay/front"]}]}])
    assert seen(m, "web.shop") == {"web.shop", "front.pay", "canary.pay", "debug.pay",
                                   "sorry.default"}
    assert targets(m.by_key["front.pay"]) == ["canary.pay", "front.pay"]


def test_sidecars_under_one_entry_share_one_set() -> None:
    """The assembly keys shared layers by the visible set: equal answers are one object."""
    m = mesh([svc(f"s{i}.shop") for i in range(20)] + [svc("a.pay"), svc("b.pay")],
             [{"name": "s", "namespace": "shop", "egress": [{"hosts": ["./*", "pay/a"]}]}])
    answers = [visible_services(m, proxy(f"s{i}.shop")) for i in range(20)]
    assert answers[0] is not None and all(a is answers[0] for a in answers)


def test_the_scoped_route_table_and_clusters() -> None:
    m = mesh(SHOP, [{"name": "s", "namespace": "shop", "egress": [{"hosts": ["pay/payments"]}]}])
    web = ProxyIdentity(node_id="web-1", service="web", namespace="shop")
    visible = visible_services(m, web)
    [route] = translate(m, web)[resource.ROUTE]
    assert route == egress_route(m, "shop", visible)
    assert {h.name for h in route.virtual_hosts} == {"web.shop", "payments.pay"}
    assert {h.name for h in egress_route(m, "shop").virtual_hosts} == {
        "web.shop", "cart.shop", "payments.pay", "ledger.pay", "ratings.default", "ratings.ops"}
    clusters = {c.name for c in translate(m, web)[resource.CLUSTER]}
    assert clusters == {"outbound|80||web.shop.svc.cluster.local",
                        "outbound|80||payments.pay.svc.cluster.local"}


# -- against a plain statement of the rules, on random meshes ---------------------------

NAMESPACES = ["a", "b", "c"]
NAMES = ["x", "y", "z"]
KEYS = [f"{n}.{ns}" for ns in NAMESPACES for n in NAMES]


Case = tuple[list[dict[str, Any]], list[dict[str, Any]]]


@st.composite
def meshes(draw: st.DrawFn) -> Case:
    keys = draw(st.lists(st.sampled_from(KEYS), unique=True, max_size=9))
    services = []
    for key in keys:
        extra: dict[str, Any] = {}
        export = draw(st.sampled_from([None, ["*"], ["."], ["a"], [".", "b"], ["c", "a"]]))
        if export is not None:
            extra["exportTo"] = export
        legs = draw(st.lists(st.sampled_from(keys), unique=True, max_size=2))
        policy: dict[str, Any] = {}
        if legs:
            kind = draw(st.sampled_from(["split", "match"]))
            policy[kind] = [
                {"service": k.split(".")[0], "namespace": k.split(".")[1],
                 **({"weight": 1} if kind == "split" else {"headers": {"x-leg": str(i)}})}
                for i, k in enumerate(legs)]
        fallback = draw(st.sampled_from([None, *[k for k in keys if k != key]]))
        if fallback is not None:
            policy["fallback"] = {"service": fallback}
        if policy:
            extra["policy"] = policy
        services.append(svc(key, **extra))
    patterns = st.sampled_from(["*/*", "./*", "a/*", "*/x", "b/y", "./z", "c/x"])
    sidecars = []
    for ns in draw(st.lists(st.sampled_from(NAMESPACES), unique=True, max_size=3)):
        for selector in draw(st.lists(st.sampled_from([None, *NAMES]), unique=True,
                                      min_size=1, max_size=2)):
            entry: dict[str, Any] = {
                "name": f"e-{selector or 'all'}", "namespace": ns,
                "egress": [{"hosts": draw(st.lists(patterns, min_size=1, max_size=3))}]}
            if selector is not None:
                entry["workloadSelector"] = {"service": selector}
            sidecars.append(entry)
    return services, sidecars


def reference(services: list[dict[str, Any]], sidecars: list[dict[str, Any]],
              name: str, namespace: str) -> set[str]:
    """The rules, written out plainly."""
    by_key = {f"{s['name']}.{s['namespace']}": s for s in services}

    def exported(s: dict[str, Any]) -> bool:
        export = s.get("exportTo", ["*"])
        return "*" in export or namespace in [s["namespace"] if e == "." else e for e in export]

    entries = [e for e in sidecars if e["namespace"] == namespace]
    chosen = ([e for e in entries if e.get("workloadSelector", {}).get("service") == name]
              or [e for e in entries if "workloadSelector" not in e])

    def allowed(s: dict[str, Any]) -> bool:
        if not chosen:
            return True
        for egress in chosen[0]["egress"]:
            for host in egress["hosts"]:
                ns, _, n = host.partition("/")
                ns = namespace if ns == "." else ns
                if ns in ("*", s["namespace"]) and n in ("*", s["name"]):
                    return True
        return False

    found = {k for k, s in by_key.items() if exported(s) and allowed(s)}
    if f"{name}.{namespace}" in by_key:
        found.add(f"{name}.{namespace}")
    grown = True
    while grown:
        policies = [by_key[k].get("policy", {}) for k in found]
        more = {f"{leg['service']}.{leg['namespace']}" for policy in policies
                for leg in [*policy.get("split", []), *policy.get("match", [])]}
        more |= {p["fallback"]["service"] for p in policies if "fallback" in p}
        grown = not more <= found
        found |= more
    return found


@settings(max_examples=300, deadline=None)
@given(meshes())
def test_visibility_follows_the_rules(case: Case) -> None:
    services, sidecars = case
    m = mesh(services, sidecars)
    for namespace in NAMESPACES:
        for name in NAMES:
            expected = reference(services, sidecars, name, namespace)
            got = seen(m, f"{name}.{namespace}")
            assert (set(m.by_key) if got is None else got) == expected, (name, namespace)
            assert got is not None or len(expected) == len(m.by_key)


@settings(max_examples=100, deadline=None)
@given(meshes())
def test_a_scoped_snapshot_is_consistent(case: Case) -> None:
    """Whatever the entries and exports, what a sidecar gets names no cluster it lacks:
    the translation's route targets resolve, and the assembly publishes it."""
    m = mesh(*case)
    build = MeshBuild(m)
    for namespace in NAMESPACES:
        for name in NAMES:
            web = ProxyIdentity(node_id="n", service=name, namespace=namespace)
            resources = translate(m, web)
            clusters = {c.name for c in resources[resource.CLUSTER]}
            [route] = resources[resource.ROUTE]
            for host in route.virtual_hosts:
                for r in host.routes:
                    named = {r.route.cluster, *(w.name for w in r.route.weighted_clusters.clusters)}
                    assert named - {""} <= clusters, (name, namespace, host.name)
            assert build.snapshot(web).problems() == []


# -- the model --------------------------------------------------------------------------


def test_service_lookup_is_by_key_and_never_stale() -> None:
    m = mesh(SHOP)
    assert m.service("ratings", "ops") is m.by_key["ratings.ops"]
    assert m.service("ratings") is m.by_key["ratings.default"]
    assert m.service("nothing") is None
    other = m.model_copy(update={"services": [Service.model_validate(svc("new.default"))]})
    assert other.service("ratings") is None and other.service("new") is not None
    assert m.service("ratings") is not None
    assert mesh(SHOP) == m  # the index built in one is not part of equality
    deep = m.model_copy(deep=True)
    assert deep == m and deep.service("ratings", "ops") is deep.services[5]
    restored = pickle.loads(pickle.dumps(m))
    assert restored == m and restored.service("web", "shop") is restored.services[0]


def test_the_file_keeps_its_keys() -> None:
    text = """
services:
  - {name: a, port: 80, exportTo: ["."]}
sidecars:
  - name: s
    namespace: shop
    workloadSelector: {service: web}
    egress: [{hosts: ["./*"]}]
"""
    m = load_mesh_text(text)
    dumped = m.model_dump(exclude_defaults=True)
    assert dumped["services"][0]["exportTo"] == ["."]
    assert dumped["sidecars"][0]["workloadSelector"] == {"service": "web"}
    assert Mesh.model_validate(m.model_dump()) == m


def test_the_incremental_loader_keeps_sidecars_and_reads_them_again_on_change() -> None:
    services = "".join(f"  - {{name: s{i}, port: 80}}\n" for i in range(50))
    entry = "sidecars:\n  - {name: e, namespace: default, egress: [{hosts: [%s]}]}\n"
    loader = MeshLoader()
    first = loader.load((entry % '"./s1"' + "services:\n" + services).encode())
    assert loader.parsed == 50 and seen(first, "s0.default") == {"s0.default", "s1.default"}
    second = loader.load((entry % '"./s2"' + "services:\n" + services).encode())
    assert loader.parsed == 0  # the services were known: only the entries changed
    assert seen(second, "s0.default") == {"s0.default", "s2.default"}
    third = loader.load((entry % '"./s2"' + "services:\n" + services
                         ).replace("s7, port: 80", "s7, port: 81").encode())
    assert loader.parsed == 1 and third.sidecars == second.sidecars
    with pytest.raises(MeshError, match=r"sidecars\[0\] \(e.default\).egress\[0\].hosts\[0\]"):
        loader.load((entry % '"s2"' + "services:\n" + services).encode())


def test_cross_entry_problems_come_with_field_problems() -> None:
    """One round of ``validate`` lists a repeated entry and a bad service together."""
    with pytest.raises(MeshError) as caught:
        mesh([svc("a.default", port=0)], [
            {"name": "s", "egress": [{"hosts": ["*/*"]}]},
            {"name": "s", "egress": [{"hosts": ["*/*"]}]}])
    problems = caught.value.problems
    assert any(p.startswith("services[0] (a.default).port") for p in problems), problems
    assert any(p.startswith("sidecars[1] (s.default).name: repeats") for p in problems), problems


@pytest.mark.parametrize("case", GOLDENS.cases)
def test_validate_names_each_bad_entry(case: str, request: pytest.FixtureRequest) -> None:
    result = subprocess.run([sys.executable, "-m", "controlplane", "validate", f"{case}.yaml"],
                            cwd=BAD, capture_output=True, text=True, timeout=60)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    GOLDENS.check(case, result.stdout + result.stderr, request,
                  "what validate prints differs from the golden file")


def test_the_bad_cases_exist(request: pytest.FixtureRequest) -> None:
    cases = set(GOLDENS.cases)
    assert {"bad_hosts", "bad_entries", "bad_export", "bad_together"} <= cases
    GOLDENS.check_no_stale(request)
    for case in cases:  # each holds what its name says: something the loader refuses
        data = yaml.safe_load((BAD / f"{case}.yaml").read_text(encoding="utf-8"))
        assert "sidecars" in data or any("exportTo" in s for s in data["services"])


def test_the_scoped_example_does_what_its_comments_say() -> None:
    m = load_mesh_file(Path(__file__).parent.parent / "examples" / "scoped-mesh.yaml")
    assert seen(m, "frontend.shop") == {"frontend.shop", "cart.shop", "payments.pay",
                                        "payments-canary.pay", "ratings.default"}
    assert seen(m, "cart.shop") == {"frontend.shop", "cart.shop"}
    assert seen(m, "ledger.pay") == set(m.by_key) - {"metrics.ops"}


def test_scoping_is_bounded() -> None:
    """Counts and lengths have limits, each an error naming the field."""
    def problems(entry: dict[str, Any]) -> list[str]:
        with pytest.raises(MeshError) as caught:
            mesh([], [{"name": "s", **entry}])
        return caught.value.problems

    many = [f"ns/s{i}" for i in range(MAX_HOSTS + 1)]
    assert problems({"egress": [{"hosts": many}]})[0].startswith(
        "sidecars[0] (s.default).egress[0].hosts: List should have at most")
    assert problems({"egress": [{"hosts": ["./*"]}] * (MAX_EGRESS + 1)})[0].startswith(
        "sidecars[0] (s.default).egress: List should have at most")
    long = "a" * 64
    assert "must be namespace/name" in problems({"egress": [{"hosts": [f"{long}/x"]}]})[0]
    with pytest.raises(MeshError, match=r"exportTo: List should have at most"):
        mesh([svc("a.default", exportTo=[f"n{i}" for i in range(MAX_EXPORTS + 1)])])


def test_hosts_that_match_nothing_are_listed_for_a_warning() -> None:
    m = mesh(SHOP, [{"name": "s", "namespace": "shop", "egress": [
        {"hosts": ["./*", "pay/paymnts", "*/ratings", "*/nothing", "nowhere/*", "*/*"]}]}])
    assert unmatched_hosts(m.sidecars, m.by_key) == [
        "sidecars[0] (s.shop).egress[0].hosts[1] (pay/paymnts)",
        "sidecars[0] (s.shop).egress[0].hosts[3] (*/nothing)",
        "sidecars[0] (s.shop).egress[0].hosts[4] (nowhere/*)",
    ]
    empty = mesh([svc("x.pay")], [{"name": "s", "namespace": "shop",
                                   "egress": [{"hosts": ["./*", "*/*"]}]}])
    assert unmatched_hosts(empty.sidecars, empty.by_key) == [
        "sidecars[0] (s.shop).egress[0].hosts[0] (./*)"]
