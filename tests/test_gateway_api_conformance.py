"""The Gateway API's conformance expectations for GAMMA routes, through real Envoy.

One file-mode control plane serves one mesh holding every case's Service and route
(each case has its own parent Service, so no case sees another's traffic); two real
sidecars (namespaces ``default`` and ``shop``) carry real HTTP and gRPC to real apps.
Each test names the upstream conformance test(s) (``conformance/tests/`` and
``conformance/tests/mesh/`` of kubernetes-sigs/gateway-api) whose expectations it
checks. The apps echo what they received (``tests/support/echo_http.py``), as the
suite's echo backend does.
"""

from __future__ import annotations

import copy
import time
import urllib.parse
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
import yaml

from tests.support.echo_http import EchoHttp, call, echoed
from tests.support.procs import ControlPlane, Envoy, wait_for
from tests.support.promise_rig import Rig, endpoint
from tests.support.promise_servers import ECHO_UNARY, GrpcEcho, ScriptedHttp, always, first

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(240),
              pytest.mark.xdist_group("gateway_api_conformance")]  # one mesh per module

GRPC_PORT = 9090
V1, V2 = "echo-v1", "echo-v2"


def _service(name: str, backend: Any, namespace: str = "default",
             **fields: Any) -> dict[str, Any]:
    return {"name": name, "namespace": namespace, "port": 80,
            "endpoints": [endpoint(backend)], **fields}


def _route(name: str, parent: str, rules: list[dict[str, Any]], namespace: str = "default",
           parent_namespace: str | None = None, **parent_fields: Any) -> dict[str, Any]:
    if parent_namespace is not None:
        parent_fields["namespace"] = parent_namespace
    return {"name": name, "namespace": namespace,
            "parentRefs": [{"kind": "Service", "name": parent, **parent_fields}],
            "rules": rules}


def _to(*names: str, **fields: Any) -> list[dict[str, Any]]:
    return [{"name": name, "port": 80, **fields} for name in names]


