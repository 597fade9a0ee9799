"""The translator's mTLS and authorization config, loaded by real Envoys.

Each sidecar is a real Envoy whose bootstrap holds, as static resources, exactly what
``translate`` gives its proxy (EDS clusters carry their assignment, the egress route
table is inlined), and the two SDS secrets the server would send it (``default``: a
workload certificate the mesh CA issued for its identity, ``ROOTCA``: the bundle) as
static secrets under the same names. Apps are real HTTP and TCP servers; callers are
other sidecars, or Python's own TLS client with a workload certificate of its choosing.
The server-side path (SDS over ADS, per stream) is tests/test_security_e2e*.py's.
"""

from __future__ import annotations

import http.client
import json
import socket
import ssl
import subprocess
from collections.abc import Iterator
from concurrent import futures
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf import json_format
from google.protobuf.message import Message

from controlplane import resource
from controlplane.lab.envoy import envoy_command, find_envoy
from controlplane.mesh import Mesh, load_mesh_data
from controlplane.mesh.security import MeshIdentity
from controlplane.proxy import ProxyIdentity
from controlplane.security.ca import CertificateAuthority, Issued
from controlplane.security.identity import SpiffeId
from controlplane.security.sds import CERT_SECRET, ROOT_SECRET, secret_messages
from controlplane.translator import Resources, resource_name, translate
from controlplane.translator.security.tls import MESH_ALPN
from tests.support.procs import admin_stat, end, free_port, http_get, wait_for
from tests.support.secure import HeaderEcho, TcpEcho

TRUST = "cluster.local"


# -- static bootstraps ------------------------------------------------------------------


def _json(message: Message) -> dict[str, Any]:
    data: dict[str, Any] = json_format.MessageToDict(message, preserving_proto_field_name=True)
    return data


def _static_secrets(data: Any) -> Any:
    """SDS references to the two fixed names without their ADS source: Envoy then takes
    the static secrets of the same names."""
    if isinstance(data, list):
        return [_static_secrets(item) for item in data]
    if not isinstance(data, dict):
        return data
    found = {key: _static_secrets(value) for key, value in data.items()}
    if found.get("name") in (CERT_SECRET, ROOT_SECRET) and "sds_config" in found:
        del found["sds_config"]
    return found


def static_bootstrap(resources: Resources, secrets: list[Message] | None = None,
                     admin_port: int = 0, admin_address: str = "127.0.0.1") -> dict[str, Any]:
    """A bootstrap whose static resources are ``resources`` as served (EDS and RDS
    inlined) and ``secrets`` (none: placeholders of a throwaway CA, for validation)."""
    assignments = {resource_name(a): a for a in resources[resource.ENDPOINT]}
    routes = {resource_name(r): _json(r) for r in resources[resource.ROUTE]}
    clusters = []
    for cluster in resources[resource.CLUSTER]:
        data = _json(cluster)
        if "eds_cluster_config" in data:
            del data["eds_cluster_config"]
            data["type"] = "STATIC"
            data["load_assignment"] = _json(assignments[resource_name(cluster)])
        clusters.append(data)
    listeners = []
    for listener in resources[resource.LISTENER]:
        data = _json(listener)
        for chain in data.get("filter_chains", []):
            for network_filter in chain.get("filters", []):
                config = network_filter.get("typed_config", {})
                rds = config.pop("rds", None)
                if rds is not None:
                    config["route_config"] = routes[rds["route_config_name"]]
        listeners.append(data)
    if secrets is None:
        ca = CertificateAuthority.create(TRUST, datetime.now(UTC))
        secrets = list(secret_messages(
            ca.issue_workload(SpiffeId(TRUST, "default", "validate"), datetime.now(UTC),
                              timedelta(hours=1)), ca.bundle_pem))
    return {
        "node": {"id": "static", "cluster": "static"},
        "admin": {"address": {"socket_address": {"address": admin_address,
                                                 "port_value": admin_port}}},
        "static_resources": _static_secrets({
            "clusters": clusters, "listeners": listeners,
            "secrets": [_json(s) for s in secrets]}),
    }


def envoy_rejects(bootstrap: dict[str, Any], workdir: Path) -> str | None:
    """``envoy --mode validate`` on ``bootstrap``: None when accepted, else its error."""
    config = workdir / "validate.json"
    config.write_text(json.dumps(bootstrap), encoding="utf-8")
    run = subprocess.run([find_envoy(), "--mode", "validate", "-c", str(config),
                          "--log-level", "error", "--use-dynamic-base-id",
                          "--concurrency", "1"], capture_output=True, text=True, timeout=120)
    return None if run.returncode == 0 else (run.stderr + run.stdout)[-2000:]


