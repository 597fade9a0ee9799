"""End to end, proxyless gRPC over mesh mTLS (gRFC A29): real processes only.

The control plane runs ``serve --ca-dir`` (xDS over TLS, token authentication:
tests/support/secure.py). A real grpcio server sits behind a real Envoy sidecar whose
inbound is STRICT and whose authorization allows only the client's identity. The
client's bootstrap comes from ``controlplane bootstrap --grpc --cert-dir``; its
certificate from ``controlplane certs`` (an xDS stream as the client's node, SDS);
the client is a real grpcio process dialling ``xds:///echo`` with
``grpc.xds_channel_credentials``. The app behind the sidecar answers with the
``x-forwarded-client-cert`` it got: the client's SPIFFE ID, verified by the sidecar.
"""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from collections.abc import Iterator
from concurrent import futures
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import grpc
import pytest
from cryptography import x509

from controlplane.security import tokens
from controlplane.security.identity import SpiffeId
from tests.support.files import write_atomic
from tests.support.procs import end, wait_for
from tests.support.secure import TRUST_DOMAIN, SecureMesh, spiffe

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(180)]

METHOD = "/test.Echo/Call"
XFCC = "x-forwarded-client-cert"

# One call (waiting for the channel up to its deadline), printed as JSON: the answer
# (the XFCC the app saw) or the status code's name.
CLIENT = r'''
import json, sys
import grpc
target, secure = sys.argv[1], sys.argv[2] == "xds"
if secure:
    from grpc.experimental import insecure_channel_credentials
    creds = grpc.xds_channel_credentials(fallback_credentials=insecure_channel_credentials())
    channel = grpc.secure_channel(target, creds)
else:
    channel = grpc.insecure_channel(target)
call = channel.unary_unary("/test.Echo/Call")
try:
    answer = call(b"", timeout=float(sys.argv[3]), wait_for_ready=True)
    print(json.dumps({"ok": answer.decode()}), flush=True)
except grpc.RpcError as error:
    print(json.dumps({"code": error.code().name, "details": error.details()}), flush=True)
'''


class XfccEcho:
    """A grpcio server on 127.0.0.1 answering each call with the XFCC it received."""

    def __init__(self) -> None:
        self.calls = 0
        echo = self

        class Handler(grpc.GenericRpcHandler):
            def service(self, details: Any) -> Any:
                return grpc.unary_unary_rpc_method_handler(echo.handle)

        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
        self.server.add_generic_rpc_handlers((Handler(),))
        self.port = self.server.add_insecure_port("127.0.0.1:0")
        self.server.start()

    def handle(self, request: bytes, context: grpc.ServicerContext) -> bytes:
        self.calls += 1
        return str(dict(context.invocation_metadata()).get(XFCC, "")).encode()

    def stop(self) -> None:
        self.server.stop(0)


def mesh_data(sidecar_port: int | None) -> dict[str, Any]:
    """echo: STRICT, runs as ServiceAccount echo, and takes calls from client only."""
    endpoints = ([{"address": "127.0.0.1", "port": sidecar_port, "service_account": "echo"}]
                 if sidecar_port else [])
    return {"services": [{
        "name": "echo", "port": 9090, "protocol": "grpc", "service_accounts": ["echo"],
        "endpoints": endpoints,
        "security": {"mtls": {"mode": "strict"}, "authorization": [
            {"name": "only-client", "action": "allow",
             "from": [{"principals": [spiffe("client")]}]}]},
    }]}


