"""GRPCRoutes attached to Gateways, as pure functions (``mesh/gateway_attach.py`` and the
gateway's route tables): which listener hosts reach which backend, who may attach, and
the reasons a GRPCRoute's parent gives when it may not. The golden files
(``golden/gateway/in/grpcroute_*.yaml``) show whole translations; a real Envoy and
grpcio are in ``test_gateway_grpcroute_e2e.py``.

Each case names the upstream conformance test it follows.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

from controlplane import resource
from controlplane.mesh import load_mesh_data
from controlplane.mesh.attach import attach
from controlplane.mesh.gateway_attach import gateway_attachments, gateway_warnings
from controlplane.mesh.model import Mesh
from controlplane.proxy import GATEWAY, ProxyIdentity
from controlplane.translator.gateway.translate import gateway_resources

PROXY = ProxyIdentity(node_id="ingress-1", service="ingress", kind=GATEWAY, gateway="ingress")


def echo(name: str, namespace: str = "default", protocol: str = "grpc") -> dict[str, Any]:
    return {"name": name, "namespace": namespace, "port": 8080, "protocol": protocol,
            "endpoints": [{"address": "10.0.0.1", "port": 8080}]}


def grpc_route(name: str, parents: list[dict[str, Any]], backend: str = "echo-v1",
               **fields: Any) -> dict[str, Any]:
    return {"name": name, "parentRefs": parents,
            "rules": [{"backendRefs": [{"name": backend, "port": 8080}]}], **fields}


def mesh_of(listeners: list[dict[str, Any]], grpc_routes: list[dict[str, Any]],
            **extra: Any) -> Mesh:
    services = [echo("echo-v1"), echo("echo-v2"), echo("echo-v3")]
    return load_mesh_data({"services": services + extra.pop("services", []),
                           "gateways": [{"name": "ingress", "listeners": listeners}],
                           "grpc_routes": grpc_routes, **extra})


def parent_reasons(mesh: Mesh, name: str, namespace: str = "default"
                   ) -> list[tuple[str | None, str, str]]:
    """(sectionName, Accepted reason, ResolvedRefs reason) per Gateway parent."""
    found = gateway_attachments(mesh).routes[("GRPCRoute", namespace, name)]
    return [(p.parent.section_name, p.conditions[0].reason, p.conditions[1].reason)
            for p in found]


def served_hosts(mesh: Mesh, port: int) -> dict[str, str]:
    """Host -> the cluster of its catch-all route, in the gateway's table for ``port``."""
    (table,) = [t for t in gateway_resources(mesh, PROXY)[resource.ROUTE]
                if t.name == f"gateway/{port}"]
    return {domain: host.routes[-1].route.cluster
            for host in table.virtual_hosts for domain in host.domains}


def cluster(service: str) -> str:
    return f"outbound|8080||{service}.default.svc.cluster.local"


def test_listener_hostname_matching() -> None:
    """GRPCRouteListenerHostnameMatching: four listeners of one port, each with its own
    hostname; a route per listener (sectionName) serves that listener's host, an exact
    host before a wildcard covering it, and a host no listener names is not served."""
    listeners = [{"name": "listener-1", "port": 80, "protocol": "HTTP", "hostname": "bar.com"},
                 {"name": "listener-2", "port": 80, "protocol": "HTTP",
                  "hostname": "foo.bar.com"},
                 {"name": "listener-3", "port": 80, "protocol": "HTTP", "hostname": "*.bar.com"},
                 {"name": "listener-4", "port": 80, "protocol": "HTTP", "hostname": "*.foo.com"}]
    mesh = mesh_of(listeners, [
        grpc_route("backend-v1", [{"name": "ingress", "sectionName": "listener-1"}]),
        grpc_route("backend-v2", [{"name": "ingress", "sectionName": "listener-2"}],
                   backend="echo-v2"),
        grpc_route("backend-v3", [{"name": "ingress", "sectionName": "listener-3"},
                                  {"name": "ingress", "sectionName": "listener-4"}],
                   backend="echo-v3"),
    ])
    assert served_hosts(mesh, 80) == {"bar.com": cluster("echo-v1"),
                                      "foo.bar.com": cluster("echo-v2"),
                                      "*.bar.com": cluster("echo-v3"),
                                      "*.foo.com": cluster("echo-v3")}
    view = gateway_attachments(mesh).gateway("default", "ingress")
    assert view is not None
    assert [s.attached_routes for s in view.status.listeners] == [1, 1, 1, 1]
    assert all(reasons[1:] == ("Accepted", "ResolvedRefs")
               for reasons in parent_reasons(mesh, "backend-v3"))


