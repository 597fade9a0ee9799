"""Egress over TCP and TLS to services outside the mesh, end to end (issue 13 item 3).

Pods are network namespaces (tests/support/pods.py). Outside the mesh: pod ``api`` and pod
``pay`` serve HTTPS on 443 with certificates for ``api.example.test`` and
``pay.example.test`` from a test CA, pod ``db`` a TCP "database" on 5432
(tests/support/tcp_echo.py). The mesh knows them only as external names
(``protocol: tls`` and ``tcp``). The client pods' hosts files map those names to the pods'
addresses: ``ip netns exec`` mounts the file over /etc/hosts, where the app and the
sidecar's Envoy both look (Envoy's default c-ares resolver reads /etc/hosts before asking
DNS: the STRICT_DNS clusters below resolve through it, and ``/clusters`` shows the
address it found).

Pod ``client`` is captured (``controlplane capture``, Envoy as UID 1337): its app dials
the names as it would without a mesh. Pod ``plain`` has a sidecar that is not captured:
its app dials 127.0.0.1:443 and :5432, the sidecar's loopback listeners, keeping the
server name for TLS. Every TLS client verifies the server's certificate against the test
CA: the sidecar never terminates the app's TLS (it has no key).
"""

from __future__ import annotations

import datetime
import json
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from controlplane.bootstrap import BootstrapOptions, capture_options, render_bootstrap
from tests.support import pods
from tests.support.files import write_atomic
from tests.support.procs import ControlPlane, http_get, wait_for

pytestmark = [
    pytest.mark.skipif(pods.available() is not None, reason=str(pods.available())),
    pytest.mark.xdist_group("egress_e2e"),  # one set of pods for the module's tests
]

API = "outbound|443||api.default.svc.cluster.local"
PAY = "outbound|443||pay.default.svc.cluster.local"
DB = "outbound|5432||db.default.svc.cluster.local"

# An HTTPS server: answers every GET with "<name> <path>".
HTTPS_SERVER = """
import http.server, ssl, sys
cert, key, port, name = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def do_GET(self):
        body = f"{name} {self.path}".encode()
        self.send_response(200)
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, *args):
        pass
server = http.server.ThreadingHTTPServer(("0.0.0.0", port), Handler)
context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
context.load_cert_chain(cert, key)
server.socket = context.wrap_socket(server.socket, server_side=True)
server.serve_forever()
"""

# An HTTPS client that dials HOST:PORT with server name NAME, verifying the certificate
# for NAME against CA ("-": not verified); prints "STATUS BODY", or "failed: ERROR".
HTTPS_CLIENT = """
import http.client, socket, ssl, sys
host, port, name, ca, path = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4], sys.argv[5]
if ca == "-":
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
else:
    context = ssl.create_default_context(cafile=ca)
try:
    raw = socket.create_connection((host, port), timeout=5)
    conn = http.client.HTTPConnection(name, port, timeout=5)
    conn.sock = context.wrap_socket(raw, server_hostname=name)
    conn.request("GET", path)
    response = conn.getresponse()
    print(response.status, response.read().decode())
except (OSError, http.client.HTTPException) as exc:
    print(f"failed: {type(exc).__name__}: {exc}")
"""


def _certificates(directory: Path) -> dict[str, Path]:
    """A test CA and, signed by it, a server certificate per external host; the paths
    (``ca``, ``<host>.crt``, ``<host>.key``)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.UTC)
    window = (now - datetime.timedelta(minutes=5), now + datetime.timedelta(hours=1))

    def pem(key: ec.EllipticCurvePrivateKey) -> bytes:
        return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                 serialization.NoEncryption())

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "egress test CA")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name)
          .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
          .not_valid_before(window[0]).not_valid_after(window[1])
          .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
          .sign(ca_key, hashes.SHA256()))
    paths = {"ca": directory / "egress-ca.crt"}
    paths["ca"].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    for host in ("api.example.test", "pay.example.test"):
        key = ec.generate_private_key(ec.SECP256R1())
        cert = (x509.CertificateBuilder()
                .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, host)]))
                .issuer_name(ca_name).public_key(key.public_key())
                .serial_number(x509.random_serial_number())
                .not_valid_before(window[0]).not_valid_after(window[1])
                .add_extension(x509.SubjectAlternativeName([x509.DNSName(host)]),
                               critical=False)
                .sign(ca_key, hashes.SHA256()))
        paths[f"{host}.crt"] = directory / f"{host}.crt"
        paths[f"{host}.key"] = directory / f"{host}.key"
        paths[f"{host}.crt"].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        paths[f"{host}.key"].write_bytes(pem(key))
    for path in paths.values():
        path.chmod(0o644)
    return paths


@dataclass
class Egress:
    network: pods.PodNetwork
    control: ControlPlane
    path: Path
    ca: Path
    client: pods.Pod  # captured
    plain: pods.Pod  # not captured
    api: pods.Pod
    pay: pods.Pod
    db: pods.Pod
    envoys: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)

    def write(self, policy: str = "ALLOW_ANY") -> None:
        write_atomic(self.path, f"""outbound_traffic_policy: {policy}
