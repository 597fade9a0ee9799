"""Property: any Gateway API route the mesh model accepts, a real Envoy accepts once
translated (``envoy --mode validate`` on batches, as tests/test_mesh_properties.py
does for services): matches of every kind with edge values, every filter, weights from
0 to 1,000,000, timeouts and retries, unresolved backends among resolved ones."""

from __future__ import annotations

import string
from typing import Any

from hypothesis import assume, given
from hypothesis import strategies as st

from controlplane.errors import MeshError
from controlplane.mesh.loader import load_mesh_data
from controlplane.mesh.route_match import MAX_HEADER_MATCHES, regex
from controlplane.proxy import ProxyIdentity
from controlplane.translator import translate
from tests.support.envoy_validate import rejected
from tests.test_mesh_properties import bounded

_TOKEN = string.ascii_letters + string.digits + "!#$%&'*+-.^_`|~"
_PATH_CHARS = string.ascii_letters + string.digits + "-._~%!$&'()*+,;=:@"
_SERVICES = ["web", "api", "audit", "missing"]  # "missing" is not in the mesh


def paths() -> st.SearchStrategy[str]:
    segment = st.text(_PATH_CHARS, min_size=1, max_size=12).filter(lambda s: s not in (".", ".."))
    return st.lists(segment, max_size=4).map(lambda parts: "/" + "/".join(parts))


def header_values() -> st.SearchStrategy[str]:
    return st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7e), max_size=40)


def headers() -> st.SearchStrategy[list[dict[str, Any]]]:
    one = st.fixed_dictionaries({"name": st.text(_TOKEN, min_size=1, max_size=20),
                                 "value": header_values(),
                                 "type": st.sampled_from(["Exact", "RegularExpression"])})
    return st.lists(one, max_size=3, unique_by=lambda h: h["name"].lower())


