"""Gateway API routes on the mesh: the models' bounds and errors, attachment (which
parents accept a route, the spec's reasons), precedence, consumer and producer routes,
the composition with TrafficPolicy, and what the build serves when routes change."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from controlplane import resource
from controlplane.assembly import MeshBuild
from controlplane.cache.references import listener_references
from controlplane.errors import MeshError
from controlplane.mesh import Mesh, MeshLoader, load_mesh_data
from controlplane.mesh.attach import attach, outbound_cluster, overridden, route_warnings
from controlplane.mesh.loader import load_mesh_file
from controlplane.mesh.route_status import ParentStatus
from controlplane.mesh.routes import HTTPRoute
from controlplane.proxy import ProxyIdentity
from controlplane.translator import names, translate
from controlplane.translator.gateway_api import rule_routes
from controlplane.translator.visibility import visible_services


def svc(name: str, namespace: str = "default", **extra: Any) -> dict[str, Any]:
    return {"name": name, "namespace": namespace, "port": 80,
            "endpoints": [{"address": "10.0.0.1", "port": 8080}], **extra}


def route(name: str, parent: str, rules: list[dict[str, Any]] | None = None,
          namespace: str = "default", parent_namespace: str | None = None,
          **parent_fields: Any) -> dict[str, Any]:
    if parent_namespace is not None:
        parent_fields["namespace"] = parent_namespace
    found: dict[str, Any] = {"name": name, "namespace": namespace, "parentRefs": [
        {"kind": "Service", "name": parent, **parent_fields}]}
    if rules is not None:
        found["rules"] = rules
    return found


def to(name: str, **fields: Any) -> dict[str, Any]:
    return {"name": name, "port": 80, **fields}


def build(services: list[dict[str, Any]], routes: list[dict[str, Any]],
          **more: Any) -> Mesh:
    return load_mesh_data({"services": services, "http_routes": routes, **more})


def status(mesh: Mesh, name: str, namespace: str = "default",
           kind: str = "HTTPRoute") -> list[ParentStatus]:
    return list(attach(mesh).statuses()[(kind, namespace, name)])


def reasons(parent: ParentStatus) -> dict[str, tuple[bool, str]]:
    return {c.type: (c.status, c.reason) for c in parent.conditions}


def problems(data: dict[str, Any]) -> list[str]:
    with pytest.raises(MeshError) as failed:
        load_mesh_data({"services": [svc("web")], **data})
    return failed.value.problems


# -- the models --------------------------------------------------------------------------


@pytest.mark.parametrize(("entry", "expected"), [
    ({"rules": [{"backendRefs": [to("web", wieght=3)]}]},
     "http_routes[0] (default/r).rules[0].backendRefs[0].wieght: unknown field"),
    ({"rules": [{"backendRefs": [to("web", weight=1_000_001)]}]},
     "http_routes[0] (default/r).rules[0].backendRefs[0].weight: Input should be less than"),
    ({"rules": [{}] * 17}, "http_routes[0] (default/r).rules: List should have at most 16"),
    ({"rules": [{"matches": [{}] * 65}]},
     "http_routes[0] (default/r).rules[0].matches: List should have at most 64"),
    ({"rules": [{"timeouts": {"request": "1.5s"}}]},
     "rules[0].timeouts.request: duration '1.5s' is not a Gateway API duration"),
    ({"rules": [{"timeouts": {"request": "1s", "backendRequest": "2s"}}]},
     "backendRequest must not be longer than request"),
    ({"rules": [{"matches": [{"path": {"type": "RegularExpression", "value": "(unclosed"}}]}]},
     "does not compile"),
    ({"rules": [{"matches": [{"headers": [{"type": "RegularExpression", "name": "x",
                                           "value": "(ab){45}"}]}]}]},
     "is too big for Envoy: about 225 RE2 instructions"),
    ({"rules": [{"matches": [{"path": {"value": "/" + "x" * 150}}], "filters": [
        {"type": "URLRewrite", "urlRewrite": {"path": {"type": "ReplacePrefixMatch",
                                                       "replacePrefixMatch": "/"}}}]}]},
     "is too long to replace with '/'"),
    ({"rules": [{"matches": [{"path": {"type": "RegularExpression", "value": "/a++"}}]}]},
     "a possessive quantifier or \\Z, which Envoy's RE2 does not support"),
    ({"rules": [{"matches": [{"path": {"type": "Exact", "value": "/a"}}], "filters": [
        {"type": "URLRewrite", "urlRewrite": {"path": {"type": "ReplacePrefixMatch",
                                                       "replacePrefixMatch": "/b"}}}]}]},
     "ReplacePrefixMatch needs every match of the rule to be a PathPrefix"),
    ({"rules": [{"filters": [
        {"type": "URLRewrite", "urlRewrite": {"hostname": "a.example"}},
        {"type": "RequestRedirect", "requestRedirect": {"hostname": "b.example"}}]}]},
     "RequestRedirect and URLRewrite cannot be in one rule"),
    ({"rules": [{"filters": [{"type": "RequestHeaderModifier"}]}]},
     "type RequestHeaderModifier takes the field requestHeaderModifier"),
    ({"parentRefs": [{"kind": "Service", "name": "web"}] * 2}, "names Service default/web twice"),
    ({"rules": [{"matches": [{"headers": [{"name": "x-a", "value": "1"},
                                          {"name": "X-A", "value": "2"}]}]}]},
     "header 'X-A' is matched twice"),
])
def test_bad_routes_are_refused_by_path(entry: dict[str, Any], expected: str) -> None:
    data = {"name": "r", "parentRefs": [{"kind": "Service", "name": "web"}], **entry}
    found = problems({"http_routes": [data]})
    assert any(expected in problem for problem in found), found


def test_repeated_names_and_grpc_filters_are_refused() -> None:
    found = problems({"http_routes": [route("r", "web"), route("r", "web")]})
    assert any("HTTPRoute default/r appears twice" in p for p in found), found
    found = problems({"grpc_routes": [{"name": "g", "parentRefs": [
        {"kind": "Service", "name": "web"}], "rules": [{"filters": [
            {"type": "URLRewrite", "urlRewrite": {"hostname": "x.example"}}]}]}]})
    assert any("a GRPCRoute takes no URLRewrite filter" in p for p in found), found
    found = problems({"grpc_routes": [{"name": "g", "parentRefs": [
        {"kind": "Service", "name": "web"}], "rules": [{"matches": [
            {"method": {"method": "M" * 200}}]}]}]})
    assert any("grpc_routes[0] (default/g).rules[0].matches[0].method: the path pattern "
               "this match becomes" in p and "give service too" in p for p in found), found


def test_a_spec_copied_from_kubernetes_loads_and_dumps_back() -> None:
    mesh = build([svc("web")], [{
        "name": "r", "parentRefs": [{"group": "", "kind": "Service", "name": "web",
                                     "port": 80}],
        "rules": [{"matches": [{"path": {"type": "PathPrefix", "value": "/"}}],
                   "backendRefs": [{"group": "", "kind": "Service", "name": "web",
                                    "port": 80, "weight": 1}],
                   "timeouts": {"request": "10s"}}]}])
    dumped = mesh.model_dump(mode="json")["http_routes"][0]
    assert dumped["parentRefs"][0]["kind"] == "Service"
    assert dumped["rules"][0]["timeouts"] == {"request": "10s", "backendRequest": None}
    again = mesh.model_dump(mode="json", exclude={"identity"})
    assert load_mesh_data(again) == mesh


# -- attachment --------------------------------------------------------------------------


def test_parents_that_cannot_take_the_route() -> None:
    """A missing Service, a port it lacks, a TCP port: NoMatchingParent, each saying
    what to do; a Gateway parent is not reported here (gateways report theirs)."""
    mesh = build([svc("web"), svc("db", port=5432, protocol="tcp")], [
        route("missing", "nope"), route("port", "web", port=81), route("tcp", "db"),
        {"name": "gw", "parentRefs": [{"name": "ingress"}]}])
    for name, words in (("missing", "no Service 'nope'"), ("port", "has no port 81"),
                        ("tcp", "no HTTP or gRPC port")):
        [parent] = status(mesh, name)
        assert reasons(parent)["Accepted"] == (False, "NoMatchingParent")
        assert words in parent.conditions[0].message
    assert ("HTTPRoute", "default", "gw") not in attach(mesh).statuses()
    assert attach(mesh).for_service("web.default", 80, "default") == []


def test_unsupported_filters_leave_the_route_out() -> None:
    """HTTPRouteInvalid... (UnsupportedValue): the route is not served, the Service
    keeps its default routing, the rest of the mesh is served."""
    mesh = build([svc("web"), svc("api")], [
        route("ext", "web", [{"filters": [{"type": "ExtensionRef", "extensionRef": {
            "group": "example.com", "kind": "Thing", "name": "x"}}], "backendRefs": [to("api")]}]),
        route("ok", "api", [{"backendRefs": [to("web")]}])])
    [parent] = status(mesh, "ext")
    assert reasons(parent)["Accepted"] == (False, "UnsupportedValue")
    assert "rules[0].filters[0]: filter type ExtensionRef" in parent.conditions[0].message
    table = translate(mesh, ProxyIdentity(node_id="n", service="web"))[resource.ROUTE][0]
    hosts = {h.name: h for h in table.virtual_hosts}
    assert hosts["web.default"].routes[0].route.cluster == names.outbound_cluster(
        mesh.by_key["web.default"], 80)
    assert hosts["api.default"].routes[0].name == "HTTPRoute/default/ok/rule/0/match/0"


@pytest.mark.parametrize(("backend", "reason"), [
    (to("nope"), "BackendNotFound"),
    (to("api", port=81), "BackendNotFound"),
    ({"group": "example.com", "kind": "Bucket", "name": "api"}, "InvalidKind"),
    (to("api", namespace="other"), "RefNotPermitted"),
])
def test_backends_that_do_not_resolve(backend: dict[str, Any], reason: str) -> None:
    mesh = build([svc("web"), svc("api"), svc("api", namespace="other")],
                 [route("r", "web", [{"backendRefs": [backend]}])])
    [parent] = status(mesh, "r")
    assert reasons(parent) == {"Accepted": (True, "Accepted"), "ResolvedRefs": (False, reason)}
    [rule] = attach(mesh).for_service("web.default", 80, "default")
    assert rule.backends[0].cluster is None


def test_a_grpc_backend_needs_a_grpc_port() -> None:
    """ResolvedRefs False, UnsupportedProtocol: gRPC to an HTTP/1.1 port fails."""
    mesh = load_mesh_data({"services": [
        svc("web"), {"name": "rpc", "ports": [{"name": "grpc", "port": 80,
                                                 "protocol": "grpc"}]}],
        "grpc_routes": [{"name": "g", "parentRefs": [{"kind": "Service", "name": "rpc"}],
                         "rules": [{"backendRefs": [to("web")]}]}]})
    [parent] = status(mesh, "g", kind="GRPCRoute")
    assert reasons(parent)["ResolvedRefs"] == (False, "UnsupportedProtocol")
    assert "give the port protocol: grpc" in parent.conditions[1].message


def test_a_reference_grant_lets_a_backend_of_another_namespace_through() -> None:
    grant = {"name": "g", "namespace": "other", "to": [{"group": "", "kind": "Service"}],
             "from": [{"group": "gateway.networking.k8s.io", "kind": "HTTPRoute",
                       "namespace": "default"}]}
    mesh = build([svc("web"), svc("api", namespace="other")],
                 [route("r", "web", [{"backendRefs": [to("api", namespace="other")]}])],
                 reference_grants=[grant])
    [parent] = status(mesh, "r")
    assert reasons(parent)["ResolvedRefs"] == (True, "ResolvedRefs")
    [rule] = attach(mesh).for_service("web.default", 80, "default")
    assert rule.backends[0].cluster == "outbound|80||api.other.svc.cluster.local"


def test_the_cluster_names_agree_with_the_translator() -> None:
    service = load_mesh_data({"services": [svc("api", namespace="other")]}).services[0]
    assert outbound_cluster("api", "other", 80) == names.outbound_cluster(service, 80)


def test_consumer_routes_replace_producer_routes_in_their_namespace() -> None:
    """MeshConsumerRoute: shop's route applies to shop's proxies only; others keep the
    producer's; a route of a third namespace applies to nobody else."""
    mesh = build([svc("web"), svc("v2"), svc("v3")], [
        route("producer", "web", [{"backendRefs": [to("web")]}]),
        route("consumer", "web", [{"backendRefs": [to("v2", namespace="default")]}],
              namespace="shop", parent_namespace="default"),
    ], reference_grants=[{"name": "g", "to": [{"group": "", "kind": "Service"}], "from": [
        {"group": "gateway.networking.k8s.io", "kind": "HTTPRoute", "namespace": "shop"}]}])
    routes = attach(mesh)
    assert [r.route[1] for r in routes.for_service("web.default", 80, "shop")] == ["shop"]
    assert [r.route[1] for r in routes.for_service("web.default", 80, "default")] == ["default"]
    assert [r.route[1] for r in routes.for_service("web.default", 80, "ops")] == ["default"]