def mesh(echo: dict[str, EchoHttp], slow: ScriptedHttp, flaky: ScriptedHttp,
         ratings: dict[str, GrpcEcho]) -> dict[str, Any]:
    v1 = echo[V1]
    parents = ["match", "weight", "headers", "redirect", "rewrite", "mirror", "timeout",
               "invalid", "consumer", "faulty"]
    services = [
        _service(V1, v1), _service(V2, echo[V2]), _service("audit", echo["audit"]),
        _service("slow", slow), _service("flaky", flaky), *(_service(name, v1) for name in parents),
        _service("other", echo[V2], namespace="elsewhere"),
        _service("granted", echo[V2], namespace="payments"),
        {"name": "ports", "ports": [{"name": "http", "port": 80},
                                    {"name": "admin", "port": 8080}],
         "endpoints": [{"address": "127.0.0.1", "ports": {"http": v1.port, "admin": v1.port}}]},
        _service("governed", v1, policy={
            "split": [{"service": V1, "weight": 100}], "timeout": "1ms",
            "rate_limit": {"requests_per_second": 1, "burst": 3}}),
        *({"name": name, "ports": [{"name": "grpc", "port": GRPC_PORT, "protocol": "grpc"}],
           "endpoints": [{"address": "127.0.0.1", "ports": {"grpc": server.port}}]}
          for name, server in ratings.items()),
    ]
    services[services.index(_service("faulty", v1))]["policy"] = {
        "fault": {"abort": {"status": 418, "percent": 100}}}
    http_routes = [
        _route("match-a", "match", [
            {"backendRefs": _to(V1)},
            {"matches": [{"path": {"type": "PathPrefix", "value": "/v2"}}], "backendRefs": _to(V2)},
            {"matches": [{"path": {"type": "Exact", "value": "/exact"}}], "backendRefs": _to(V2)},
            {"matches": [{"headers": [{"name": "X-Version", "value": "two"}]}],
             "backendRefs": _to(V2)},
            {"matches": [{"queryParams": [{"name": "version", "value": "two"}]}],
             "backendRefs": _to(V2)},
            {"matches": [{"method": "POST"}], "backendRefs": _to(V2)},
        ]),
        _route("match-b", "match", [  # another route on the same parent
            {"matches": [{"path": {"type": "PathPrefix", "value": "/v2/v1"}}],
             "backendRefs": _to(V1)},
        ]),
        _route("weight", "weight", [{"backendRefs": [*_to(V1, weight=90), *_to(V2, weight=10)]}]),
        _route("headers", "headers", [{"filters": [
            {"type": "RequestHeaderModifier", "requestHeaderModifier": {
                "set": [{"name": "X-Header-Set", "value": "set-overwrites-values"}],
                "add": [{"name": "X-Header-Add", "value": "add-appends-values"}],
                "remove": ["X-Header-Remove"]}},
            {"type": "ResponseHeaderModifier", "responseHeaderModifier": {
                "set": [{"name": "X-Answer", "value": "from-the-route"}]}},
        ], "backendRefs": _to(V1)}]),
        _route("redirect", "redirect", [
            {"matches": [{"path": {"value": "/original-prefix"}}], "filters": [
                {"type": "RequestRedirect", "requestRedirect": {"path": {
                    "type": "ReplacePrefixMatch", "replacePrefixMatch": "/replacement-prefix"}}}]},
            {"matches": [{"path": {"value": "/full-path"}}], "filters": [
                {"type": "RequestRedirect", "requestRedirect": {"path": {
                    "type": "ReplaceFullPath", "replaceFullPath": "/full-path-replacement"}}}]},
            {"matches": [{"path": {"value": "/scheme"}}], "filters": [
                {"type": "RequestRedirect", "requestRedirect": {"scheme": "https"}}]},
            {"matches": [{"path": {"value": "/hostname-and-status"}}], "filters": [
                {"type": "RequestRedirect", "requestRedirect": {
                    "hostname": "example.org", "statusCode": 301}}]},
            {"matches": [{"path": {"value": "/port"}}], "filters": [
                {"type": "RequestRedirect", "requestRedirect": {"port": 8083}}]},
        ]),
        _route("rewrite", "rewrite", [
            {"matches": [{"path": {"value": "/prefix/one"}}], "filters": [
                {"type": "URLRewrite", "urlRewrite": {"path": {
                    "type": "ReplacePrefixMatch", "replacePrefixMatch": "/one"}}}],
             "backendRefs": _to(V1)},
            {"matches": [{"path": {"value": "/strip-prefix"}}], "filters": [
                {"type": "URLRewrite", "urlRewrite": {"path": {
                    "type": "ReplacePrefixMatch", "replacePrefixMatch": "/"}}}],
             "backendRefs": _to(V1)},
            {"matches": [{"path": {"value": "/full/one"}}], "filters": [
                {"type": "URLRewrite", "urlRewrite": {"path": {
                    "type": "ReplaceFullPath", "replaceFullPath": "/one"}}}],
             "backendRefs": _to(V1)},
            {"matches": [{"path": {"value": "/rewrite-host"}}], "filters": [
                {"type": "URLRewrite", "urlRewrite": {"hostname": "one.example.org"}}],
             "backendRefs": _to(V1)},
        ]),
        _route("mirror", "mirror", [{"filters": [
            {"type": "RequestMirror", "requestMirror": {"backendRef": {"name": "audit",
                                                                       "port": 80}}}],
            "backendRefs": _to(V1)}]),
        _route("timeout", "timeout", [
            {"matches": [{"path": {"value": "/request-timeout"}}],
             "timeouts": {"request": "500ms"}, "backendRefs": _to("slow")},
            {"matches": [{"path": {"value": "/backend-timeout"}}],
             "timeouts": {"backendRequest": "500ms"}, "backendRefs": _to("slow")},
            {"matches": [{"path": {"value": "/retry"}}],
             "retry": {"attempts": 2, "codes": [503], "backoff": "10ms"},
             "backendRefs": _to("flaky")}]),
        _route("invalid", "invalid", [
            {"matches": [{"path": {"value": "/missing"}}], "backendRefs": _to("no-such-service")},
            {"matches": [{"path": {"value": "/kind"}}],
             "backendRefs": [{"group": "example.com", "kind": "Bucket", "name": V1}]},
            {"matches": [{"path": {"value": "/cross"}}],
             "backendRefs": _to("other", namespace="elsewhere")},
            {"matches": [{"path": {"value": "/granted"}}],
             "backendRefs": _to("granted", namespace="payments")},
            {"matches": [{"path": {"value": "/zero"}}], "backendRefs": _to(V1, weight=0)},
            {"matches": [{"path": {"value": "/half"}}],
             "backendRefs": [*_to(V1), *_to("no-such-service")]},
        ]),
        _route("producer", "consumer", [{"filters": [
            {"type": "ResponseHeaderModifier", "responseHeaderModifier": {
                "set": [{"name": "X-Route", "value": "producer"}]}}], "backendRefs": _to(V1)}]),
        _route("consumer", "consumer", [{"backendRefs": _to(V2, namespace="default")}],
               namespace="shop", parent_namespace="default"),
        _route("ports", "ports", [{"backendRefs": _to(V2)}], port=80),
        _route("governed", "governed", [{"backendRefs": _to(V2)}]),
        _route("faulty", "faulty", [{"backendRefs": _to(V2)}]),
    ]
    grpc_routes = [{"name": "ratings", "parentRefs": [
        {"kind": "Service", "name": "ratings-v1", "port": GRPC_PORT}], "rules": [
        {"backendRefs": [{"name": "ratings-v1", "port": GRPC_PORT}]},
        {"matches": [{"method": {"service": "promises.Echo", "method": "Say"}}],
         "backendRefs": [{"name": "ratings-v2", "port": GRPC_PORT}]},
        {"matches": [{"method": {"service": "promises.Echo", "method": "Count"},
                      "headers": [{"name": "x-canary", "value": "true"}]}],
         "backendRefs": [{"name": "ratings-v2", "port": GRPC_PORT}]},
    ]}]
    grants = [
        {"name": "shop-to-default", "namespace": "default",
         "from": [{"group": "gateway.networking.k8s.io", "kind": "HTTPRoute",
                   "namespace": "shop"}], "to": [{"group": "", "kind": "Service"}]},
        {"name": "default-to-payments", "namespace": "payments",
         "from": [{"group": "gateway.networking.k8s.io", "kind": "HTTPRoute",
                   "namespace": "default"}],
         "to": [{"group": "", "kind": "Service", "name": "granted"}]},
    ]
    return {"services": services, "http_routes": http_routes, "grpc_routes": grpc_routes,
            "reference_grants": grants}