def matches() -> st.SearchStrategy[dict[str, Any]]:
    path = st.one_of(
        st.fixed_dictionaries({"type": st.sampled_from(["Exact", "PathPrefix"]),
                               "value": paths()}),
        st.fixed_dictionaries({"type": st.just("RegularExpression"),
                               "value": st.sampled_from(["/v[0-9]+/.*", "/(a|b)", ".*"])}))
    queries = st.lists(st.fixed_dictionaries({
        "name": st.text(_TOKEN, min_size=1, max_size=10),
        "value": st.text(string.printable.strip(), min_size=1, max_size=20)}),
        max_size=MAX_HEADER_MATCHES // 8, unique_by=lambda q: q["name"])
    return st.fixed_dictionaries({}, optional={
        "path": path, "headers": headers(), "queryParams": queries,
        "method": st.sampled_from(["GET", "POST", "PATCH", "CONNECT"])})


def modifier() -> st.SearchStrategy[dict[str, Any]]:
    change = st.fixed_dictionaries({"name": st.text(_TOKEN, min_size=1, max_size=20),
                                    "value": header_values()})
    return st.fixed_dictionaries({}, optional={
        "set": st.lists(change, max_size=2, unique_by=lambda c: c["name"].lower()),
        "add": st.lists(change, max_size=2, unique_by=lambda c: c["name"].lower()),
        "remove": st.lists(st.text(_TOKEN, min_size=1, max_size=20), max_size=2,
                           unique_by=str.lower)})


def path_modifier(prefix: bool) -> st.SearchStrategy[dict[str, Any]]:
    if prefix:
        return paths().map(lambda p: {"type": "ReplacePrefixMatch", "replacePrefixMatch": p})
    return paths().map(lambda p: {"type": "ReplaceFullPath", "replaceFullPath": p})


def backend() -> st.SearchStrategy[dict[str, Any]]:
    return st.fixed_dictionaries(
        {"name": st.sampled_from(_SERVICES), "port": st.sampled_from([80, 81])},
        optional={"weight": st.sampled_from([0, 1, 7, 1_000_000]),
                  "filters": st.just([{"type": "RequestHeaderModifier",
                                       "requestHeaderModifier": {"set": [
                                           {"name": "x-leg", "value": "100%"}]}}])})


@st.composite
def rules(draw: st.DrawFn) -> dict[str, Any]:
    found: dict[str, Any] = {"matches": draw(st.lists(matches(), max_size=3))}
    prefix_only = all(m.get("path", {"type": "PathPrefix"})["type"] == "PathPrefix"
                      for m in found["matches"])
    filters: list[dict[str, Any]] = []
    if draw(st.booleans()):
        filters.append({"type": "RequestHeaderModifier", "requestHeaderModifier": draw(modifier())})
    if draw(st.booleans()):
        filters.append({"type": "ResponseHeaderModifier",
                        "responseHeaderModifier": draw(modifier())})
    action = draw(st.sampled_from(["none", "redirect", "rewrite", "mirror"]))
    if action == "redirect":
        filters.append({"type": "RequestRedirect", "requestRedirect": draw(st.fixed_dictionaries(
            {}, optional={"scheme": st.sampled_from(["http", "https"]),
                          "hostname": st.sampled_from(["example.org", "a.b-c.example"]),
                          "port": st.sampled_from([1, 80, 443, 65535]),
                          "statusCode": st.sampled_from([301, 302, 303, 307, 308]),
                          "path": path_modifier(prefix_only and draw(st.booleans()))}))})
    elif action == "rewrite":
        filters.append({"type": "URLRewrite", "urlRewrite": draw(st.fixed_dictionaries(
            {}, optional={"hostname": st.just("rewritten.example"),
                          "path": path_modifier(prefix_only and draw(st.booleans()))}))})
    elif action == "mirror":
        filters.append({"type": "RequestMirror", "requestMirror": {
            "backendRef": {"name": draw(st.sampled_from(_SERVICES)), "port": 80},
            "percent": draw(st.integers(0, 100))}})
    found["filters"] = filters
    found["backendRefs"] = draw(st.lists(backend(), max_size=3))
    found["timeouts"] = draw(st.fixed_dictionaries({}, optional={
        "request": st.sampled_from(["0s", "1ms", "10s", "99999h"])}))
    if draw(st.booleans()):
        found["retry"] = {"attempts": draw(st.integers(0, 5)), "backoff": "10ms",
                          "codes": draw(st.lists(st.integers(400, 599), max_size=3))}
    return found


def grpc_rules() -> st.SearchStrategy[dict[str, Any]]:
    name = st.from_regex(r"[A-Za-z_][A-Za-z0-9_]{0,30}", fullmatch=True)
    service = st.lists(name, min_size=1, max_size=3).map(".".join)
    method = st.one_of(
        st.fixed_dictionaries({"service": service}, optional={"method": name}),
        st.fixed_dictionaries({"method": name}),
        st.fixed_dictionaries({"type": st.just("RegularExpression")}, optional={
            "service": st.sampled_from(["ratings\\.v[0-9]+\\.R", ".*"]),
            "method": st.sampled_from(["Get.*", "(List|Watch)"])}).filter(
                lambda m: "service" in m or "method" in m))
    match = st.fixed_dictionaries({}, optional={"method": method, "headers": headers()})
    return st.fixed_dictionaries({
        "matches": st.lists(match, max_size=3),
        "backendRefs": st.lists(backend().map(lambda b: {k: v for k, v in b.items()
                                                         if k != "filters"}), max_size=2)})


@st.composite
def meshes(draw: st.DrawFn) -> dict[str, Any]:
    services = [{"name": name, "port": 80, "endpoints": [{"address": "10.0.0.1", "port": 80}]}
                for name in _SERVICES if name != "missing"]
    routes = [{"name": f"r{i}", "parentRefs": [{"kind": "Service", "name": "web"}],
               "rules": draw(st.lists(rules(), min_size=1, max_size=3))}
              for i in range(draw(st.integers(1, 2)))]
    grpc = [{"name": "g", "parentRefs": [{"kind": "Service", "name": "api"}],
             "rules": draw(st.lists(grpc_rules(), min_size=1, max_size=3))}]
    return {"services": services, "http_routes": routes, "grpc_routes": grpc}


@bounded(10, shrink=False)
@given(st.lists(meshes(), min_size=8, max_size=8))
def test_every_route_the_model_accepts_a_real_envoy_accepts(cases: list[dict[str, Any]]) -> None:
    loaded = []
    for case in cases:
        try:
            loaded.append(load_mesh_data(case))
        except MeshError:
            continue  # a shape the model refuses (say a regex Python rejects)
    assume(loaded)
    proxy = ProxyIdentity(node_id="n", service="api")
    refused = rejected([translate(mesh, proxy) for mesh in loaded])
    assert not refused, [(loaded[i].http_routes, error) for i, error in refused.items()]


def patterns() -> st.SearchStrategy[str]:
    """Patterns near Envoy's RE2 size limit: atoms, groups and alternatives under
    counted repetitions, which is how a short pattern grows a big program."""
    atom = st.sampled_from(["a", "[a-z]", r"\d", ".", "(ab)", "(x|yz)", "[^/]"])
    quantifier = st.one_of(st.sampled_from(["", "+", "*", "?"]),
                           st.integers(1, 60).map(lambda n: f"{{{n}}}"),
                           st.tuples(st.integers(0, 30), st.integers(0, 30)).map(
                               lambda t: f"{{{min(t)},{max(t)}}}"))
    piece = st.tuples(atom, quantifier).map("".join)
    return st.lists(piece, min_size=1, max_size=6).map("".join)


@bounded(10, shrink=False)
@given(st.lists(patterns(), min_size=24, max_size=24))
def test_every_pattern_the_model_accepts_a_real_envoy_accepts(found: list[str]) -> None:
    """The model's estimate of RE2's program size is an upper bound: what it lets
    through compiles in Envoy (what it refuses may or may not)."""
    accepted = [p for p in found if _model_accepts(p)]
    assume(accepted)
    meshes = [load_mesh_data({"services": [{"name": "web", "port": 80}], "http_routes": [
        {"name": "r", "parentRefs": [{"kind": "Service", "name": "web"}], "rules": [
            {"matches": [{"headers": [{"type": "RegularExpression", "name": "x",
                                       "value": pattern}]}],
             "backendRefs": [{"name": "web", "port": 80}]}]}]}) for pattern in accepted]
    proxy = ProxyIdentity(node_id="n", service="web")
    refused = rejected([translate(mesh, proxy) for mesh in meshes])
    assert not refused, [(accepted[i], error[-200:]) for i, error in refused.items()]


def _model_accepts(pattern: str) -> bool:
    try:
        regex(pattern)
    except ValueError:
        return False
    return True