def test_a_route_hostname_narrows_the_listener_and_a_miss_is_reported() -> None:
    """GRPCRouteListenerHostnameMatching / HTTPRouteHostnameIntersection for a GRPCRoute:
    a route's exact host under the listener's wildcard is served for that host only; a
    route whose hostnames miss every listener is NoMatchingListenerHostname."""
    listeners = [{"name": "grpc", "port": 80, "protocol": "HTTP", "hostname": "*.example.com"}]
    mesh = mesh_of(listeners, [
        grpc_route("narrow", [{"name": "ingress"}], hostnames=["api.example.com"]),
        grpc_route("elsewhere", [{"name": "ingress"}], hostnames=["api.example.org"]),
    ])
    assert served_hosts(mesh, 80) == {"api.example.com": cluster("echo-v1")}
    assert parent_reasons(mesh, "elsewhere") == [
        (None, "NoMatchingListenerHostname", "ResolvedRefs")]


def test_allowed_routes_kinds_and_namespaces() -> None:
    """GatewayInvalidRouteKind / HTTPRouteDisallowedKind for GRPCRoutes: a listener whose
    allowedRoutes.kinds names only GRPCRoute lists only it (an HTTPRoute there is
    NotAllowedByListeners), one naming only HTTPRoute refuses a GRPCRoute, and a TLS
    listener never takes one; HTTPRouteInvalidCrossNamespaceParentRef for a GRPCRoute:
    allowedRoutes Same (the default) refuses another namespace's route, All admits it."""
    listeners = [
        {"name": "grpc-only", "port": 80, "protocol": "HTTP",
         "allowedRoutes": {"kinds": [{"kind": "GRPCRoute"}]}},
        {"name": "http-only", "port": 81, "protocol": "HTTP",
         "allowedRoutes": {"kinds": [{"kind": "HTTPRoute"}]}},
        {"name": "all", "port": 82, "protocol": "HTTP",
         "allowedRoutes": {"namespaces": {"from": "All"}}},
        {"name": "same", "port": 83, "protocol": "HTTP"},
        {"name": "tls", "port": 443, "protocol": "TLS", "tls": {"mode": "Passthrough"}},
        {"name": "tls-grpc", "port": 444, "protocol": "TLS", "tls": {"mode": "Passthrough"},
         "allowedRoutes": {"kinds": [{"kind": "GRPCRoute"}]}},
    ]
    shop = {"namespace": "shop"}
    mesh = mesh_of(listeners, [
        grpc_route("fine", [{"name": "ingress", "sectionName": "grpc-only"}]),
        grpc_route("refused", [{"name": "ingress", "sectionName": "http-only"}]),
        grpc_route("on-tls", [{"name": "ingress", "sectionName": "tls"}]),
        {**grpc_route("foreign", [{"name": "ingress", "namespace": "default",
                                   "sectionName": "all"},
                                  {"name": "ingress", "namespace": "default",
                                   "sectionName": "same"}], backend="echo-shop"), **shop},
    ], services=[echo("echo-shop", "shop")], http_routes=[
        {"name": "web", "parentRefs": [{"name": "ingress", "sectionName": "grpc-only"}],
         "rules": [{"backendRefs": [{"name": "echo-v1", "port": 8080}]}]}])
    view = gateway_attachments(mesh).gateway("default", "ingress")
    assert view is not None
    kinds = {s.name: (s.supported_kinds, s.attached_routes) for s in view.status.listeners}
    assert kinds == {"grpc-only": (("GRPCRoute",), 1), "http-only": (("HTTPRoute",), 0),
                     "all": (("HTTPRoute", "GRPCRoute"), 1),
                     "same": (("HTTPRoute", "GRPCRoute"), 0),
                     "tls": (("TLSRoute",), 0), "tls-grpc": ((), 0)}
    tls_grpc = next(s for s in view.status.listeners if s.name == "tls-grpc")
    resolved = next(c for c in tls_grpc.conditions if c.type == "ResolvedRefs")
    assert (resolved.reason, resolved.message) == (
        "InvalidRouteKinds", "allowedRoutes.kinds gateway.networking.k8s.io/GRPCRoute "
        "cannot attach to a TLS listener (it takes TLSRoute)")
    assert parent_reasons(mesh, "fine") == [("grpc-only", "Accepted", "ResolvedRefs")]
    assert parent_reasons(mesh, "refused")[0][1] == "NotAllowedByListeners"
    assert parent_reasons(mesh, "on-tls")[0][1] == "NotAllowedByListeners"
    assert parent_reasons(mesh, "foreign", "shop") == [
        ("all", "Accepted", "ResolvedRefs"), ("same", "NotAllowedByListeners", "ResolvedRefs")]
    http = gateway_attachments(mesh).routes[("HTTPRoute", "default", "web")]
    assert http[0].conditions[0].reason == "NotAllowedByListeners"


