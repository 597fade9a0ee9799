"""Zero trust between captured sidecars (issue 11 in issue 10's transparent mode): pods
are network namespaces (tests/support/pods.py) whose apps call each other by name while
iptables hands every connection to their sidecars. Each sidecar's xDS stream is TLS to
the control plane (``serve --ca-dir``, on the pods' gateway) with a token minted for its
pod's identity.

So mesh mTLS, the caller's SPIFFE ID and authorization are exercised on the captured
inbound listener (15006) and the captured outbound chains, not only on the explicit
ports: reviews -> ratings 200 (the app sees reviews' SPIFFE ID), frontend -> ratings 403,
a plaintext client outside the mesh refused by the strict port, and a TCP service whose
deny rule cuts frontend off while reviews gets its echo. frontend's sidecar speaks delta,
the others SotW.
"""

from __future__ import annotations

import datetime
import json
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from controlplane.bootstrap import capture_options, render_bootstrap
from controlplane.security import tokens
from controlplane.security.castore import load_dir
from controlplane.security.identity import SpiffeId
from tests.support import pods
from tests.support.files import write_atomic
from tests.support.procs import ControlPlane, http_get, wait_for
from tests.support.secure import TRUST_DOMAIN, spiffe
from tests.test_capture_e2e import GRPC_SERVER

pytestmark = [
    pytest.mark.e2e, pytest.mark.timeout(180),
    pytest.mark.skipif(pods.capture_available() is not None,
                       reason=str(pods.capture_available())),
    pytest.mark.xdist_group("security_capture_e2e"),  # one set of pods for the module
]

RATINGS_IP = "10.233.0.40"
STORE_IP = "10.233.0.41"
GREETER_IP = "10.233.0.42"
TCP_ECHO = str(Path(__file__).parent / "support" / "tcp_echo.py")

# The app behind ratings: answers JSON with its name and the request headers it got.
APP = """
import http.server, json, sys
class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def do_GET(self):
        body = json.dumps({"backend": sys.argv[1],
                           "headers": {k.lower(): v for k, v in self.headers.items()}}).encode()
        self.send_response(200)
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, *args):
        pass
http.server.ThreadingHTTPServer(("0.0.0.0", 9080), Handler).serve_forever()
"""

# A gRPC client: the answer, or the status code's name when the call fails.
GRPC_CALL = """
import sys, grpc
with grpc.insecure_channel(sys.argv[1]) as channel:
    try:
        print(channel.unary_unary("/e2e.Echo/Say")(b"hi", timeout=5).decode())
    except grpc.RpcError as exc:
        print(exc.code().name, exc.details())
"""


@dataclass
class Mesh:
    network: pods.PodNetwork
    control: ControlPlane
    path: Path
    ca_dir: Path
    pods: dict[str, pods.Pod]
    envoys: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)

    def write(self) -> None:
        ratings, store, greeter = self.pods["ratings"], self.pods["store"], self.pods["greeter"]
        write_atomic(self.path, f"""services:
  - name: ratings
    port: 9080
    cluster_ips: [{RATINGS_IP}]
    service_accounts: [ratings]
    endpoints: [{{address: {ratings.address}, port: 9080, service_account: ratings}}]
    security:
      mtls: {{mode: strict}}
      authorization:
        - name: allow-reviews
          from: [{{principals: ["{spiffe('reviews')}"]}}]
  - name: store
    port: 7000
    protocol: tcp
    cluster_ips: [{STORE_IP}]
    service_accounts: [store]
    endpoints: [{{address: {store.address}, port: 7000, service_account: store}}]
    security:
      mtls: {{mode: strict}}
      authorization:
        - name: deny-frontend
          action: deny
          from: [{{service_accounts: [default/frontend]}}]
  - name: greeter
    port: 50051
    protocol: grpc
    cluster_ips: [{GREETER_IP}]
    service_accounts: [greeter]
    endpoints: [{{address: {greeter.address}, port: 50051, service_account: greeter}}]
    security:
      mtls: {{mode: strict}}
      authorization:
        - name: allow-reviews
          from: [{{service_accounts: [default/reviews]}}]
""")

    def sidecar(self, name: str, delta: bool) -> None:
        """A captured Envoy in pod ``name`` (service and ServiceAccount ``name``): xDS
        over TLS to the gateway, a token minted for it, readable by Envoy's UID."""
        pod = self.pods[name]
        node_id = f"{name}.default"
        ca = load_dir(self.ca_dir, TRUST_DOMAIN, datetime.datetime.now(datetime.UTC),
                      create=False)
        token = self.network.workdir / f"{name}.token"
        token.write_text(tokens.mint(ca, SpiffeId(TRUST_DOMAIN, "default", name), node_id,
                                     datetime.datetime.now(datetime.UTC),
                                     datetime.timedelta(hours=1)))
        token.chmod(0o644)
        options = capture_options(
            node_id, name, admin_address=pod.address, delta=delta, service_account=name,
            xds_address=f"{self.network.gateway}:{self.control.xds_port}",
            xds_ca=ca.bundle_pem.decode(), token_file=str(token))
        self.envoys[name] = pod.envoy(render_bootstrap(options))
        wait_for(lambda: '"egress"' in admin(pod, "/listeners?format=json"), timeout=30,
                 what=f"listeners of {name}'s sidecar (log: {pod.envoy_log})")