class StaticEnvoy:
    """A real Envoy on a static bootstrap."""

    def __init__(self, workdir: Path, name: str, bootstrap: dict[str, Any]) -> None:
        self.name = name
        self.config = workdir / f"{name}.json"
        self.config.write_text(json.dumps(bootstrap), encoding="utf-8")
        self.log = workdir / f"{name}.log"
        self.admin_path = workdir / f"{name}.admin"
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(envoy_command(self.config, self.admin_path),
                                         stdout=log, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL)
        self.admin_port: int = wait_for(self._admin_port, what=f"{name} admin")
        wait_for(lambda: self.admin("/ready")[0] == 200, what=f"{name} ready")

    def _admin_port(self) -> int | None:
        if self.proc.poll() is not None:
            raise AssertionError(f"envoy {self.name} exited: {self.log.read_text()[-3000:]}")
        text = self.admin_path.read_text() if self.admin_path.exists() else ""
        port = text.strip().rpartition(":")[2]
        return int(port) if port.isdigit() else None

    def admin(self, path: str) -> tuple[int, str, dict[str, str]]:
        return http_get(f"http://127.0.0.1:{self.admin_port}{path}")

    def stat(self, name: str) -> int:
        return admin_stat(self.admin, name)

    def stop(self) -> None:
        end(self.proc)  # type: ignore[arg-type]


# -- a small mesh -----------------------------------------------------------------------


@dataclass
class Ports:
    ratings_in: int
    tcp_in: int
    reviews_out: int
    frontend_out: int
    grpc_in: int


def mesh_of(ports: Ports, ratings: dict[str, Any] | None = None,
            tcp: dict[str, Any] | None = None, identity: bool = True,
            grpc: dict[str, Any] | None = None) -> Mesh:
    """ratings (HTTP) and ratings-tcp, each behind its sidecar's inbound port, with the
    ``security`` blocks given; the server's identity on unless ``identity`` is False."""
    data = {"services": [
        {"name": "ratings", "port": 9080, "service_accounts": ["ratings"],
         "endpoints": [{"address": "127.0.0.1", "port": ports.ratings_in}],
         **({"security": ratings} if ratings else {})},
        {"name": "ratings-tcp", "port": 9090, "protocol": "tcp",
         "service_accounts": ["ratings"],
         "endpoints": [{"address": "127.0.0.1", "port": ports.tcp_in}],
         **({"security": tcp} if tcp else {})},
        {"name": "ratings-grpc", "port": 9070, "protocol": "grpc",
         "service_accounts": ["ratings"],
         "endpoints": [{"address": "127.0.0.1", "port": ports.grpc_in}],
         **({"security": grpc} if grpc else {})},
        {"name": "reviews", "port": 9080},
        {"name": "frontend", "port": 9080},
    ]}
    mesh = load_mesh_data(data)
    return mesh.model_copy(update={"identity": MeshIdentity(trust_domain=TRUST)}) \
        if identity else mesh


