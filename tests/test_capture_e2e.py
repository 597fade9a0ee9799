"""Transparent capture end to end (issue 10, "How it is shown", first bullet): pods are
network namespaces on a bridge (tests/support/pods.py), each with a real app and a real
Envoy as UID 1337 whose traffic ``controlplane capture`` sends to it; the control plane
serves them from a mesh file on the bridge's gateway address.

Pod ``productpage`` calls ``http://reviews:9080/``: a name its hosts file resolves to a
cluster IP no process owns. Its sidecar catches the connection, routes it by Host (every
policy of reviews applied) to a pod behind reviews, whose sidecar catches it inbound and
hands it to the app from 127.0.0.6. So the app's answer names the caller it saw (the
sidecar's 127.0.0.6), and each sidecar's stats count the call.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from controlplane.bootstrap import capture_options, render_bootstrap
from tests.support import pods
from tests.support.files import write_atomic
from tests.support.procs import ControlPlane, end, http_get, wait_for

pytestmark = [
    pytest.mark.skipif(pods.available() is not None, reason=str(pods.available())),
    pytest.mark.xdist_group("capture_e2e"),  # one set of pods for the module's tests
]

REVIEWS_IP = "10.233.0.10"
ECHO_IP = "10.233.0.20"
GREETER_IP = "10.233.0.30"
PRODUCTPAGE_IP = "10.233.0.5"  # productpage's own service: its sidecar's inbound ports
REVIEWS = "outbound|9080||reviews.default.svc.cluster.local"
ECHO = "outbound|7000||echo.default.svc.cluster.local"
TCP_ECHO = str(Path(__file__).parent / "support" / "tcp_echo.py")

# The app behind reviews: answers "<name> <caller address>"; /flaky answers 503 to every
# other request it gets, /slow takes 1.5 s.
APP = """
import http.server, sys, threading, time
address, port, name = sys.argv[1], int(sys.argv[2]), sys.argv[3]
lock, count = threading.Lock(), [0]
class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def do_GET(self):
        status = 200
        if self.path.startswith("/flaky"):
            with lock:
                count[0] += 1
                status = 503 if count[0] % 2 else 200
        elif self.path.startswith("/slow"):
            time.sleep(1.5)
        body = f"{name} {self.client_address[0]}".encode()
        self.send_response(status)
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, *args):
        pass
http.server.ThreadingHTTPServer((address, port), Handler).serve_forever()
"""

# The app in pod productpage: N GETs of a URL, each on its own connection, no proxy
# from the environment; prints [[status, body, seconds], ...].
CLIENT = """
import json, sys, time, urllib.error, urllib.request
url, count = sys.argv[1], int(sys.argv[2])
opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
found = []
for _ in range(count):
    started = time.monotonic()
    try:
        with opener.open(url, timeout=10) as response:
            found.append([response.status, response.read().decode()])
    except urllib.error.HTTPError as exc:
        found.append([exc.code, exc.read().decode()])
    except OSError as exc:
        found.append([0, str(exc)])
    found[-1].append(round(time.monotonic() - started, 3))
print(json.dumps(found))
"""

# A TLS server (outside the mesh) that greets each client, and a client that sends a
# server name (SNI) and prints the greeting: only the real server's key can produce it.
TLS_SERVER = """
import socket, ssl, sys, threading
cert, key, port = sys.argv[1], sys.argv[2], int(sys.argv[3])
context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
context.load_cert_chain(cert, key)
listener = socket.create_server(("0.0.0.0", port))
def greet(conn):
    try:
        with context.wrap_socket(conn, server_side=True) as tls:
            tls.sendall(b"secure hello\\n")
    except OSError:
        pass
while True:
    conn, _ = listener.accept()
    threading.Thread(target=greet, args=(conn,), daemon=True).start()
"""
TLS_CLIENT = """
import socket, ssl, sys
host, port, name = sys.argv[1], int(sys.argv[2]), sys.argv[3]
context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
with socket.create_connection((host, port), timeout=5) as raw:
    with context.wrap_socket(raw, server_hostname=name) as tls:
        print(tls.recv(100).decode().strip())
