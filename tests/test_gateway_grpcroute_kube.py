"""GRPCRoutes with a Gateway parent in Kubernetes, against the API server double (with
the shipped RBAC): the route enters the mesh, its ``status.parents`` is written per
Gateway parent as the Gateway API specifies (another controller's entry kept), the
Gateway's listeners count it in ``attachedRoutes`` and list it in ``supportedKinds``,
and the gateway proxy's route table holds its method match.

Cases follow the Gateway API conformance tests named in their docstrings.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from controlplane import resource
from controlplane.mesh.model import Mesh
from controlplane.proxy import ProxyIdentity
from controlplane.sources.kubernetes.kinds import (
    GATEWAY_CONTROLLER,
    GRPC_ROUTES,
    SERVICE_TYPE_ANNOTATION,
)
from controlplane.translator.gateway.translate import gateway_resources
from tests.kube.apiserver import ApiServerDouble
from tests.kube.objects import grpc_route, service
from tests.support.kube_gateways import gateway, gateway_api, gateway_class
from tests.support.kube_waits import mesh_where
from tests.test_kube_gateway import conditions, listener, source, until
from tests.test_kube_source import Feed

Obj = dict[str, Any]
GROUP = "gateway.networking.k8s.io"
LISTENERS = [
    {"name": "http", "port": 80, "protocol": "HTTP", "hostname": "grpc.example.com"},
    {"name": "http-only", "port": 81, "protocol": "HTTP",
     "allowedRoutes": {"kinds": [{"kind": "HTTPRoute"}]}},
]
ROUTE_SPEC: Obj = {
    "parentRefs": [{"name": "ingress", "sectionName": "http"},
                   {"name": "ingress", "sectionName": "http-only"}],
    "rules": [{"matches": [{"method": {"service": "shop.Cart", "method": "Add"}}],
               "backendRefs": [{"name": "cart", "port": 9090}]}],
}
OTHER = {"parentRef": {"name": "edge", "group": GROUP, "kind": "Gateway"},
         "controllerName": "example.com/another-controller",
         "conditions": [{"type": "Accepted", "status": "True", "reason": "Accepted",
                         "message": "", "lastTransitionTime": "2026-01-01T00:00:00Z"}]}


@pytest.fixture
def api() -> Iterator[ApiServerDouble]:
    """As shipped, with the example RoleBinding applied in "default"."""
    with gateway_api() as double:
        yield double


def ours(api: ApiServerDouble) -> dict[str, Obj]:
    """Our controller's entries in the GRPCRoute's status.parents, by sectionName."""
    parents = (api.get(GRPC_ROUTES, "default", "cart").get("status") or {}).get("parents")
    return {str(p["parentRef"].get("sectionName")): p for p in parents or []
            if p.get("controllerName") == GATEWAY_CONTROLLER}


async def test_a_grpc_route_on_a_gateway_gets_its_status_and_is_served(
        api: ApiServerDouble, tmp_path: Path) -> None:
    """GatewayWithAttachedRoutes for a GRPCRoute: Accepted and ResolvedRefs on the
    listener that admits it, attachedRoutes 1 there; HTTPRouteDisallowedKind's shape for
    a GRPCRoute: NotAllowedByListeners where allowedRoutes.kinds leaves it out
    (attachedRoutes 0, supportedKinds HTTPRoute only); another controller's entry kept;
    GRPCExactMethodMatching in the gateway's route table; an edit to a parentRef naming
    no listener: NoMatchingParent at the new generation."""
    api.create(gateway_class())
    api.create(gateway("ingress", LISTENERS, annotations={SERVICE_TYPE_ANNOTATION: "ClusterIP"}))
    api.create(service("cart").port(9090, name="grpc", app_protocol="kubernetes.io/h2c")
               .build())
    created = api.create(grpc_route("cart", ROUTE_SPEC))
    created["status"] = {"parents": [OTHER]}
    api.update_status(created)
    feed = Feed(source(api, tmp_path).updates())
    try:
        found = await until(lambda: len(ours(api)) == 2 and ours(api), "our two entries")
        accepted = found["http"]
        assert conditions(accepted) == {"Accepted": ("True", "Accepted"),
                                        "ResolvedRefs": ("True", "ResolvedRefs")}
        assert accepted["parentRef"] == {"group": GROUP, "kind": "Gateway", "name": "ingress",
                                         "sectionName": "http"}
        assert all(c["observedGeneration"] == 1 for c in accepted["conditions"])
        refused = found["http-only"]
        assert conditions(refused)["Accepted"] == ("False", "NotAllowedByListeners")
        parents = api.get(GRPC_ROUTES, "default", "cart")["status"]["parents"]
        assert parents[0] == OTHER  # another controller's entry, as it was

        await until(lambda: listener(api, "ingress", "http").get("attachedRoutes") == 1,
                    "the GRPCRoute counted")
        assert listener(api, "ingress", "http")["supportedKinds"] == [
            {"group": GROUP, "kind": "HTTPRoute"}, {"group": GROUP, "kind": "GRPCRoute"}]
        assert listener(api, "ingress", "http-only")["attachedRoutes"] == 0
        assert listener(api, "ingress", "http-only")["supportedKinds"] == [
            {"group": GROUP, "kind": "HTTPRoute"}]

        # What the gateway's proxies are served: the method as an exact path to cart.
        mesh: Mesh = await mesh_where(feed, lambda m: bool(m.grpc_routes and m.gateways))
        proxy = ProxyIdentity(node_id="ingress-1.default", service="ingress-controlplane",
                              kind="gateway", gateway="ingress")
        (table,) = [t for t in gateway_resources(mesh, proxy)[resource.ROUTE]
                    if t.name == "gateway/80"]
        (host,) = table.virtual_hosts
        assert list(host.domains) == ["grpc.example.com"]
        (route,) = host.routes
        assert route.name == "GRPCRoute/default/cart/rule/0/match/0"
        assert route.match.path == "/shop.Cart/Add"
        assert route.route.cluster == "outbound|9090||cart.default.svc.cluster.local"

        # An edit: the parentRef names a listener the Gateway lacks.
        edited = api.get(GRPC_ROUTES, "default", "cart")
        edited["spec"]["parentRefs"] = [{"name": "ingress", "sectionName": "nope"}]
        api.update(edited)
        moved = await until(lambda: "nope" in ours(api) and len(ours(api)) == 1
                            and ours(api)["nope"], "the entry for the new parentRef")
        assert conditions(moved)["Accepted"] == ("False", "NoMatchingParent")
        assert all(c["observedGeneration"] == 2 for c in moved["conditions"])
        await until(lambda: listener(api, "ingress", "http").get("attachedRoutes") == 0,
                    "the GRPCRoute no longer counted")
        assert api.get(GRPC_ROUTES, "default", "cart")["status"]["parents"][0] == OTHER
    finally:
        await feed.aclose()
