"""End to end, a proxyless gRPC *server* (gRFC A36 listeners, A29 mTLS, A41 RBAC): no Envoy.

The control plane runs ``serve --ca-dir`` (tests/support/secure.py). The server is a
real grpcio process, ``grpc.server(xds=True)`` with ``grpc.xds_server_credentials``, on
its mesh endpoint 127.0.0.1:PORT; its bootstrap comes from ``controlplane bootstrap
--grpc --grpc-server --cert-dir`` and its certificate from ``controlplane certs``. It
serves only what the Listener ``grpc/server?xds.resource.listening_address=127.0.0.1:PORT``
says: STRICT mTLS and the service's authorization rules, enforced by gRPC itself. The
callers are real grpcio proxyless clients (``xds:///echo``, tests/test_proxyless_mtls_e2e).
The app answers with the peer identity gRPC verified (its auth context).
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support.procs import end, free_port, wait_for
from tests.support.secure import SecureMesh, spiffe
from tests.test_proxyless_mtls_e2e import Workload, _key_body, run_cli

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(240)]

# A proxyless server: serves once the control plane's Listener for its address came.
# Each call is answered with the auth context gRPC made of the peer (no certificate).
SERVER = r'''
import json, sys
from concurrent import futures
import grpc

def call(request, context):
    auth = {k: [v.decode(errors="replace") for v in vs]
            for k, vs in context.auth_context().items() if "pem" not in k}
    return json.dumps(auth).encode()

class Handler(grpc.GenericRpcHandler):
    def service(self, details):
        return grpc.unary_unary_rpc_method_handler(call)

server = grpc.server(futures.ThreadPoolExecutor(max_workers=4), xds=True)
server.add_generic_rpc_handlers((Handler(),))
server.add_secure_port(sys.argv[1], grpc.xds_server_credentials(
    grpc.insecure_server_credentials()))
server.start()
print("server.started", flush=True)
server.wait_for_termination()
'''


def mesh_data(port: int, allowed: list[str], mode: str = "strict") -> dict[str, Any]:
    """echo: its one endpoint the proxyless server, calls from ``allowed`` only (no rule
    when the list is empty)."""
    rules = ([{"name": "allowed", "action": "allow",
               "from": [{"principals": [spiffe(a) for a in allowed]}]}] if allowed else [])
    return {"services": [{
        "name": "echo", "port": 9090, "protocol": "grpc", "service_accounts": ["echo"],
        "endpoints": [{"address": "127.0.0.1", "port": port, "service_account": "echo"}],
        "security": {"mtls": {"mode": mode}, "authorization": rules},
    }]}


class ProxylessServer:
    """The server's workload files, then its grpcio process on 127.0.0.1:``port``."""

    def __init__(self, mesh: SecureMesh, port: int) -> None:
        assert mesh.server is not None
        self.workload = Workload(mesh, "echo-1", "echo")
        # The same bootstrap, as a server: the listener template and the node's flag.
        made = run_cli("bootstrap", "--grpc", "--grpc-server", "--node-id", "echo-1",
                       "--service", "echo", "--service-account", "echo",
                       "--xds-ca", str(mesh.bundle), "--token-file", str(self.workload.token),
                       "--ca-dir", str(mesh.ca_dir),
                       "--xds-address", f"127.0.0.1:{mesh.server.xds_port}",
                       "--cert-dir", str(self.workload.cert_dir),
                       "-o", str(self.workload.bootstrap))
        assert made.returncode == 0, made.stderr
        self.port = port
        self.log_path = mesh.tmp / "echo-server.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, certificates: bool = True) -> None:
        if certificates:
            got = self.workload.certs_once()
            assert got.returncode == 0, got.stderr
        with open(self.log_path, "w") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-c", SERVER, f"127.0.0.1:{self.port}"],
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                env=self.workload.env())

    def stop(self) -> None:
        end(self.proc)


@pytest.fixture
def rig(tmp_path: Path) -> Iterator[tuple[SecureMesh, ProxylessServer]]:
    mesh = SecureMesh(tmp_path)
    port = free_port()
    server: ProxylessServer | None = None
    try:
        mesh.serve(mesh_data(port, ["client"]))
        server = ProxylessServer(mesh, port)
        server.start()
        yield mesh, server
    finally:
        if server is not None:
            server.stop()
        mesh.close()


def auth(answer: dict[str, str]) -> dict[str, list[str]]:
    """The auth context the server's gRPC made of the caller, from the app's answer."""
    assert "ok" in answer, answer
    found: dict[str, list[str]] = json.loads(answer["ok"])
    return found


