"""Injection of proxyless gRPC pods (``mesh.controlplane.io/proxyless: grpc``): golden
manifests from ``controlplane inject -f``, valid for Kubernetes 1.30 (kubernetes-validate
strict); what the pod gets and does not get; refusals naming the field; and the webhook
answering the API server double with a patch whose Pod the double stores.

Regenerate the goldens with ``pytest --update-golden`` and review the diff like code.
The running pod (its commands executed, a grpcio call over mTLS) is
tests/test_inject_proxyless_pods.py.
"""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml

from controlplane.app import start_webhook
from controlplane.inject import proxyless
from controlplane.inject.config import (
    INIT_NAME,
    PROXY_NAME,
    SERVICE_ACCOUNT_ANNOTATION,
    STATUS_ANNOTATION,
    TOKEN_PATH,
    InjectConfig,
    InjectError,
)
from controlplane.inject.offline import ManifestError, inject_manifest
from controlplane.inject.pod import inject_pod
from controlplane.inject.webhook import Webhook
from tests.kube.apiserver import ApiServerDouble
from tests.support.admission import (
    app_pod,
    ca_bundle,
    client_context,
    patched,
    review_request,
    send,
    webhook_api,
)
from tests.support.golden import Goldens
from tests.test_webhook import XDS, settings

DATA = Path(__file__).parent / "testdata" / "inject_proxyless"
GOLDENS = Goldens(DATA, input_dir="", output_dir="", input_suffix=".in.yaml",
                  output_suffix=".out.yaml")
CASES = GOLDENS.cases
BUNDLE = DATA / "xds-ca.pem"  # a root certificate made for these files (no key kept)
VALIDATE = Path(sys.executable).parent / "kubernetes-validate"


def secure() -> InjectConfig:
    return InjectConfig(xds_address=XDS, xds_ca=BUNDLE.read_text()).check()


def grpc_pod(name: str = "ratings-client", **annotations: str) -> dict[str, Any]:
    return app_pod(name, labels={"app": "ratings-client"},
                   annotations={proxyless.ANNOTATION: "grpc", **annotations})


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "controlplane", "inject", *args],
                          capture_output=True, text=True, timeout=60, check=False)


def _ca_flags(case: str) -> list[str]:
    """Cases named ``*plaintext*`` are injected without the mesh CA."""
    return [] if "plaintext" in case else ["--xds-ca", str(BUNDLE)]


# --- golden manifests -----------------------------------------------------------------------


@pytest.mark.parametrize("case", CASES)
def test_golden(case: str, request: pytest.FixtureRequest) -> None:
    result = _run("-f", str(GOLDENS.input(case)), *_ca_flags(case))
    assert result.returncode == 0, result.stderr
    GOLDENS.check(case, result.stdout, request, "the injected manifests differ from the "
                  "golden file")
    assert "injected" in result.stderr


def test_every_case_has_a_golden_and_no_golden_is_stale(
        request: pytest.FixtureRequest) -> None:
    assert {"deployment", "pod-plaintext"} <= set(CASES)
    assert all(GOLDENS.output(case).exists() for case in CASES), "run pytest --update-golden"
    GOLDENS.check_no_stale(request)


