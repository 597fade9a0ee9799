"""Ingress through a Gateway with real Envoy (issue 13, "How it is shown"): a gateway
proxy (``controlplane bootstrap --gateway``) in file mode serves an HTTPS listener with a
certificate from ``certificates`` files (made here from a test CA; the client verifies
it, SNI picks among several), an HTTP listener matched by hostname, and TLS passthrough
by SNI to a TLS backend, into the mesh through a real sidecar. The key is nowhere but on
the wire to the gateway: not in the snapshot store, ``/debug/config_dump``, CSDS or the
logs, and a sidecar never gets it. With ``serve --ca-dir`` the gateway reaches a
``strict`` mTLS service under its own workload identity.

The cases follow the Gateway API conformance tests named in each docstring.
"""

from __future__ import annotations

import base64
import http.client
import socket
import ssl
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from envoy.service.status.v3 import csds_pb2, csds_pb2_grpc

from tests.support.gateway_certs import ServerFiles, TestCA, key_marker
from tests.support.procs import Backend, ControlPlane, Envoy, free_port, wait_for
from tests.support.secure import SecureMesh, call, spiffe, write_mesh

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(180)]


class TlsBackend:
    """A TLS server (its own certificate) that answers each line with ``NAME:line``."""

    def __init__(self, name: str, files: ServerFiles) -> None:
        self.name = name
        self.context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.context.load_cert_chain(str(files.cert), str(files.key))
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = int(self.sock.getsockname()[1])
        self.sock.settimeout(0.5)
        self.running = True
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while self.running:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                continue
            threading.Thread(target=self._one, args=(conn,), daemon=True).start()

    def _one(self, conn: socket.socket) -> None:
        try:
            conn.settimeout(5)
            with self.context.wrap_socket(conn, server_side=True) as tls:
                line = tls.makefile("rb").readline().decode().strip()
                tls.sendall(f"{self.name}:{line}\n".encode())
        except (OSError, ssl.SSLError):
            conn.close()

    def stop(self) -> None:
        self.running = False
        self.sock.close()


def https_get(port: int, sni: str, context: ssl.SSLContext, path: str = "/",
              host: str | None = None) -> tuple[int, str, list[str]]:
    """(status, body, the DNS names of the certificate the gateway showed); status 0
    when the connection or handshake failed."""
    conn = http.client.HTTPConnection(sni, port, timeout=5)
    try:
        raw = socket.create_connection(("127.0.0.1", port), timeout=5)
        tls = context.wrap_socket(raw, server_hostname=sni)  # SNI, and the name checked
        conn.sock = tls
        peer: dict[str, Any] = dict(tls.getpeercert() or {})
        names = [str(v) for k, v in peer.get("subjectAltName", ()) if k == "DNS"]
        conn.request("GET", path, headers={"Host": host or sni})
        response = conn.getresponse()
        return response.status, response.read().decode(errors="replace"), names
    except (OSError, http.client.HTTPException):
        return 0, "", []
    finally:
        conn.close()