def test_backend_references() -> None:
    """HTTPRouteInvalidCrossNamespaceBackendRef / HTTPRouteReferenceGrant for GRPCRoutes:
    another namespace's Service needs a ReferenceGrant from GRPCRoutes (one from
    HTTPRoutes does not do); a backend whose port is not gRPC is UnsupportedProtocol
    (GRPCRoute backends speak HTTP/2); a missing one BackendNotFound. The route stays
    Accepted; the unresolved share answers UNAVAILABLE."""
    listeners = [{"name": "grpc", "port": 80, "protocol": "HTTP"}]
    grant: dict[str, Any] = {"name": "from-http", "namespace": "shop",
             "from": [{"group": "gateway.networking.k8s.io", "kind": "HTTPRoute",
                       "namespace": "default"}],
             "to": [{"group": "", "kind": "Service"}]}
    other = {"name": "echo-shop", "namespace": "shop", "port": 8080}
    routes = [
        {"name": "cross", "parentRefs": [{"name": "ingress"}],
         "rules": [{"matches": [{"method": {"service": "a.A"}}], "backendRefs": [other]}]},
        grpc_route("plain-http", [{"name": "ingress"}], backend="web",
                   rules=[{"matches": [{"method": {"service": "b.B"}}],
                           "backendRefs": [{"name": "web", "port": 8080}]}]),
        grpc_route("missing", [{"name": "ingress"}],
                   rules=[{"matches": [{"method": {"service": "c.C"}}],
                           "backendRefs": [{"name": "gone", "port": 8080}]}]),
    ]
    services = [echo("echo-shop", "shop"), echo("web", protocol="http")]
    mesh = mesh_of(listeners, routes, services=services, reference_grants=[grant])
    assert parent_reasons(mesh, "cross") == [(None, "Accepted", "RefNotPermitted")]
    assert parent_reasons(mesh, "plain-http") == [(None, "Accepted", "UnsupportedProtocol")]
    assert parent_reasons(mesh, "missing") == [(None, "Accepted", "BackendNotFound")]
    (table,) = gateway_resources(mesh, PROXY)[resource.ROUTE]
    statuses = {r.match.prefix: r.direct_response.status for r in table.virtual_hosts[0].routes}
    assert statuses == {"/a.A/": 503, "/b.B/": 503, "/c.C/": 503}

    granted = {**grant, "name": "from-grpc",
               "from": [{**grant["from"][0], "kind": "GRPCRoute"}]}
    mesh = mesh_of(listeners, routes, services=services, reference_grants=[grant, granted])
    assert parent_reasons(mesh, "cross") == [(None, "Accepted", "ResolvedRefs")]


def test_a_route_with_a_service_and_a_gateway_parent_gets_both() -> None:
    """GAMMA and ingress at once: one GRPCRoute with a Service parent (its sidecars'
    routing, ``attach.py``) and a Gateway parent (``gateway_attach.py``): each parent's
    status from its own attachment, both accepted, the gateway serving the route."""
    listeners = [{"name": "grpc", "port": 80, "protocol": "HTTP"}]
    mesh = mesh_of(listeners, [grpc_route("both", [
        {"kind": "Service", "name": "echo-v1", "port": 8080}, {"name": "ingress"}],
        backend="echo-v2")])
    (service_parent,) = attach(mesh).statuses()[("GRPCRoute", "default", "both")]
    assert service_parent.parent.is_service and service_parent.accepted
    assert parent_reasons(mesh, "both") == [(None, "Accepted", "ResolvedRefs")]
    assert served_hosts(mesh, 80) == {"*": cluster("echo-v2")}


def test_validate_warns_of_what_a_gateway_does_not_serve(tmp_path: Path) -> None:
    """``controlplane validate``: a mesh whose GRPCRoute a Gateway refuses, or whose
    listener cannot be served, is valid (exit 0) and each is a warning naming the route,
    the parent and the reason; a mesh where everything attaches has none."""
    listeners = [{"name": "grpc", "port": 80, "protocol": "HTTP"},
                 {"name": "http-only", "port": 81, "protocol": "HTTP",
                  "allowedRoutes": {"kinds": [{"kind": "HTTPRoute"}]}}]
    fine = [grpc_route("fine", [{"name": "ingress", "sectionName": "grpc"}])]
    assert gateway_warnings(mesh_of(listeners, fine)) == []
    data = {"services": [echo("echo-v1")],
            "gateways": [{"name": "ingress", "listeners": [
                *listeners, {"name": "udp", "port": 53, "protocol": "UDP"}]}],
            "grpc_routes": [*fine, grpc_route("refused", [
                {"name": "ingress", "sectionName": "http-only"}])]}
    path = tmp_path / "mesh.yaml"
    path.write_text(yaml.safe_dump(data), encoding="utf-8")
    done = subprocess.run([sys.executable, "-m", "controlplane", "validate", str(path)],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    warnings = [line for line in done.stderr.splitlines() if ": warning: " in line]
    assert warnings == [
        f"{path}: warning: GRPCRoute/default/refused on Gateway default/ingress section "
        "http-only: Accepted NotAllowedByListeners: no listener of Gateway default/ingress "
        "picked by the parentRef admits GRPCRoutes from namespace default (allowedRoutes)",
        f"{path}: warning: Gateway default/ingress listener udp: Accepted "
        "UnsupportedProtocol: protocol 'UDP' is not supported; use HTTP, HTTPS, TLS or TCP"]