"""

# A gRPC server answering "<name> <caller>" (raw bytes, no protobuf), and its client.
GRPC_SERVER = """
import sys, grpc
from concurrent import futures
name = sys.argv[1]
def say(request, context):
    return f"{name} {context.peer()}".encode()
handler = grpc.method_handlers_generic_handler(
    "e2e.Echo", {"Say": grpc.unary_unary_rpc_method_handler(say)})
server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
server.add_generic_rpc_handlers((handler,))
server.add_insecure_port("0.0.0.0:50051")
server.start()
server.wait_for_termination()
"""
GRPC_CLIENT = """
import sys, grpc
with grpc.insecure_channel(sys.argv[1]) as channel:
    print(channel.unary_unary("/e2e.Echo/Say")(b"hi", timeout=5).decode())
"""


def _certificate(directory: Path) -> tuple[Path, Path]:
    """A self-signed certificate for secure.example (the outside TLS server's)."""
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "secure.example")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(hours=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName("secure.example")]),
                           critical=False)
            .sign(key, hashes.SHA256()))
    cert_path, key_path = directory / "secure.crt", directory / "secure.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_path, key_path


@dataclass
class Mesh:
    """The pods, their sidecars and the control plane, for the module's tests."""

    network: pods.PodNetwork
    control: ControlPlane
    path: Path
    productpage: pods.Pod
    reviews: list[pods.Pod]
    echo: pods.Pod
    greeter: pods.Pod
    outside: pods.Pod
    envoys: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)

    def write(self, policy: str = "ALLOW_ANY", reviews_policy: str = "{}",
              extra: str = "") -> None:
        v1, v2 = self.reviews
        write_atomic(self.path, f"""outbound_traffic_policy: {policy}
services:
  - name: productpage
    port: 9080
    cluster_ips: [{PRODUCTPAGE_IP}]
    endpoints: [{{address: {self.productpage.address}, port: 9080}}]
  - name: reviews
    port: 9080
    cluster_ips: [{REVIEWS_IP}]
    endpoints:
      - {{address: {v1.address}, port: 9080, labels: {{version: v1}}}}
      - {{address: {v2.address}, port: 9080, labels: {{version: v2}}}}
    policy: {reviews_policy}
  - name: echo
    port: 7000
    protocol: tcp
    cluster_ips: [{ECHO_IP}]
    endpoints: [{{address: {self.echo.address}, port: 7000}}]
  - name: greeter
    port: 50051
    protocol: grpc
    cluster_ips: [{GREETER_IP}]
    endpoints: [{{address: {self.greeter.address}, port: 50051}}]
{extra}""")

    def listeners(self) -> str:
        """productpage's sidecar's listeners, as its admin dumps them."""
        return admin(self.productpage, "/config_dump?resource=dynamic_listeners")

    def reset(self) -> None:
        """Back to the first mesh (ALLOW_ANY, no policies), once productpage's sidecar
        has it: the next test starts from there."""
        self.write()
        wait_for(lambda: "registry-only" not in self.listeners(), timeout=20,
                 what="ALLOW_ANY again at productpage's sidecar")

    def sidecar(self, pod: pods.Pod, service: str, delta: bool = False) -> None:
        """A captured Envoy in ``pod``, its admin on the pod's address (port 15000, which
        capture leaves alone) so the test reads it from here; ready once it has its
        listeners from the control plane."""
        options = capture_options(f"{pod.name}.default", service, admin_address=pod.address,
                                  xds_address=f"{self.network.gateway}:{self.control.xds_port}",
                                  delta=delta)
        self.envoys[pod.name] = pod.envoy(render_bootstrap(options))
        wait_for(lambda: '"egress"' in admin(pod, "/listeners?format=json"), timeout=30,
                 what=f"listeners of {pod.name}'s sidecar (log: {pod.envoy_log})")

    def calls(self, url: str, count: int = 1,
              pod: pods.Pod | None = None) -> list[tuple[int, str, float]]:
        """``count`` GETs from the app in pod productpage (or ``pod``)."""
        run = (pod or self.productpage).call([sys.executable, "-c", CLIENT, url, str(count)],
                                             timeout=30 + 12 * count)
        assert run.returncode == 0, run.stderr
        return [(int(s), str(b), float(t)) for s, b, t in json.loads(run.stdout)]

    def call(self, url: str) -> tuple[int, str]:
        [(status, body, _)] = self.calls(url)
        return status, body


