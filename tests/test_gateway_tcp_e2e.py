"""TCP and TLS-terminated streams through a real gateway Envoy (file mode): a TCP
listener with a TCPRoute split 80/20 across two real TCP echo servers; TLS listeners in
mode Terminate whose certificates come from the mesh's ``certificates`` (a test CA the
Python client verifies) forwarding the decrypted bytes to plaintext TCP backends, a
TCPRoute for one hostname and a TLSRoute for another, told apart by SNI. The key is in
no log and no debug answer.

The cases follow the Gateway API conformance tests named in each docstring.
"""

from __future__ import annotations

import base64
import socket
import ssl
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support.gateway_certs import TestCA, key_marker
from tests.support.procs import ControlPlane, Envoy, free_port, wait_for
from tests.support.promise_servers import TcpEcho
from tests.support.secure import write_mesh
from tests.test_gateway_e2e import gateway_envoy

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(180)]

CONNECTIONS = 100  # for the 80/20 split


def read_line(sock: socket.socket | ssl.SSLSocket) -> str:
    """Bytes up to a newline (the socket's timeout bounds each read)."""
    received = b""
    while not received.endswith(b"\n") and len(received) < 4096:
        chunk = sock.recv(4096)
        if not chunk:
            break
        received += chunk
    return received.decode(errors="replace").strip()


def tcp_line(port: int, line: str) -> str:
    """One line over plain TCP through the gateway; the echo ("" when it failed)."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=5) as conn:
            conn.sendall(f"{line}\n".encode())
            return read_line(conn)
    except OSError:
        return ""


def tls_line(port: int, sni: str, context: ssl.SSLContext, line: str
             ) -> tuple[str, list[str]]:
    """One line over TLS (SNI ``sni``, the certificate verified by ``context``): (the
    echo, the DNS names of the certificate the gateway showed); ("", []) on failure."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=5) as raw, \
                context.wrap_socket(raw, server_hostname=sni) as tls:
            peer: dict[str, Any] = dict(tls.getpeercert() or {})
            names = [str(v) for k, v in peer.get("subjectAltName", ()) if k == "DNS"]
            tls.sendall(f"{line}\n".encode())
            return read_line(tls), names
    except (OSError, ssl.SSLError):
        return "", []