@pytest.mark.skipif(not VALIDATE.exists(), reason="kubernetes-validate not installed")
def test_injected_goldens_pass_kubernetes_validate_strict() -> None:
    """A native sidecar, a projected volume with a token and a downward-API file from an
    annotation, a memory-backed emptyDir: all valid for the API server of 1.30."""
    files = [str(GOLDENS.output(case)) for case in CASES]
    result = subprocess.run([str(VALIDATE), "--kubernetes-version", "1.30", "--strict",
                             *files], capture_output=True, text=True, timeout=300,
                            check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "passed for resource deployment/ratings-client" in result.stdout + result.stderr


# --- what the pod gets ----------------------------------------------------------------------


def test_a_grpc_pod_gets_the_bootstrap_the_certificates_and_the_agent() -> None:
    pod = grpc_pod()
    pod["spec"]["containers"][0]["securityContext"] = {"runAsUser": 1000}
    injected = inject_pod(pod, "shop", secure())
    spec = injected["spec"]
    init = {c["name"]: c for c in spec["initContainers"]}
    assert list(init) == [proxyless.BOOTSTRAP_NAME, proxyless.CERTS_NAME,
                          proxyless.AGENT_NAME]
    # No Envoy, no capture: none of the sidecar's containers, no root, no NET_ADMIN.
    assert not {INIT_NAME, PROXY_NAME} & set(init)
    assert "envoy" not in json.dumps(spec)
    for container in init.values():
        assert container["command"][0] == "controlplane"
        context = container["securityContext"]
        assert context["runAsUser"] == 1000  # the app's user: it reads the 0600 key
        assert context["capabilities"] == {"drop": ["ALL"]}
        assert context["allowPrivilegeEscalation"] is False
        assert container["resources"]["limits"]["memory"]
        assert container["resources"]["requests"]["cpu"]
    # The agent is a native sidecar; the init step waits for the first certificate.
    assert init[proxyless.AGENT_NAME]["restartPolicy"] == "Always"
    assert "restartPolicy" not in init[proxyless.CERTS_NAME]
    assert init[proxyless.CERTS_NAME]["args"][:1] == ["--once"]
    args = init[proxyless.BOOTSTRAP_NAME]["args"]
    flags = dict(zip(args[2::2], args[3::2], strict=False))
    assert args[:2] == ["--grpc", "--grpc-server"]  # a server too, if the app serves
    assert flags["--node-id"] == "$(POD_NAME).$(POD_NAMESPACE)"
    assert flags["--service"] == "ratings-client"
    assert flags["--namespace"] == "$(POD_NAMESPACE)"
    assert flags["--xds-address"] == XDS
    assert flags["--token-file"] == TOKEN_PATH
    assert flags["--cert-dir"] == proxyless.CERT_DIR
    assert flags["--xds-ca"] == proxyless.CA_PATH
    assert flags["-o"] == proxyless.BOOTSTRAP_PATH
    # The app: the bootstrap's env, read-only mounts; nothing else of it changed.
    (app,) = spec["containers"]
    assert {e["name"]: e["value"] for e in app["env"]} == {
        "GRPC_XDS_BOOTSTRAP": proxyless.BOOTSTRAP_PATH,
        "GRPC_EXPERIMENTAL_XDS_BOOTSTRAP_CALL_CREDS": "true"}
    assert all(mount["readOnly"] for mount in app["volumeMounts"])
    assert {k: v for k, v in app.items() if k not in ("env", "volumeMounts")} == \
        pod["spec"]["containers"][0]
    # The CA reaches the files through the pod's own annotation.
    annotations = injected["metadata"]["annotations"]
    assert annotations[proxyless.XDS_CA_ANNOTATION] == BUNDLE.read_text()
    token_volume = spec["volumes"][-1]["projected"]["sources"]
    assert token_volume[1]["downwardAPI"]["items"][0]["fieldRef"]["fieldPath"] == \
        f"metadata.annotations['{proxyless.XDS_CA_ANNOTATION}']"
    assert spec["volumes"][-2]["emptyDir"]["medium"] == "Memory"
    # Marked as proxyless (the label) with its identity (the ServiceAccount, "reviews"
    # here), which the source reads as a proxyless server's endpoint; no Envoy stats.
    assert injected["metadata"]["labels"][proxyless.LABEL] == "grpc"
    assert annotations[SERVICE_ACCOUNT_ANNOTATION] == "reviews"
    assert not any(key.startswith("prometheus.io/") for key in annotations)
    status = json.loads(annotations[STATUS_ANNOTATION])
    assert status["proxyless"] == "grpc"


def test_without_the_mesh_ca_only_the_bootstrap() -> None:
    injected = inject_pod(grpc_pod(), "shop", InjectConfig(xds_address=XDS))
    (only,) = injected["spec"]["initContainers"]
    assert only["name"] == proxyless.BOOTSTRAP_NAME
    assert not {"--xds-ca", "--token-file", "--cert-dir"} & set(only["args"])
    assert [v["name"] for v in injected["spec"]["volumes"]] == [proxyless.VOLUME]
    (app,) = injected["spec"]["containers"]
    assert [e["name"] for e in app["env"]] == ["GRPC_XDS_BOOTSTRAP"]
    assert proxyless.XDS_CA_ANNOTATION not in injected["metadata"]["annotations"]


def test_the_pods_user_is_inherited_not_copied() -> None:
    pod = grpc_pod()
    pod["spec"]["securityContext"] = {"runAsUser": 2000, "fsGroup": 2000}
    injected = inject_pod(pod, "shop", secure())
    for container in injected["spec"]["initContainers"]:
        assert "runAsUser" not in container["securityContext"]
    assert injected["spec"]["securityContext"] == pod["spec"]["securityContext"]


def test_reinjecting_changes_nothing() -> None:
    once = inject_pod(grpc_pod(), "shop", secure())
    assert inject_pod(once, "shop", secure()) == once
    text = yaml.safe_dump(once)
    again, outcomes = inject_manifest(text, secure())
    assert yaml.safe_load(again) == once
    assert [o.injected for o in outcomes] == [False]


def test_an_app_call_credentials_setting_is_kept() -> None:
    pod = grpc_pod()
    pod["spec"]["containers"][0]["env"] = [
        {"name": "GRPC_EXPERIMENTAL_XDS_BOOTSTRAP_CALL_CREDS", "value": "true"}]
    (app,) = inject_pod(pod, "shop", secure())["spec"]["containers"]
    assert [e["name"] for e in app["env"]] == ["GRPC_EXPERIMENTAL_XDS_BOOTSTRAP_CALL_CREDS",
                                               "GRPC_XDS_BOOTSTRAP"]


def test_the_annotation_alone_does_not_opt_in() -> None:
    """As Istio's template annotation: it says how to inject, not whether."""
    pod = grpc_pod()
    pod["metadata"]["labels"]["mesh.controlplane.io/inject"] = "false"
    text, outcomes = inject_manifest(yaml.safe_dump(pod), secure())
    assert yaml.safe_load(text) == pod
    assert [o.injected for o in outcomes] == [False]


# --- refusals -------------------------------------------------------------------------------


def _refused(pod: dict[str, Any]) -> InjectError:
    with pytest.raises(InjectError) as caught:
        inject_pod(pod, "shop", secure())
    return caught.value


def test_an_unknown_kind_is_refused_naming_the_annotation() -> None:
    error = _refused(grpc_pod(**{proxyless.ANNOTATION: "grpc-agent"}))
    assert error.field == 'metadata.annotations["mesh.controlplane.io/proxyless"]'
    assert "'grpc-agent'" in error.reason and '"grpc"' in error.reason


@pytest.mark.parametrize(("change", "field"), [
    (lambda spec: spec["containers"][0].update(
        env=[{"name": "GRPC_XDS_BOOTSTRAP", "value": "/etc/mine.json"}]),
     "spec.containers[0].env[0].name"),
    (lambda spec: spec["containers"][0].update(
        env=[{"name": "GRPC_XDS_BOOTSTRAP_CONFIG", "value": "{}"}]),
     "spec.containers[0].env[0].name"),
    (lambda spec: spec["containers"][0].update(
        volumeMounts=[{"name": "x", "mountPath": "/var/run/controlplane-grpc"}]),
     "spec.containers[0].volumeMounts[0].mountPath"),
    (lambda spec: spec.update(volumes=[{"name": "controlplane-grpc", "emptyDir": {}}]),
     "spec.volumes[0].name"),
    (lambda spec: spec["containers"].append(
        {"name": "controlplane-grpc-agent", "image": "x"}), "spec.containers[1].name"),
    (lambda spec: spec.update(containers=[]), "spec.containers"),
], ids=["bootstrap-env", "bootstrap-config-env", "mount-path", "volume-name",
        "container-name", "no-containers"])
def test_what_would_contradict_injection_is_refused(change: Any, field: str) -> None:
    pod = grpc_pod()
    change(pod["spec"])
    error = _refused(pod)
    assert error.field == field
    assert ";" in error.reason  # what is wrong; what to do


def test_offline_names_the_document_and_the_field() -> None:
    text = yaml.safe_dump(grpc_pod(**{proxyless.ANNOTATION: "envoy"}))
    with pytest.raises(ManifestError, match=r"document 1 \(Pod shop/ratings-client\): "
                       r"metadata\.annotations\[\"mesh\.controlplane\.io/proxyless\"\]"):
        inject_manifest(text, secure())


# --- the webhook, against the API server double ----------------------------------------------


@pytest.fixture
def api() -> Iterator[ApiServerDouble]:
    with webhook_api() as double:
        yield double


@pytest.fixture
async def webhook(api: ApiServerDouble, tmp_path: Path) -> AsyncIterator[Webhook]:
    """The webhook as serve starts it, with the mesh CA's bundle (xDS over TLS)."""
    running = await start_webhook(settings(api, tmp_path), bundle=BUNDLE.read_bytes)
    assert running is not None
    await running.has_certificate.wait()
    yield running
    await running.stop()


async def test_the_webhook_injects_a_grpc_pod_the_double_then_stores(
        api: ApiServerDouble, webhook: Webhook) -> None:
    pod = grpc_pod("", **{})
    pod["metadata"]["generateName"] = "ratings-client-7d9f8b6c5-"
    pod["metadata"]["labels"]["pod-template-hash"] = "7d9f8b6c5"
    async with aiohttp.ClientSession() as session:
        context = client_context(ca_bundle(api))
        response = await send(session, webhook.port, review_request(pod), context)
        assert response["allowed"] is True and "warnings" not in response
        after = patched(pod, response)
        assert after == inject_pod(pod, "shop", secure())  # the same code as offline
        # Sent again (a re-invocation), it is left as it is.
        again = await send(session, webhook.port, review_request(after), context)
        assert "patch" not in again
        # An unknown kind: admitted unchanged (fail open), the reason names the field.
        bad = grpc_pod("bad", **{proxyless.ANNOTATION: "grpc-agent"})
        refused = await send(session, webhook.port, review_request(bad), context)
    assert refused["allowed"] is True and "patch" not in refused
    assert 'metadata.annotations["mesh.controlplane.io/proxyless"]' in refused["warnings"][0]
    # The API server stores what the patch made: the double's Pod validation accepts it.
    stored = copy.deepcopy(after)
    created = api.create(stored)
    assert created["metadata"]["name"].startswith("ratings-client-7d9f8b6c5-")
    names = [c["name"] for c in created["spec"]["initContainers"]]
    assert names == list(proxyless.OUR_CONTAINERS)


@pytest.mark.parametrize(("pod_user", "app_user", "non_root"), [
    (None, None, True), (None, 1000, True), (2000, None, True), (0, None, False),
    (2000, 0, False), (0, 1000, True)])
def test_ours_meet_pod_security_restricted_unless_the_app_is_root(
        pod_user: int | None, app_user: int | None, non_root: bool) -> None:
    """No capability, no escalation, RuntimeDefault seccomp, and non-root unless the app
    runs as root (then ours must too, to read its key, and restricted refuses the app
    anyway)."""
    pod = grpc_pod()
    if pod_user is not None:
        pod["spec"]["securityContext"] = {"runAsUser": pod_user}
    if app_user is not None:
        pod["spec"]["containers"][0]["securityContext"] = {"runAsUser": app_user}
    for container in inject_pod(pod, "shop", secure())["spec"]["initContainers"]:
        context = container["securityContext"]
        assert context["capabilities"] == {"drop": ["ALL"]}
        assert context["allowPrivilegeEscalation"] is False
        assert context["seccompProfile"] == {"type": "RuntimeDefault"}
        assert context.get("runAsNonRoot", False) is non_root
        assert context.get("runAsUser") == app_user