def test_precedence_across_rules_and_routes() -> None:
    """HTTPRouteMatchingAcrossRoutes: exact, then regular expressions, then the longest
    prefix, then method, then most headers, then most query params; ties by route
    order, then rule order."""
    mesh = build([svc("web")], [
        route("first", "web", [
            {"matches": [{"path": {"value": "/"}}]},
            {"matches": [{"path": {"value": "/"}, "queryParams": [{"name": "q", "value": "1"}]}]},
            {"matches": [{"path": {"value": "/"}, "headers": [{"name": "a", "value": "1"}]}]},
            {"matches": [{"path": {"value": "/"}, "method": "GET"}]},
        ]),
        route("second", "web", [
            {"matches": [{"path": {"value": "/a"}}]},
            {"matches": [{"path": {"type": "Exact", "value": "/a"}}]},
            {"matches": [{"path": {"type": "RegularExpression", "value": "/a.*"}}]},
            {"matches": [{"path": {"value": "/"}}]},
        ]),
    ])
    rules = attach(mesh).for_service("web.default", 80, "default")
    order = [r.name.removeprefix("HTTPRoute/default/").removesuffix("/match/0")
             for r in rule_routes(rules)]
    assert order == ["second/rule/1", "second/rule/2", "second/rule/0", "first/rule/3",
                     "first/rule/2", "first/rule/1", "first/rule/0", "second/rule/3"]