def admin(pod: pods.Pod, path: str) -> str:
    status, body, _ = http_get(f"http://{pod.address}:15000{path}", timeout=5)
    assert status == 200, body
    return body


def rbac_denials(pod: pods.Pod) -> int:
    found = json.loads(admin(pod, "/stats?format=json&filter=rbac"))
    return sum(int(s.get("value", 0)) for s in found.get("stats", [])
               if "denied" in s.get("name", "") and "shadow" not in s.get("name", ""))


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mesh]:
    workdir = tmp_path_factory.mktemp("security-capture")
    with pods.PodNetwork() as network:
        hosts = {"ratings": RATINGS_IP, "store": STORE_IP, "greeter": GREETER_IP}
        found_pods = {name: network.pod(name, hosts=hosts) for name in
                      ("frontend", "reviews", "ratings", "store", "greeter", "outside")}
        path, ca_dir = workdir / "mesh.yaml", workdir / "ca"
        control = ControlPlane(path, workdir, extra=[
            "--xds-address", f"{network.gateway}:0", "--ca-dir", str(ca_dir)])
        found = Mesh(network, control, path, ca_dir, found_pods)
        found.write()
        control.start()
        try:
            found_pods["ratings"].run([sys.executable, "-c", APP, "ratings"])
            found_pods["store"].run([sys.executable, TCP_ECHO, "0.0.0.0", "7000"])  # echo
            found_pods["greeter"].run([sys.executable, "-c", GRPC_SERVER, "greeter"])
            for name in ("ratings", "store", "greeter", "reviews", "frontend"):
                found_pods[name].capture()
                found.sidecar(name, delta=name == "frontend")
            reviews = found_pods["reviews"]
            wait_for(lambda: reviews.http_get("http://ratings:9080/")[0] == 200, timeout=40,
                     what="a first call from reviews to ratings")
            yield found
        finally:
            control.stop()


def test_captured_sidecars_speak_mtls_and_the_app_sees_the_caller(mesh: Mesh) -> None:
    status, body = mesh.pods["reviews"].http_get("http://ratings:9080/")
    assert status == 200, body
    xfcc = json.loads(body)["headers"].get("x-forwarded-client-cert", "")
    assert f"URI={spiffe('reviews')}" in xfcc, xfcc
    assert f"By={spiffe('ratings')}" in xfcc, xfcc


def test_captured_inbound_refuses_plaintext_when_strict(mesh: Mesh) -> None:
    """A pod without a sidecar calls ratings' pod directly, in plaintext: the strict
    captured inbound listener has no chain for it."""
    ratings = mesh.pods["ratings"]
    status, error = mesh.pods["outside"].http_get(f"http://{ratings.address}:9080/")
    assert status == 0, error


def test_captured_authorization_denies_frontend_with_a_403(mesh: Mesh) -> None:
    before = rbac_denials(mesh.pods["ratings"])
    status, body = mesh.pods["frontend"].http_get("http://ratings:9080/")
    assert status == 403, body
    assert "ratings" in body, body
    assert rbac_denials(mesh.pods["ratings"]) > before


def test_captured_tcp_deny_closes_frontends_connection(mesh: Mesh) -> None:
    """store (a plain echo) denies frontend's ServiceAccount: reviews gets its echo
    through both sidecars; frontend's connection is closed with no reply."""
    assert mesh.pods["reviews"].tcp_connect("store", 7000, send="hello") == "hello"
    before = rbac_denials(mesh.pods["store"])
    answer = mesh.pods["frontend"].tcp_connect("store", 7000, send="secret")
    assert answer.startswith("error") and "secret" not in answer, answer
    wait_for(lambda: rbac_denials(mesh.pods["store"]) > before, timeout=5,
             what="store's sidecar to count the denial")


def test_captured_grpc_over_mtls_and_its_denial_is_permission_denied(mesh: Mesh) -> None:
    """gRPC (HTTP/2) between sidecars over mesh mTLS: reviews is answered by greeter;
    frontend's call is denied by greeter's policy, which a gRPC client reads as
    PERMISSION_DENIED."""
    def grpc_call(pod: str) -> str:
        run = mesh.pods[pod].call([sys.executable, "-c", GRPC_CALL, "greeter:50051"],
                                  timeout=30)
        assert run.returncode == 0, run.stderr
        return run.stdout.strip()

    answer = wait_for(lambda: (found := grpc_call("reviews")).startswith("greeter ") and found,
                      timeout=20, what="reviews' gRPC call to greeter")
    assert answer.startswith("greeter ipv4:127.0.0.6:"), answer  # via greeter's sidecar
    denied = grpc_call("frontend")
    assert denied.startswith("PERMISSION_DENIED"), denied