def admin(pod: pods.Pod, path: str) -> str:
    status, body, _ = http_get(f"http://{pod.address}:15000{path}", timeout=5)
    assert status == 200, body
    return body


def stat(pod: pods.Pod, name: str) -> int:
    """A counter of the pod's sidecar (0 while it does not exist)."""
    found: dict[str, Any] = json.loads(admin(pod, f"/stats?format=json&filter=^{_escape(name)}$"))
    values = [s.get("value", 0) for s in found.get("stats", []) if s.get("name") == name]
    return int(values[0]) if values else 0


def _escape(name: str) -> str:
    return "".join("\\" + c if c in ".|[]()" else c for c in name)


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mesh]:
    workdir = tmp_path_factory.mktemp("capture-e2e")
    with pods.PodNetwork() as network:
        outside = network.pod("outside")  # not in the mesh, no sidecar
        productpage = network.pod("productpage", hosts={
            "reviews": REVIEWS_IP, "echo": ECHO_IP, "outside": outside.address,
            "secure.example": outside.address,
            "weather": outside.address,  # an ExternalName's name: a CNAME in a cluster
            "greeter": GREETER_IP})
        reviews = [network.pod("reviews-v1"), network.pod("reviews-v2")]
        echo = network.pod("echo")
        greeter = network.pod("greeter")
        path = workdir / "mesh.yaml"
        control = ControlPlane(path, workdir, extra=["--xds-address", f"{network.gateway}:0"])
        found = Mesh(network, control, path, productpage, reviews, echo, greeter, outside)
        found.write()
        control.start()
        try:
            for pod in reviews:
                pod.run([sys.executable, "-c", APP, "0.0.0.0", "9080", pod.name])
            echo.run([sys.executable, TCP_ECHO, "0.0.0.0", "7000", "echo"])
            greeter.run([sys.executable, "-c", GRPC_SERVER, "greeter"])
            outside.run([sys.executable, "-c", APP, "0.0.0.0", "8080", "outside"])
            outside.run([sys.executable, TCP_ECHO, "0.0.0.0", "7000", "outside"])
            cert, key = _certificate(network.workdir)
            outside.run([sys.executable, "-c", TLS_SERVER, str(cert), str(key), "8443"])
            for pod, service in [(productpage, "productpage"), (reviews[0], "reviews"),
                                 (reviews[1], "reviews"), (echo, "echo"),
                                 (greeter, "greeter")]:
                pod.capture()
                found.sidecar(pod, service)
            wait_for(lambda: found.call("http://reviews:9080/")[0] == 200, timeout=30,
                     what="a first call from productpage to reviews")
            yield found
        finally:
            control.stop()


def test_a_call_by_name_reaches_reviews_through_both_sidecars(mesh: Mesh) -> None:
    before = stat(mesh.productpage, f"cluster.{REVIEWS}.upstream_rq_200")
    inbound = [stat(p, "http.inbound.downstream_rq_2xx") for p in mesh.reviews]
    status, body = mesh.call("http://reviews:9080/")
    assert status == 200, body
    name, caller = body.split()
    assert name in ("reviews-v1", "reviews-v2")
    assert caller == "127.0.0.6"  # the app was called by its own sidecar, inbound
    assert stat(mesh.productpage, f"cluster.{REVIEWS}.upstream_rq_200") == before + 1
    after = [stat(p, "http.inbound.downstream_rq_2xx") for p in mesh.reviews]
    assert sum(after) == sum(inbound) + 1
    # The cluster IP itself, as an app that has the address rather than the name
    assert mesh.call(f"http://{REVIEWS_IP}:9080/")[0] == 200