def tls_line(port: int, sni: str, context: ssl.SSLContext, line: str) -> str:
    """Send one line over TLS (SNI ``sni``, verified) through the gateway; the answer."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as raw, \
            context.wrap_socket(raw, server_hostname=sni) as tls:
        tls.sendall(f"{line}\n".encode())
        return tls.makefile("rb").readline().decode().strip()


def gateway_envoy(tmp: Path, node_id: str, xds_port: int, name: str = "ingress",
                  extra: list[str] | None = None) -> Envoy:
    return Envoy(tmp, node_id, name, xds_port, extra=["--gateway", name,
                                                      "--inbound-address", "127.0.0.1",
                                                      *(extra or [])])


class Ingress:
    """A file-mode server; the web app behind a real sidecar; a TLS backend; the
    gateway's ports; ``close`` ends what it started."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.ca = TestCA(tmp)
        self.shop = self.ca.server("shop", "shop.example.com")
        self.api = self.ca.server("api", "api.example.org")
        self.db = self.ca.server("db", "db.example.com")
        self.web = Backend("web-app")
        self.tls_backend = TlsBackend("db", self.db)
        self.http_port, self.https_port, self.tls_port, self.broken_port = (
            free_port(), free_port(), free_port(), free_port())
        self.mesh_path = tmp / "mesh.yaml"
        self.envoys: list[Envoy] = []
        write_mesh(self.mesh_path, self.mesh(sidecar_port=None))
        self.server = ControlPlane(self.mesh_path, tmp).start()
        self.sidecar = self.start(Envoy(tmp, "web-1.default", "web", self.server.xds_port,
                                        app_port=self.web.port))
        write_mesh(self.mesh_path, self.mesh(sidecar_port=self.sidecar.inbound_port))

    def start(self, envoy: Envoy) -> Envoy:
        self.envoys.append(envoy)
        return envoy.start()

    def mesh(self, sidecar_port: int | None) -> dict[str, Any]:
        web_endpoints = [{"address": "127.0.0.1", "port": sidecar_port}] if sidecar_port \
            else []
        return {
            "services": [
                {"name": "web", "port": 9080, "endpoints": web_endpoints},
                {"name": "teapot", "port": 9080, "endpoints": [],
                 "policy": {"fault": {"abort": {"percent": 100, "status": 418}}}},
                {"name": "db", "port": 5432, "protocol": "tcp",
                 "endpoints": [{"address": "127.0.0.1", "port": self.tls_backend.port}]},
            ],
            "gateways": [{"name": "ingress", "namespace": "default", "listeners": [
                {"name": "http", "port": self.http_port, "protocol": "HTTP"},
                {"name": "https", "port": self.https_port, "protocol": "HTTPS",
                 "tls": {"mode": "Terminate", "certificateRefs": [
                     {"kind": "Secret", "name": "shop-cert"},
                     {"kind": "Secret", "name": "api-cert"}]}},
                {"name": "tls", "port": self.tls_port, "protocol": "TLS",
                 "tls": {"mode": "Passthrough"}},
                {"name": "broken", "port": self.broken_port, "protocol": "HTTPS",
                 "tls": {"certificateRefs": [{"kind": "Secret", "name": "missing-cert"}]}},
            ]}],
            "http_routes": [
                {"name": "shop", "parentRefs": [{"kind": "Gateway", "name": "ingress"}],
                 "hostnames": ["shop.example.com", "api.example.org"],
                 "rules": [{"backendRefs": [{"name": "web", "port": 9080}]}]},
                {"name": "teapot", "parentRefs": [{"name": "ingress", "sectionName": "http"}],
                 "hostnames": ["teapot.example.com"],
                 "rules": [{"backendRefs": [{"name": "teapot", "port": 9080}]}]},
                {"name": "stray", "parentRefs": [{"name": "ingress", "sectionName": "nope"}],
                 "rules": [{"backendRefs": [{"name": "web", "port": 9080}]}]},
            ],
            "tls_routes": [
                {"name": "db", "parentRefs": [{"kind": "Gateway", "name": "ingress",
                                               "sectionName": "tls"}],
                 "hostnames": ["db.example.com"],
                 "rules": [{"backendRefs": [{"name": "db", "port": 5432}]}]},
            ],
            "certificates": [
                {"name": "shop-cert", "cert_file": str(self.shop.cert),
                 "key_file": str(self.shop.key)},
                {"name": "api-cert", "cert_file": str(self.api.cert),
                 "key_file": str(self.api.key)},
            ],
        }

    def close(self) -> None:
        for envoy in self.envoys:
            envoy.stop()
        self.server.stop()
        self.web.stop()
        self.tls_backend.stop()


@pytest.fixture
def ingress(tmp_path: Path) -> Iterator[Ingress]:
    made = Ingress(tmp_path)
    yield made
    made.close()