services:
  - name: api
    port: 443
    protocol: tls
    external_name: api.example.test
    policy: {{connect_timeout: 2s, circuit_breaker: {{max_connections: 100}}}}
  - name: pay
    port: 443
    protocol: tls
    external_name: pay.example.test
  - name: db
    port: 5432
    protocol: tcp
    external_name: db.example.test
    policy: {{idle_timeout: 10m}}
""")

    def https(self, pod: pods.Pod, host: str, name: str, verify: bool = True,
              port: int = 443) -> str:
        run = pod.call([sys.executable, "-c", HTTPS_CLIENT, host, str(port), name,
                        str(self.ca) if verify else "-", "/orders"], timeout=20)
        assert run.returncode == 0, run.stderr
        return run.stdout.strip()


def admin(pod: pods.Pod, path: str) -> str:
    status, body, _ = http_get(f"http://{pod.address}:15000{path}", timeout=5)
    assert status == 200, body
    return body


def stat(pod: pods.Pod, name: str) -> int:
    """A counter of the pod's sidecar (0 while it does not exist)."""
    escaped = "".join("\\" + c if c in ".|[]()" else c for c in name)
    found: dict[str, Any] = json.loads(admin(pod, f"/stats?format=json&filter=^{escaped}$"))
    values = [s.get("value", 0) for s in found.get("stats", []) if s.get("name") == name]
    return int(values[0]) if values else 0


@pytest.fixture(scope="module")
def egress(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Egress]:
    workdir = tmp_path_factory.mktemp("egress-e2e")
    with pods.PodNetwork() as network:
        api, pay, db = network.pod("api"), network.pod("pay"), network.pod("db")
        hosts = {"api.example.test": api.address, "pay.example.test": pay.address,
                 "db.example.test": db.address}
        client, plain = network.pod("client", hosts=hosts), network.pod("plain", hosts=hosts)
        certs = _certificates(network.workdir)
        path = workdir / "mesh.yaml"
        control = ControlPlane(path, workdir, extra=["--xds-address", f"{network.gateway}:0"])
        found = Egress(network, control, path, certs["ca"], client, plain, api, pay, db)
        found.write()
        control.start()
        try:
            for pod, host in ((api, "api.example.test"), (pay, "pay.example.test")):
                pod.run([sys.executable, "-c", HTTPS_SERVER, str(certs[f"{host}.crt"]),
                         str(certs[f"{host}.key"]), "443", pod.name])
            db.serve_tcp(5432, "db")
            xds = f"{network.gateway}:{control.xds_port}"
            client.capture()
            found.envoys["client"] = client.envoy(render_bootstrap(capture_options(
                "client-0.default", "client", admin_address=client.address,
                xds_address=xds)))
            # The sidecar binds 127.0.0.1:443 as UID 1337: this pod lets any user bind
            # ports below 1024, as container runtimes do (the notes say so).
            result = plain.call(["sysctl", "-w", "net.ipv4.ip_unprivileged_port_start=0"])
            assert result.returncode == 0, result.stderr
            found.envoys["plain"] = plain.envoy(render_bootstrap(BootstrapOptions(
                node_id="plain-0.default", service="plain", xds_address=xds,
                admin_address=plain.address, admin_port=15000)))
            wait_for(lambda: found.https(client, "api.example.test", "api.example.test")
                     .startswith("200 "), timeout=30,
                     what=f"HTTPS from the captured pod (log: {client.envoy_log})")
            wait_for(lambda: found.https(plain, "127.0.0.1", "api.example.test")
                     .startswith("200 "), timeout=30,
                     what=f"HTTPS from the plain pod (log: {plain.envoy_log})")
            yield found
        finally:
            control.stop()


def test_https_to_external_apis_is_routed_by_server_name_and_verified(egress: Egress) -> None:
    """Two external hosts on 443, told apart by the ClientHello's server name; the
    certificate the client verifies can only come from the host itself."""
    before = stat(egress.client, f"cluster.{API}.upstream_cx_total")
    assert egress.https(egress.client, "api.example.test", "api.example.test") == \
        "200 api /orders"
    assert egress.https(egress.client, "pay.example.test", "pay.example.test") == \
        "200 pay /orders"
    assert stat(egress.client, f"cluster.{API}.upstream_cx_total") == before + 1
    assert stat(egress.client, f"cluster.{PAY}.upstream_cx_total") >= 1
    # Dialled at pay's address, named api: the server name decides, not the address.
    assert egress.https(egress.client, egress.pay.address, "api.example.test") == \
        "200 api /orders"
    assert stat(egress.client, f"cluster.{API}.upstream_cx_total") == before + 2
    # Envoy resolved the external name through the pod's hosts file.
    clusters = admin(egress.client, "/clusters")
    assert f"{API}::{egress.api.address}:443::" in clusters
    assert f"{DB}::{egress.db.address}:5432::" in clusters