class Workload:
    """A proxyless client's files: its bootstrap, token and certificate directory."""

    def __init__(self, mesh: SecureMesh, node_id: str, account: str,
                 certs: bool = True) -> None:
        assert mesh.server is not None
        self.mesh = mesh
        self.node_id = node_id
        self.bootstrap = mesh.tmp / f"{node_id}-bootstrap.json"
        self.cert_dir = mesh.tmp / f"{node_id}-certs"
        self.token = mesh.token_path(node_id)
        made = run_cli("bootstrap", "--grpc", "--node-id", node_id, "--service", account,
                       "--service-account", account, "--xds-ca", str(mesh.bundle),
                       "--token-file", str(self.token), "--ca-dir", str(mesh.ca_dir),
                       "--xds-address", f"127.0.0.1:{mesh.server.xds_port}",
                       *(["--cert-dir", str(self.cert_dir)] if certs else []),
                       "-o", str(self.bootstrap))
        assert made.returncode == 0, made.stderr

    def env(self) -> dict[str, str]:
        return {**os.environ, "GRPC_XDS_BOOTSTRAP": str(self.bootstrap),
                "GRPC_EXPERIMENTAL_XDS_BOOTSTRAP_CALL_CREDS": "true"}

    def certs_once(self) -> subprocess.CompletedProcess[str]:
        return run_cli("certs", "--bootstrap", str(self.bootstrap), "--once",
                       "--timeout", "30")

    def call(self, secure: bool = True, timeout: float = 30.0) -> dict[str, str]:
        done = subprocess.run(
            [sys.executable, "-c", CLIENT, "xds:///echo", "xds" if secure else "plain",
             str(timeout)], capture_output=True, text=True, timeout=timeout + 60,
            check=False, env=self.env())
        assert done.returncode == 0, done.stderr[-3000:]
        found: dict[str, str] = json.loads(done.stdout)
        return found


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "controlplane", *args],
                          capture_output=True, text=True, timeout=90, check=False)


@pytest.fixture
def rig(tmp_path: Path) -> Iterator[tuple[SecureMesh, XfccEcho]]:
    mesh = SecureMesh(tmp_path)
    app = XfccEcho()
    try:
        mesh.serve(mesh_data(None))
        sidecar = mesh.sidecar("echo-1.default", "echo", "echo", False, app_port=app.port)
        mesh.update(mesh_data(sidecar.inbound_port))
        yield mesh, app
    finally:
        mesh.close()
        app.stop()


def test_a_client_with_certificates_calls_strict_with_its_identity(
        rig: tuple[SecureMesh, XfccEcho]) -> None:
    mesh, app = rig
    client = Workload(mesh, "client-1", "client")
    got = client.certs_once()
    assert got.returncode == 0, got.stderr

    # The files gRPC's file_watcher reads: the client's own certificate, its key (0600),
    # the mesh roots; the key appears in nothing the command printed.
    leaf = x509.load_pem_x509_certificates((client.cert_dir / "cert.pem").read_bytes())[0]
    uris = leaf.extensions.get_extension_for_class(
        x509.SubjectAlternativeName).value.get_values_for_type(x509.UniformResourceIdentifier)
    assert uris == [spiffe("client")]
    assert stat.S_IMODE(os.stat(client.cert_dir / "key.pem").st_mode) == 0o600
    assert x509.load_pem_x509_certificates((client.cert_dir / "ca.pem").read_bytes())
    written = [json.loads(line) for line in got.stdout.splitlines() + got.stderr.splitlines()
               if line.startswith("{")]
    assert any(e.get("event") == "certs.written" and e.get("identity") == spiffe("client")
               for e in written), got.stdout + got.stderr

    answer = client.call()
    assert "ok" in answer, answer
    # The sidecar verified the client's certificate and tells the app who called.
    assert f"URI={spiffe('client')}" in answer["ok"], answer
    assert f"By={spiffe('echo')}" in answer["ok"], answer

    # Another workload with certificates of its own is a valid mesh peer, but the
    # authorization rule allows only client: RBAC answers 403 -> PERMISSION_DENIED.
    other = Workload(mesh, "other-1", "other")
    assert other.certs_once().returncode == 0
    calls = app.calls
    denied = other.call()
    assert denied.get("code") == "PERMISSION_DENIED", denied
    assert app.calls == calls

    # Without certificates the client calls in plaintext, and STRICT refuses it: the
    # connection is closed before any request reaches the app.
    plain = Workload(mesh, "plain-1", "client", certs=False)
    refused = plain.call(timeout=8.0)
    assert refused.get("code") in {"UNAVAILABLE", "DEADLINE_EXCEEDED"}, refused
    assert app.calls == calls

    # No private key in the server's log, the sidecar's log, or the agent's output.
    key_body = _key_body(client.cert_dir / "key.pem")
    assert mesh.server is not None
    for text in (mesh.server.log_path.read_text(), got.stdout, got.stderr,
                 *(envoy.log_path.read_text() for envoy in mesh.envoys)):
        assert key_body not in text
    notes = [e for e in mesh.server.logs() if e.get("event") == "proxyless.left_out"]
    assert any("STRICT service refuses" in " ".join(e.get("left_out", [])) for e in notes), notes


