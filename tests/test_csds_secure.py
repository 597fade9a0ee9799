"""CSDS on a secured xDS port (TLS, token authentication): only a token of the control
plane's namespace reads it, a refusal says what to do, and the answer carries the
sidecar's secrets redacted, never its private key."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import grpc
import pytest
from envoy.extensions.transport_sockets.tls.v3 import secret_pb2
from envoy.service.status.v3 import csds_pb2, csds_pb2_grpc

from controlplane import resource
from controlplane.security import tokens
from controlplane.security.identity import SpiffeId
from tests.support.procs import wait_for
from tests.support.secure import TRUST_DOMAIN, SecureMesh

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(120)]
STATUS_NAMESPACE = "controlplane-system"


@pytest.fixture
def mesh(tmp_path: Path) -> Iterator[SecureMesh]:
    secured = SecureMesh(tmp_path)
    yield secured
    secured.close()


def token(mesh: SecureMesh, namespace: str) -> str:
    return tokens.mint(mesh.authority(), SpiffeId(TRUST_DOMAIN, namespace, "operator"), None,
                       datetime.now(UTC), timedelta(minutes=10))


def fetch(mesh: SecureMesh, bearer: str | None) -> csds_pb2.ClientStatusResponse:
    assert mesh.server is not None
    credentials = grpc.ssl_channel_credentials(root_certificates=mesh.bundle.read_bytes())
    metadata = [("authorization", f"Bearer {bearer}")] if bearer else []
    with grpc.secure_channel(f"127.0.0.1:{mesh.server.xds_port}", credentials) as channel:
        stub = csds_pb2_grpc.ClientStatusDiscoveryServiceStub(channel)
        answer: csds_pb2.ClientStatusResponse = stub.FetchClientStatus(
            csds_pb2.ClientStatusRequest(), timeout=10, metadata=metadata)
        return answer


def refused(mesh: SecureMesh, bearer: str | None) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as caught:
        fetch(mesh, bearer)
    return caught.value


def test_only_the_status_namespace_reads_csds_and_no_key_leaves(mesh: SecureMesh) -> None:
    # Strict mTLS and a sidecar with an inbound port: it asks for its certificate (SDS).
    mesh.serve({"security": {"mtls": {"mode": "strict"}}, "services": [
        {"name": name, "port": 9080, "service_accounts": [name], "endpoints": []}
        for name in ("frontend", "ratings")]})
    app = mesh.http_app("frontend-app")
    mesh.sidecar("frontend-1.default", "frontend", "frontend", False, app_port=app.port)

    missing = refused(mesh, None)
    assert missing.code() == grpc.StatusCode.UNAUTHENTICATED
    assert "--token-file FILE with a token of the control plane's namespace" in str(
        missing.details())
    other = refused(mesh, token(mesh, "default"))
    assert other.code() == grpc.StatusCode.PERMISSION_DENIED
    assert f"not '{STATUS_NAMESPACE}' (--status-namespace)" in str(other.details())

    allowed = token(mesh, STATUS_NAMESPACE)

    def synced() -> csds_pb2.ClientConfig | None:
        answer = fetch(mesh, allowed)
        [config] = answer.config or [None]
        if config is None:
            return None
        secrets = [e for e in config.generic_xds_configs if e.type_url == resource.SECRET]
        done = secrets and all(e.config_status == csds_pb2.SYNCED
                               for e in config.generic_xds_configs)
        return config if done else None

    config = wait_for(synced, timeout=30, what="frontend-1 SYNCED, with its secrets")
    assert config.node.id == "frontend-1.default"
    raw = fetch(mesh, allowed).SerializeToString()
    assert b"PRIVATE KEY" not in raw  # no PEM key, in any secret, anywhere
    shown = {}
    for entry in config.generic_xds_configs:
        if entry.type_url == resource.SECRET:
            secret = secret_pb2.Secret()
            entry.xds_config.Unpack(secret)
            shown[secret.name] = secret
    own = shown["default"].tls_certificate
    assert own.private_key.inline_string == "[redacted]"
    assert b"BEGIN CERTIFICATE" in own.certificate_chain.inline_bytes \
        or "BEGIN CERTIFICATE" in own.certificate_chain.inline_string

    # controlplane status over TLS with a token minted as the README says: the table.
    token_file = mesh.tmp / "operator.token"
    subprocess.run([sys.executable, "-m", "controlplane", "bootstrap", "--node-id", "ops",
                    "--service", "ops", "--namespace", STATUS_NAMESPACE, "--ca-dir",
                    str(mesh.ca_dir), "--token-file", str(token_file), "-o", os.devnull],
                   check=True, timeout=60)
    assert mesh.server is not None
    done = subprocess.run(
        [sys.executable, "-m", "controlplane", "status", "--server",
         f"127.0.0.1:{mesh.server.xds_port}", "--ca", str(mesh.bundle), "--token-file",
         str(token_file)], capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    [row] = [line.split() for line in done.stdout.splitlines()
             if line.startswith("frontend-1.default")]
    assert row[4:9] == ["SYNCED"] * 5, done.stdout  # CDS LDS EDS RDS SDS
    # Without the token the command says what to give it.
    plain = subprocess.run(
        [sys.executable, "-m", "controlplane", "status", "--server",
         f"127.0.0.1:{mesh.server.xds_port}", "--ca", str(mesh.bundle)],
        capture_output=True, text=True, timeout=60, check=False)
    assert plain.returncode == 2
    assert "UNAUTHENTICATED" in plain.stderr and "--token-file" in plain.stderr
