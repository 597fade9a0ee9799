"""End to end, a sidecar calling a proxyless gRPC server: real processes only.

The control plane runs ``serve --ca-dir`` (tests/support/secure.py). The server is the
real grpcio ``grpc.server(xds=True)`` process of tests/test_proxyless_server_e2e.py,
with its bootstrap from ``controlplane bootstrap --grpc --grpc-server`` and its
certificate from ``controlplane certs``; its endpoint is marked ``proxyless: true``. The
caller is a real Envoy sidecar (web): its app dials the sidecar's egress listener with
authority ``echo:9090``. The server answers with the auth context its gRPC made of the
peer, so the test sees whether the sidecar came with mTLS and as whom.

- STRICT: the sidecar's cluster takes the ``mtls-grpc`` match, whose TLS offers ``h2``
  after the mesh ALPN (grpcio closes a connection that selects no ALPN); the server
  verifies the sidecar's SPIFFE ID, and its authorization rule, naming web, allows it and
  refuses another sidecar.
- PERMISSIVE: the proxyless server serves plaintext, and the sidecar calls it so (before,
  it sent mesh mTLS to every endpoint with a service account, and every call failed).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from tests.support.procs import Envoy, free_port, wait_for
from tests.support.secure import SecureMesh, spiffe, stats_matching
from tests.test_proxyless_mtls_e2e import METHOD, _key_body
from tests.test_proxyless_server_e2e import ProxylessServer, auth, identity

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(240)]

AUTHORITY = "echo:9090"


def mesh_data(port: int, mode: str, allowed: list[str]) -> dict[str, Any]:
    """echo: one endpoint, the proxyless server (ServiceAccount echo); calls from
    ``allowed`` only (no rule when empty)."""
    rules = ([{"name": "allowed", "action": "allow",
               "from": [{"principals": [spiffe(a) for a in allowed]}]}] if allowed else [])
    return {"services": [{
        "name": "echo", "port": 9090, "protocol": "grpc",
        "endpoints": [{"address": "127.0.0.1", "port": port, "service_account": "echo",
                       "proxyless": True}],
        "security": {"mtls": {"mode": mode}, "authorization": rules},
    }]}


def through(envoy: Envoy, timeout: float = 5.0) -> dict[str, str]:
    """One gRPC call from ``envoy``'s app, through its egress listener: the answer, or
    the status code's name."""
    with grpc.insecure_channel(f"127.0.0.1:{envoy.egress_port}",
                               options=[("grpc.default_authority", AUTHORITY)]) as channel:
        try:
            answer = channel.unary_unary(METHOD)(b"", timeout=timeout)
        except grpc.RpcError as error:
            return {"code": error.code().name, "details": str(error.details())}
    return {"ok": bytes(answer).decode()}


def answered(envoy: Envoy, what: str) -> dict[str, str]:
    """Wait (bounded) until a call from ``envoy`` is answered: the sidecar has its
    certificate, the cluster and the endpoint, and the server its Listener."""
    found: dict[str, str] = wait_for(lambda: (a if "ok" in (a := through(envoy)) else None),
                                     timeout=60, what=what)
    return found


@pytest.fixture
def rig(tmp_path: Path, request: pytest.FixtureRequest
        ) -> Iterator[tuple[SecureMesh, ProxylessServer]]:
    mode: str = request.param
    mesh = SecureMesh(tmp_path)
    port = free_port()
    server: ProxylessServer | None = None
    try:
        mesh.serve(mesh_data(port, mode, ["web"] if mode == "strict" else []))
        server = ProxylessServer(mesh, port)
        server.start(certificates=mode == "strict")
        yield mesh, server
    finally:
        if server is not None:
            server.stop()
        mesh.close()


@pytest.mark.parametrize("rig", ["strict"], indirect=True)
def test_a_sidecar_calls_a_strict_proxyless_server_with_its_identity(
        rig: tuple[SecureMesh, ProxylessServer]) -> None:
    mesh, server = rig
    web = mesh.sidecar("web-1.default", "web", "web", False)

    # The server's gRPC verified the sidecar's certificate (TLS, ALPN h2 selected) and
    # its rule allows web.
    answer = answered(web, "web's sidecar -> the strict proxyless server")
    assert auth(answer).get("transport_security_type") == ["tls"], answer
    assert identity(answer) == [spiffe("web")], answer

    # Another sidecar, with a valid certificate of its own: gRPC's RBAC refuses it.
    other = mesh.sidecar("other-1.default", "other", "other", False)
    denied = wait_for(lambda: (a if a.get("code") == "PERMISSION_DENIED"
                               else None) if "ok" not in (a := through(other)) else a,
                      timeout=60, what="other's sidecar to be refused by the server")
    assert denied.get("code") == "PERMISSION_DENIED", denied

    # The sidecar's cluster used the proxyless match, and its handshakes succeeded.
    handshakes = stats_matching(web, "outbound|9090||echo.", "ssl.handshake")
    assert handshakes and all(v > 0 for v in handshakes.values()), handshakes

    # No private key in the control plane's log or the server's.
    assert mesh.server is not None
    key_body = _key_body(server.workload.cert_dir / "key.pem")
    for text in (mesh.server.log_path.read_text(), server.log_path.read_text()):
        assert key_body not in text


@pytest.mark.parametrize("rig", ["permissive"], indirect=True)
def test_a_sidecar_calls_a_permissive_proxyless_server_in_plaintext(
        rig: tuple[SecureMesh, ProxylessServer]) -> None:
    mesh, _ = rig
    web = mesh.sidecar("web-1.default", "web", "web", False)
    answer = answered(web, "web's sidecar -> the permissive proxyless server")
    assert auth(answer).get("transport_security_type") == ["insecure"], answer
    assert identity(answer) == [], answer
    assert not any(stats_matching(web, "outbound|9090||echo.", "ssl.handshake").values())