def test_a_sidecar_speaking_delta_xds_is_captured_alike(mesh: Mesh) -> None:
    pod = mesh.network.pod("productpage-delta", hosts={"reviews": REVIEWS_IP})
    pod.capture()
    mesh.sidecar(pod, "productpage", delta=True)
    [(status, body, _)] = mesh.calls("http://reviews:9080/", pod=pod)
    assert status == 200 and body.split()[1] == "127.0.0.6", body
    assert stat(pod, f"cluster.{REVIEWS}.upstream_rq_200") == 1


def test_an_app_calling_15001_with_a_host_header_still_works(mesh: Mesh) -> None:
    script = ("import urllib.request as u; o = u.build_opener(u.ProxyHandler({}));"
              "r = u.Request('http://127.0.0.1:15001/', headers={'Host': 'reviews'});"
              "print(o.open(r, timeout=5).read().decode())")
    run = mesh.productpage.call([sys.executable, "-c", script])
    assert run.returncode == 0, run.stderr
    assert run.stdout.split()[0] in ("reviews-v1", "reviews-v2")


def test_retries_a_timeout_and_a_split_apply_to_captured_calls(mesh: Mesh) -> None:
    flaky = [s for s, _, _ in mesh.calls("http://reviews:9080/flaky", 6)]
    assert 503 in flaky  # without a policy, every other answer of each pod fails
    retried = stat(mesh.productpage, f"cluster.{REVIEWS}.upstream_rq_retry")
    mesh.write(reviews_policy="{retries: {attempts: 3, on: [5xx]}, timeout: 500ms}")
    wait_for(lambda: mesh.calls("http://reviews:9080/slow")[0][0] == 504, timeout=20,
             what="the timeout policy at productpage's sidecar")
    [(status, body, seconds)] = mesh.calls("http://reviews:9080/slow")
    assert status == 504 and "upstream request timeout" in body and seconds < 1.4
    answers = mesh.calls("http://reviews:9080/flaky", 10)
    assert [s for s, _, _ in answers] == [200] * 10
    assert stat(mesh.productpage, f"cluster.{REVIEWS}.upstream_rq_retry") > retried

    mesh.write(reviews_policy="{split: [{labels: {version: v1}, weight: 90}, "
                              "{labels: {version: v2}, weight: 10}]}")
    wait_for(lambda: "weighted_clusters" in admin(mesh.productpage, "/config_dump"),
             timeout=20, what="the split at productpage's sidecar")
    names = Counter(body.split()[0] for _, body, _ in mesh.calls("http://reviews:9080/", 200))
    assert names["reviews-v1"] + names["reviews-v2"] == 200
    assert 150 <= names["reviews-v1"] <= 197, names  # 90/10: v2 gets some, v1 most
    mesh.write()


def test_inbound_policies_apply_to_callers_outside_the_mesh(mesh: Mesh) -> None:
    """The pod outside the mesh has no sidecar and calls a reviews pod by its address:
    the call still enters through that pod's sidecar, whose own bucket limits it."""
    v1 = mesh.reviews[0]
    url = f"http://{v1.address}:9080/"
    [(status, body, _)] = mesh.calls(url, pod=mesh.outside)
    assert (status, body.split()[1]) == (200, "127.0.0.6")  # through v1's sidecar
    mesh.write(reviews_policy="{rate_limit: {requests_per_second: 0.5, burst: 2}}")
    try:
        wait_for(lambda: 429 in [s for s, _, _ in mesh.calls(url, 4, pod=mesh.outside)],
                 timeout=20, what="the rate limit at reviews-v1's inbound")
        assert stat(v1, "inbound_rate_limit.http_local_rate_limit.rate_limited") > 0
    finally:
        mesh.write()