@dataclass
class Mesh:
    rig: Rig
    frontend: Envoy
    shop: Envoy
    echo: dict[str, EchoHttp]
    ratings: dict[str, GrpcEcho]
    flaky: ScriptedHttp
    data: dict[str, Any]  # the mesh file as served
    delta: Envoy  # a sidecar on the delta protocol

    def write(self, data: dict[str, Any]) -> None:
        """Atomically, as editors save, so the server never reads half a file."""
        tmp = self.rig.mesh.with_suffix(".tmp")
        tmp.write_text(yaml.safe_dump(data))
        tmp.replace(self.rig.mesh)

    def get(self, host: str, path: str = "/", envoy: Envoy | None = None,
            **kwargs: Any) -> tuple[int, str, dict[str, str]]:
        return call((envoy or self.frontend).egress_port, host, path, **kwargs)


@pytest.fixture(scope="module")
def gamma(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mesh]:
    rig = Rig(Path(tmp_path_factory.mktemp("gateway_api")))
    try:
        echo = {name: rig.own(EchoHttp(name)) for name in (V1, V2, "audit")}
        slow = rig.own(ScriptedHttp("slow", always(200, delay=3.0)))
        flaky = rig.own(ScriptedHttp("flaky", first(1, 503)))
        ratings = {name: rig.own(GrpcEcho(name)) for name in ("ratings-v1", "ratings-v2")}
        data = mesh(echo, slow, flaky, ratings)
        rig.mesh.write_text(yaml.safe_dump(data))
        rig.server = ControlPlane(rig.mesh, rig.tmp).start()
        frontend = rig.envoy("frontend-1")
        shop = rig.envoy("frontend-shop", extra=["--namespace", "shop"])
        delta = rig.envoy("frontend-delta", delta=True)
        found = Mesh(rig, frontend, shop, echo, ratings, flaky, data, delta)
        wait_for(lambda: found.get("match")[0] == 200, what="routes served", timeout=30)
        wait_for(lambda: found.get("consumer.default", envoy=shop)[0] == 200,
                 what="the shop sidecar routed", timeout=30)
        yield found
    finally:
        rig.close()


