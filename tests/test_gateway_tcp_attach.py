"""TCPRoutes and TLS Terminate listeners, as pure functions (``mesh/gateway_attach.py``,
``mesh/gateway_listeners.py`` and the gateway's listeners): who may attach, what each
listener and route reports, and what the gateway proxy is given. Whole translations are
in the golden files (``golden/gateway/in/tcproute.yaml``, ``tls_terminate.yaml``); a
real Envoy in ``test_gateway_tcp_e2e.py``.

Each case names the upstream conformance test it follows.
"""

from __future__ import annotations

from typing import Any

import pytest
from envoy.config.listener.v3 import listener_pb2
from envoy.extensions.filters.network.tcp_proxy.v3 import tcp_proxy_pb2

from controlplane import resource
from controlplane.errors import MeshError
from controlplane.mesh import load_mesh_data
from controlplane.mesh.gateway_attach import gateway_attachments, gateway_warnings
from controlplane.mesh.model import Mesh
from controlplane.proxy import GATEWAY, ProxyIdentity
from controlplane.translator.gateway.translate import gateway_resources

PROXY = ProxyIdentity(node_id="ingress-1", service="ingress", kind=GATEWAY, gateway="ingress")
TCP: dict[str, Any] = {"name": "tcp", "port": 5432, "protocol": "TCP"}


def db(name: str, namespace: str = "default") -> dict[str, Any]:
    return {"name": name, "namespace": namespace, "port": 5432, "protocol": "tcp",
            "endpoints": [{"address": "10.0.0.1", "port": 5432}]}


def tcp_route(name: str, parents: list[dict[str, Any]], *backends: str,
              namespace: str = "default") -> dict[str, Any]:
    return {"name": name, "namespace": namespace, "parentRefs": parents,
            "rules": [{"backendRefs": [{"name": b, "port": 5432} for b in backends or
                                       ("db",)]}]}


def mesh_of(listeners: list[dict[str, Any]], tcp_routes: list[dict[str, Any]],
            **extra: Any) -> Mesh:
    return load_mesh_data({"services": [db("db"), db("db-next"), *extra.pop("services", [])],
                           "gateways": [{"name": "ingress", "listeners": listeners}],
                           "tcp_routes": tcp_routes, **extra})


def reasons(mesh: Mesh, name: str, kind: str = "TCPRoute", namespace: str = "default"
            ) -> list[tuple[str | None, str, str]]:
    """(sectionName, Accepted reason, ResolvedRefs reason) per Gateway parent."""
    return [(p.parent.section_name, p.conditions[0].reason, p.conditions[1].reason)
            for p in gateway_attachments(mesh).routes[(kind, namespace, name)]]


def listener_status(mesh: Mesh, name: str) -> tuple[tuple[str, ...], int, dict[str, str]]:
    """(supportedKinds, attachedRoutes, {condition type: reason})."""
    view = gateway_attachments(mesh).gateway("default", "ingress")
    assert view is not None
    (found,) = [s for s in view.status.listeners if s.name == name]
    return found.supported_kinds, found.attached_routes, {
        c.type: c.reason for c in found.conditions}


def listeners(mesh: Mesh) -> dict[str, listener_pb2.Listener]:
    return {str(m.name): m for m in gateway_resources(mesh, PROXY)[resource.LISTENER]
            if isinstance(m, listener_pb2.Listener)}


def proxied(chain: Any) -> list[tuple[str, int]]:
    """The (cluster, weight) pairs of a chain's TCP proxy (weight 0: a lone cluster)."""
    config = tcp_proxy_pb2.TcpProxy()
    chain.filters[0].typed_config.Unpack(config)
    if config.cluster:
        return [(config.cluster, 0)]
    return [(c.name, c.weight) for c in config.weighted_clusters.clusters]


