"""The injection webhook as the API server meets it: real AdmissionReview v1 requests over
HTTPS, its certificate checked against the caBundle the control plane wrote into the API
server double's MutatingWebhookConfiguration, the JSON patch applied to the object the
controller sent, and the patched Pod accepted by the double's Pod validation."""

from __future__ import annotations

import asyncio
import copy
import datetime
import io
import json
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from prometheus_client import REGISTRY
from structlog.testing import capture_logs

from controlplane import deploy
from controlplane.app import start_webhook
from controlplane.inject.certs import renewed as renew
from controlplane.inject.certs import secret_data
from controlplane.inject.config import INIT_NAME, PROXY_NAME, STATUS_ANNOTATION, InjectConfig
from controlplane.inject.pod import inject_pod, inject_template
from controlplane.inject.webhook import Webhook
from controlplane.security.ca import CertificateAuthority
from controlplane.settings import ServeSettings
from controlplane.sources.kubernetes.kinds import (
    MUTATING_WEBHOOKS,
    SECRETS,
    WEBHOOK_CONFIGURATION,
    WEBHOOK_SECRET,
)
from tests.kube.apiserver import ApiServerDouble
from tests.support.admission import (
    app_pod,
    ca_bundle,
    client_context,
    patched,
    review_request,
    send,
    webhook_api,
    workload,
)

NAMESPACE = deploy.NAMESPACE
XDS = "controlplane.controlplane-system.svc:18000"


@pytest.fixture
def api() -> Iterator[ApiServerDouble]:
    """The API server with the shipped webhook configuration (no caBundle yet); the
    control plane talks to it as its service account, under the shipped RBAC."""
    with webhook_api() as double:
        yield double


def settings(api: ApiServerDouble, tmp_path: Path, **more: Any) -> ServeSettings:
    return ServeSettings(source="kubernetes",
                         kubeconfig=api.kubeconfig(tmp_path / "kubeconfig"),
                         webhook_address="127.0.0.1:0", webhook_namespace=NAMESPACE,
                         inject_xds_address=XDS, **more)


async def started(api: ApiServerDouble, tmp_path: Path, **more: Any) -> Webhook:
    webhook = await start_webhook(settings(api, tmp_path, **more))
    assert webhook is not None
    await webhook.has_certificate.wait()
    return webhook


@pytest.fixture
async def webhook(api: ApiServerDouble, tmp_path: Path) -> AsyncIterator[Webhook]:
    running = await started(api, tmp_path)
    yield running
    await running.stop()


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as client:
        yield client


def counted(result: str) -> float:
    return REGISTRY.get_sample_value("controlplane_injections_total",
                                     {"result": result}) or 0.0


def config() -> InjectConfig:
    return InjectConfig(xds_address=XDS)


# --- pods ---------------------------------------------------------------------------------


@pytest.mark.parametrize(("owner", "generate_name"), [
    (None, ""),
    (("ReplicaSet", "reviews-v1-7d9f8b6c5"), "reviews-v1-7d9f8b6c5-"),  # a Deployment's
    (("StatefulSet", "db"), ""),
    (("DaemonSet", "agent"), "agent-"),
    (("Job", "migrate"), "migrate-"),
], ids=["pod", "deployment", "statefulset", "daemonset", "job"])
async def test_a_pod_gets_a_patch_that_injects_it(
        api: ApiServerDouble, webhook: Webhook, session: aiohttp.ClientSession,
        owner: tuple[str, str] | None, generate_name: str) -> None:
    name = "reviews" if owner is None else ("db-0" if owner[0] == "StatefulSet" else "")
    labels = {"app": "reviews"}
    if owner is not None and owner[0] == "ReplicaSet":
        labels["pod-template-hash"] = "7d9f8b6c5"
    pod = app_pod(name, generate_name=generate_name, labels=labels, owner=owner)
    injected_before = counted("injected")
    response = await send(session, webhook.port, review_request(pod),
                          client_context(ca_bundle(api)))

    assert response["allowed"] is True
    after = patched(pod, response)
    assert after == inject_pod(pod, "shop", config())  # the same code as offline injection
    init = {c["name"]: c for c in after["spec"]["initContainers"]}
    assert list(init)[:2] == [INIT_NAME, PROXY_NAME]
    assert init[PROXY_NAME]["restartPolicy"] == "Always"  # a native sidecar
    assert after["spec"]["containers"] == pod["spec"]["containers"]  # the app untouched
    assert STATUS_ANNOTATION in after["metadata"]["annotations"]
    assert after["metadata"].get("ownerReferences") == pod["metadata"].get("ownerReferences")
    assert counted("injected") == injected_before + 1
    # The API server stores what the patch made: the double's Pod validation accepts it.
    stored = copy.deepcopy(after)
    stored["metadata"]["namespace"] = "shop"
    created = api.create(stored)
    assert created["metadata"]["name"].startswith(name or generate_name)