def test_registry_only_lets_known_server_names_through_and_closes_the_rest(
        egress: Egress) -> None:
    passed = stat(egress.client, "cluster.passthrough.upstream_cx_total")
    # ALLOW_ANY: an unknown server name goes where the app dialled, untouched.
    assert egress.https(egress.client, egress.api.address, "other.example.test",
                        verify=False) == "200 api /orders"
    assert stat(egress.client, "cluster.passthrough.upstream_cx_total") == passed + 1
    egress.write("REGISTRY_ONLY")
    try:
        wait_for(lambda: egress.https(egress.client, egress.api.address, "other.example.test",
                                      verify=False).startswith("failed"),
                 timeout=20, what="REGISTRY_ONLY at the captured sidecar")
        assert egress.https(egress.client, "api.example.test", "api.example.test") == \
            "200 api /orders"
        assert egress.https(egress.client, "pay.example.test", "pay.example.test") == \
            "200 pay /orders"
        assert egress.client.tcp_connect("db.example.test", 5432).startswith("db ")
    finally:
        egress.write()
        wait_for(lambda: egress.https(egress.client, egress.api.address, "other.example.test",
                                      verify=False).startswith("200 "),
                 timeout=20, what="ALLOW_ANY again at the captured sidecar")


def test_a_database_outside_is_reached_by_port_from_a_captured_pod(egress: Egress) -> None:
    before = stat(egress.client, f"cluster.{DB}.upstream_cx_total")
    banner = egress.client.tcp_connect("db.example.test", 5432, send="select 1")
    name, _original, local, peer = banner.splitlines()[0].split()
    assert banner.splitlines()[1:] in ([], ["select 1"])  # the echo, when it came along
    assert (name, local) == ("db", f"{egress.db.address}:5432")
    assert peer.startswith(f"{egress.client.address}:")  # the sidecar's connection
    assert stat(egress.client, f"cluster.{DB}.upstream_cx_total") == before + 1
    # By port alone: whatever address the app dialled on 5432, the one external host.
    assert egress.client.tcp_connect(egress.pay.address, 5432).startswith("db ")
    assert stat(egress.client, f"cluster.{DB}.upstream_cx_total") == before + 2


def test_a_sidecar_that_is_not_captured_serves_external_ports_on_loopback(
        egress: Egress) -> None:
    listeners = json.loads(admin(egress.plain, "/listeners?format=json"))
    names = {entry["name"] for entry in listeners["listener_statuses"]}
    assert {"egress", "egress~443", "egress~5432"} <= names
    before = stat(egress.plain, f"cluster.{PAY}.upstream_cx_total")
    assert egress.https(egress.plain, "127.0.0.1", "api.example.test") == "200 api /orders"
    assert egress.https(egress.plain, "127.0.0.1", "pay.example.test") == "200 pay /orders"
    assert stat(egress.plain, f"cluster.{PAY}.upstream_cx_total") == before + 1
    # A server name no external service has: no chain, closed.
    assert egress.https(egress.plain, "127.0.0.1", "other.example.test",
                        verify=False).startswith("failed")
    banner = egress.plain.tcp_connect("127.0.0.1", 5432, send="select 1").splitlines()[0]
    assert banner.split()[0] == "db" and banner.split()[2] == f"{egress.db.address}:5432"
    assert stat(egress.plain, f"cluster.{DB}.upstream_cx_total") >= 1


def test_a_port_the_sidecar_cannot_bind_is_refused_alone_and_reported(egress: Egress) -> None:
    """Pod ``strict`` keeps the kernel's default: ports below 1024 are root's, and its
    sidecar runs as UID 1337. Envoy refuses the listener on 443 (a NACK naming it, seen
    in the server's /debug/proxies) and keeps the rest: HTTP by Host, and 5432."""
    hosts = {"db.example.test": egress.db.address}
    pod = egress.network.pod("strict", hosts=hosts)
    xds = f"{egress.network.gateway}:{egress.control.xds_port}"
    egress.envoys["strict"] = pod.envoy(render_bootstrap(BootstrapOptions(
        node_id="strict-0.default", service="strict", xds_address=xds,
        admin_address=pod.address, admin_port=15000)))
    wait_for(lambda: pod.tcp_connect("127.0.0.1", 5432).startswith("db "), timeout=30,
             what=f"5432 on loopback in pod strict (log: {pod.envoy_log})")

    def nack() -> str:
        status, body, _ = http_get(f"http://127.0.0.1:{egress.control.admin_port}"
                                   "/debug/proxies", timeout=5)
        assert status == 200, body
        [proxy] = [p for p in json.loads(body) if p["node_id"] == "strict-0.default"]
        found = proxy["types"]["lds"]["last_nack"]
        return "" if found is None else str(found["error"])

    wait_for(nack, timeout=20, what="the strict sidecar's NACK at the server")
    assert "cannot bind '127.0.0.1:443'" in nack()
    listeners = json.loads(admin(pod, "/listeners?format=json"))
    names = {entry["name"] for entry in listeners["listener_statuses"]}
    assert "egress" in names and "egress~5432" in names and "egress~443" not in names