def name_of(answer: tuple[int, str, dict[str, str]]) -> str:
    return str(echoed(answer)["name"])


def test_matching(gamma: Mesh) -> None:
    """MeshHTTPRouteMatching, HTTPRouteMatchingAcrossRoutes, HTTPRouteExactPathMatching,
    HTTPRouteHeaderMatching, HTTPRouteQueryParamMatching, HTTPRouteMethodMatching: each
    kind of match, a path prefix matched by whole segments, the longest prefix winning
    across two routes on one parent."""
    assert name_of(gamma.get("match", "/")) == V1
    assert name_of(gamma.get("match", "/v2")) == V2
    assert name_of(gamma.get("match", "/v2/example")) == V2
    assert name_of(gamma.get("match", "/v2example")) == V1  # not the /v2 segment
    assert name_of(gamma.get("match", "/v2/v1/deeper")) == V1  # route match-b's longer prefix
    assert name_of(gamma.get("match", "/exact")) == V2
    assert name_of(gamma.get("match", "/exact/more")) == V1
    assert name_of(gamma.get("match", "/", headers={"x-version": "two"})) == V2
    assert name_of(gamma.get("match", "/", headers={"x-version": "three"})) == V1
    assert name_of(gamma.get("match", "/?version=two")) == V2
    assert name_of(gamma.get("match", "/?version=Two")) == V1  # values match exactly
    assert name_of(gamma.get("match", "/", method="POST")) == V2
    assert name_of(gamma.get("match", "/", method="PUT")) == V1


def test_weight(gamma: Mesh) -> None:
    """MeshHTTPRouteWeight, MeshSplit: 90/10 across two Services. 400 requests at 10%:
    the v2 share has a binomial sd of 1.5 points; +-5 points is 3.3 sd."""
    seen = Counter(name_of(gamma.get("weight")) for _ in range(400))
    assert set(seen) == {V1, V2}, seen
    print(f"HTTPRoute 90/10 through a sidecar, 400 requests: {dict(seen)}")
    assert abs(seen[V2] / 400 - 0.10) <= 0.05, seen


def test_request_and_response_header_modifiers(gamma: Mesh) -> None:
    """MeshHTTPRouteRequestHeaderModifier, HTTPRouteResponseHeaderModifier."""
    status, body, headers = gamma.get("headers", headers={
        "X-Header-Set": "original", "X-Header-Add": "original", "X-Header-Remove": "gone"})
    seen = echoed((status, body, headers))["headers"]
    assert seen["x-header-set"] == "set-overwrites-values"
    assert seen["x-header-add"] == "original,add-appends-values", seen
    assert "x-header-remove" not in seen
    assert headers["x-answer"] == "from-the-route"


def _location(answer: tuple[int, str, dict[str, str]]) -> urllib.parse.SplitResult:
    return urllib.parse.urlsplit(answer[2]["location"])


def test_redirects(gamma: Mesh) -> None:
    """MeshHTTPRouteRedirectPath, MeshHTTPRouteSchemeRedirect,
    MeshHTTPRouteRedirectHostAndStatus, MeshHTTPRouteRedirectPort: the redirect is the
    sidecar's answer (302 unless statusCode says), the app never sees the request."""
    before = len(gamma.echo[V1].requests)
    answer = gamma.get("redirect", "/original-prefix/lemon")
    assert answer[0] == 302 and _location(answer).path == "/replacement-prefix/lemon"
    answer = gamma.get("redirect", "/full-path/lemon")
    assert answer[0] == 302 and _location(answer).path == "/full-path-replacement"
    answer = gamma.get("redirect", "/scheme")
    where = _location(answer)
    assert answer[0] == 302 and where.scheme == "https" and where.hostname == "redirect"
    assert where.port is None  # https's own port: left out of the Location
    where = _location(gamma.get("redirect:80", "/scheme"))  # http's port: not https's
    assert where.scheme == "https" and where.netloc == "redirect"
    answer = gamma.get("redirect", "/hostname-and-status")
    assert answer[0] == 301 and _location(answer).hostname == "example.org"
    answer = gamma.get("redirect", "/port")
    assert answer[0] == 302 and _location(answer).port == 8083
    assert len(gamma.echo[V1].requests) == before