async def test_an_injected_pod_gets_no_patch(api: ApiServerDouble, webhook: Webhook,
                                             session: aiohttp.ClientSession) -> None:
    context = client_context(ca_bundle(api))
    pod = app_pod("reviews")
    once = patched(pod, await send(session, webhook.port, review_request(pod), context))
    again = await send(session, webhook.port, review_request(once), context)
    assert again["allowed"] is True
    assert "patch" not in again
    assert patched(once, again) == once


@pytest.mark.parametrize("where", ["labels", "annotations"])
async def test_a_pod_that_opts_out_is_left_alone(
        api: ApiServerDouble, webhook: Webhook, session: aiohttp.ClientSession,
        where: str) -> None:
    pod = app_pod("reviews")
    pod["metadata"].setdefault(where, {})["mesh.controlplane.io/inject"] = "false"
    skipped = counted("skipped")
    response = await send(session, webhook.port, review_request(pod),
                          client_context(ca_bundle(api)))
    assert response["allowed"] is True and "patch" not in response
    assert counted("skipped") == skipped + 1


@pytest.mark.parametrize("kind", ["Deployment", "StatefulSet", "DaemonSet", "ReplicaSet",
                                  "Job", "CronJob"])
async def test_a_workload_gets_its_template_injected(
        api: ApiServerDouble, webhook: Webhook, session: aiohttp.ClientSession,
        kind: str) -> None:
    """If a configuration sends workloads too, their pod templates go through the same
    code as ``controlplane inject`` does offline."""
    obj = workload(kind)
    response = await send(session, webhook.port, review_request(obj),
                          client_context(ca_bundle(api)))
    after = patched(obj, response)
    path = ["spec", "jobTemplate", "spec", "template"] if kind == "CronJob" \
        else ["spec", "template"]
    before_template, after_template = obj, after
    for step in path:
        before_template, after_template = before_template[step], after_template[step]
    assert after_template == inject_template(before_template, "shop", config(), "reviews")
    rest_before, rest_after = copy.deepcopy(obj), copy.deepcopy(after)
    for found in (rest_before, rest_after):
        parent = found
        for step in path[:-1]:
            parent = parent[step]
        del parent[path[-1]]
    assert rest_before == rest_after  # nothing but the template changed


# --- pods it cannot understand ------------------------------------------------------------


def malformed_pod() -> dict[str, Any]:
    pod = app_pod("broken")
    pod["spec"]["containers"] = "reviews"  # not a list: no API server sends this, but
    return pod                             # injection must never be what breaks it


async def test_a_pod_it_cannot_understand_is_admitted_unchanged_and_counted(
        api: ApiServerDouble, webhook: Webhook, session: aiohttp.ClientSession) -> None:
    errors = counted("error")
    with capture_logs() as logs:
        response = await send(session, webhook.port, review_request(malformed_pod()),
                              client_context(ca_bundle(api)))
    assert response["allowed"] is True
    assert "patch" not in response
    (warning,) = response["warnings"]
    assert "spec.containers" in warning and "admitted without a sidecar" in warning
    assert counted("error") == errors + 1
    (line,) = [e for e in logs if e["event"] == "webhook.not_injected"]
    assert line["pod"] == "broken" and line["namespace"] == "shop"
    assert line["result"] == "error" and "spec.containers" in line["reason"]
    assert line["log_level"] == "warning"