def test_https_http_and_passthrough_through_a_real_gateway(ingress: Ingress) -> None:
    """HTTPS terminated with the listener's certificates, SNI choosing between two
    (conformance: GatewaySecretReferenceGrantSpecific's TLS check, HTTPRouteHTTPSListener,
    ...ListenerHostnameMatching); an HTTP listener routing by Host; TLS passed through by
    SNI to a TLS backend (TLSRouteSimpleSameNamespace); a listener whose certificate is
    missing is not served, the others are."""
    gateway = ingress.start(gateway_envoy(ingress.tmp, "ingress-1", ingress.server.xds_port))
    context = ingress.ca.client_context()

    status, body, names = wait_for(
        lambda: (found if (found := https_get(ingress.https_port, "shop.example.com",
                                              context))[0] == 200 else None),
        timeout=30, what="HTTPS through the gateway")
    assert body == "web-app"
    assert names == ["shop.example.com"]  # verified by the client against the test CA
    status, body, names = https_get(ingress.https_port, "api.example.org", context)
    assert (status, body, names) == (200, "web-app", ["api.example.org"])
    # A host no route names: the TLS handshake succeeds on the listener's certificate
    # (no SNI match needed), the request finds no virtual host: 404.
    relaxed = ingress.ca.client_context()
    relaxed.check_hostname = False
    status, _, _ = https_get(ingress.https_port, "shop.example.com", relaxed,
                             host="other.example.com")
    assert status == 404

    # HTTP: the route's hostnames, 404 for others (HTTPRouteHostnameIntersection).
    answer = call(ingress.http_port, "shop.example.com")
    assert (answer.status, answer.body) == (200, "web-app")
    assert call(ingress.http_port, "shop.example.com:80").status == 200  # port ignored
    assert call(ingress.http_port, "unknown.example.com").status == 404
    # The backend service's own policy applies at the gateway, as at a sidecar: its
    # fault injection answers for it.
    assert call(ingress.http_port, "teapot.example.com").status == 418

    # TLS passthrough: the backend's own certificate reaches the client.
    assert tls_line(ingress.tls_port, "db.example.com", context, "ping") == "db:ping"
    with pytest.raises(OSError):  # no chain for another SNI: the gateway closes
        tls_line(ingress.tls_port, "other.example.com", relaxed, "ping")

    # The broken listener (its certificate missing) is not served; the server says why.
    assert call(ingress.broken_port, "shop.example.com").status == 0
    lines = [line for line in ingress.server.logs()
             if line.get("event") == "gateway.listener_not_served"]
    assert any(line.get("listener") == "broken" and "missing-cert" in line.get("message", "")
               for line in lines), lines
    # So is a route whose parentRef names no listener of the Gateway (the rest served).
    stray = [line for line in ingress.server.logs() if line.get("event") ==
             "routes.not_accepted" and line.get("route") == "HTTPRoute/default/stray"]
    assert stray and stray[0]["reason"] == "NoMatchingParent", stray
    # The gateway's calls went through the sidecar in front of the app.
    assert gateway.stat("cluster.outbound|9080||web.default.svc.cluster.local"
                        ".upstream_rq_total") >= 4
    inbound = f"inbound|{ingress.sidecar.inbound_port}||web.default.svc.cluster.local"
    assert ingress.sidecar.stat(f"cluster.{inbound}.upstream_rq_total") >= 4


def test_the_key_reaches_the_gateway_and_nothing_else(ingress: Ingress) -> None:
    """The certificate's key is in no snapshot on disk, no /debug/config_dump, no CSDS
    answer and no log line; a sidecar is never sent a gateway's certificate."""
    gateway = ingress.start(gateway_envoy(ingress.tmp, "ingress-1", ingress.server.xds_port))
    context = ingress.ca.client_context()
    wait_for(lambda: https_get(ingress.https_port, "shop.example.com", context)[0] == 200,
             timeout=30, what="HTTPS through the gateway")
    markers = []
    for files in (ingress.shop, ingress.api):
        markers.append(key_marker(files))
        markers.append(base64.b64encode(files.key.read_bytes()).decode()[:48])

    def leaked(text: str) -> list[str]:
        return [m for m in markers if m in text]

    stored = [p for p in (ingress.tmp / "snapshots").rglob("*") if p.is_file()]
    assert stored, "the snapshot store wrote nothing"
    for path in stored:
        assert not leaked(path.read_bytes().decode(errors="replace")), path
    for node in ("ingress-1", "web-1.default"):
        status, body, _ = ingress.server.get(f"/debug/config_dump?node={node}")
        assert status == 200, body
        assert not leaked(body), node
    with grpc.insecure_channel(f"127.0.0.1:{ingress.server.xds_port}") as channel:
        answer = csds_pb2_grpc.ClientStatusDiscoveryServiceStub(channel).FetchClientStatus(
            csds_pb2.ClientStatusRequest(), timeout=10)
    dumped = str(answer)
    assert "ingress-1" in dumped and "certificate/default/shop-cert" in dumped
    assert not leaked(dumped)
    assert not leaked(ingress.server.log_path.read_text())

    # What the gateway holds: both certificates, by SDS; the sidecar holds none.
    _, certs, _ = gateway.admin("/certs")
    assert "shop.example.com" in certs and "api.example.org" in certs
    _, sidecar_certs, _ = ingress.sidecar.admin("/certs")
    assert "shop.example.com" not in sidecar_certs
    _, dump, _ = ingress.sidecar.admin("/config_dump?resource=dynamic_active_secrets")
    assert "certificate/" not in dump


