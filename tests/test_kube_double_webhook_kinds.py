"""The API server double serves Secrets and MutatingWebhookConfigurations as the real
server does where the webhook's code can tell: through the official client, with real
Status errors (404, 409 AlreadyExists, 409 Conflict, 422), cluster-scoped paths, merge
and JSON patches, Secret ``stringData`` and the TLS type's required keys, and the
admissionregistration defaults and validation."""

from __future__ import annotations

import base64
import json
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from kubernetes import client
from kubernetes.client.exceptions import ApiException

from controlplane import deploy
from controlplane.sources.kubernetes import api_client
from controlplane.sources.kubernetes.kinds import MUTATING_WEBHOOKS
from tests.kube.apiserver import ADMIN_TOKEN, ApiServerDouble, StatusError


@pytest.fixture
def api() -> Iterator[ApiServerDouble]:
    double = ApiServerDouble(crd_installed=False).start()
    yield double
    double.stop()


@pytest.fixture
def admin(api: ApiServerDouble, tmp_path: Path) -> client.ApiClient:
    return api_client(api.kubeconfig(tmp_path / "admin", admin=True))


def status(exc: ApiException) -> dict[str, Any]:
    body: dict[str, Any] = json.loads(exc.body)
    return body


def secret(name: str = "s", **data: str) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Secret", "type": "Opaque",
            "metadata": {"name": name, "namespace": "default"},
            "data": {k: base64.b64encode(v.encode()).decode() for k, v in data.items()}}


def test_secrets_create_get_conflict_and_not_found(admin: client.ApiClient) -> None:
    core = client.CoreV1Api(admin)
    core.create_namespaced_secret("default", secret(a="1"))
    with pytest.raises(ApiException) as exists:
        core.create_namespaced_secret("default", secret(a="2"))
    assert exists.value.status == 409 and status(exists.value)["reason"] == "AlreadyExists"
    assert status(exists.value)["message"] == 'secrets "s" already exists'
    raw = json.loads(core.read_namespaced_secret("s", "default",
                                                 _preload_content=False).data)
    assert base64.b64decode(raw["data"]["a"]) == b"1"
    assert "generation" not in raw["metadata"]
    stale = {**secret(a="3"), "metadata": {"name": "s", "namespace": "default",
                                           "resourceVersion": "1"}}
    with pytest.raises(ApiException) as conflict:
        core.replace_namespaced_secret("s", "default", stale)
    assert conflict.value.status == 409 and status(conflict.value)["reason"] == "Conflict"
    with pytest.raises(ApiException) as missing:
        core.read_namespaced_secret("nope", "default")
    assert missing.value.status == 404
    assert status(missing.value)["message"] == 'secrets "nope" not found'


def test_string_data_is_written_into_data(api: ApiServerDouble) -> None:
    stored = api.create({"apiVersion": "v1", "kind": "Secret",
                         "metadata": {"name": "s", "namespace": "default"},
                         "stringData": {"token": "abc"}})
    assert "stringData" not in stored and stored["type"] == "Opaque"
    assert base64.b64decode(stored["data"]["token"]) == b"abc"


def test_a_tls_secret_needs_its_keys_and_keeps_its_type(api: ApiServerDouble) -> None:
    tls = {**secret("t", **{"tls.crt": "c"}), "type": "kubernetes.io/tls"}
    with pytest.raises(StatusError) as missing:
        api.create(tls)
    assert missing.value.code == 422 and "data[tls.key]: Required value" in \
        missing.value.message
    api.create(secret("o", a="1"))
    with pytest.raises(StatusError, match=r"type: Invalid value.*field is immutable"):
        api.update({**secret("o", a="1"), "type": "kubernetes.io/tls"})
    with pytest.raises(StatusError, match="illegal base64"):
        api.create({**secret("b"), "data": {"a": "not base64!"}})


def test_webhook_configurations_are_cluster_scoped_and_defaulted(
        api: ApiServerDouble, admin: client.ApiClient) -> None:
    api.create(deploy.mutating_webhook_configuration())
    stored = api.get(MUTATING_WEBHOOKS, "", "controlplane-injector")
    assert "namespace" not in stored["metadata"]
    assert stored["metadata"]["generation"] == 1
    paths = [r.path for r in api.requests]
    admission = client.AdmissionregistrationV1Api(admin)
    raw = json.loads(admission.read_mutating_webhook_configuration(
        "controlplane-injector", _preload_content=False).data)
    assert raw["webhooks"][0]["matchPolicy"] == "Equivalent"
    assert api.requests[-1].path == \
        "/apis/admissionregistration.k8s.io/v1/mutatingwebhookconfigurations/" \
        "controlplane-injector"
    assert len(api.requests) == len(paths) + 1
    # A namespaced path to a cluster-scoped kind is not a resource.
    request = urllib.request.Request(
        f"{api.url}/apis/admissionregistration.k8s.io/v1/namespaces/default/"
        "mutatingwebhookconfigurations/controlplane-injector",
        headers={"Authorization": f"Bearer {ADMIN_TOKEN}"})
    with pytest.raises(urllib.error.HTTPError) as namespaced:
        urllib.request.urlopen(request, timeout=5)
    namespaced.value.close()
    assert namespaced.value.code == 404


def test_patches_merge_json_and_conflicts(api: ApiServerDouble,
                                          admin: client.ApiClient) -> None:
    api.create(deploy.mutating_webhook_configuration())
    admission = client.AdmissionregistrationV1Api(admin)
    ca = base64.b64encode(b"ca").decode()
    admission.patch_mutating_webhook_configuration(
        "controlplane-injector",
        [{"op": "add", "path": "/webhooks/0/clientConfig/caBundle", "value": ca}],
        _content_type="application/json-patch+json")
    stored = api.get(MUTATING_WEBHOOKS, "", "controlplane-injector")
    assert stored["webhooks"][0]["clientConfig"]["caBundle"] == ca
    stale = {"metadata": {"resourceVersion": "1"}, "webhooks": []}
    with pytest.raises(ApiException) as conflict:
        admission.patch_mutating_webhook_configuration(
            "controlplane-injector", stale, _content_type="application/merge-patch+json")
    assert conflict.value.status == 409
    with pytest.raises(ApiException) as strategic:
        admission.patch_mutating_webhook_configuration("controlplane-injector",
                                                       {"metadata": {}})
    assert strategic.value.status == 415  # refused rather than approximated


@pytest.mark.parametrize(("change", "message"), [
    ({"name": "short"}, "should be a domain with at least three segments"),
    ({"sideEffects": "Some"}, 'Unsupported value: "Some"'),
    ({"timeoutSeconds": 31}, "between 1 and 30 seconds"),
    ({"admissionReviewVersions": []}, "must specify one of v1, v1beta1"),
    ({"clientConfig": {}}, "exactly one of url or service is required"),
])
def test_webhook_configuration_validation(api: ApiServerDouble, change: dict[str, Any],
                                          message: str) -> None:
    config = deploy.mutating_webhook_configuration()
    config["webhooks"][0].update(change)
    with pytest.raises(StatusError) as refused:
        api.create(config)
    assert refused.value.code == 422 and message in refused.value.message