async def test_a_reserved_port_is_a_reason_not_a_broken_pod(
        api: ApiServerDouble, webhook: Webhook, session: aiohttp.ClientSession) -> None:
    pod = app_pod("reviews")
    pod["spec"]["containers"][0]["ports"] = [{"containerPort": 15001, "protocol": "TCP"}]
    response = await send(session, webhook.port, review_request(pod),
                          client_context(ca_bundle(api)))
    assert response["allowed"] is True and "patch" not in response
    assert "15001" in response["warnings"][0]


async def test_closed_denies_with_the_reason(api: ApiServerDouble, tmp_path: Path,
                                             session: aiohttp.ClientSession) -> None:
    webhook = await started(api, tmp_path, inject_failure_policy="closed")
    try:
        denied = counted("denied")
        response = await send(session, webhook.port, review_request(malformed_pod()),
                              client_context(ca_bundle(api)))
        assert response["allowed"] is False
        assert "patch" not in response
        assert response["status"]["code"] == 400
        assert "spec.containers" in response["status"]["message"]
        assert counted("denied") == denied + 1
        # Closed is about pods it cannot understand, not about every pod.
        good = await send(session, webhook.port, review_request(app_pod("reviews")),
                          client_context(ca_bundle(api)))
        assert good["allowed"] is True and "patch" in good
    finally:
        await webhook.stop()


@pytest.mark.parametrize("body", [
    b"not json", b"[]", b'{"kind": "AdmissionReview", "apiVersion": "admission.k8s.io/v1"}',
    b'{"kind": "AdmissionReview", "apiVersion": "admission.k8s.io/v1beta1", '
    b'"request": {"uid": "x"}}',
])
async def test_what_is_not_an_admission_review_is_a_400(
        api: ApiServerDouble, webhook: Webhook, session: aiohttp.ClientSession,
        body: bytes) -> None:
    invalid = counted("invalid")
    async with session.post(f"https://127.0.0.1:{webhook.port}/inject", data=body,
                            ssl=client_context(ca_bundle(api)),
                            server_hostname="controlplane.controlplane-system.svc") as answer:
        assert answer.status == 400
        assert (await answer.json())["error"]
    assert counted("invalid") == invalid + 1


async def test_a_request_over_the_size_bound_is_refused(
        api: ApiServerDouble, webhook: Webhook, session: aiohttp.ClientSession) -> None:
    huge = review_request(app_pod("reviews"))
    huge["request"]["object"]["metadata"]["annotations"] = {"big": "x" * (5 * 1024 * 1024)}
    body = io.BytesIO(json.dumps(huge).encode())
    async with session.post(f"https://127.0.0.1:{webhook.port}/inject", data=body,
                            headers={"Content-Type": "application/json"},
                            ssl=client_context(ca_bundle(api)),
                            server_hostname="controlplane.controlplane-system.svc") as answer:
        assert answer.status == 413


# --- the certificate ----------------------------------------------------------------------


async def test_healthz_and_the_certificate_names(
        api: ApiServerDouble, webhook: Webhook, session: aiohttp.ClientSession) -> None:
    context = client_context(ca_bundle(api))
    for name in ("controlplane.controlplane-system.svc",
                 "controlplane.controlplane-system.svc.cluster.local"):
        async with session.get(f"https://127.0.0.1:{webhook.port}/healthz", ssl=context,
                               server_hostname=name) as answer:
            assert answer.status == 200
    with pytest.raises(aiohttp.ClientConnectorCertificateError):
        async with session.get(f"https://127.0.0.1:{webhook.port}/healthz", ssl=context,
                               server_hostname="other.example.com"):
            pass
    secret = api.get(SECRETS, NAMESPACE, WEBHOOK_SECRET)
    assert secret["type"] == "kubernetes.io/tls"
    assert set(secret["data"]) == {"tls.crt", "tls.key", "ca.crt", "ca.key"}


async def test_two_replicas_share_one_secret_and_one_ca_bundle(
        api: ApiServerDouble, tmp_path: Path, session: aiohttp.ClientSession) -> None:
    first = await started(api, tmp_path)
    config_version = api.get(MUTATING_WEBHOOKS, "", WEBHOOK_CONFIGURATION)[
        "metadata"]["resourceVersion"]
    second = await started(api, tmp_path)
    try:
        assert first.state.cert == second.state.cert
        assert len(api.objects(SECRETS)) == 1
        assert api.count("create", SECRETS) == 1
        # The second found the caBundle current and wrote nothing.
        assert api.get(MUTATING_WEBHOOKS, "", WEBHOOK_CONFIGURATION)[
            "metadata"]["resourceVersion"] == config_version
        context = client_context(ca_bundle(api))
        for replica in (first, second):
            response = await send(session, replica.port, review_request(app_pod("reviews")),
                                  context)
            assert "patch" in response
    finally:
        await first.stop()
        await second.stop()


