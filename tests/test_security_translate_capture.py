"""Mesh mTLS through captured sidecars (iptables in network-namespace pods), as the
translator makes it: each Envoy's bootstrap holds its proxy's translation as static
resources and its identity's two secrets (tests/test_security_translate.py explains).

Pod ``client`` calls ``http://ratings:9080/`` (a cluster IP no process owns): its
sidecar catches the call and uses mTLS to the endpoint, since it has a sidecar; pod
``server``'s sidecar catches the connection inbound, takes the TLS chain of the target
port (destination port + TLS + the mesh ALPN, after the original destination is
restored) and the app sees the caller's SPIFFE ID. Pod ``outsider`` has no sidecar and
calls the endpoint in plaintext: permissive lets it in, strict closes it there (a chain
of its own, so the default passthrough chain never hands it to the app). A port of the
server pod that no service names passes through in either mode.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
import yaml

from controlplane.mesh import Mesh, load_mesh_data
from controlplane.mesh.security import MeshIdentity
from controlplane.proxy import ProxyIdentity
from controlplane.security.ca import CertificateAuthority
from controlplane.security.identity import SpiffeId
from controlplane.security.sds import secret_messages
from controlplane.translator import translate
from tests.support import pods
from tests.support.procs import http_get, wait_for
from tests.test_security_translate import TRUST, static_bootstrap

pytestmark = [
    pytest.mark.skipif(pods.capture_available() is not None,
                       reason=str(pods.capture_available())),
]

RATINGS_IP = "10.234.0.10"
APP_PORT = 8080
OTHER_PORT = 7000  # a port of the server pod that no service names
ADMIN_PORT = 15000  # capture leaves it alone: the test reads stats from the host

# The app in pod server: answers every GET with the request's headers as JSON.
APP = """
import http.server, json, sys
class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def do_GET(self):
        body = json.dumps({k.lower(): v for k, v in self.headers.items()}).encode()
        self.send_response(200)
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, *args):
        pass
http.server.ThreadingHTTPServer(("0.0.0.0", int(sys.argv[1])), Handler).serve_forever()
"""


def mesh_of(server: pods.Pod, mode: str) -> Mesh:
    return load_mesh_data({
        "security": {"mtls": {"mode": mode}},
        "services": [
            {"name": "ratings", "port": 9080, "cluster_ips": [RATINGS_IP],
             "service_accounts": ["ratings"],
             "endpoints": [{"address": server.address, "port": APP_PORT}]},
            {"name": "reviews", "port": 9080},
        ]}).model_copy(update={"identity": MeshIdentity(trust_domain=TRUST)})


class Pods:
    def __init__(self, network: pods.PodNetwork) -> None:
        self.network = network
        self.ca = CertificateAuthority.create(TRUST, datetime.now(UTC))
        self.client = network.pod("client", hosts={"ratings": RATINGS_IP})
        self.server = network.pod("server")
        self.outsider = network.pod("outsider")
        self.server.run([sys.executable, "-c", APP, str(APP_PORT)])
        self.server.serve_tcp(OTHER_PORT, name="other")  # speaks first: a greeting
        wait_for(lambda: self.outsider.http_get(
            f"http://{self.server.address}:{APP_PORT}/")[0] == 200, what="the app")
        self.server.capture()
        self.client.capture()

    def sidecar(self, pod: pods.Pod, mesh: Mesh, service: str) -> None:
        now = datetime.now(UTC)
        issued = self.ca.issue_workload(SpiffeId(TRUST, "default", service), now,
                                        timedelta(hours=1))
        proxy = ProxyIdentity(node_id=f"{pod.name}.default", service=service, capture=True)
        bootstrap = static_bootstrap(translate(mesh, proxy),
                                     list(secret_messages(issued, self.ca.bundle_pem)),
                                     admin_port=ADMIN_PORT, admin_address=pod.address)
        pod.envoy(yaml.safe_dump(bootstrap))
        wait_for(lambda: http_get(f"http://{pod.address}:{ADMIN_PORT}/ready")[0] == 200,
                 timeout=30, what=f"{pod.name}'s sidecar (log: {pod.envoy_log})")

    def stat(self, pod: pods.Pod, name: str) -> int:
        _, body, _ = http_get(f"http://{pod.address}:{ADMIN_PORT}/stats?filter=^"
                              + name.replace("|", "%7C") + "$")
        for line in body.splitlines():
            key, _, value = line.partition(": ")
            if key == name:
                return int(value)
        return 0


@pytest.fixture
def mesh_pods() -> Iterator[Pods]:
    with pods.PodNetwork() as network:
        yield Pods(network)


def _headers(body: str) -> dict[str, Any]:
    found: dict[str, Any] = json.loads(body)
    return found


@pytest.mark.parametrize("mode", ["permissive", "strict"])
def test_captured_sidecars_use_mesh_mtls_and_the_mode_decides_plaintext(
        mesh_pods: Pods, mode: str) -> None:
    mesh = mesh_of(mesh_pods.server, mode)
    mesh_pods.sidecar(mesh_pods.server, mesh, "ratings")
    mesh_pods.sidecar(mesh_pods.client, mesh, "reviews")

    status, body = mesh_pods.client.http_get("http://ratings:9080/")
    assert status == 200, body
    xfcc = _headers(body).get("x-forwarded-client-cert", "")
    assert f"URI=spiffe://{TRUST}/ns/default/sa/reviews" in xfcc, body
    assert mesh_pods.stat(mesh_pods.client, "cluster.outbound|9080||ratings.default.svc."
                          "cluster.local.ssl.handshake") >= 1

    status, body = mesh_pods.outsider.http_get(f"http://{mesh_pods.server.address}:{APP_PORT}/")
    if mode == "permissive":
        assert status == 200 and "x-forwarded-client-cert" not in _headers(body), body
    else:
        assert status == 0, body  # closed by the plaintext chain of the port, not passed

    # A port no service names passes through, whatever the mode, even to a client that
    # waits for the server to speak first (the TLS inspector gives up after 2 s).
    greeting = mesh_pods.outsider.tcp_connect(mesh_pods.server.address, OTHER_PORT)
    assert greeting.startswith("other "), greeting