# -- composition and serving -------------------------------------------------------------


def test_overridden_policy_fields() -> None:
    policy = {"split": [{"labels": {"v": "1"}, "weight": 1}], "timeout": "2s",
              "fault": {"abort": {"status": 503, "percent": 1}}}
    mesh = build([svc("web", policy=policy), svc("api", policy=policy)],
                 [route("r", "web", [{"backendRefs": [to("web")]}])])
    assert overridden(mesh, "web.default") == [("split", ("HTTPRoute", "default", "r")),
                                               ("timeout", ("HTTPRoute", "default", "r"))]
    assert overridden(mesh, "api.default") == []


def test_a_scoped_sidecar_gets_the_backends_of_what_it_sees() -> None:
    mesh = build([svc("web", namespace="shop"), svc("api"), svc("v2"), svc("audit"),
                  svc("other")],
                 [route("r", "api", [{"filters": [{"type": "RequestMirror", "requestMirror": {
                     "backendRef": {"name": "audit", "port": 80}}}],
                     "backendRefs": [to("v2")]}])],
                 sidecars=[{"name": "web", "namespace": "shop",
                            "egress": [{"hosts": ["default/api"]}]}])
    seen = visible_services(mesh, ProxyIdentity(node_id="n", service="web", namespace="shop"))
    assert seen == {"web.shop", "api.default", "v2.default", "audit.default"}