def test_rewrite_path_and_host(gamma: Mesh) -> None:
    """MeshHTTPRouteRewritePath, HTTPRouteRewriteHost."""
    def path(path: str) -> str:
        return str(echoed(gamma.get("rewrite", path))["path"])

    assert path("/prefix/one/two") == "/one/two"
    assert path("/prefix/one") == "/one"
    assert path("/strip-prefix/three") == "/three"
    assert path("/strip-prefix") == "/"
    assert path("/full/one/two") == "/one"
    assert path("/full/one?query=kept") == "/one?query=kept"
    assert echoed(gamma.get("rewrite", "/rewrite-host"))["host"] == "one.example.org"


def test_request_mirror(gamma: Mesh) -> None:
    """HTTPRouteRequestMirror: the caller gets the backend's answer; the mirror gets a
    copy of the request."""
    audit = gamma.echo["audit"]
    before = len(audit.requests)
    assert name_of(gamma.get("mirror", "/mirrored-path")) == V1
    wait_for(lambda: any(r.path == "/mirrored-path" for r in audit.requests[before:]),
             what="the mirrored request", timeout=10)


def test_timeouts_and_retry(gamma: Mesh) -> None:
    """HTTPRouteTimeoutRequest, HTTPRouteTimeoutBackendRequest: the app answers after
    3 s; the route's 500ms timeout answers 504 first. HTTPRouteRetry (experimental): the
    app's first answer is a 503, retried (code 503 listed), so the caller gets 200."""
    for path in ("/request-timeout", "/backend-timeout"):
        started = time.monotonic()
        assert gamma.get("timeout", path)[0] == 504, path
        assert time.monotonic() - started < 2.5, path
    assert gamma.get("timeout", "/retry")[0] == 200
    assert gamma.flaky.calls == 2


def test_unresolved_backends_answer_500(gamma: Mesh) -> None:
    """HTTPRouteInvalidNonExistentBackendRef, HTTPRouteInvalidBackendRefUnknownKind,
    HTTPRouteInvalidCrossNamespaceBackendRef, HTTPRouteAllBackendsWeightZero answer 500;
    HTTPRouteReferenceGrant: a ReferenceGrant lets the cross-namespace one through; a
    share of an unresolved backend answers 500, the rest is served."""
    for path in ("/missing", "/kind", "/cross", "/zero"):
        assert gamma.get("invalid", path)[0] == 500, path
    assert name_of(gamma.get("invalid", "/granted")) == V2
    statuses = Counter(gamma.get("invalid", "/half")[0] for _ in range(60))
    assert set(statuses) == {200, 500}, statuses


def test_consumer_route(gamma: Mesh) -> None:
    """MeshConsumerRoute: the shop namespace's own route for consumer.default replaces
    the producer's route for shop's sidecars only."""
    assert name_of(gamma.get("consumer.default", envoy=gamma.shop)) == V2
    answer = gamma.get("consumer")
    assert name_of(answer) == V1 and answer[2]["x-route"] == "producer"


def test_ports(gamma: Mesh) -> None:
    """MeshPorts: a parentRef with a port routes that port only."""
    assert name_of(gamma.get("ports")) == V2
    assert name_of(gamma.get("ports:80")) == V2
    assert name_of(gamma.get("ports:8080")) == V1


