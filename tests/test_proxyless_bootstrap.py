"""``controlplane bootstrap --grpc``: the JSON bootstrap gRPC clients read, and a real
grpcio client using it, in plaintext and over TLS with the mesh CA's bundle and a token
(the recorder of tests/test_bootstrap_secure.py as the server)."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from controlplane.bootstrap_cmd import write_secret
from controlplane.bootstrap_grpc import GrpcBootstrapOptions, build_grpc_bootstrap
from controlplane.security import tokens
from controlplane.security.ca import CertificateAuthority
from controlplane.security.identity import SpiffeId
from tests.test_bootstrap_secure import AdsRecorder, ca_named, until

# Resolves one xds:/// name (its xDS stream is what the server records), then waits.
CLIENT = r'''
import sys, grpc
channel = grpc.insecure_channel("xds:///reviews:9080")
channel._channel.check_connectivity_state(True)
sys.stdin.read()
'''


def cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "controlplane", "bootstrap", "--grpc", *args],
                          capture_output=True, text=True, timeout=60, check=False, cwd=cwd)


def test_the_bootstrap_names_the_server_and_the_node() -> None:
    result = cli("--node-id", "ratings-client-1", "--service", "ratings",
                 "--namespace", "shop", "--zone", "zone-a", "--xds-address", "cp.mesh:18000")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == {
        "xds_servers": [{"server_uri": "cp.mesh:18000",
                         "channel_creds": [{"type": "insecure"}],
                         "server_features": ["xds_v3"]}],
        "node": {"id": "ratings-client-1", "cluster": "ratings",
                 "metadata": {"kind": "grpc", "namespace": "shop"},
                 "locality": {"zone": "zone-a"}},
    }


def test_tls_takes_the_bundle_file_and_the_token_file(tmp_path: Path) -> None:
    bundle = tmp_path / "roots.pem"
    bundle.write_text(ca_named("cluster.local").bundle_pem.decode())
    result = cli("--node-id", "c-1", "--service", "client", "--xds-ca", "roots.pem",
                 "--token-file", "client.token", "--xds-address", "[::1]:18000", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    [server] = json.loads(result.stdout)["xds_servers"]
    assert server["server_uri"] == "[::1]:18000"
    assert server["channel_creds"] == [{"type": "tls", "config": {
        "ca_certificate_file": str(bundle)}}]
    assert server["call_creds"] == [{"type": "jwt_token_file", "config": {
        "jwt_token_file": str(tmp_path / "client.token")}}]


@pytest.mark.parametrize(("args", "message"), [
    (["--delta"], "state-of-the-world"),
    (["--capture"], "state-of-the-world"),
    (["--token-file", "/run/token"], "--token-file needs --xds-ca"),
    (["--xds-address", "nowhere"], "--xds-address must be HOST:PORT"),
])
def test_bad_flags_say_what_to_do(args: list[str], message: str) -> None:
    result = cli("--node-id", "c-1", "--service", "client", *args)
    assert result.returncode == 2
    assert message in result.stderr


def test_a_token_needs_tls() -> None:
    with pytest.raises(ValueError, match="needs --xds-ca"):
        build_grpc_bootstrap(GrpcBootstrapOptions(node_id="n", service="s",
                                                  token_file="/t"))


@pytest.mark.parametrize("with_token", [True, False])
async def test_a_grpcio_client_speaks_tls_to_the_server_with_its_token(
        with_token: bool, tmp_path: Path) -> None:
    """The bundle verifies the server (its certificate names 127.0.0.1); with a token
    file, the stream carries ``authorization: Bearer <token>`` (gRFC A97 call
    credentials: grpcio reads them with GRPC_EXPERIMENTAL_XDS_BOOTSTRAP_CALL_CREDS)."""
    ca: CertificateAuthority = ca_named("cluster.local")
    (tmp_path / "roots.pem").write_bytes(ca.bundle_pem)
    # A JWT (gRPC reads its exp claim): one the server would take, bound to the node.
    minted = tokens.mint(ca, SpiffeId("cluster.local", "default", "client"), "c-1",
                         datetime.now(UTC), timedelta(hours=1))
    write_secret(tmp_path / "client.token", minted)
    async with AdsRecorder().serving(ca) as server:
        token = ["--token-file", "client.token"] if with_token else []
        made = cli("--node-id", "c-1", "--service", "client", "--xds-ca", "roots.pem",
                   *token, "--xds-address", f"127.0.0.1:{server.port}",
                   "-o", "bootstrap.json", cwd=tmp_path)
        assert made.returncode == 0, made.stderr
        env = {**os.environ, "GRPC_XDS_BOOTSTRAP": str(tmp_path / "bootstrap.json"),
               "GRPC_EXPERIMENTAL_XDS_BOOTSTRAP_CALL_CREDS": "true"}
        client = await asyncio.create_subprocess_exec(
            sys.executable, "-c", CLIENT, env=env, stdin=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE)
        try:
            await until(lambda: any(s.node_seen for s in server.streams), "a stream", 30)
            stream = server.streams[0]
            assert stream.transport == "ssl"
            expected = f"Bearer {minted}" if with_token else None
            assert stream.authorization == expected
        finally:
            assert client.stdin is not None
            client.stdin.close()
            try:
                await asyncio.wait_for(client.communicate(), 20)
            except TimeoutError:
                client.kill()
                await client.communicate()
