"""The gateway controller in the Kubernetes source, against the API server double (with
the shipped RBAC): GatewayClasses of ours accepted and others' left alone, each Gateway's
Envoy Deployment, Service and ServiceAccount made and owned by it (garbage-collected
with it), its status as the Gateway API defines it, and its certificates read from
Secrets, one watch per Secret named.

Cases follow the Gateway API conformance tests named in their docstrings.
"""

from __future__ import annotations

import asyncio
import base64
import copy
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from controlplane.inject.config import InjectConfig
from controlplane.mesh.model import Mesh
from controlplane.sources.kubernetes import (
    Debounce,
    KubernetesSource,
    WatchTiming,
    api_client,
    gateway_controller,
)
from controlplane.sources.kubernetes.certificates import ClusterCertificates, parse_secret
from controlplane.sources.kubernetes.deploy_writer import Deployer
from controlplane.sources.kubernetes.deployer import (
    HASH_ANNOTATION,
    NotDeployable,
    desired,
    resource_name,
)
from controlplane.sources.kubernetes.gateway_controller import GatewayController
from controlplane.sources.kubernetes.gateway_examples import (
    example_gateway,
    example_gateway_class,
    example_gateway_route,
)
from controlplane.sources.kubernetes.gateways import convert_gateways
from controlplane.sources.kubernetes.kinds import (
    DEPLOYMENTS,
    GATEWAY_CLASSES,
    GATEWAY_CONTROLLER,
    GATEWAY_LABEL,
    GATEWAYS,
    SECRETS,
    SERVICE_ACCOUNTS,
    SERVICE_TYPE_ANNOTATION,
    SERVICES,
    TLS_ROUTES,
)
from tests.kube.apiserver import ApiServerDouble, StatusError
from tests.kube.objects import http_route
from tests.kube.rbac import Rbac, granted_certificates
from tests.support.gateway_certs import TestCA, key_marker
from tests.support.kube_gateways import (
    gateway,
    gateway_api,
    gateway_class,
    https_listener,
    tls_route,
    tls_secret,
)
from tests.support.kube_waits import mesh_where
from tests.test_kube_source import Feed, next_mesh

Obj = dict[str, Any]
HTTP = {"name": "http", "port": 80, "protocol": "HTTP"}


@pytest.fixture
def api() -> Iterator[ApiServerDouble]:
    """As shipped, with the example RoleBinding applied in "default" (the Gateways'
    namespace): the server may read that namespace's Secrets, no other's."""
    with gateway_api() as double:
        yield double


def source(api: ApiServerDouble, tmp_path: Path) -> KubernetesSource:
    client = api_client(api.kubeconfig(tmp_path / "kubeconfig"))
    timing = WatchTiming(server_timeout=30, inactivity=5, backoff_initial=0.1)
    controller = GatewayController(client, deployer=Deployer(client, InjectConfig()),
                                   certificates=ClusterCertificates(client, timing),
                                   write_status=True)
    return KubernetesSource(client, None, timing, Debounce(quiet=0.05, max_delay=1.0),
                            gateways=controller)