def identity(answer: dict[str, str]) -> list[str]:
    """The URI SANs the server's gRPC verified, from the app's answer."""
    return [v for v in auth(answer).get("x509_subject_alternative_name", [])
            if v.startswith("spiffe:")]


def test_a_proxyless_server_enforces_strict_mtls_and_authorization(
        rig: tuple[SecureMesh, ProxylessServer]) -> None:
    mesh, server = rig
    client = Workload(mesh, "client-1", "client")
    assert client.certs_once().returncode == 0

    # STRICT: the client's gRPC calls over mTLS; the server's gRPC verified its
    # certificate (A29) and the rule allows its identity (A41).
    answer = client.call()
    assert identity(answer) == [spiffe("client")], answer

    # Another mesh workload with a valid certificate of its own: the rule names only
    # client, so gRPC's RBAC refuses the call.
    other = Workload(mesh, "other-1", "other")
    assert other.certs_once().returncode == 0
    denied = other.call()
    assert denied.get("code") == "PERMISSION_DENIED", denied

    # A client without certificates calls in plaintext: the TLS-only listener refuses.
    plain = Workload(mesh, "plain-1", "client", certs=False)
    refused = plain.call(timeout=8.0)
    assert refused.get("code") in {"UNAVAILABLE", "DEADLINE_EXCEEDED"}, refused

    # A change of the rule reaches the running server (same process, same PID).
    assert server.proc is not None
    pid = server.proc.pid
    mesh.update(mesh_data(server.port, ["client", "other"]))
    deadline = time.monotonic() + 60
    allowed = other.call()
    while "ok" not in allowed and time.monotonic() < deadline:
        # the old rule, or a connection drained as the server takes the new Listener
        assert allowed.get("code") in {"PERMISSION_DENIED", "UNAVAILABLE"}, allowed
        allowed = other.call()
    assert identity(allowed) == [spiffe("other")], allowed
    assert server.proc.poll() is None and server.proc.pid == pid

    # The server's gRPC asked for exactly its address's Listener and ACKed each version.
    name = f"grpc/server?xds.resource.listening_address=127.0.0.1:{server.port}"
    streams = wait_for(lambda: _acked(mesh, "echo-1"), timeout=20,
                       what="the server's ACK of its Listener")
    assert [s["types"]["lds"]["subscribed"] for s in streams] == [[name]], streams

    # No private key in the control plane's log or the server's.
    assert mesh.server is not None
    key_body = _key_body(server.workload.cert_dir / "key.pem")
    for text in (mesh.server.log_path.read_text(), server.log_path.read_text()):
        assert key_body not in text


def _acked(mesh: SecureMesh, node_id: str) -> list[dict[str, Any]] | None:
    """The node's streams that ask for Listeners, once each ACKed all it was sent
    and none NACKed anything."""
    assert mesh.server is not None
    found = [p for p in mesh.server.json("/debug/proxies")
             if p["node_id"] == node_id and "lds" in p["types"]]
    if not found or not all(s["acked_version"] == s["sent_version"] and s["sent_version"]
                            and s["last_nack"] is None
                            for p in found for s in p["types"].values()):
        return None
    return found


def test_a_permissive_server_takes_plaintext_from_every_caller(tmp_path: Path) -> None:
    """PERMISSIVE: gRPC cannot tell TLS from plaintext on one port, so the Listener is
    plaintext: a client without certificates reaches it, and so does one with them
    (gRPC clients call PERMISSIVE services in plaintext); the server logs why."""
    mesh = SecureMesh(tmp_path)
    port = free_port()
    server: ProxylessServer | None = None
    try:
        mesh.serve(mesh_data(port, [], mode="permissive"))
        server = ProxylessServer(mesh, port)
        server.start(certificates=False)
        plain = Workload(mesh, "plain-1", "client", certs=False)
        answer = plain.call()
        assert auth(answer).get("transport_security_type") == ["insecure"], answer
        assert identity(answer) == [], answer
        client = Workload(mesh, "client-1", "client")
        assert client.certs_once().returncode == 0
        assert identity(client.call()) == []
        assert mesh.server is not None
        notes = [e for e in mesh.server.logs() if e.get("event") == "proxyless.left_out"
                 and e.get("service") == "echo.default"]
        assert any("PERMISSIVE" in " ".join(e["left_out"]) for e in notes), notes
    finally:
        if server is not None:
            server.stop()
        mesh.close()