def test_a_parent_ref_without_section_attaches_to_every_tcp_listener() -> None:
    """TCPRouteParentRefAttachAll: no sectionName or port: the route attaches to every
    listener that admits it (both TCP listeners; the HTTP one does not take TCPRoutes,
    and is not counted); each TCP port proxies to it."""
    mesh = mesh_of([TCP, {**TCP, "name": "tcp-2", "port": 5433},
                    {"name": "http", "port": 80, "protocol": "HTTP"}],
                   [tcp_route("all", [{"name": "ingress"}])])
    assert reasons(mesh, "all") == [(None, "Accepted", "ResolvedRefs")]
    assert listener_status(mesh, "tcp")[:2] == (("TCPRoute",), 1)
    assert listener_status(mesh, "tcp-2")[:2] == (("TCPRoute",), 1)
    assert listener_status(mesh, "http")[:2] == (("HTTPRoute", "GRPCRoute"), 0)
    made = listeners(mesh)
    assert set(made) == {"gateway/5432", "gateway/5433", "gateway/80"}
    for port in (5432, 5433):
        (chain,) = made[f"gateway/{port}"].filter_chains
        assert proxied(chain) == [("outbound|5432||db.default.svc.cluster.local", 0)]
        assert not chain.HasField("transport_socket")


def test_a_parent_ref_picks_by_port_or_section_name() -> None:
    """TCPRouteParentRefPortAndSectionName: a port, a sectionName, or both must match
    one listener; neither matching: NoMatchingParent."""
    mesh = mesh_of([TCP, {**TCP, "name": "tcp-2", "port": 5433}], [
        tcp_route("by-port", [{"name": "ingress", "port": 5433}], "db-next"),
        tcp_route("both", [{"name": "ingress", "sectionName": "tcp", "port": 5432}]),
        tcp_route("mismatch", [{"name": "ingress", "sectionName": "tcp", "port": 5433}])])
    assert reasons(mesh, "by-port") == [(None, "Accepted", "ResolvedRefs")]
    assert reasons(mesh, "both") == [("tcp", "Accepted", "ResolvedRefs")]
    assert reasons(mesh, "mismatch") == [("tcp", "NoMatchingParent", "ResolvedRefs")]
    (chain,) = listeners(mesh)["gateway/5433"].filter_chains
    assert proxied(chain) == [("outbound|5432||db-next.default.svc.cluster.local", 0)]


def test_several_tcp_routes_on_one_listener_the_first_takes_the_connections() -> None:
    """TCPRouteMultipleRoutesAttachment: both accepted and counted; the first (the oldest
    in Kubernetes, the first in the file) is proxied to; ``validate`` says the other is
    unused."""
    mesh = mesh_of([TCP], [tcp_route("first", [{"name": "ingress"}]),
                           tcp_route("second", [{"name": "ingress"}], "db-next")])
    assert reasons(mesh, "first") == reasons(mesh, "second") == [
        (None, "Accepted", "ResolvedRefs")]
    assert listener_status(mesh, "tcp")[1] == 2
    (chain,) = listeners(mesh)["gateway/5432"].filter_chains
    assert chain.name == "tcp/tcp/default/first"
    assert proxied(chain) == [("outbound|5432||db.default.svc.cluster.local", 0)]
    assert gateway_warnings(mesh) == [
        "TCPRoute/default/second on Gateway default/ingress listener tcp: attached, but "
        "default/first came first and takes every connection (one TCPRoute per listener); "
        "give it its own listener"]


def test_weights_split_and_a_zero_weight_gets_nothing() -> None:
    """TCPRouteWeightedRouting: relative weights in the TCP proxy; a weight of 0 is left
    out (as the Gateway API has it for every route kind)."""
    route = {"name": "split", "parentRefs": [{"name": "ingress"}],
             "rules": [{"backendRefs": [{"name": "db", "port": 5432, "weight": 3},
                                        {"name": "db-next", "port": 5432, "weight": 1},
                                        {"name": "db-next", "port": 5432, "weight": 0}]}]}
    (chain,) = listeners(mesh_of([TCP], [route]))["gateway/5432"].filter_chains
    assert proxied(chain) == [("outbound|5432||db.default.svc.cluster.local", 3),
                              ("outbound|5432||db-next.default.svc.cluster.local", 1)]


