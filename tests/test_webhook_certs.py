"""The webhook's certificate: made, shared, renewed before it expires, from files, kept in
a directory; its Secret and caBundle written with the concurrency the API server has
(409 AlreadyExists, resourceVersion conflicts) and the RBAC the manifests grant."""

from __future__ import annotations

import asyncio
import base64
import datetime
import threading
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest
from cryptography import x509

from controlplane import deploy
from controlplane.app import certificates, inject_config, start, start_webhook
from controlplane.inject.certs import (
    CertificateError,
    DirectoryStore,
    FileCertificates,
    ServingCert,
    dns_names,
    from_files,
    needs_renewal,
    renewed,
    self_made,
)
from controlplane.inject.webhook import Webhook, WebhookState
from controlplane.inject.webhook_kube import (
    KubernetesCertificates,
    SecretCertificates,
    write_ca_bundle,
)
from controlplane.settings import ServeSettings
from controlplane.sources.kubernetes import api_client
from controlplane.sources.kubernetes.kinds import (
    MUTATING_WEBHOOKS,
    SECRETS,
    WEBHOOK_CONFIGURATION,
    WEBHOOK_SECRET,
)
from tests.kube.apiserver import ApiServerDouble, StatusError
from tests.kube.rbac import Rbac
from tests.support.admission import ca_bundle, webhook_api

NAMES = dns_names("controlplane", deploy.NAMESPACE)
NOW = datetime.datetime(2026, 12, 1, tzinfo=datetime.UTC)


def days(n: float) -> datetime.timedelta:
    return datetime.timedelta(days=n)


@pytest.fixture
def api() -> Iterator[ApiServerDouble]:
    with webhook_api() as double:
        yield double


def secrets_of(api: ApiServerDouble, tmp_path: Path) -> SecretCertificates:
    client = api_client(api.kubeconfig(tmp_path / "kubeconfig"))
    return SecretCertificates(client, deploy.NAMESPACE, WEBHOOK_SECRET)


def issuer_of(cert: ServingCert) -> str:
    return cert.certificate.issuer.rfc4514_string()


# --- pure ---------------------------------------------------------------------------------


def test_a_self_made_certificate_is_ecdsa_for_the_service_names() -> None:
    cert = self_made(NAMES, NOW)
    leaf = cert.certificate
    assert leaf.signature_algorithm_oid.dotted_string == "1.2.840.10045.4.3.2"  # ECDSA-SHA256
    assert cert.names() == set(NAMES)
    (ca,) = x509.load_pem_x509_certificates(cert.ca_pem)
    leaf.verify_directly_issued_by(ca)
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is True
    assert leaf.not_valid_after_utc - NOW <= days(366)
    assert not needs_renewal(cert, NAMES, NOW + days(200))


def test_renewal_well_before_expiry_keeps_the_ca() -> None:
    cert = self_made(NAMES, NOW)
    later = NOW + days(250)  # a third of a year's validity left
    assert needs_renewal(cert, NAMES, later)
    fresh = renewed(cert, NAMES, later)
    assert fresh.ca_pem == cert.ca_pem  # caBundle stays put
    assert fresh.certificate.not_valid_after_utc > cert.certificate.not_valid_after_utc
    fresh.certificate.verify_directly_issued_by(x509.load_pem_x509_certificate(cert.ca_pem))


def test_a_ca_near_its_end_is_replaced_with_both_in_the_bundle() -> None:
    cert = self_made(NAMES, NOW)
    later = NOW + days(3650 - 900)
    fresh = renewed(cert, NAMES, later)
    new_ca, old_ca = x509.load_pem_x509_certificates(fresh.ca_pem)
    assert old_ca == x509.load_pem_x509_certificate(cert.ca_pem)
    fresh.certificate.verify_directly_issued_by(new_ca)
    assert fresh.ca_key_pem != cert.ca_key_pem


def test_other_names_need_a_new_certificate() -> None:
    cert = self_made(NAMES, NOW)
    assert needs_renewal(cert, dns_names("controlplane", "other"), NOW)


def test_files_that_do_not_match_are_refused_at_once(tmp_path: Path) -> None:
    one, two = self_made(NAMES, NOW), self_made(NAMES, NOW)
    (tmp_path / "tls.crt").write_bytes(one.cert_pem)
    (tmp_path / "tls.key").write_bytes(two.key_pem)
    with pytest.raises(CertificateError, match="give a PEM certificate and its PEM key"):
        from_files(tmp_path / "tls.crt", tmp_path / "tls.key")
    (tmp_path / "tls.key").write_bytes(one.key_pem)
    assert from_files(tmp_path / "tls.crt", tmp_path / "tls.key").cert_pem == one.cert_pem


