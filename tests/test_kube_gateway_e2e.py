"""A Gateway from Kubernetes, end to end: ``serve --source kubernetes`` against the API
server double makes the Gateway's Deployment; its Envoy is started in a test pod (a
network namespace) exactly as the Deployment says, ``$(VAR)``s expanded from the downward
API as the kubelet does; it serves the Gateway's HTTPS listener with the certificate of a
``kubernetes.io/tls`` Secret and routes a real TLS request, by an HTTPRoute, to a real
backend pod behind a Service. The Secret's key shows in no log, no /debug page and no
CSDS answer or stored snapshot, and a sidecar's stream never gets it.

Follows the Gateway API conformance tests HTTPRouteHTTPSListener and
GatewaySecretReferenceGrantSpecific's same-namespace case (a listener's certificate
from a Secret), with HTTPRouteHostnameIntersection's listener hostname.
"""

from __future__ import annotations

import http.client
import json
import socket
import ssl
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from envoy.service.status.v3 import csds_pb2, csds_pb2_grpc

from controlplane.lab.envoy import find_envoy
from controlplane.sources.kubernetes.deployer import resource_name
from controlplane.sources.kubernetes.kinds import DEPLOYMENTS, GATEWAYS, HTTP_ROUTES
from tests.kube.apiserver import ApiServerDouble, StatusError
from tests.kube.objects import endpoint_slice, http_route, service
from tests.kube.rbac import Rbac, granted_certificates
from tests.support import pods
from tests.support.gateway_certs import TestCA, key_marker
from tests.support.kube_gateways import gateway, gateway_class, https_listener, tls_secret
from tests.support.procs import ControlPlane, Envoy, free_port, http_get, wait_for
from tests.test_inject_pods import NAMED_HTTP, expand

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(180),
              pytest.mark.skipif(pods.available() is not None,
                                 reason=f"test pods: {pods.available()}")]

HOST = "shop.example.com"
LISTENER_PORT = 8443
WEB_PORT = 8080


@pytest.fixture
def network() -> Iterator[pods.PodNetwork]:
    with pods.PodNetwork() as made:
        yield made


def https_get(address: str, port: int, context: ssl.SSLContext) -> tuple[int, str]:
    """GET / over TLS with SNI ``HOST`` (the client verifies the certificate for it)."""
    raw = socket.create_connection((address, port), timeout=5)
    tls = context.wrap_socket(raw, server_hostname=HOST)
    conn = http.client.HTTPConnection(HOST, port, timeout=5)
    conn.sock = tls
    try:
        conn.request("GET", "/", headers={"Host": HOST})
        response = conn.getresponse()
        return response.status, response.read().decode()
    finally:
        conn.close()


def csds_dump(port: int) -> str:
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = csds_pb2_grpc.ClientStatusDiscoveryServiceStub(channel)
        answer = stub.FetchClientStatus(csds_pb2.ClientStatusRequest(), timeout=10)
    return str(answer)


def run_pod(pod: pods.Pod, deployment: dict[str, Any], pod_name: str) -> Path:
    """The Deployment's pod as the kubelet runs it: its one container, its command and
    args with ``$(VAR)`` expanded from the downward API, as its runAsUser."""
    template = deployment["spec"]["template"]
    (container,) = template["spec"]["containers"]
    env = {"POD_NAME": pod_name, "POD_NAMESPACE": deployment["metadata"]["namespace"],
           "SERVICE_ACCOUNT": template["spec"]["serviceAccountName"],
           "INSTANCE_IP": pod.address}
    for item in container["env"]:
        assert item["name"] in env, f"downward API {item} not simulated"
    words = [expand(word, env) for word in container["command"] + container["args"]]
    assert words[0] == "envoy"
    log = pod.network.workdir / f"{pod.name}-gateway.log"
    with open(log, "ab") as out:
        pod.run([find_envoy(), *words[1:], "--concurrency", "1"],
                uid=container["securityContext"]["runAsUser"], stdout=out,
                stderr=out)
    probe = container["readinessProbe"]["httpGet"]
    wait_for(lambda: _status(f"http://{pod.address}:{probe['port']}{probe['path']}") == 200,
             timeout=60, what=f"the gateway's readiness probe; its log: {log}")
    return log


def gateway_server(api: ApiServerDouble, network: pods.PodNetwork,
                   tmp_path: Path) -> ControlPlane:
    """``serve`` against ``api`` (not started), xDS on a free port on every address: the
    gateway pods are told to dial it at the network's gateway address."""
    xds_port = free_port()
    return ControlPlane("kubernetes", tmp_path, xds_port=xds_port, extra=[
        "--kubeconfig", str(api.kubeconfig(tmp_path / "kubeconfig")),
        "--authentication", "none", "--xds-address", f"0.0.0.0:{xds_port}",
        "--inject-xds-address", f"{network.gateway}:{xds_port}"],
        env={"CONTROLPLANE_DEBOUNCE_QUIET": "0.1", "CONTROLPLANE_DEBOUNCE_MAX": "2"})

