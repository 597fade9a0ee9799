"""TCPRoutes and TLS Terminate listeners in Kubernetes, against the API server double
(with the shipped RBAC, which now grants tcproutes and tcproutes/status): TCPRoutes to
our Gateways enter the mesh, get ``status.parents`` per Gateway parent, are counted in
their listener's ``attachedRoutes``; a TLS listener in mode Terminate reads its
certificate from a ``kubernetes.io/tls`` Secret and the gateway proxy's chain terminates
with it (by SDS: the key is not in the resources).

Cases follow the Gateway API conformance tests named in their docstrings.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from envoy.extensions.filters.network.tcp_proxy.v3 import tcp_proxy_pb2
from envoy.extensions.transport_sockets.tls.v3 import tls_pb2

from controlplane import resource
from controlplane.mesh import load_mesh_data
from controlplane.mesh.gateway_attach import gateway_attachments
from controlplane.mesh.model import Mesh
from controlplane.proxy import ProxyIdentity
from controlplane.sources.kubernetes.gateway_examples import (
    example_gateway_class,
    example_tcp_gateway,
    example_tcp_route,
)
from controlplane.sources.kubernetes.gateways import convert_gateways
from controlplane.sources.kubernetes.kinds import (
    GATEWAY_CONTROLLER,
    SERVICE_TYPE_ANNOTATION,
    TCP_ROUTES,
)
from controlplane.translator.gateway.translate import gateway_resources
from tests.kube.apiserver import ApiServerDouble
from tests.kube.objects import reference_grant, service
from tests.support.gateway_certs import TestCA
from tests.support.kube_gateways import (
    gateway,
    gateway_api,
    gateway_class,
    tcp_route,
    tls_secret,
)
from tests.support.kube_waits import mesh_where
from tests.test_kube_gateway import conditions, listener, source, until
from tests.test_kube_source import Feed

Obj = dict[str, Any]
GROUP = "gateway.networking.k8s.io"
LISTENERS: list[Obj] = [
    {"name": "postgres", "port": 5432, "protocol": "TCP"},
    {"name": "db-tls", "port": 8443, "protocol": "TLS", "hostname": "db.example.com",
     "tls": {"mode": "Terminate", "certificateRefs": [{"kind": "Secret", "name": "db-cert"}]}},
]


@pytest.fixture
def api() -> Iterator[ApiServerDouble]:
    """As shipped, with the example RoleBinding applied in "default" (Secrets readable)."""
    with gateway_api() as double:
        yield double


def ours(api: ApiServerDouble, name: str, namespace: str = "default") -> list[Obj]:
    """Our controller's entries in a TCPRoute's status.parents."""
    parents = (api.get(TCP_ROUTES, namespace, name).get("status") or {}).get("parents")
    return [p for p in parents or [] if p.get("controllerName") == GATEWAY_CONTROLLER]


def backend(name: str, weight: int = 1, namespace: str | None = None) -> Obj:
    ref: Obj = {"name": name, "port": 5432, "weight": weight}
    return {**ref, "namespace": namespace} if namespace else ref


async def test_tcp_routes_get_status_and_reach_the_gateway(
        api: ApiServerDouble, tmp_path: Path) -> None:
    """TCPRouteWeightedRouting (80/20 in the gateway's TCP proxy),
    TCPRouteParentRefPortAndSectionName (sectionName), TCPRouteMultipleRoutesAttachment
    (a second TCPRoute on the listener is accepted and counted, the oldest proxied to),
    TCPRouteReferenceGrant (another namespace's Service: RefNotPermitted until a grant
    from TCPRoutes exists), TLSRouteTerminateSimpleSameNamespace's listener (a TCPRoute
    on a TLS Terminate listener whose certificate is a Secret)."""
    ca = TestCA(tmp_path)
    api.create(gateway_class())
    api.create(gateway("ingress", LISTENERS,
                       annotations={SERVICE_TYPE_ANNOTATION: "ClusterIP"}))
    api.create(tls_secret("db-cert", ca.server("db", "db.example.com")))
    for name, namespace in (("db", "default"), ("db-replica", "default"), ("vault", "data")):
        api.create(service(name, namespace=namespace).port(5432, name="tcp-postgres").build())
    api.create(tcp_route("postgres", {
        "parentRefs": [{"name": "ingress", "sectionName": "postgres"}],
        "rules": [{"backendRefs": [backend("db", 80), backend("db-replica", 20)]}]}))
    api.create(tcp_route("vault", {
        "parentRefs": [{"name": "ingress", "sectionName": "postgres"}],
        "rules": [{"backendRefs": [backend("vault", namespace="data")]}]}))
    api.create(tcp_route("secure-db", {
        "parentRefs": [{"name": "ingress", "sectionName": "db-tls"}],
        "rules": [{"backendRefs": [backend("db")]}]}))
    feed = Feed(source(api, tmp_path).updates())
    try:
        (first,) = await until(lambda: ours(api, "postgres"), "the TCPRoute's status")
        assert conditions(first) == {"Accepted": ("True", "Accepted"),
                                     "ResolvedRefs": ("True", "ResolvedRefs")}
        assert first["parentRef"] == {"group": GROUP, "kind": "Gateway", "name": "ingress",
                                      "sectionName": "postgres"}
        assert all(c["observedGeneration"] == 1 for c in first["conditions"])
        (later,) = await until(lambda: ours(api, "vault"), "the second TCPRoute's status")
        assert conditions(later) == {"Accepted": ("True", "Accepted"),
                                     "ResolvedRefs": ("False", "RefNotPermitted")}
        await until(lambda: listener(api, "ingress", "postgres").get("attachedRoutes") == 2,
                    "both TCPRoutes counted")
        assert listener(api, "ingress", "postgres")["supportedKinds"] == [
            {"group": GROUP, "kind": "TCPRoute"}]
        (terminated,) = await until(lambda: ours(api, "secure-db"), "secure-db's status")
        assert conditions(terminated)["Accepted"] == ("True", "Accepted")
        tls = await until(lambda: (found if conditions(
            found := listener(api, "ingress", "db-tls")).get("ResolvedRefs") == (
                "True", "ResolvedRefs") else None), "the certificate read")
        assert conditions(tls)["Programmed"] == ("True", "Programmed")
        assert tls["attachedRoutes"] == 1
        assert tls["supportedKinds"] == [{"group": GROUP, "kind": "TLSRoute"},
                                         {"group": GROUP, "kind": "TCPRoute"}]

        # What the gateway's proxies are served.
        mesh: Mesh = await mesh_where(feed, lambda m: len(m.tcp_routes) == 3
                                      and bool(m.certificates))
        proxy = ProxyIdentity(node_id="ingress-1.default", service="ingress-controlplane",
                              kind="gateway", gateway="ingress")
        listeners = {m.name: m for m in gateway_resources(mesh, proxy)[resource.LISTENER]}
        (chain,) = listeners["gateway/5432"].filter_chains
        proxied = tcp_proxy_pb2.TcpProxy()
        chain.filters[0].typed_config.Unpack(proxied)
        assert [(c.name, c.weight) for c in proxied.weighted_clusters.clusters] == [
            ("outbound|5432||db.default.svc.cluster.local", 80),
            ("outbound|5432||db-replica.default.svc.cluster.local", 20)]
        (chain,) = listeners["gateway/8443"].filter_chains
        assert list(chain.filter_chain_match.server_names) == ["db.example.com"]
        context = tls_pb2.DownstreamTlsContext()
        chain.transport_socket.typed_config.Unpack(context)
        assert [s.name for s in context.common_tls_context.tls_certificate_sds_secret_configs
                ] == ["certificate/default/db-cert"]
        assert not context.common_tls_context.alpn_protocols

        # A ReferenceGrant from TCPRoutes of default opens data/vault.
        api.create(reference_grant("tcp-routes", "data",
                                   [{"group": GROUP, "kind": "TCPRoute",
                                     "namespace": "default"}],
                                   [{"group": "", "kind": "Service"}]))
        granted = await until(lambda: (found if conditions(found := ours(api, "vault")[0])
                                       ["ResolvedRefs"] == ("True", "ResolvedRefs")
                                       else None), "vault's backend resolved")
        assert conditions(granted)["Accepted"] == ("True", "Accepted")
    finally:
        await feed.aclose()


def test_the_tcp_examples_pass_the_schema_and_the_model() -> None:
    """deploy/kubernetes/examples/gateway-tcp*.yaml: stored as written by the API server
    double (the Gateway's spec unpruned), the Gateway ours and valid with its Secret
    wanted, and the TCPRoute attached to both listeners (TCP and TLS Terminate)."""
    made = [example_gateway_class(), example_tcp_gateway(), example_tcp_route()]
    with ApiServerDouble() as double:
        stored = [double.create(copy.deepcopy(obj)) for obj in made]
    def shape(gateway: Obj) -> list[tuple[Any, ...]]:  # nothing pruned (defaults added)
        return [(item["name"], item["port"], item["protocol"], item.get("hostname"),
                 (item.get("tls") or {}).get("mode")) for item in gateway["spec"]["listeners"]]

    assert shape(stored[1]) == shape(made[1])
    (rule,) = stored[2]["spec"]["rules"]
    assert [(r["name"], r["port"]) for r in rule["backendRefs"]] == [("postgres", 5432)]
    found = convert_gateways([stored[0]], [stored[1]], [], tcp_routes=[stored[2]])
    assert not found.verdicts[("default", "db")].problem
    assert found.secrets == {("default", "db-cert")}
    mesh = load_mesh_data({
        "services": [{"name": "postgres", "port": 5432, "protocol": "tcp"}],
        "gateways": found.gateways, "tcp_routes": found.tcp_routes,
        "certificates": [{"name": "db-cert"}]})
    view = gateway_attachments(mesh).gateway("default", "db")
    assert view is not None
    assert [(s.name, s.attached_routes) for s in view.status.listeners] == [
        ("postgres", 1), ("postgres-tls", 1)]
    assert [len(s.routes) for s in view.served] == [1, 1]