def test_traffic_policy_composes_with_a_route(gamma: Mesh) -> None:
    """The route replaces the policy's split and timeout (1ms: every call would 504)
    on its port; the policy's rate limit (3 at once) and fault injection still apply."""
    answers = [gamma.get("governed") for _ in range(8)]
    served = [a for a in answers if a[0] == 200]
    limited = [a for a in answers if a[0] == 429]
    assert served and limited, [a[0] for a in answers]
    assert {name_of(a) for a in served} == {V2}
    assert all(a[2].get("x-local-rate-limit") == "true" for a in limited)
    assert {gamma.get("faulty")[0] for _ in range(5)} == {418}


def _grpc(gamma: Mesh, metadata: tuple[tuple[str, str], ...] = ()) -> bytes:
    with grpc.insecure_channel(f"127.0.0.1:{gamma.frontend.egress_port}",
                               options=[("grpc.default_authority",
                                         f"ratings-v1:{GRPC_PORT}")]) as channel:
        answer: bytes = channel.unary_unary(ECHO_UNARY)(b"hi", timeout=10, metadata=metadata)
        return answer


def test_grpc_method_and_header_matching(gamma: Mesh) -> None:
    """GRPCExactMethodMatching, GRPCRouteHeaderMatching: the Say method goes to
    v2 (a real grpcio client and server through the sidecar); Count only with the
    header."""
    assert _grpc(gamma) == b"ratings-v2:hi"
    with grpc.insecure_channel(f"127.0.0.1:{gamma.frontend.egress_port}",
                               options=[("grpc.default_authority", "ratings-v1")]) as channel:
        count = channel.unary_stream("/promises.Echo/Count")
        assert list(count(b"1", timeout=10)) == [b"ratings-v1:0"]
        assert list(count(b"1", timeout=10, metadata=(("x-canary", "true"),))) == [
            b"ratings-v2:0"]


def test_file_source_logs_what_is_not_served(gamma: Mesh) -> None:
    """Each backend that does not resolve is logged (routes.not_accepted) with the
    route, the parent and the spec's reason."""
    assert gamma.rig.server is not None
    found = [e for e in gamma.rig.server.logs() if e.get("event") == "routes.not_accepted"]
    assert any(e["route"] == "HTTPRoute/default/invalid" and e["reason"] == "BackendNotFound"
               and e["parent"] == "Service default/invalid" for e in found), found


def test_the_delta_protocol_serves_the_same_routes(gamma: Mesh) -> None:
    """A sidecar on incremental xDS gets the same routing (matching, consumer-free)."""
    assert name_of(gamma.get("match", "/v2", envoy=gamma.delta)) == V2
    assert name_of(gamma.get("match", "/v2example", envoy=gamma.delta)) == V1
    assert gamma.get("redirect", "/port", envoy=gamma.delta)[0] == 302


def test_a_route_change_moves_traffic_and_a_bad_route_is_left_out(gamma: Mesh) -> None:
    """Editing the file: 90/10 becomes 0/100 with no restart, and a route to a parent
    that does not exist is left out (logged, NoMatchingParent) while every other route
    stays served. Restored afterwards (the module's other tests share the mesh)."""
    changed = copy.deepcopy(gamma.data)
    [weight] = [r for r in changed["http_routes"] if r["name"] == "weight"]
    weight["rules"][0]["backendRefs"][0]["weight"] = 0
    weight["rules"][0]["backendRefs"][1]["weight"] = 100
    changed["http_routes"].append(_route("orphan", "no-such-parent", [{"backendRefs": _to(V2)}]))
    gamma.write(changed)
    try:
        wait_for(lambda: {name_of(gamma.get("weight")) for _ in range(20)} == {V2},
                 what="the 0/100 weights served", timeout=30)
        assert name_of(gamma.get("match", "/v2")) == V2  # the rest as it was
        assert gamma.rig.server is not None
        wait_for(lambda: any(
            e.get("event") == "routes.not_accepted" and e.get("route") == "HTTPRoute/default/orphan"
            and e.get("reason") == "NoMatchingParent" for e in gamma.rig.server.logs()),
            what="the orphan route logged", timeout=10)
    finally:
        gamma.write(gamma.data)
        wait_for(lambda: V1 in {name_of(gamma.get("weight")) for _ in range(40)},
                 what="the 90/10 weights back", timeout=30)