class TcpIngress:
    """A file-mode server, three TCP echo servers, a test CA's certificates."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.ca = TestCA(tmp)
        self.db_cert = self.ca.server("db", "db.example.com")
        self.mqtt_cert = self.ca.server("mqtt", "mqtt.example.com")
        self.primary, self.replica, self.plain = (TcpEcho("primary"), TcpEcho("replica"),
                                                  TcpEcho("plain"))
        self.tcp_port, self.tls_port = free_port(), free_port()
        self.mesh_path = tmp / "mesh.yaml"
        write_mesh(self.mesh_path, self.mesh())
        self.server = ControlPlane(self.mesh_path, tmp).start()
        self.envoys: list[Envoy] = []

    def mesh(self) -> dict[str, Any]:
        def service(name: str, echo: TcpEcho) -> dict[str, Any]:
            return {"name": name, "port": 5432, "protocol": "tcp",
                    "endpoints": [{"address": "127.0.0.1", "port": echo.port}]}

        def terminate(name: str, host: str, cert: str) -> dict[str, Any]:
            return {"name": name, "port": self.tls_port, "protocol": "TLS", "hostname": host,
                    "tls": {"mode": "Terminate", "certificateRefs": [{"name": cert}]}}

        return {
            "services": [service("db", self.primary), service("db-replica", self.replica),
                         service("plain", self.plain)],
            "gateways": [{"name": "ingress", "listeners": [
                {"name": "postgres", "port": self.tcp_port, "protocol": "TCP"},
                terminate("db-tls", "db.example.com", "db-cert"),
                terminate("mqtt-tls", "mqtt.example.com", "mqtt-cert")]}],
            "tcp_routes": [
                {"name": "postgres", "parentRefs": [{"name": "ingress",
                                                     "sectionName": "postgres"}],
                 "rules": [{"backendRefs": [{"name": "db", "port": 5432, "weight": 80},
                                            {"name": "db-replica", "port": 5432,
                                             "weight": 20}]}]},
                {"name": "db-tls", "parentRefs": [{"name": "ingress",
                                                   "sectionName": "db-tls"}],
                 "rules": [{"backendRefs": [{"name": "plain", "port": 5432}]}]},
                {"name": "postgres-later", "parentRefs": [{"name": "ingress",
                                                           "sectionName": "postgres"}],
                 "rules": [{"backendRefs": [{"name": "plain", "port": 5432}]}]},
            ],
            "tls_routes": [
                {"name": "mqtt", "parentRefs": [{"name": "ingress",
                                                 "sectionName": "mqtt-tls"}],
                 "hostnames": ["mqtt.example.com"],
                 "rules": [{"backendRefs": [{"name": "db-replica", "port": 5432}]}]},
            ],
            "certificates": [
                {"name": "db-cert", "cert_file": str(self.db_cert.cert),
                 "key_file": str(self.db_cert.key)},
                {"name": "mqtt-cert", "cert_file": str(self.mqtt_cert.cert),
                 "key_file": str(self.mqtt_cert.key)},
            ],
        }

    def start(self, envoy: Envoy) -> Envoy:
        self.envoys.append(envoy)
        return envoy.start()

    def close(self) -> None:
        for envoy in self.envoys:
            envoy.stop()
        self.server.stop()
        for echo in (self.primary, self.replica, self.plain):
            echo.stop()


@pytest.fixture
def ingress(tmp_path: Path) -> Iterator[TcpIngress]:
    made = TcpIngress(tmp_path)
    yield made
    made.close()


def test_a_tcp_listener_splits_connections_by_weight(ingress: TcpIngress) -> None:
    """TCPRouteWeightedRouting, TCPRouteParentRefPortAndSectionName's sectionName: a
    real TCP client through the gateway's TCP listener reaches the two echo servers,
    80/20 within tolerance over a bounded count of connections.
    TCPRouteMultipleRoutesAttachment: a second TCPRoute on the listener gets nothing
    (the first takes every connection), and the server logs that it is unused."""
    gateway = ingress.start(gateway_envoy(ingress.tmp, "ingress-1", ingress.server.xds_port))
    wait_for(lambda: tcp_line(ingress.tcp_port, "hello").endswith(":hello"), timeout=30,
             what="a TCP echo through the gateway")
    seen = Counter(tcp_line(ingress.tcp_port, "ping") for _ in range(CONNECTIONS))
    assert set(seen) <= {"primary:ping", "replica:ping"}, seen
    # 80/20 of 100: the replica's count is binomial (mean 20, sd 4); 8..36 is 3 sd each way.
    assert 8 <= seen["replica:ping"] <= 36, seen
    assert seen["primary:ping"] + seen["replica:ping"] == CONNECTIONS
    assert gateway.stat("cluster.outbound|5432||db.default.svc.cluster.local"
                        ".upstream_cx_total") >= seen["primary:ping"]
    assert ingress.plain.connections == 0  # postgres-later's backend
    unused = [line for line in ingress.server.logs()
              if line.get("event") == "gateway.tcp_route_unused"]
    assert unused and unused[0]["route"] == "TCPRoute/default/postgres-later", unused
    assert unused[0]["served"] == "TCPRoute/default/postgres"


def test_tls_terminate_forwards_decrypted_bytes(ingress: TcpIngress) -> None:
    """TLSRouteTerminateSimpleSameNamespace (a TLSRoute on a Terminate listener) and a
    TCPRoute on one: Python's ssl client verifies the gateway's certificate (from the
    mesh's ``certificates``), SNI picks the listener, the plaintext backend gets the
    decrypted line; a name no listener serves gets no handshake; the key is in no log
    and no /debug/config_dump."""
    ingress.start(gateway_envoy(ingress.tmp, "ingress-1", ingress.server.xds_port))
    context = ingress.ca.client_context()
    answer, names = wait_for(
        lambda: (found if (found := tls_line(ingress.tls_port, "db.example.com", context,
                                             "select 1"))[0] else None),
        timeout=30, what="a TLS-terminated echo through the gateway")
    assert answer == "plain:select 1"  # the backend speaks no TLS: it got the plaintext
    assert names == ["db.example.com"]
    answer, names = tls_line(ingress.tls_port, "mqtt.example.com", context, "connect")
    assert (answer, names) == ("replica:connect", ["mqtt.example.com"])
    relaxed = ingress.ca.client_context()
    relaxed.check_hostname = False
    assert tls_line(ingress.tls_port, "other.example.com", relaxed, "x") == ("", [])

    markers = [m for files in (ingress.db_cert, ingress.mqtt_cert) for m in (
        key_marker(files), base64.b64encode(files.key.read_bytes()).decode()[:48])]
    status, body, _ = ingress.server.get("/debug/config_dump?node=ingress-1")
    assert status == 200, body
    assert "certificate/default/db-cert" in body
    assert not [m for m in markers if m in body]
    assert not [m for m in markers if m in ingress.server.log_path.read_text()]