def test_the_agent_rewrites_the_files_on_rotation(tmp_path: Path) -> None:
    """Certificates of 6 s, renewed at half: the running agent writes each new one
    (a new serial, the same identity), switching the three files at once."""
    mesh = SecureMesh(tmp_path, cert_ttl="6s")
    agent: subprocess.Popen[bytes] | None = None
    try:
        mesh.serve(mesh_data(None))
        client = Workload(mesh, "client-1", "client")
        log = open(tmp_path / "agent.log", "w")  # noqa: SIM115 (closed below)
        agent = subprocess.Popen(
            [sys.executable, "-m", "controlplane", "certs", "--bootstrap",
             str(client.bootstrap), "--timeout", "30"],
            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        log.close()
        cert = client.cert_dir / "cert.pem"

        def serial() -> int | None:
            if not cert.exists():
                return None
            return x509.load_pem_x509_certificates(cert.read_bytes())[0].serial_number

        first = wait_for(serial, timeout=30, what="the agent's first certificate")
        second = wait_for(lambda: (s if (s := serial()) not in (None, first) else None),
                          timeout=30, what="a rotated certificate")
        assert second != first
        assert (client.cert_dir / "..data").is_symlink()
        assert len(list(client.cert_dir.glob("..certs-*"))) == 1  # old sets removed
        assert agent.poll() is None  # still running, for the next rotation
        # The server's view of the agent's stream shows the secret, its key redacted.
        assert mesh.server is not None
        status, dump, _ = mesh.server.get("/debug/config_dump?node=client-1")
        assert status == 200, dump
        assert "[redacted]" in dump
        assert _key_body(client.cert_dir / "key.pem") not in dump
    finally:
        end(agent)
        mesh.close()
    events = [json.loads(line) for line in (tmp_path / "agent.log").read_text().splitlines()
              if line.startswith("{")]
    assert sum(e.get("event") == "certs.written" for e in events) >= 2, events
    assert _key_body(client.cert_dir / "key.pem") not in (tmp_path / "agent.log").read_text()


def test_the_agent_exits_with_the_servers_refusal(tmp_path: Path) -> None:
    """A token bound to another node: the server refuses the stream, and the agent exits
    1 with its message (what to fix), having written nothing."""
    mesh = SecureMesh(tmp_path)
    try:
        mesh.serve(mesh_data(None))
        client = Workload(mesh, "client-1", "client")
        wrong = tokens.mint(mesh.authority(), SpiffeId(TRUST_DOMAIN, "default", "client"),
                            "someone-else", datetime.now(UTC), timedelta(hours=1))
        write_atomic(client.token, wrong)
        got = client.certs_once()
    finally:
        mesh.close()
    assert got.returncode == 1, got
    assert "PERMISSION_DENIED" in got.stderr and "someone-else" in got.stderr, got.stderr
    assert not (client.cert_dir / "key.pem").exists()


def _key_body(path: Path) -> str:
    """A line of the key's base64 body: what a leak would contain."""
    lines = [line for line in path.read_text().splitlines() if not line.startswith("-----")]
    return max(lines, key=len)