def test_grpc_by_name_goes_through_both_sidecars_over_http2(mesh: Mesh) -> None:
    before = stat(mesh.greeter, "http.inbound.downstream_rq_2xx")
    # gRPC's own resolver reads no hosts file; the system's does, as in a cluster's DNS
    run = mesh.productpage.call(["env", "GRPC_DNS_RESOLVER=native", sys.executable, "-c",
                                 GRPC_CLIENT, "greeter:50051"])
    assert run.returncode == 0, run.stderr
    name, peer = run.stdout.split()
    assert name == "greeter" and peer.startswith("ipv4:127.0.0.6:")  # its own sidecar's
    assert stat(mesh.productpage, "cluster.outbound|50051||greeter.default.svc.cluster.local"
                                  ".upstream_rq_200") >= 1
    assert stat(mesh.greeter, "http.inbound.downstream_rq_2xx") == before + 1


def test_a_tcp_service_works_through_its_cluster_ip(mesh: Mesh) -> None:
    before = stat(mesh.productpage, f"cluster.{ECHO}.upstream_cx_total")
    run = mesh.productpage.call([sys.executable, TCP_ECHO, "connect", "echo", "7000",
                                 "--send", "hello"])
    assert run.returncode == 0, run.stderr
    name, _original, local, peer = run.stdout.splitlines()[0].split()
    assert name == "echo" and local == f"{mesh.echo.address}:7000"
    assert peer.startswith("127.0.0.6:")  # handed over by echo's own sidecar
    assert stat(mesh.productpage, f"cluster.{ECHO}.upstream_cx_total") == before + 1
    assert stat(mesh.echo, "cluster.inbound|7000||echo.default.svc.cluster.local"
                           ".upstream_cx_total") >= 1


def test_outside_the_mesh_passes_under_allow_any_and_is_refused_under_registry_only(
        mesh: Mesh) -> None:
    passed = stat(mesh.productpage, "cluster.passthrough.upstream_cx_total")
    status, body = mesh.call("http://outside:8080/")
    assert (status, body.split()[0]) == (200, "outside")
    assert body.split()[1] == mesh.productpage.address  # untouched: from the pod itself
    assert stat(mesh.productpage, "cluster.passthrough.upstream_cx_total") == passed + 1
    tcp = [sys.executable, TCP_ECHO, "connect", "outside", "7000", "--send", "hi"]
    assert mesh.productpage.call(tcp).stdout.startswith("outside ")

    # An ExternalName service (here the outside pod by its host name) is in the mesh:
    # under REGISTRY_ONLY, HTTP to it is told apart by its Host and let through.
    mesh.write(policy="REGISTRY_ONLY", extra="  - {name: weather, port: 8080, "
                                             "external_name: outside}\n")
    try:
        wait_for(lambda: mesh.call(f"http://{mesh.outside.address}:8080/")[0] == 502,
                 timeout=20, what="REGISTRY_ONLY at productpage's sidecar")
        status, body = mesh.call(f"http://{mesh.outside.address}:8080/")
        assert status == 502 and "REGISTRY_ONLY" in body and "ALLOW_ANY" in body
        for url in ("http://outside:8080/", "http://weather:8080/"):  # its host, its name
            status, body = mesh.call(url)
            assert (status, body.split()[0]) == (200, "outside"), url
        refused = mesh.productpage.call(tcp)
        assert refused.returncode == 1 and refused.stdout == ""  # closed: no echo, no banner
        assert "closed with no reply" in refused.stderr or "reset" in refused.stderr
        assert mesh.call("http://reviews:9080/")[0] == 200  # the mesh's services still work
    finally:
        mesh.reset()
    assert mesh.call("http://outside:8080/")[0] == 200