def _status(url: str) -> int | None:
    try:
        return http_get(url, timeout=3)[0]
    except OSError:
        return None


def test_a_kubernetes_gateway_serves_https_with_a_secret(network: pods.PodNetwork,
                                                         tmp_path: Path) -> None:
    web = network.pod("web")
    gw = network.pod("gateway")
    web.run([sys.executable, NAMED_HTTP, "0.0.0.0", str(WEB_PORT), "web"])
    wait_for(lambda: _status(f"http://{web.address}:{WEB_PORT}/") == 200, what="web")
    ca = TestCA(tmp_path)
    files = ca.server("shop", HOST)
    marker = key_marker(files)

    # The example RoleBinding applied in "default": the server may read its Secrets.
    api = ApiServerDouble(bookmark_interval=0.5,
                          rbac=Rbac(roles=granted_certificates("default"))).start()
    server = gateway_server(api, network, tmp_path)
    xds_port = server.xds_port
    sidecar: Envoy | None = None
    try:
        api.create(service("web").port(WEB_PORT, name="http").build())
        api.create(endpoint_slice("web-abc", service="web").endpoint(web.address)
                   .port(WEB_PORT, name="http").build())
        api.create(gateway_class())
        api.create(gateway("ingress", [https_listener("https", LISTENER_PORT, "shop-cert",
                                                      HOST)]))
        api.create(http_route("shop", {
            "parentRefs": [{"name": "ingress"}], "hostnames": [HOST],
            "rules": [{"backendRefs": [{"name": "web", "port": WEB_PORT}]}]}))
        api.create(tls_secret("shop-cert", files))
        server.start()

        name = resource_name("ingress", "controlplane")
        deployment = wait_for(lambda: _get(api, DEPLOYMENTS, name), timeout=30,
                              what="the Gateway's Deployment")
        gateway_log = run_pod(gw, deployment, f"{name}-5d8c7b9f4-k2x7q")

        # A real TLS request through the gateway: the certificate from the Secret (the
        # client checks it against the test CA and the host name), routed to web.
        context = ca.client_context()
        answer = wait_for(lambda: _try(lambda: https_get(gw.address, LISTENER_PORT, context)),
                          timeout=30, what="HTTPS through the gateway")
        assert answer == (200, "web")

        # Status as the Gateway API defines it.
        status = api.get(GATEWAYS, "default", "ingress")["status"]
        (listener,) = status["listeners"]
        found = {c["type"]: c["status"] for c in listener["conditions"]}
        assert found["ResolvedRefs"] == "True" and found["Programmed"] == "True"
        assert listener["attachedRoutes"] == 1
        parents = wait_for(lambda: (api.get(HTTP_ROUTES, "default", "shop").get("status")
                                    or {}).get("parents"), what="the HTTPRoute's status")
        assert {c["type"]: c["status"] for c in parents[0]["conditions"]}["Accepted"] == "True"

        # The key: on the gateway's stream only. A sidecar (another group) gets none.
        sidecar = Envoy(tmp_path, "frontend-1", "frontend", xds_port).start()
        wait_for(lambda: len(server.json("/debug/proxies")) >= 2, what="both proxies")
        for path in ("/debug/config_dump?node=frontend-1", "/debug/proxies",
                     f"/debug/config_dump?node={name}-5d8c7b9f4-k2x7q.default"):
            text = json.dumps(server.json(path))
            assert marker not in text, path
        sidecar_dump = json.dumps(server.json("/debug/config_dump?node=frontend-1"))
        assert "shop-cert" not in sidecar_dump
        _, secrets, _ = sidecar.admin("/config_dump?resource=dynamic_active_secrets")
        assert "shop-cert" not in secrets
        assert marker not in csds_dump(xds_port)
        stored = [p for p in (tmp_path / "snapshots").rglob("*") if p.is_file()]
        assert stored, "the snapshot store wrote nothing"
        assert not [p for p in stored if marker.encode() in p.read_bytes()]
        assert marker not in server.log_path.read_text()
        assert marker not in gateway_log.read_text()
    finally:
        if sidecar is not None:
            sidecar.stop()
        server.stop()
        api.stop()


def _get(api: ApiServerDouble, kind: Any, name: str) -> dict[str, Any] | None:
    try:
        return api.get(kind, "default", name)
    except StatusError:
        return None


def _try(call: Any) -> Any:
    try:
        return call()
    except (OSError, ssl.SSLError, http.client.HTTPException):
        return None