def test_a_renewed_certificate_reaches_the_gateway(ingress: Ingress) -> None:
    """The files are replaced (a renewal): the gateway serves the new certificate
    without a restart or a mesh edit."""
    ingress.start(gateway_envoy(ingress.tmp, "ingress-1", ingress.server.xds_port))
    context = ingress.ca.client_context()
    wait_for(lambda: https_get(ingress.https_port, "shop.example.com", context)[0] == 200,
             timeout=30, what="HTTPS through the gateway")
    renewed = ingress.ca.server("shop-renewed", "shop.example.com", "www.shop.example.com")
    ingress.shop.cert.write_bytes(renewed.cert.read_bytes())
    ingress.shop.key.write_bytes(renewed.key.read_bytes())
    found = wait_for(
        lambda: (r if "www.shop.example.com" in (r := https_get(
            ingress.https_port, "shop.example.com", context))[2] else None),
        timeout=30, what="the renewed certificate served")
    assert found[0] == 200


@pytest.fixture
def secure(tmp_path: Path) -> Iterator[SecureMesh]:
    made = SecureMesh(tmp_path)
    yield made
    made.close()


def test_the_gateway_reaches_a_strict_service_with_its_own_identity(secure: SecureMesh
                                                                    ) -> None:
    """``serve --ca-dir``: mesh mTLS is strict; the gateway calls the sidecar with mTLS
    as the workload identity its token names (the app sees it in XFCC)."""
    port = free_port()
    app = secure.http_app("web-app")

    def mesh(sidecar: Envoy | None) -> dict[str, Any]:
        endpoints = [{"address": "127.0.0.1", "port": sidecar.inbound_port,
                      "service_account": "web"}] if sidecar is not None else []
        return {
            "security": {"mtls": {"mode": "strict"}},
            "services": [{"name": "web", "port": 9080, "service_accounts": ["web"],
                          "endpoints": endpoints}],
            "gateways": [{"name": "ingress", "listeners": [
                {"name": "http", "port": port, "protocol": "HTTP"}]}],
            "http_routes": [{"name": "web", "parentRefs": [{"name": "ingress"}],
                             "rules": [{"backendRefs": [{"name": "web", "port": 9080}]}]}],
        }

    secure.serve(mesh(None))
    web = secure.sidecar("web-1.default", "web", "web", False, app_port=app.port)
    secure.update(mesh(web))
    secure.sidecar("ingress-1.default", "ingress", "ingress-gateway", False,
                   extra=["--gateway", "ingress", "--inbound-address", "127.0.0.1"])
    answer = wait_for(lambda: (a if (a := call(port, "anything.example.com")).status == 200
                               else None), timeout=40, what="the gateway to reach web")
    assert answer.json()["backend"] == "web-app"
    assert f"URI={spiffe('ingress-gateway')}" in answer.xfcc, answer.xfcc
    # Plaintext straight at the strict sidecar is still refused.
    assert call(web.inbound_port or 0, "web").status == 0


def test_a_delta_gateway_gets_its_certificates_too(ingress: Ingress) -> None:
    """Incremental xDS: the same listeners, and the certificates per stream."""
    envoy = Envoy(ingress.tmp, "ingress-delta", "ingress", ingress.server.xds_port,
                  delta=True, extra=["--gateway", "ingress", "--inbound-address", "127.0.0.1"])
    ingress.start(envoy)
    context = ingress.ca.client_context()
    found = wait_for(
        lambda: (r if (r := https_get(ingress.https_port, "api.example.org", context))[0]
                 == 200 else None), timeout=30, what="HTTPS through a delta gateway")
    assert found == (200, "web-app", ["api.example.org"])
    [proxy] = [p for p in ingress.server.json("/debug/proxies")
               if p["node_id"] == "ingress-delta"]
    assert proxy["protocol"] == "delta", proxy