async def test_the_key_is_never_logged(api: ApiServerDouble, tmp_path: Path) -> None:
    with capture_logs() as logs:
        webhook = await started(api, tmp_path)
    await webhook.stop()
    assert webhook.state.cert is not None
    key = webhook.state.cert.key_pem.decode()
    ca_key = (webhook.state.cert.ca_key_pem or b"").decode()
    body = "\n".join(line.strip() for line in key.splitlines()[1:-1])
    text = repr(logs)
    assert any(e["event"] == "webhook.certificate_made" for e in logs)
    assert "PRIVATE KEY" not in text and body[:40] not in text
    assert ca_key.splitlines()[1] not in text


async def test_a_renewed_certificate_is_served_without_a_restart(
        api: ApiServerDouble, tmp_path: Path) -> None:
    """Another replica renewed the Secret: at its next check this one loads it into the
    live TLS context, and new connections get it (same CA: caBundle unchanged)."""
    first = await started(api, tmp_path)
    try:
        old = first.state.cert
        assert old is not None
        # What another replica's renewal leaves in the Secret: a new leaf, the same CA.
        renewed = renew(old, first.names, datetime.datetime.now(datetime.UTC))
        stored = api.get(SECRETS, NAMESPACE, WEBHOOK_SECRET)
        api.update({**stored, "data": secret_data(renewed)})
        assert renewed.cert_pem != old.cert_pem and renewed.ca_pem == old.ca_pem
        await first.refresh()
        assert first.state.cert == renewed
        context = client_context(ca_bundle(api))
        _, writer = await asyncio.open_connection(
            "127.0.0.1", first.port, ssl=context,
            server_hostname="controlplane.controlplane-system.svc")
        served = writer.get_extra_info("ssl_object").getpeercert(binary_form=True)
        writer.close()
        await writer.wait_closed()
        assert served == x509.load_pem_x509_certificate(renewed.cert_pem).public_bytes(
            serialization.Encoding.DER)
    finally:
        await first.stop()


# --- identity ---------------------------------------------------------------------------


async def test_injected_sidecars_get_the_bundle_the_mesh_ca_has_now(
        api: ApiServerDouble, webhook: Webhook, session: aiohttp.ClientSession) -> None:
    """With the server's CA (``WebhookState.bundle``), a pod's sidecar gets its projected
    token and TLS to xDS against the CA's bundle as it is at admission: a rotated root
    reaches the next pods without a restart."""
    now = datetime.datetime.now(datetime.UTC)
    first = CertificateAuthority.create("cluster.local", now).bundle_pem
    current = [first]
    webhook.state.bundle = lambda: current[-1]

    async def injected() -> dict[str, Any]:
        pod = app_pod("reviews", labels={"app": "reviews"})
        return patched(pod, await send(session, webhook.port, review_request(pod),
                                       client_context(ca_bundle(api))))

    def roots(pod: dict[str, Any]) -> str:
        proxy = next(c for c in pod["spec"]["initContainers"] if c["name"] == PROXY_NAME)
        boot = yaml.safe_load(proxy["args"][1])
        text: str = boot["dynamic_resources"]["ads_config"]["grpc_services"][0][
            "google_grpc"]["channel_credentials"]["ssl_credentials"]["root_certs"][
            "inline_string"]
        return text

    pod = await injected()
    assert roots(pod) == first.decode()
    assert pod["spec"]["volumes"][-1]["name"] == "controlplane-token"
    assert pod["metadata"]["annotations"]["mesh.controlplane.io/service-account"] == \
        pod["spec"]["serviceAccountName"]
    rotated = first + CertificateAuthority.create("cluster.local", now).bundle_pem
    current.append(rotated)  # the CA's poll saw a rotation
    assert roots(await injected()) == rotated.decode()