def test_another_namespace_needs_a_grant_from_tcp_routes() -> None:
    """TCPRouteReferenceGrant: RefNotPermitted (and nothing proxied: no listener) until a
    ReferenceGrant from TCPRoutes opens it; one from TLSRoutes does not."""
    route = {"name": "vault", "parentRefs": [{"name": "ingress"}],
             "rules": [{"backendRefs": [{"name": "vault", "namespace": "secure",
                                         "port": 5432}]}]}

    def grant(kind: str) -> dict[str, Any]:
        return {"name": f"from-{kind.lower()}", "namespace": "secure",
                "from": [{"group": "gateway.networking.k8s.io", "kind": kind,
                          "namespace": "default"}],
                "to": [{"group": "", "kind": "Service"}]}

    closed = mesh_of([TCP], [route], services=[db("vault", "secure")],
                     reference_grants=[grant("TLSRoute")])
    assert reasons(closed, "vault") == [(None, "Accepted", "RefNotPermitted")]
    assert listeners(closed) == {}
    opened = mesh_of([TCP], [route], services=[db("vault", "secure")],
                     reference_grants=[grant("TCPRoute")])
    assert reasons(opened, "vault") == [(None, "Accepted", "ResolvedRefs")]
    (chain,) = listeners(opened)["gateway/5432"].filter_chains
    assert proxied(chain) == [("outbound|5432||vault.secure.svc.cluster.local", 0)]


def test_a_tcp_listener_refuses_other_kinds_and_other_namespaces() -> None:
    """GatewayInvalidRouteKind (allowedRoutes.kinds naming HTTPRoute on a TCP listener:
    ResolvedRefs InvalidRouteKinds, no kind supported), HTTPRouteDisallowedKind's shape
    (an HTTPRoute to a TCP listener: NotAllowedByListeners), allowedRoutes.namespaces
    Same (a TCPRoute of another namespace: NotAllowedByListeners)."""
    mesh = mesh_of(
        [TCP, {**TCP, "name": "wrong-kinds", "port": 5433,
               "allowedRoutes": {"kinds": [{"kind": "HTTPRoute"}]}}],
        [tcp_route("elsewhere", [{"name": "ingress", "namespace": "default",
                                  "sectionName": "tcp"}], namespace="other")],
        http_routes=[{"name": "web", "parentRefs": [{"name": "ingress", "sectionName": "tcp"}],
                      "rules": [{"backendRefs": [{"name": "db", "port": 5432}]}]}],
        services=[db("db", "other")])
    kinds, attached, found = listener_status(mesh, "wrong-kinds")
    assert (kinds, attached, found["ResolvedRefs"]) == ((), 0, "InvalidRouteKinds")
    assert reasons(mesh, "web", kind="HTTPRoute") == [
        ("tcp", "NotAllowedByListeners", "ResolvedRefs")]
    assert reasons(mesh, "elsewhere", namespace="other") == [
        ("tcp", "NotAllowedByListeners", "ResolvedRefs")]


def test_a_tcp_listener_takes_its_whole_port() -> None:
    """A TCP listener has nothing to tell connections apart by: another listener on its
    port (TCP, HTTP or TLS) is ProtocolConflict and not served; one with tls is
    UnsupportedValue."""
    mesh = mesh_of([TCP, {**TCP, "name": "again"},
                    {"name": "http", "port": 5432, "protocol": "HTTP"},
                    {**TCP, "name": "tls", "port": 5434, "tls": {"mode": "Passthrough"}}],
                   [tcp_route("db", [{"name": "ingress"}])])
    assert listener_status(mesh, "again")[2]["Conflicted"] == "ProtocolConflict"
    assert listener_status(mesh, "http")[2]["Conflicted"] == "ProtocolConflict"
    assert listener_status(mesh, "tls")[2]["Accepted"] == "UnsupportedValue"
    assert listener_status(mesh, "tcp")[2]["Programmed"] == "Programmed"
    assert listener_status(mesh, "tcp")[1] == 1  # only the served listener counts it
    assert set(listeners(mesh)) == {"gateway/5432"}


def test_a_tcp_route_of_two_rules_is_unsupported() -> None:
    """A TCP stream has nothing to choose a rule by: Accepted False UnsupportedValue,
    saying to put the backends in one rule; the listener serves nothing for it."""
    route = {"name": "two", "parentRefs": [{"name": "ingress"}],
             "rules": [{"backendRefs": [{"name": "db", "port": 5432}]},
                       {"backendRefs": [{"name": "db-next", "port": 5432}]}]}
    mesh = mesh_of([TCP], [route])
    (parent,) = gateway_attachments(mesh).routes[("TCPRoute", "default", "two")]
    assert (parent.conditions[0].reason, parent.conditions[0].status) == (
        "UnsupportedValue", False)
    assert "put every backendRef in one rule" in parent.conditions[0].message
    assert listeners(mesh) == {}