async def until(check: Callable[[], Any], what: str, timeout: float = 20) -> Any:
    """Poll ``check`` (which may raise StatusError 404 meanwhile) until it is truthy."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        try:
            last = check()
        except (StatusError, KeyError):
            last = None
        if last:
            return last
        await asyncio.sleep(0.05)
    raise AssertionError(f"never: {what} (last: {last})")


def conditions(found: Any) -> dict[str, tuple[str, str]]:
    return {c["type"]: (c["status"], c["reason"]) for c in (found or {}).get("conditions", [])}


def listener(api: ApiServerDouble, name: str, listener_name: str) -> Obj:
    status = api.get(GATEWAYS, "default", name).get("status") or {}
    return next((item for item in status.get("listeners") or []
                 if item["name"] == listener_name), {})


async def test_our_gateway_class_is_accepted_and_another_left_alone(
        api: ApiServerDouble, tmp_path: Path) -> None:
    """GatewayClassObservedGenerationBump; Gateways of another class are not ours
    (GatewayClass's controllerName decides)."""
    api.create(gateway_class("controlplane"))
    api.create(gateway_class("other", "example.com/another-controller"))
    api.create(gateway("theirs", [HTTP], class_name="other"))
    feed = Feed(source(api, tmp_path).updates())
    try:
        found = await until(lambda: conditions(api.get(GATEWAY_CLASSES, "", "controlplane")
                                               .get("status")).get("Accepted"),
                            "our GatewayClass Accepted")
        assert found == ("True", "Accepted")
        ours = api.get(GATEWAY_CLASSES, "", "controlplane")["status"]["conditions"][0]
        assert ours["observedGeneration"] == 1
        await asyncio.sleep(1.0)  # a batch or two later: still nothing written to theirs
        assert "status" not in api.get(GATEWAY_CLASSES, "", "other") or not conditions(
            api.get(GATEWAY_CLASSES, "", "other").get("status"))
        assert not (api.get(GATEWAYS, "default", "theirs").get("status") or {}).get(
            "listeners")
        assert api.objects(DEPLOYMENTS) == []
        assert api.count("create", DEPLOYMENTS) == 0
    finally:
        await feed.aclose()


async def test_a_gateway_gets_its_envoy_status_and_certificate(
        api: ApiServerDouble, tmp_path: Path) -> None:
    """GatewayInvalidTLSConfiguration (a missing Secret: ResolvedRefs False,
    InvalidCertificateRef), then GatewaySecretReferenceGrant-like recovery once the Secret
    exists; GatewayObservedGenerationBump; HTTPRouteSimpleSameNamespace (attachedRoutes);
    the Gateway's address from its Service (GatewayStaticAddresses' status shape)."""
    ca = TestCA(tmp_path)
    api.create(gateway_class("controlplane"))
    api.create(gateway("ingress", [HTTP, https_listener("https", 443, "shop-cert",
                                                        "shop.example.com")],
                       infrastructure={"labels": {"team": "shop"},
                                       "annotations": {"owner": "shop@example.com"}}))
    api.create(http_route("shop", {"parentRefs": [{"name": "ingress", "sectionName": "http"}],
                                   "rules": [{"backendRefs": [{"name": "web", "port": 8080}]}]}))
    feed = Feed(source(api, tmp_path).updates())
    name = resource_name("ingress", "controlplane")
    try:
        # Its three objects, each owned by the Gateway (controller: true).
        uid = api.get(GATEWAYS, "default", "ingress")["metadata"]["uid"]
        service = await until(lambda: api.get(SERVICES, "default", name), "Service (last made)")
        deployment = api.get(DEPLOYMENTS, "default", name)
        account = api.get(SERVICE_ACCOUNTS, "default", name)
        for made in (deployment, service, account):
            owners = made["metadata"]["ownerReferences"]
            assert owners == [{"apiVersion": "gateway.networking.k8s.io/v1",
                               "kind": "Gateway", "name": "ingress", "uid": uid,
                               "controller": True}]
            assert made["metadata"]["labels"]["team"] == "shop"  # spec.infrastructure
            assert made["metadata"]["annotations"]["owner"] == "shop@example.com"
        assert service["spec"]["type"] == "LoadBalancer"
        assert [(p["name"], p["port"], p["targetPort"]) for p in service["spec"]["ports"]] \
            == [("http-80", 80, 80), ("https-443", 443, 443)]
        assert service["spec"]["selector"] == {GATEWAY_LABEL: "ingress"}
        pod = deployment["spec"]["template"]
        assert pod["metadata"]["labels"]["mesh.controlplane.io/inject"] == "false"
        assert pod["spec"]["serviceAccountName"] == name
        (envoy,) = pod["spec"]["containers"]
        assert envoy["command"] == ["envoy"] and envoy["args"][0] == "--config-yaml"
        assert "kind: gateway" in envoy["args"][1] and "gateway: ingress" in envoy["args"][1]
        assert {p["containerPort"] for p in envoy["ports"]} >= {80, 443}

        # Status: accepted; not yet programmed (no load balancer address); the HTTPS
        # listener without its Secret; the route attached to the HTTP listener.
        await until(lambda: conditions(listener(api, "ingress", "https")).get(
            "ResolvedRefs") == ("False", "InvalidCertificateRef"), "InvalidCertificateRef")
        status = api.get(GATEWAYS, "default", "ingress")["status"]
        top = conditions(status)
        assert top["Accepted"] == ("True", "Accepted")
        assert top["Programmed"] == ("False", "AddressNotAssigned")
        assert conditions(listener(api, "ingress", "http"))["ResolvedRefs"] == (
            "True", "ResolvedRefs")
        await until(lambda: listener(api, "ingress", "http").get("attachedRoutes") == 1,
                    "the HTTPRoute attached")
        assert listener(api, "ingress", "http")["supportedKinds"] == [
            {"group": "gateway.networking.k8s.io", "kind": "HTTPRoute"},
            {"group": "gateway.networking.k8s.io", "kind": "GRPCRoute"}]
        assert all(c["observedGeneration"] == 1 for c in status["conditions"])

        # A load balancer gives the Service an address (as a cloud controller would).
        lb = api.get(SERVICES, "default", name)
        lb["status"] = {"loadBalancer": {"ingress": [{"ip": "203.0.113.7"}]}}
        api.update_status(lb)
        await until(lambda: conditions(api.get(GATEWAYS, "default", "ingress")["status"])
                    .get("Programmed") == ("True", "Programmed"), "Programmed", timeout=30)
        assert api.get(GATEWAYS, "default", "ingress")["status"]["addresses"] == [
            {"type": "IPAddress", "value": "203.0.113.7"}]

        # The Secret appears: the listener resolves, and the mesh names the certificate.
        files = ca.server("shop", "shop.example.com")
        api.create(tls_secret("shop-cert", files))
        await until(lambda: conditions(listener(api, "ingress", "https")).get(
            "ResolvedRefs") == ("True", "ResolvedRefs"), "ResolvedRefs True")
        mesh = await mesh_where(feed, lambda m: bool(m.certificates))
        assert [(c.namespace, c.name, c.cert_file) for c in mesh.certificates] == [
            ("default", "shop-cert", None)]
        assert key_marker(files) not in repr(mesh.model_dump())

        # An edit bumps the generation; the conditions follow it.
        edited = api.get(GATEWAYS, "default", "ingress")
        edited["spec"]["listeners"][0]["port"] = 8080
        api.update(edited)
        await until(lambda: all(c["observedGeneration"] == 2 for c in api.get(
            GATEWAYS, "default", "ingress")["status"]["conditions"]), "generation 2")
        await until(lambda: [p["port"] for p in api.get(SERVICES, "default", name)["spec"][
            "ports"]] == [443, 8080], "the Service follows the listeners")

        # Deleted: its objects go with it (garbage collection, by ownerReferences).
        api.delete(GATEWAYS, "default", "ingress")
        for kind in (DEPLOYMENTS, SERVICES, SERVICE_ACCOUNTS):
            with pytest.raises(StatusError):
                api.get(kind, "default", name)
    finally:
        await feed.aclose()


async def test_secrets_are_watched_one_by_one(api: ApiServerDouble, tmp_path: Path) -> None:
    """The server reads only the Secrets certificateRefs name, each by a watch of its
    own name in its own namespace, never the cluster's Secrets."""
    ca = TestCA(tmp_path)
    api.create(gateway_class())
    api.create(tls_secret("unrelated", ca.server("other", "other.example.com")))
    api.create(gateway("ingress", [https_listener("https", 443, "shop-cert")],
                       annotations={SERVICE_TYPE_ANNOTATION: "ClusterIP"}))
    api.create(tls_secret("shop-cert", ca.server("shop", "shop.example.com")))
    feed = Feed(source(api, tmp_path).updates())
    try:
        # The first mesh already names it: its watch starts with that batch, and a
        # listener is not dropped while the Secret's first read is on its way.
        mesh: Mesh = await next_mesh(feed)
        assert [c.name for c in mesh.certificates] == ["shop-cert"]
        reads = await until(lambda: [r for r in api.requests if r.kind == SECRETS],
                            "the Secret's watch to reach the API")
        assert all(r.verb in ("list", "watch") for r in reads)
        assert {(r.namespace, r.query.get("fieldSelector")) for r in reads} == {
            ("default", "metadata.name=shop-cert")}
        # ClusterIP by annotation: the Gateway is programmed with the cluster IP.
        name = resource_name("ingress", "controlplane")
        ip = (await until(lambda: api.get(SERVICES, "default", name), "Service"))["spec"][
            "clusterIP"]
        await until(lambda: (api.get(GATEWAYS, "default", "ingress").get("status") or {})
                    .get("addresses") == [{"type": "IPAddress", "value": ip}], "address")
    finally:
        await feed.aclose()


# -- the pure parts -----------------------------------------------------------------------

def test_a_secret_that_cannot_serve_says_why_without_its_content(tmp_path: Path) -> None:
    ca = TestCA(tmp_path)
    files = ca.server("shop", "shop.example.com")
    other = ca.server("other", "other.example.com")
    good = tls_secret("shop-cert", files)
    pair, problem = parse_secret(good)
    assert pair is not None and problem == ""
    assert pair.chain_pem == files.cert.read_bytes()
    assert "key_pem" not in repr(pair)  # the key is left out of repr
    cases = {
        "opaque": ({**good, "type": "Opaque"}, "not 'kubernetes.io/tls'"),
        "no key": ({**good, "data": {"tls.crt": good["data"]["tls.crt"]}},
                   "data['tls.key'] is missing"),
        "not base64": ({**good, "data": {**good["data"], "tls.key": "%%%"}},
                       "data['tls.key'] is not base64"),
        "not pem": ({**good, "data": {**good["data"],
                                      "tls.crt": base64.b64encode(b"junk").decode()}},
                    "tls.crt holds no PEM certificate"),
        "mismatched": ({**good, "data": {**good["data"], "tls.key": base64.b64encode(
            other.key.read_bytes()).decode()}}, "not the key of the first certificate"),
    }
    for label, (secret, expected) in cases.items():
        pair, problem = parse_secret(secret)
        assert pair is None and expected in problem, (label, problem)
        for files_ in (files, other):
            assert key_marker(files_) not in problem


def test_desired_objects_are_named_bounded_and_hashed() -> None:
    obj = gateway("a" * 60, [HTTP], class_name="controlplane")
    obj["metadata"]["uid"] = "u-1"
    made = desired(obj, InjectConfig(), lambda ns, gw, config: f"bootstrap {ns}/{gw}")
    names = {o["metadata"]["name"] for _, o in made}
    (name,) = names
    assert len(name) <= 63 and name == resource_name("a" * 60, "controlplane")
    assert resource_name("a" * 60, "controlplane") != resource_name("a" * 60 + "b",
                                                                    "controlplane")
    hashes = [o["metadata"]["annotations"][HASH_ANNOTATION] for _, o in made]
    again = desired(obj, InjectConfig(), lambda ns, gw, config: f"bootstrap {ns}/{gw}")
    assert hashes == [o["metadata"]["annotations"][HASH_ANNOTATION] for _, o in again]
    bad = gateway("x", [HTTP], annotations={SERVICE_TYPE_ANNOTATION: "ExternalName"})
    with pytest.raises(NotDeployable, match=r'service-type"\]: .*LoadBalancer'):
        desired(bad, InjectConfig(), lambda ns, gw, config: "")


def test_only_our_gateways_and_their_tls_routes_enter_the_mesh() -> None:
    """GatewayClass controllerName decides; TLSRoutes to others' Gateways are not ours
    (TLSRouteSimpleSameNamespace's parent rules)."""
    classes = [gateway_class("controlplane"), gateway_class("other", "example.com/x")]
    ours = gateway("ours", [{"name": "tls", "port": 9443, "protocol": "TLS",
                             "tls": {"mode": "Passthrough"}}])
    theirs = gateway("theirs", [HTTP], class_name="other")
    invalid = gateway("bad", [HTTP, HTTP])  # two listeners named alike
    routes = [
        {"metadata": {"name": "db", "namespace": "default"},
         "spec": {"parentRefs": [{"name": "ours"}], "hostnames": ["db.example.com"],
                  "rules": [{"backendRefs": [{"name": "db", "port": 5432}]}]}},
        {"metadata": {"name": "elsewhere", "namespace": "default"},
         "spec": {"parentRefs": [{"name": "theirs"}],
                  "rules": [{"backendRefs": [{"name": "db", "port": 5432}]}]}},
    ]
    found = convert_gateways(classes, [ours, theirs, invalid], routes)
    assert [g["name"] for g in found.gateways] == ["ours"]
    assert set(found.objects) == {("default", "ours"), ("default", "bad")}
    assert "listeners[1].name" in found.verdicts[("default", "bad")].problem
    assert [r["name"] for r in found.tls_routes] == ["db"]
    assert GATEWAY_CONTROLLER in {c["spec"]["controllerName"] for c in found.classes.values()}


def test_the_examples_pass_the_schema_and_the_model() -> None:
    """deploy/kubernetes/examples/gateway*.yaml: stored as written (nothing pruned), the
    Gateway ours and valid, its Secret wanted, and its route naming it."""
    made = [example_gateway_class(), example_gateway(), example_gateway_route()]
    with ApiServerDouble() as double:
        stored = [double.create(copy.deepcopy(obj)) for obj in made]
    for obj, kept in zip(made[:2], stored[:2], strict=True):  # the route gets defaults
        assert kept["spec"] == obj["spec"] or kept["spec"]["listeners"][1]["tls"][
            "certificateRefs"][0]["group"] == "", obj["kind"]
    found = convert_gateways([stored[0]], [stored[1]], [])
    assert [g["name"] for g in found.gateways] == ["ingress"]
    assert not found.verdicts[("default", "ingress")].problem
    assert found.secrets == {("default", "shop-cert")}
    assert stored[2]["spec"]["parentRefs"][0]["name"] == "ingress"


async def test_a_deleted_deployment_is_put_back_and_tls_routes_get_status(
        api: ApiServerDouble, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Drift: someone deletes the gateway's Deployment; the next resync makes it again.
    TLSRouteSimpleSameNamespace: a TLSRoute to a Passthrough listener is Accepted with
    our controller's entry in status.parents, beside another controller's (kept)."""
    monkeypatch.setattr(gateway_controller, "RESYNC", 0.5)
    api.create(gateway_class())
    api.create(gateway("ingress", [{"name": "tls", "port": 9443, "protocol": "TLS",
                                    "tls": {"mode": "Passthrough"}}],
                       annotations={SERVICE_TYPE_ANNOTATION: "ClusterIP"}))
    route = tls_route("db", {"parentRefs": [{"name": "ingress", "sectionName": "tls"}],
                             "hostnames": ["db.example.com"],
                             "rules": [{"backendRefs": [{"name": "db", "port": 5432}]}]})
    created = api.create(route)
    other = {"parentRef": {"name": "edge", "group": "gateway.networking.k8s.io",
                           "kind": "Gateway"}, "controllerName": "example.com/x",
             "conditions": [{"type": "Accepted", "status": "True", "reason": "Accepted",
                             "message": "", "lastTransitionTime": "2026-01-01T00:00:00Z"}]}
    created["status"] = {"parents": [other]}
    api.update_status(created)
    feed = Feed(source(api, tmp_path).updates())
    name = resource_name("ingress", "controlplane")
    try:
        first = await until(lambda: api.get(DEPLOYMENTS, "default", name), "Deployment")
        parents = await until(lambda: len((api.get(TLS_ROUTES, "default", "db").get(
            "status") or {}).get("parents") or []) == 2 and api.get(
            TLS_ROUTES, "default", "db")["status"]["parents"], "the TLSRoute's parents")
        assert parents[0] == other
        ours = parents[1]
        assert ours["controllerName"] == GATEWAY_CONTROLLER
        assert ours["parentRef"]["name"] == "ingress"
        assert ours["parentRef"]["sectionName"] == "tls"
        assert conditions(ours)["Accepted"] == ("True", "Accepted")
        assert listener(api, "ingress", "tls")["attachedRoutes"] == 1
        await until(lambda: conditions(api.get(GATEWAYS, "default", "ingress")["status"])
                    .get("Programmed") == ("True", "Programmed"), "Programmed")
        # Resyncs (every 0.5 s here) read each object and write nothing unchanged.
        api.clear_requests()
        await asyncio.sleep(2.0)
        writes = [r for r in api.requests if r.verb in ("create", "update", "patch")]
        assert writes == []
        assert api.count("get", DEPLOYMENTS) >= 2
        api.delete(DEPLOYMENTS, "default", name)
        again = await until(lambda: api.get(DEPLOYMENTS, "default", name), "put back")
        assert again["metadata"]["uid"] != first["metadata"]["uid"]
        assert again["spec"] == first["spec"]
    finally:
        await feed.aclose()


def test_a_secret_in_another_namespace_needs_a_reference_grant() -> None:
    """GatewaySecretReferenceGrantAllInNamespace / ...Specific: a certificateRef into
    another namespace is read only when a ReferenceGrant there lets Gateways of the
    Gateway's namespace refer to that Secret (or to every Secret)."""
    listener = https_listener("https", 443, "shared-cert")
    listener["tls"]["certificateRefs"][0]["namespace"] = "certs"
    gw = gateway("ingress", [listener], namespace="shop")

    def grant(name: str | None, from_ns: str = "shop") -> Obj:
        to: Obj = {"group": "", "kind": "Secret", **({"name": name} if name else {})}
        return {"metadata": {"name": "g", "namespace": "certs"},
                "spec": {"from": [{"group": "gateway.networking.k8s.io", "kind": "Gateway",
                                   "namespace": from_ns}], "to": [to]}}

    classes = [gateway_class()]
    assert convert_gateways(classes, [gw], []).secrets == set()
    assert convert_gateways(classes, [gw], [], [grant(None, "elsewhere")]).secrets == set()
    assert convert_gateways(classes, [gw], [], [grant("other-cert")]).secrets == set()
    for allowed in (grant(None), grant("shared-cert")):
        assert convert_gateways(classes, [gw], [], [allowed]).secrets == {
            ("certs", "shared-cert")}


async def test_without_the_rolebinding_a_listener_says_which_to_apply(
        tmp_path: Path) -> None:
    """As shipped, the server may read no Secret of a Gateway's namespace until the
    example RoleBinding grants it there: the HTTPS listener is InvalidCertificateRef
    and its message gives the command; after the grant it is served."""
    api = ApiServerDouble(bookmark_interval=0.5).start()  # the shipped RBAC, no grant
    try:
        ca = TestCA(tmp_path)
        api.create(gateway_class())
        api.create(tls_secret("shop-cert", ca.server("shop", "shop.example.com")))
        api.create(gateway("ingress", [https_listener("https", 443, "shop-cert")],
                           annotations={SERVICE_TYPE_ANNOTATION: "ClusterIP"}))
        feed = Feed(source(api, tmp_path).updates())
        try:
            await until(lambda: conditions(listener(api, "ingress", "https")).get(
                "ResolvedRefs") == ("False", "InvalidCertificateRef"),
                "InvalidCertificateRef once the read is refused")
            https = listener(api, "ingress", "https")
            refs = {c["type"]: c for c in https["conditions"]}["ResolvedRefs"]
            assert ("kubectl create rolebinding controlplane-gateway-certificates "
                    "--namespace default") in refs["message"], refs["message"]
            assert api.count("get", SECRETS) + api.count("list", SECRETS) \
                + api.count("watch", SECRETS) > 0  # it asked, and was refused

            api.rbac = Rbac(roles=granted_certificates("default"))  # the binding applied
            await until(lambda: conditions(listener(api, "ingress", "https")).get(
                "ResolvedRefs") == ("True", "ResolvedRefs"), "served once granted",
                timeout=40)
        finally:
            await feed.aclose()
    finally:
        api.stop()