def test_a_directory_keeps_the_certificate_between_runs(tmp_path: Path) -> None:
    store = DirectoryStore(tmp_path / "certs")
    first = store.ensure(NAMES, NOW)
    assert (tmp_path / "certs" / "tls.key").stat().st_mode & 0o077 == 0
    assert DirectoryStore(tmp_path / "certs").ensure(NAMES, NOW + days(10)) == first
    renewed_one = DirectoryStore(tmp_path / "certs").ensure(NAMES, NOW + days(300))
    assert renewed_one != first and renewed_one.ca_pem == first.ca_pem


# --- the Secret and the caBundle ----------------------------------------------------------


def test_the_first_replica_creates_the_secret_the_next_reads_it(
        api: ApiServerDouble, tmp_path: Path) -> None:
    made = secrets_of(api, tmp_path).ensure(NAMES, NOW)
    read = secrets_of(api, tmp_path).ensure(NAMES, NOW + days(1))
    assert made == read
    assert api.count("create", SECRETS) == 1
    stored = api.get(SECRETS, deploy.NAMESPACE, WEBHOOK_SECRET)
    assert base64.b64decode(stored["data"]["tls.crt"]) == made.cert_pem


def test_replicas_racing_to_create_end_with_one_certificate(
        api: ApiServerDouble, tmp_path: Path) -> None:
    """Both read 404 and create; the API server lets one win (409 AlreadyExists for the
    other), and the loser serves the winner's certificate."""
    results: list[ServingCert] = []
    barrier = threading.Barrier(4, timeout=10)

    def replica(source: SecretCertificates) -> None:
        barrier.wait()
        results.append(source.ensure(NAMES, NOW))

    threads = [threading.Thread(target=replica, args=(secrets_of(api, tmp_path),))
               for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert len(results) == 4 and len(set(results)) == 1
    stored = api.get(SECRETS, deploy.NAMESPACE, WEBHOOK_SECRET)
    assert base64.b64decode(stored["data"]["tls.crt"]) == results[0].cert_pem


def test_a_certificate_near_expiry_is_replaced_once(api: ApiServerDouble,
                                                    tmp_path: Path) -> None:
    old = secrets_of(api, tmp_path).ensure(NAMES, NOW)
    later = NOW + days(300)
    first = secrets_of(api, tmp_path).ensure(NAMES, later)
    second = secrets_of(api, tmp_path).ensure(NAMES, later)  # another replica: reads it
    assert first == second != old
    assert first.ca_pem == old.ca_pem
    assert api.count("update", SECRETS) == 1


def test_an_unusable_secret_is_replaced(api: ApiServerDouble, tmp_path: Path) -> None:
    api.create({"apiVersion": "v1", "kind": "Secret", "type": "Opaque",
                "metadata": {"name": WEBHOOK_SECRET, "namespace": deploy.NAMESPACE},
                "data": {"tls.crt": base64.b64encode(b"junk").decode()}})
    cert = secrets_of(api, tmp_path).ensure(NAMES, NOW)
    assert cert.names() == set(NAMES)


def test_the_ca_bundle_is_written_to_every_webhook_and_only_when_it_changes(
        api: ApiServerDouble, tmp_path: Path) -> None:
    client = api_client(api.kubeconfig(tmp_path / "kubeconfig"))
    cert = self_made(NAMES, NOW)
    assert write_ca_bundle(client, WEBHOOK_CONFIGURATION, cert.ca_pem)
    assert ca_bundle(api) == cert.ca_pem
    version = api.get(MUTATING_WEBHOOKS, "", WEBHOOK_CONFIGURATION)["metadata"][
        "resourceVersion"]
    assert write_ca_bundle(client, WEBHOOK_CONFIGURATION, cert.ca_pem)
    assert api.get(MUTATING_WEBHOOKS, "", WEBHOOK_CONFIGURATION)["metadata"][
        "resourceVersion"] == version
    # The rest of the configuration is as it was applied (the API server's defaults on).
    stored = api.get(MUTATING_WEBHOOKS, "", WEBHOOK_CONFIGURATION)
    for applied, hook in zip(deploy.mutating_webhook_configuration()["webhooks"],
                             stored["webhooks"], strict=True):
        without = {**hook, "clientConfig": {k: v for k, v in hook["clientConfig"].items()
                                            if k != "caBundle"}}
        assert without == applied


def test_a_conflict_while_writing_the_bundle_is_read_again(
        api: ApiServerDouble, tmp_path: Path) -> None:
    """Someone (kubectl apply) changes the configuration between our read and our patch:
    the patch carries the version it read, gets 409, and the write is done again."""
    client = api_client(api.kubeconfig(tmp_path / "kubeconfig"))
    cert = self_made(NAMES, NOW)
    real_read = api._store.get
    bumped = threading.Event()

    def read_then_change(kind, namespace, name):  # type: ignore[no-untyped-def]
        found = real_read(kind, namespace, name)
        if kind == MUTATING_WEBHOOKS and not bumped.is_set():
            bumped.set()
            changed = real_read(kind, namespace, name)
            changed["metadata"].setdefault("labels", {})["touched"] = "yes"
            api._store.update(changed)
        return found

    api._store.get = read_then_change  # type: ignore[method-assign]
    try:
        assert write_ca_bundle(client, WEBHOOK_CONFIGURATION, cert.ca_pem)
    finally:
        api._store.get = real_read  # type: ignore[method-assign]
    assert bumped.is_set()
    assert ca_bundle(api) == cert.ca_pem
    stored = api.get(MUTATING_WEBHOOKS, "", WEBHOOK_CONFIGURATION)
    assert stored["metadata"]["labels"]["touched"] == "yes"  # their change kept
    assert api.count("patch", MUTATING_WEBHOOKS) == 2


async def test_a_configuration_applied_after_the_server_gets_its_ca_in_seconds(
        api: ApiServerDouble, tmp_path: Path) -> None:
    """``kubectl apply -f deploy/kubernetes/`` creates the Deployment before the webhook
    configuration: the CA goes in once it exists, not at the next hourly check."""
    api.delete(MUTATING_WEBHOOKS, "", WEBHOOK_CONFIGURATION)
    settings = ServeSettings(source="kubernetes",
                             kubeconfig=api.kubeconfig(tmp_path / "kubeconfig"),
                             webhook_address="127.0.0.1:0", webhook_namespace=deploy.NAMESPACE)
    webhook = Webhook(WebhookState(inject_config(settings)), certificates(settings), NAMES,
                      retry_interval=0.1)
    await webhook.start("127.0.0.1", 0)
    try:
        await asyncio.wait_for(webhook.has_certificate.wait(), 10)
        assert webhook.state.cert is not None  # served already, though nobody trusts it
        api.create(deploy.mutating_webhook_configuration())
        for _ in range(100):
            hooks = api.get(MUTATING_WEBHOOKS, "", WEBHOOK_CONFIGURATION)["webhooks"]
            if all("caBundle" in h["clientConfig"] for h in hooks):
                break
            await asyncio.sleep(0.1)
        assert ca_bundle(api) == webhook.state.cert.ca_pem
    finally:
        await webhook.stop()


def test_without_the_rbac_the_error_names_the_rule(tmp_path: Path) -> None:
    with ApiServerDouble(crd_installed=False, rbac=Rbac(rules=[])) as api:
        api.create(deploy.mutating_webhook_configuration())
        with pytest.raises(CertificateError, match="secrets get/create/update in "
                           "controlplane-system"):
            secrets_of(api, tmp_path).ensure(NAMES, NOW)


def test_the_shipped_rbac_allows_exactly_our_objects(api: ApiServerDouble,
                                                     tmp_path: Path) -> None:
    rbac = Rbac()
    assert rbac.allows("get", SECRETS, deploy.NAMESPACE, name=WEBHOOK_SECRET)
    assert not rbac.allows("get", SECRETS, deploy.NAMESPACE, name="other")
    assert not rbac.allows("get", SECRETS, "default", name=WEBHOOK_SECRET)
    assert not rbac.allows("list", SECRETS, deploy.NAMESPACE)
    assert rbac.allows("patch", MUTATING_WEBHOOKS, None, name=WEBHOOK_CONFIGURATION)
    assert not rbac.allows("patch", MUTATING_WEBHOOKS, None, name="istio-sidecar-injector")
    other = {"apiVersion": "admissionregistration.k8s.io/v1",
             "kind": "MutatingWebhookConfiguration", "metadata": {"name": "someone-else"},
             "webhooks": []}
    api.create(other)
    client = api_client(api.kubeconfig(tmp_path / "kubeconfig"))
    with pytest.raises(CertificateError, match="not allowed"):
        write_ca_bundle(client, "someone-else", b"x")
    with pytest.raises(StatusError, match="already exists"):
        api.create(other)


def test_given_files_still_fill_the_ca_bundle(api: ApiServerDouble, tmp_path: Path) -> None:
    cert = self_made(NAMES, NOW)
    for name, data in (("tls.crt", cert.cert_pem), ("tls.key", cert.key_pem),
                       ("ca.crt", cert.ca_pem)):
        (tmp_path / name).write_bytes(data)
    client = api_client(api.kubeconfig(tmp_path / "kubeconfig"))
    source = KubernetesCertificates(client, WEBHOOK_CONFIGURATION, FileCertificates(
        tmp_path / "tls.crt", tmp_path / "tls.key", tmp_path / "ca.crt"))
    found = source.ensure(NAMES, NOW)
    assert found.cert_pem == cert.cert_pem
    assert source.publish(found)
    assert ca_bundle(api) == cert.ca_pem
    assert api.objects(SECRETS) == []  # the Secret is for self-made ones only


# --- in the server ------------------------------------------------------------------------


async def test_mesh_file_mode_runs_the_webhook_only_when_asked(tmp_path: Path) -> None:
    mesh = tmp_path / "mesh.yaml"
    mesh.write_text("services: []\n")
    base = {"source": f"file:{mesh}", "xds_address": "127.0.0.1:0",
            "admin_address": "127.0.0.1:0", "snapshot_keep": 0}
    assert await start_webhook(ServeSettings(**base)) is None
    running = await start(ServeSettings(**base, webhook_address="127.0.0.1:0",
                                        webhook_cert_dir=tmp_path / "certs"))
    try:
        assert running.webhook is not None
        await asyncio.wait_for(running.webhook.has_certificate.wait(), 10)
        assert (tmp_path / "certs" / "ca.crt").exists()
    finally:
        await running.stop()
    assert running.webhook.state.cert is not None


def test_bad_injection_settings_are_refused_at_start(tmp_path: Path) -> None:
    settings = ServeSettings(source="file:x", webhook_address="127.0.0.1:0",
                             inject_proxy_memory="lots")
    with pytest.raises(ValueError, match="CONTROLPLANE_INJECT_"):
        asyncio.run(start_webhook(settings))
    with pytest.raises(ValueError, match="go together"):
        asyncio.run(start_webhook(ServeSettings(source="file:x", webhook_address="127.0.0.1:0",
                                                webhook_cert=tmp_path / "c")))


async def test_readiness_reports_a_webhook_without_certificate_but_never_waits(
        tmp_path: Path) -> None:
    """xDS does not need the webhook: /readyz turns ready with the mesh, and says why
    the webhook cannot serve yet (files that are not there, here)."""
    mesh = tmp_path / "mesh.yaml"
    mesh.write_text("services: []\n")
    running = await start(ServeSettings(
        source=f"file:{mesh}", xds_address="127.0.0.1:0", admin_address="127.0.0.1:0",
        snapshot_keep=0, webhook_address="127.0.0.1:0", webhook_cert=tmp_path / "no.crt",
        webhook_key=tmp_path / "no.key"))
    try:
        assert running.webhook is not None
        async with aiohttp.ClientSession() as session:
            for _ in range(100):
                async with session.get(
                        f"http://127.0.0.1:{running.admin_port}/readyz") as answer:
                    text = await answer.text()
                    if answer.status == 200 and "no.crt" in text:
                        break
                await asyncio.sleep(0.1)
        assert answer.status == 200, text
        assert "injection webhook has no certificate yet" in text and "no.crt" in text
    finally:
        await running.stop()


def test_the_webhook_runs_by_default_only_in_a_pod(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    assert ServeSettings(source="kubernetes").webhook_listen() is None
    monkeypatch.setenv("KUBERNETES_SERVICE_HOST", "10.96.0.1")
    assert ServeSettings(source="kubernetes").webhook_listen() == "0.0.0.0:15017"
    assert ServeSettings(source="kubernetes", webhook_address="off").webhook_listen() is None
    assert ServeSettings(source="file:m.yaml").webhook_listen() is None
    assert ServeSettings(source="file:m.yaml",
                         webhook_address="127.0.0.1:1").webhook_listen() == "127.0.0.1:1"


async def test_a_taken_webhook_port_names_the_setting(tmp_path: Path) -> None:
    import socket

    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        settings = ServeSettings(source="file:x", webhook_address=f"127.0.0.1:{port}",
                                 webhook_cert_dir=tmp_path / "c")
        with pytest.raises(ValueError, match="--webhook-address"):
            await start_webhook(settings)
