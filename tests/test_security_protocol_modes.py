"""How ``serve`` runs its CA (issue 11), in-process: a root rotated in ``--ca-dir`` reaches
every connected proxy without a restart (new certificate, bundle with both roots);
``--authentication none`` serves plaintext xDS, takes the identity from the node's claim and
says so in a warning at start; without a CA nothing changes (no identities, plaintext);
the xDS serving certificate is renewed at half its life and after a CA change."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from structlog.testing import capture_logs

from controlplane import app
from controlplane.security import castore, tokens
from controlplane.security.ca import CertificateAuthority
from controlplane.security.identity import SpiffeId
from controlplane.security.sds import CERT_SECRET, ROOT_SECRET
from controlplane.server.tls import ServingCertificate, server_names
from controlplane.settings import ServeSettings
from tests.test_security_bounds import MESH, channel_to, token
from tests.test_security_protocol import TD, Client, identity_of, refused, sds_request, secrets


def settings(tmp_path: Path, **more: object) -> ServeSettings:
    (tmp_path / "mesh.yaml").write_text(MESH)
    return ServeSettings(xds_address="127.0.0.1:0", admin_address="127.0.0.1:0",
                         source=f"file:{tmp_path / 'mesh.yaml'}", snapshot_keep=0,
                         **more)  # type: ignore[arg-type]


async def ready(running: app.Running) -> None:
    for _ in range(200):
        if running.pipeline.current is not None:
            return
        await asyncio.sleep(0.05)
    raise AssertionError("no mesh accepted")


def roots_in(bundle: bytes) -> set[int]:
    return {c.serial_number for c in x509.load_pem_x509_certificates(bundle)}


async def test_a_rotated_root_reaches_connected_proxies(tmp_path: Path) -> None:
    running = await app.start(settings(tmp_path, ca_dir=tmp_path / "ca",
                                       ca_poll_interval=0.2))
    try:
        await ready(running)
        assert running.secured is not None
        old = running.secured.trust.current()
        channel = channel_to(running)
        client = Client(channel, token=token(running, "frontend", "frontend-1"))
        await client.send(**sds_request(client, "frontend-1", "frontend"))
        first = await secrets(client)
        assert roots_in(first[ROOT_SECRET].validation_context.trusted_ca.inline_bytes) \
            == {r.serial_number for r in old.roots}
        new = await asyncio.to_thread(castore.rotate_dir, tmp_path / "ca", TD,
                                      datetime.now(UTC))
        second = await secrets(client)  # pushed on the open stream, no restart
        bundle = second[ROOT_SECRET].validation_context.trusted_ca.inline_bytes
        assert roots_in(bundle) == {r.serial_number for r in new.roots}
        assert len(roots_in(bundle)) == 2  # the old root stays trusted until pruned
        uris, cert = identity_of(second[CERT_SECRET])
        assert uris == [f"spiffe://{TD}/ns/default/sa/frontend"]
        assert cert.issuer == new.signer_cert.subject
        await client.close()
        await channel.close()
    finally:
        await running.stop(0)


async def test_unauthenticated_mode_trusts_the_node_and_warns(tmp_path: Path) -> None:
    with capture_logs() as logs:
        running = await app.start(settings(tmp_path, ca_dir=tmp_path / "ca",
                                           authentication="none"))
    try:
        await ready(running)
        warned = [e for e in logs if e["event"] == "serve.unauthenticated"]
        assert warned and warned[0]["log_level"] == "warning"
        assert "development only" in warned[0]["hint"]
        channel = grpc.aio.insecure_channel(f"127.0.0.1:{running.xds_port}")
        client = Client(channel)  # no credential, plaintext
        await client.send(**sds_request(client, "anything-1", "frontend",
                                        service_account="frontend"))
        got = await secrets(client)
        assert identity_of(got[CERT_SECRET])[0] == [f"spiffe://{TD}/ns/default/sa/frontend"]
        await client.close()
        bad = Client(channel)
        error = await refused(bad, **sds_request(bad, "x-1", "frontend",
                                                 service_account="Not_A_Name"))
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "service_account" in (error.details() or "")
        await channel.close()
    finally:
        await running.stop(0)


async def test_without_a_ca_nothing_changes(tmp_path: Path) -> None:
    running = await app.start(settings(tmp_path))
    try:
        await ready(running)
        assert running.secured is None
        assert running.pipeline.current is not None
        assert running.pipeline.current.mesh.identity is None
        channel = grpc.aio.insecure_channel(f"127.0.0.1:{running.xds_port}")
        client = Client(channel)
        await client.send(**sds_request(client, "frontend-1", "frontend"))
        answer = await client.recv(10)  # no secrets to serve, and no refusal
        assert list(answer.resources) == [] and client.error is None
        await client.close()
        await channel.close()
    finally:
        await running.stop(0)


async def test_token_authentication_needs_a_ca(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="--ca-dir"):
        await app.start(settings(tmp_path, authentication="token"))


async def test_the_trust_domain_is_the_meshs_and_the_certificates(tmp_path: Path) -> None:
    running = await app.start(settings(tmp_path, ca_dir=tmp_path / "ca",
                                       trust_domain="example.org"))
    try:
        await ready(running)
        assert running.pipeline.current is not None
        identity = running.pipeline.current.mesh.identity
        assert identity is not None and identity.trust_domain == "example.org"
        assert running.secured is not None
        ca = running.secured.trust.current()
        channel = grpc.aio.secure_channel(f"127.0.0.1:{running.xds_port}",
                                          grpc.ssl_channel_credentials(ca.bundle_pem))
        client = Client(channel, token=tokens.mint(
            ca, SpiffeId("example.org", "default", "frontend"), "frontend-1",
            datetime.now(UTC), timedelta(hours=1)))
        await client.send(**sds_request(client, "frontend-1", "frontend"))
        got = await secrets(client)
        assert identity_of(got[CERT_SECRET])[0] == [
            "spiffe://example.org/ns/default/sa/frontend"]
        await client.close()
        await channel.close()
    finally:
        await running.stop(0)


def test_serving_certificate_is_renewed_at_half_life_and_on_a_ca_change() -> None:
    start = datetime.now(UTC)
    clock = [start]
    ca = [CertificateAuthority.create(TD, start)]
    serving = ServingCertificate(lambda: ca[0], *server_names("mesh", ["xds.example"]),
                                 ttl=timedelta(hours=2), clock=lambda: clock[0])
    leaf = x509.load_pem_x509_certificates(serving.issued.cert_pem)[0]
    names = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert {"controlplane.mesh.svc", "localhost", "xds.example"} <= set(
        names.get_values_for_type(x509.DNSName))
    assert serving.fetch() is None  # fresh: keep it
    clock[0] = start + timedelta(hours=1, minutes=5)  # past half its life
    assert serving.fetch() is not None
    renewed = serving.issued.serial
    assert serving.fetch() is None
    ca[0] = CertificateAuthority.create(TD, clock[0])  # a new CA: renewed at once
    assert serving.fetch() is not None and serving.issued.serial != renewed


@pytest.mark.parametrize(("flags", "said"), [
    (["--authentication", "token"], "--authentication token needs a CA"),
    (["--ca-dir", "CA", "--workload-cert-ttl", "3x"], "--workload-cert-ttl: duration '3x'"),
    (["--ca-dir", "CA", "--workload-cert-ttl", "0s"], "must be positive"),
    (["--ca-cert", "nope.pem"], "--ca-cert and --ca-key go together"),
    (["--ca-cert", "nope.pem", "--ca-key", "nope.key"], "cannot read --ca-cert"),
])
def test_bad_ca_flags_are_one_line_that_says_what_to_do(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], flags: list[str],
        said: str) -> None:
    from controlplane.cli import main

    (tmp_path / "mesh.yaml").write_text(MESH)
    given = [str(tmp_path / f) if f in ("CA", "nope.pem", "nope.key") else f for f in flags]
    code = main(["serve", "--source", f"file:{tmp_path / 'mesh.yaml'}", "--xds-address",
                 "127.0.0.1:0", "--admin-address", "127.0.0.1:0", "--snapshot-keep", "0",
                 *given])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1
    assert err[-1].startswith("controlplane serve: ") and said in err[-1]
    assert "Traceback" not in "\n".join(err)


async def test_the_webhook_is_served_from_the_mesh_ca(tmp_path: Path) -> None:
    """xDS and the injection webhook from one CA: its certificate is the mesh CA's, its
    caBundle the mesh bundle."""
    running = await app.start(settings(tmp_path, ca_dir=tmp_path / "ca",
                                       webhook_address="127.0.0.1:0",
                                       webhook_cert_dir=tmp_path / "webhook"))
    try:
        assert running.webhook is not None and running.secured is not None
        await asyncio.wait_for(running.webhook.has_certificate.wait(), 10)
        cert = running.webhook.state.cert
        assert cert is not None
        ca = running.secured.trust.current()
        assert cert.certificate.issuer == ca.signer_cert.subject
        assert cert.ca_pem == ca.bundle_pem
    finally:
        await running.stop(0)