class Rig:
    """The CA, the apps and the client sidecars; ratings' sidecars per test."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.now = datetime.now(UTC)
        self.ca = CertificateAuthority.create(TRUST, self.now)
        self.ports = Ports(free_port(), free_port(), free_port(), free_port(), free_port())
        self.app = HeaderEcho("ratings")
        self.tcp_app = TcpEcho("ratings-tcp")
        self.envoys: list[StaticEnvoy] = []
        self.certs: dict[str, Issued] = {}

    def cert(self, account: str) -> Issued:
        if account not in self.certs:
            self.certs[account] = self.ca.issue_workload(
                SpiffeId(TRUST, "default", account), self.now, timedelta(hours=1))
        return self.certs[account]

    def sidecar(self, mesh: Mesh, proxy: ProxyIdentity, account: str) -> StaticEnvoy:
        secrets = secret_messages(self.cert(account), self.ca.bundle_pem)
        envoy = StaticEnvoy(self.workdir, f"{proxy.node_id}-{len(self.envoys)}",
                            static_bootstrap(translate(mesh, proxy), list(secrets)))
        self.envoys.append(envoy)
        return envoy

    def ratings(self, mesh: Mesh) -> StaticEnvoy:
        return self.sidecar(mesh, ProxyIdentity(
            node_id="ratings-1", service="ratings", egress_port=free_port(),
            inbound_port=self.ports.ratings_in, app_port=self.app.port,
            inbound_address="127.0.0.1"), "ratings")

    def ratings_tcp(self, mesh: Mesh) -> StaticEnvoy:
        return self.sidecar(mesh, ProxyIdentity(
            node_id="ratings-tcp-1", service="ratings-tcp", egress_port=free_port(),
            inbound_port=self.ports.tcp_in, app_port=self.tcp_app.port,
            inbound_address="127.0.0.1"), "ratings")

    def ratings_grpc(self, mesh: Mesh, app_port: int) -> StaticEnvoy:
        return self.sidecar(mesh, ProxyIdentity(
            node_id="ratings-grpc-1", service="ratings-grpc", egress_port=free_port(),
            inbound_port=self.ports.grpc_in, app_port=app_port,
            inbound_address="127.0.0.1"), "ratings")

    def caller(self, mesh: Mesh, account: str, port: int) -> StaticEnvoy:
        return self.sidecar(mesh, ProxyIdentity(node_id=f"{account}-1", service=account,
                                                egress_port=port), account)

    def mtls(self, account: str, port: int, alpn: bool = True) -> ssl.SSLSocket:
        """A mesh mTLS connection to ``port`` as ``account`` (Python's TLS client)."""
        issued = self.cert(account)
        chain, key = self.workdir / f"{account}.crt", self.workdir / f"{account}.key"
        chain.write_bytes(issued.cert_pem)
        key.write_bytes(issued.key_pem)
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        context.check_hostname = False  # a workload certificate names a SPIFFE URI only
        context.load_verify_locations(cadata=self.ca.bundle_pem.decode())
        context.load_cert_chain(chain, key)
        if alpn:
            context.set_alpn_protocols([MESH_ALPN])
        raw = socket.create_connection(("127.0.0.1", port), timeout=5)
        try:
            return context.wrap_socket(raw)
        except BaseException:
            raw.close()
            raise

    def stop(self) -> None:
        for envoy in self.envoys:
            envoy.stop()
        self.app.stop()
        self.tcp_app.stop()


@pytest.fixture
def rig(tmp_path: Path) -> Iterator[Rig]:
    made = Rig(tmp_path)
    try:
        yield made
    finally:
        made.stop()


def call(envoy_port: int, path: str = "/ratings/1",
         headers: dict[str, str] | None = None) -> tuple[int, str]:
    status, body, _ = http_get(f"http://127.0.0.1:{envoy_port}{path}", host="ratings",
                               headers=headers)
    return status, body


def get_over(sock: socket.socket, path: str = "/ratings/1") -> tuple[int, str]:
    """One HTTP/1.1 GET over an open (TLS) socket."""
    connection = http.client.HTTPConnection("ratings", timeout=5)
    connection.sock = sock
    try:
        connection.request("GET", path)
        response = connection.getresponse()
        return response.status, response.read().decode()
    finally:
        connection.close()


def plaintext_get(port: int, headers: dict[str, str] | None = None) -> tuple[int, str]:
    status, body, _ = http_get(f"http://127.0.0.1:{port}/ratings/1", headers=headers)
    return status, body


def xfcc(body: str) -> str | None:
    value: str | None = json.loads(body)["headers"].get("x-forwarded-client-cert")
    return value


def refused(attempt: Any) -> bool:
    """Whether ``attempt()`` fails at the connection (closed, reset, handshake refused)."""
    try:
        attempt()
    except (OSError, http.client.HTTPException):
        return True
    return False


# -- mTLS -------------------------------------------------------------------------------


def test_permissive_accepts_mesh_mtls_and_plaintext_on_one_port(rig: Rig) -> None:
    """permissive (the default): a sidecar's mTLS call and a plaintext call both reach
    the app on the same inbound port; the app sees the mTLS caller's SPIFFE ID in
    x-forwarded-client-cert, and a plaintext caller cannot forge one."""
    mesh = mesh_of(rig.ports)
    rig.ratings(mesh)
    reviews = rig.caller(mesh, "reviews", rig.ports.reviews_out)

    status, body = call(rig.ports.reviews_out)
    assert status == 200, body
    assert f"URI=spiffe://{TRUST}/ns/default/sa/reviews" in (xfcc(body) or "")

    status, body = plaintext_get(rig.ports.ratings_in,
                                 {"x-forwarded-client-cert": "URI=spiffe://forged"})
    assert status == 200 and xfcc(body) is None, body  # sanitized: no forged identity
    # The caller's cluster took the mtls transport socket match, not plaintext.
    assert reviews.stat("cluster.outbound|9080||ratings.default.svc.cluster.local."
                        "ssl.handshake") >= 1


def test_permissive_sends_an_apps_own_tls_to_the_plaintext_chain(rig: Rig) -> None:
    """Only a ClientHello offering the mesh ALPN takes the mTLS chain: a TLS client that
    does not (an app's own TLS) gets the plaintext chain, which does not terminate TLS
    (here an HTTP listener: the connection fails); with the ALPN, the same client
    certificate is accepted and the app sees it."""
    rig.ratings(mesh_of(rig.ports))
    status, body = get_over(rig.mtls("frontend", rig.ports.ratings_in))
    assert status == 200 and "sa/frontend" in (xfcc(body) or ""), body
    assert refused(lambda: get_over(rig.mtls("frontend", rig.ports.ratings_in, alpn=False)))


def test_strict_refuses_plaintext_and_accepts_mesh_mtls(rig: Rig) -> None:
    mesh = mesh_of(rig.ports, ratings={"mtls": {"mode": "strict"}})
    rig.ratings(mesh)
    rig.caller(mesh, "reviews", rig.ports.reviews_out)
    assert refused(lambda: plaintext_get(rig.ports.ratings_in))
    status, body = call(rig.ports.reviews_out)
    assert status == 200 and "sa/reviews" in (xfcc(body) or ""), body


def test_strict_refuses_a_certificate_the_mesh_did_not_issue(rig: Rig) -> None:
    """A client certificate from another CA fails the handshake."""
    rig.ratings(mesh_of(rig.ports, ratings={"mtls": {"mode": "strict"}}))
    other = CertificateAuthority.create(TRUST, rig.now)
    rig.certs["intruder"] = other.issue_workload(SpiffeId(TRUST, "default", "reviews"),
                                                 rig.now, timedelta(hours=1))
    assert refused(lambda: get_over(rig.mtls("intruder", rig.ports.ratings_in)))


def test_disable_makes_callers_use_plaintext(rig: Rig) -> None:
    """mode disable: the inbound side has no TLS chain, and callers' clusters have no
    mtls match, so a sidecar's call arrives in plaintext (no XFCC)."""
    mesh = mesh_of(rig.ports, ratings={"mtls": {"mode": "disable"}})
    rig.ratings(mesh)
    rig.caller(mesh, "reviews", rig.ports.reviews_out)
    status, body = call(rig.ports.reviews_out)
    assert status == 200 and xfcc(body) is None, body
    assert refused(lambda: get_over(rig.mtls("reviews", rig.ports.ratings_in)))


def test_grpc_rides_mesh_mtls_as_http2(rig: Rig) -> None:
    """The inbound TLS context selects no ALPN, so the HTTP connection manager tells
    HTTP/2 by its preface: a gRPC call goes caller sidecar -> mTLS -> callee sidecar ->
    app, and the app sees the caller's SPIFFE ID in its metadata."""
    seen: list[str] = []

    def echo(request: bytes, context: grpc.ServicerContext) -> bytes:
        seen.extend(v for k, v in context.invocation_metadata()
                    if k == "x-forwarded-client-cert")
        return request

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler(
        "test.Echo", {"Call": grpc.unary_unary_rpc_method_handler(echo)})])
    app_port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        mesh = mesh_of(rig.ports, grpc={"mtls": {"mode": "strict"}})
        rig.ratings_grpc(mesh, app_port)
        rig.caller(mesh, "reviews", rig.ports.reviews_out)
        with grpc.insecure_channel(f"127.0.0.1:{rig.ports.reviews_out}",
                                   options=[("grpc.default_authority", "ratings-grpc")]) as chan:
            assert chan.unary_unary("/test.Echo/Call")(b"hello", timeout=10) == b"hello"
        assert len(seen) == 1 and "sa/reviews" in seen[0], seen
    finally:
        server.stop(0)


def test_permissive_lets_a_server_first_plaintext_client_through_after_inspection(
        rig: Rig) -> None:
    """permissive on a TCP port: a plaintext client that waits for the server to speak
    first (MySQL, SMTP) sends no ClientHello for the TLS inspector to read; after
    INSPECT_TIMEOUT the connection takes the plaintext chain and the app's
    greeting arrives, rather than Envoy closing it. A client that speaks first is not
    held at all, and an mTLS client gets the TLS chain."""
    rig.ratings_tcp(mesh_of(rig.ports))
    with socket.create_connection(("127.0.0.1", rig.ports.tcp_in), timeout=10) as sock:
        assert sock.recv(100) == b"ratings-tcp\n"
    with socket.create_connection(("127.0.0.1", rig.ports.tcp_in), timeout=10) as sock:
        sock.sendall(b"hi\n")
        received = b""
        while b"hi\n" not in received and (chunk := sock.recv(100)):
            received += chunk
        assert received == b"ratings-tcp\nhi\n"
    with rig.mtls("reviews", rig.ports.tcp_in) as sock:
        assert sock.recv(100) == b"ratings-tcp\n"