def test_a_route_change_reaches_the_route_table_and_a_late_backend_is_served() -> None:
    services = [svc("web"), svc("api")]
    first = build(services, [route("r", "web", [{"backendRefs": [to("late")]}])])
    proxy = ProxyIdentity(node_id="n", service="api")
    before = MeshBuild(first)
    table = before.route("default").message
    web = next(h for h in table.virtual_hosts if h.name == "web.default")
    assert web.routes[0].direct_response.status == 500
    second = build([*services, svc("late")], [route("r", "web", [{"backendRefs": [to("late")]}])])
    after = MeshBuild(second, before)
    web = next(h for h in after.route("default").message.virtual_hosts
               if h.name == "web.default")
    assert web.routes[0].route.cluster == "outbound|80||late.default.svc.cluster.local"
    assert after.snapshot(proxy) is not None
    third = build([*services, svc("late")], [route("r", "web", [{"backendRefs": [to("api")]}])])
    assert third != second
    final = MeshBuild(third, after)
    web = next(h for h in final.route("default").message.virtual_hosts
               if h.name == "web.default")
    assert web.routes[0].route.cluster == "outbound|80||api.default.svc.cluster.local"


def test_the_incremental_loader_reads_routes() -> None:
    text = ("services:\n- {name: web, port: 80}\n- {name: api, port: 80}\n"
            "http_routes:\n- name: r\n  parentRefs: [{kind: Service, name: web}]\n"
            "  rules: [{backendRefs: [{name: api, port: 80}]}]\n")
    loader = MeshLoader()
    mesh = loader.load(text.encode())
    assert [r.name for r in mesh.http_routes] == ["r"]
    changed = loader.load(text.replace("name: api, port: 80}]", "name: web, port: 80}]")
                          .encode())
    assert changed.http_routes[0].rules[0].backend_refs[0].name == "web"  # type: ignore[index]
    assert loader.parsed == 0  # the services were known: only the routes were read again