def test_tls_terminate_needs_usable_certificates() -> None:
    """GatewayInvalidTLSConfiguration: a TLS listener in mode Terminate without
    certificateRefs, or naming a certificate the mesh lacks, or another namespace's
    without a ReferenceGrant: ResolvedRefs False (InvalidCertificateRef,
    RefNotPermitted), not served; one with its certificate is served, supportedKinds
    TLSRoute and TCPRoute."""
    def terminate(name: str, port: int, *refs: dict[str, str]) -> dict[str, Any]:
        return {"name": name, "port": port, "protocol": "TLS",
                "tls": {"mode": "Terminate", "certificateRefs": list(refs)}}

    mesh = mesh_of([terminate("none", 8443), terminate("missing", 8444, {"name": "nope"}),
                    terminate("foreign", 8445, {"name": "db-cert", "namespace": "certs"}),
                    terminate("good", 8446, {"name": "db-cert"})],
                   [tcp_route("db", [{"name": "ingress"}])],
                   certificates=[{"name": "db-cert", "cert_file": "/c.pem",
                                  "key_file": "/k.pem"},
                                 {"name": "db-cert", "namespace": "certs",
                                  "cert_file": "/c.pem", "key_file": "/k.pem"}])
    assert listener_status(mesh, "none")[2]["ResolvedRefs"] == "InvalidCertificateRef"
    assert listener_status(mesh, "missing")[2]["ResolvedRefs"] == "InvalidCertificateRef"
    assert listener_status(mesh, "foreign")[2]["ResolvedRefs"] == "RefNotPermitted"
    kinds, attached, found = listener_status(mesh, "good")
    assert (kinds, attached, found["Programmed"]) == (("TLSRoute", "TCPRoute"), 1,
                                                      "Programmed")
    assert set(listeners(mesh)) == {"gateway/8446"}


def test_a_tls_route_on_a_terminate_listener_matches_its_hostnames() -> None:
    """TLSRouteTerminateSimpleSameNamespace, TLSRouteHostnameIntersection's shape: the
    chain's server names are the route's hostnames under the listener's wildcard; a
    hostname outside it is NoMatchingListenerHostname."""
    listener = {"name": "mqtt", "port": 8883, "protocol": "TLS",
                "hostname": "*.mqtt.example.com",
                "tls": {"mode": "Terminate", "certificateRefs": [{"name": "mqtt"}]}}
    mesh = mesh_of([listener], [], certificates=[
        {"name": "mqtt", "cert_file": "/c.pem", "key_file": "/k.pem"}], tls_routes=[
        {"name": "eu", "parentRefs": [{"name": "ingress"}],
         "hostnames": ["eu.mqtt.example.com", "other.example.com"],
         "rules": [{"backendRefs": [{"name": "db", "port": 5432}]}]},
        {"name": "off", "parentRefs": [{"name": "ingress"}],
         "hostnames": ["other.example.com"],
         "rules": [{"backendRefs": [{"name": "db", "port": 5432}]}]}])
    assert reasons(mesh, "eu", kind="TLSRoute") == [(None, "Accepted", "ResolvedRefs")]
    assert reasons(mesh, "off", kind="TLSRoute") == [
        (None, "NoMatchingListenerHostname", "ResolvedRefs")]
    (chain,) = listeners(mesh)["gateway/8883"].filter_chains
    assert list(chain.filter_chain_match.server_names) == ["eu.mqtt.example.com"]
    assert chain.transport_socket.name == "envoy.transport_sockets.tls"


@pytest.mark.parametrize(("change", "path"), [
    (lambda r: r["rules"][0].update(backendRefs=[{"name": "db", "port": 5432}] * 17),
     "tcp_routes[0] (default/db).rules[0].backendRefs"),
    (lambda r: r.update(rules=[r["rules"][0]] * 17), "tcp_routes[0] (default/db).rules"),
    (lambda r: r.update(hostnames=["db.example.com"]), "tcp_routes[0] (default/db).hostnames"),
])
def test_a_bad_tcp_route_names_the_field(change: Any, path: str) -> None:
    """Bounded as the API (16 backendRefs, 16 rules), no fields it lacks (hostnames):
    the error names the object and field."""
    route = tcp_route("db", [{"name": "ingress"}])
    change(route)
    with pytest.raises(MeshError) as raised:
        mesh_of([TCP], [route])
    assert path in str(raised.value)
