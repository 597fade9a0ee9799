"""The injection webhook's certificate from the mesh CA: xDS and the webhook served from one
CA, ``caBundle`` the mesh trust bundle (following a root rotation), no CA key kept beside
the serving certificate; a real TLS client that trusts only the bundle accepts it."""

from __future__ import annotations

import asyncio
import datetime
import ssl
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest
from cryptography import x509
from kubernetes.client import CoreV1Api

from controlplane import deploy
from controlplane.app import inject_config
from controlplane.inject.certs import (
    DirectoryStore,
    dns_names,
    issued_by,
    needs_renewal,
    renewed,
    self_made,
)
from controlplane.inject.webhook import Webhook, WebhookState
from controlplane.inject.webhook_kube import KubernetesCertificates, SecretCertificates
from controlplane.security import castore
from controlplane.security.ca import CertificateAuthority
from controlplane.settings import ServeSettings
from controlplane.sources.kubernetes import api_client
from controlplane.sources.kubernetes.kinds import (
    SECRETS,
    WEBHOOK_CONFIGURATION,
    WEBHOOK_SECRET,
)
from tests.kube.apiserver import ApiServerDouble
from tests.support.admission import ca_bundle, webhook_api

NAMES = dns_names("controlplane", deploy.NAMESPACE)
NOW = datetime.datetime(2026, 12, 1, tzinfo=datetime.UTC)


def days(n: float) -> datetime.timedelta:
    return datetime.timedelta(days=n)


@pytest.fixture
def api() -> Iterator[ApiServerDouble]:
    with webhook_api() as double:
        yield double


def test_the_mesh_ca_issues_the_serving_certificate_and_its_bundle_is_the_ca_bundle(
        tmp_path: Path) -> None:
    ca = castore.load_dir(tmp_path / "ca", "cluster.local", NOW)
    cert = self_made(NAMES, NOW, ca)
    assert cert.ca_pem == ca.bundle_pem and cert.ca_key_pem is None  # no CA key kept here
    assert cert.names() == set(NAMES) and issued_by(cert, ca)
    cert.certificate.verify_directly_issued_by(ca.signer_cert)
    assert not needs_renewal(cert, NAMES, NOW + days(200), ca)
    assert needs_renewal(cert, NAMES, NOW + days(250), ca)  # a third of its life left
    # A rotated root: reissued by the new signer, caBundle holds both roots.
    rotated = castore.rotate_dir(tmp_path / "ca", "cluster.local", NOW)
    assert needs_renewal(cert, NAMES, NOW, rotated)
    fresh = renewed(cert, NAMES, NOW, rotated)
    fresh.certificate.verify_directly_issued_by(rotated.signer_cert)
    assert x509.load_pem_x509_certificates(fresh.ca_pem) == [rotated.signer_cert,
                                                             ca.signer_cert]
    # A self-made one from before is replaced by the mesh CA's.
    assert needs_renewal(self_made(NAMES, NOW), NAMES, NOW, rotated)


def test_a_directory_moves_from_its_own_ca_to_the_mesh_ca(tmp_path: Path) -> None:
    own = DirectoryStore(tmp_path / "certs").ensure(NAMES, NOW)
    assert (tmp_path / "certs" / "ca.key").exists()
    ca = castore.load_dir(tmp_path / "ca", "cluster.local", NOW)
    store = DirectoryStore(tmp_path / "certs", ca=lambda: ca)
    mesh = store.ensure(NAMES, NOW + days(1))
    assert mesh != own and issued_by(mesh, ca)
    assert not (tmp_path / "certs" / "ca.key").exists()  # the old CA's key is gone
    assert store.ensure(NAMES, NOW + days(2)) == mesh  # kept, not reissued


async def test_the_webhook_serves_tls_a_mesh_trusting_client_accepts(
        tmp_path: Path) -> None:
    """A real handshake: the client trusts only the mesh bundle (what caBundle holds)."""
    ca = castore.load_dir(tmp_path / "ca", "cluster.local", NOW)
    settings = ServeSettings(source="file:x", webhook_address="127.0.0.1:0",
                             webhook_cert_dir=tmp_path / "certs")
    webhook = Webhook(WebhookState(inject_config(settings)),
                      DirectoryStore(tmp_path / "certs", ca=lambda: ca), [*NAMES, "localhost"])
    port = await webhook.start("127.0.0.1", 0)
    try:
        await asyncio.wait_for(webhook.has_certificate.wait(), 10)
        trusting = ssl.create_default_context(cadata=ca.bundle_pem.decode())
        async with aiohttp.ClientSession() as session:
            async with session.get(f"https://localhost:{port}/healthz",
                                   ssl=trusting) as answer:
                assert answer.status == 200
            other = CertificateAuthority.create("cluster.local", NOW)
            with pytest.raises(aiohttp.ClientConnectorCertificateError):
                await session.get(f"https://localhost:{port}/healthz",
                                  ssl=ssl.create_default_context(
                                      cadata=other.bundle_pem.decode()))
    finally:
        await webhook.stop()


def test_the_secret_keeps_only_the_serving_certificate_and_the_bundle_follows_the_ca(
        api: ApiServerDouble, tmp_path: Path) -> None:
    client = api_client(api.kubeconfig(tmp_path / "kubeconfig"))
    core = CoreV1Api(client)
    ca = castore.load_secret(core, deploy.NAMESPACE, trust_domain="cluster.local", now=NOW)
    current = [ca]
    source = KubernetesCertificates(client, WEBHOOK_CONFIGURATION, SecretCertificates(
        client, deploy.NAMESPACE, WEBHOOK_SECRET, ca=lambda: current[0]))
    first = source.ensure(NAMES, NOW)
    assert source.publish(first) and ca_bundle(api) == ca.bundle_pem
    stored = api.get(SECRETS, deploy.NAMESPACE, WEBHOOK_SECRET)
    assert set(stored["data"]) == {"tls.crt", "tls.key", "ca.crt"}  # no CA key
    current[0] = castore.rotate_secret(core, deploy.NAMESPACE, "controlplane-ca",
                                       "cluster.local", NOW)
    second = source.ensure(NAMES, NOW + days(1))
    assert issued_by(second, current[0]) and source.publish(second)
    assert ca_bundle(api) == current[0].bundle_pem != ca.bundle_pem  # both roots
    assert source.ensure(NAMES, NOW + days(2)) == second  # another replica: reads it