def test_the_example_validates_and_every_route_is_served(tmp_path: Path) -> None:
    """examples/routes-mesh.yaml: valid, every route accepted with its refs resolved;
    ``controlplane validate`` warns about a route that is not."""
    example = Path(__file__).parent.parent / "examples" / "routes-mesh.yaml"
    mesh = load_mesh_file(example)
    assert route_warnings(mesh) == []
    assert {key for key in attach(mesh).statuses()} == {
        ("HTTPRoute", "default", "reviews-canary"), ("HTTPRoute", "default", "old-shop"),
        ("GRPCRoute", "default", "ratings-methods")}
    broken = tmp_path / "broken.yaml"
    broken.write_text(example.read_text().replace("name: reviews-v2, port: 9080, weight",
                                                  "name: reviews-v3, port: 9080, weight"))
    done = subprocess.run([sys.executable, "-m", "controlplane", "validate", str(broken)],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert ("warning: HTTPRoute/default/reviews-canary on Service default/reviews port 9080: "
            "ResolvedRefs BackendNotFound: backendRef Service default/reviews-v3 does not "
            "exist") in done.stderr


def test_resolve_rules_for_a_gateway_parent() -> None:
    """A gateway listener has no Service port: a backendRef without a port does not
    resolve there (the spec requires one for a Service)."""
    mesh = build([svc("web")], [])
    gateway_route = HTTPRoute.model_validate({
        "name": "r", "parentRefs": [{"name": "ingress"}],
        "rules": [{"backendRefs": [to("web"), {"name": "web"}]}]})
    [rule] = attach(mesh).resolve(gateway_route)
    assert [b.cluster for b in rule.backends] == ["outbound|80||web.default.svc.cluster.local",
                                                  None]


def test_a_captured_sidecar_calling_by_cluster_ip_gets_the_routes() -> None:
    """MeshFrontend's premise, in translation: a captured sidecar sends a call to the
    Service's cluster IP through the same egress table, by the cluster IP as Host, so
    the route applies whichever name or address the app used."""
    mesh = load_mesh_data({"services": [
        {**svc("web"), "cluster_ips": ["10.96.0.10"]}, svc("v2")],
        "http_routes": [route("r", "web", [{"backendRefs": [to("v2")]}])]})
    found = translate(mesh, ProxyIdentity(node_id="a-1.default", service="v2", capture=True))
    [table] = found[resource.ROUTE]
    [web] = [h for h in table.virtual_hosts if h.name == "web.default"]
    assert "10.96.0.10" in web.domains and "10.96.0.10:80" in web.domains
    assert [r.name for r in web.routes] == ["HTTPRoute/default/r/rule/0/match/0"]
    assert web.routes[0].route.cluster == "outbound|80||v2.default.svc.cluster.local"
    assert any(table.name in listener_references(listener)[0]  # type: ignore[arg-type]
               for listener in found[resource.LISTENER])