def test_tls_to_an_outside_host_passes_untouched_and_registry_only_lets_its_sni_through(
        mesh: Mesh) -> None:
    """HTTPS outside the mesh: the sidecar never terminates it (it has no key: the
    greeting can only come from the server itself). Under REGISTRY_ONLY, an ExternalName
    service for that host lets TLS with its server name through, and nothing else."""
    def hello(name: str) -> str:
        run = mesh.productpage.call([sys.executable, "-c", TLS_CLIENT, "secure.example",
                                     "8443", name])
        return run.stdout.strip() if run.returncode == 0 else f"failed: {run.stderr[-200:]}"

    passed = stat(mesh.productpage, "cluster.passthrough.upstream_cx_total")
    assert hello("secure.example") == "secure hello"
    assert stat(mesh.productpage, "cluster.passthrough.upstream_cx_total") == passed + 1
    mesh.write(policy="REGISTRY_ONLY", extra="  - {name: secure, port: 8443, protocol: tls, "
                                             "external_name: secure.example}\n")
    try:
        wait_for(lambda: hello("other.example").startswith("failed"), timeout=20,
                 what="REGISTRY_ONLY at productpage's sidecar")
        assert hello("secure.example") == "secure hello"  # its SNI is in the mesh
        assert stat(mesh.productpage, "cluster.outbound|8443||secure.default.svc.cluster.local"
                                      ".upstream_cx_total") >= 1
    finally:
        mesh.reset()


def test_a_headless_service_reaches_the_pod_its_caller_chose(mesh: Mesh) -> None:
    """No cluster IP: callers dial a pod's own address (a StatefulSet member, say). The
    sidecar knows the address as the service's, so REGISTRY_ONLY lets it through, to
    that very pod (through the pod's own sidecar)."""
    mesh.write(policy="REGISTRY_ONLY", extra=f"  - {{name: db, port: 7000, protocol: tcp, "
               f"endpoints: [{{address: {mesh.echo.address}, port: 7000}}]}}\n")
    try:
        wait_for(lambda: "db.default.svc.cluster.local" in mesh.listeners(), timeout=20,
                 what="db's chain at productpage's sidecar")
        outside = [sys.executable, TCP_ECHO, "connect", "outside", "7000", "--send", "hi"]
        assert mesh.productpage.call(outside).returncode == 1  # REGISTRY_ONLY
        run = mesh.productpage.call([sys.executable, TCP_ECHO, "connect", mesh.echo.address,
                                     "7000", "--send", "hi"])
        assert run.returncode == 0, run.stderr
        name, _original, local, peer = run.stdout.splitlines()[0].split()
        assert (name, local) == ("echo", f"{mesh.echo.address}:7000")
        assert peer.startswith("127.0.0.6:")
        assert stat(mesh.productpage, "tcp.outbound|7000||db.default.svc.cluster.local"
                                      ".downstream_cx_total") == 1
    finally:
        mesh.reset()


def test_the_sidecars_own_connections_are_not_captured(mesh: Mesh) -> None:
    """Were productpage's Envoy (UID 1337) captured, its upstream connection would come
    back to its own 15001 (a loop, growing until the call times out): five calls are
    five connections to the listener, each answered at once."""
    accepted = "listener.0.0.0.0_15001.downstream_cx_total"
    before = stat(mesh.productpage, accepted)
    answers = mesh.calls("http://outside:8080/", 5)
    assert [s for s, _, _ in answers] == [200] * 5
    assert all(seconds < 2 for _, _, seconds in answers)
    assert stat(mesh.productpage, accepted) == before + 5


def test_with_the_sidecar_stopped_the_same_call_fails(mesh: Mesh) -> None:
    """Capture is real: nothing but the sidecar can reach a cluster IP."""
    pod = mesh.productpage
    end(mesh.envoys.pop(pod.name))
    try:
        status, error = mesh.call("http://reviews:9080/")
        assert status == 0 and "refused" in error.lower(), error
    finally:
        mesh.sidecar(pod, "productpage")
    wait_for(lambda: mesh.call("http://reviews:9080/")[0] == 200, timeout=30,
             what="productpage's new sidecar")
