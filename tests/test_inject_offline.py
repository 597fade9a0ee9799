"""``controlplane inject -f``: manifests in, injected manifests out (golden files), valid
for Kubernetes 1.30 (kubernetes-validate strict), and errors that name the document.

Regenerate the goldens with ``pytest --update-golden`` and review the diff like code.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from controlplane.inject.config import INJECT_LABEL, PROXY_NAME, InjectConfig
from controlplane.inject.offline import ManifestError, inject_manifest
from tests.support.golden import Goldens

DATA = Path(__file__).parent / "testdata" / "inject"
GOLDENS = Goldens(DATA, input_dir="", output_dir="", input_suffix=".in.yaml",
                  output_suffix=".out.yaml")
CASES = GOLDENS.cases
VALIDATE = Path(sys.executable).parent / "kubernetes-validate"


def _run(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "controlplane", "inject", *args],
                          input=stdin, capture_output=True, text=True, timeout=60,
                          check=False)


@pytest.mark.parametrize("case", CASES)
def test_golden(case: str, request: pytest.FixtureRequest) -> None:
    result = _run("-f", str(GOLDENS.input(case)))
    assert result.returncode == 0, result.stderr
    GOLDENS.check(case, result.stdout, request, "the injected manifests differ from the "
                  "golden file")


def test_every_case_has_a_golden_and_no_golden_is_stale(
        request: pytest.FixtureRequest) -> None:
    assert all(GOLDENS.output(case).exists() for case in CASES), "run pytest --update-golden"
    GOLDENS.check_no_stale(request)
    # The workload kinds of the issue are all covered.
    kinds = {doc["kind"] for case in CASES
             for doc in yaml.safe_load_all(GOLDENS.input(case).read_text()) if doc}
    assert {"Pod", "Deployment", "StatefulSet", "DaemonSet", "Job", "ReplicaSet",
            "CronJob", "List", "Service"} <= kinds


@pytest.mark.skipif(not VALIDATE.exists(), reason="kubernetes-validate not installed")
def test_injected_goldens_pass_kubernetes_validate_strict() -> None:
    """What injection writes is a valid object for the API server (1.30 knows native
    sidecars), checked field by field in strict mode (no unknown fields)."""
    files = [str(GOLDENS.output(case)) for case in CASES]
    result = subprocess.run([str(VALIDATE), "--kubernetes-version", "1.30", "--strict",
                             *files], capture_output=True, text=True, timeout=300,
                            check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "passed for resource deployment/reviews-v1" in result.stdout + result.stderr


def test_golden_outputs_hold_the_sidecar_where_expected() -> None:
    """The goldens are not just any output: each injected template has our two init
    containers first, the opted-out and host-network pods have none."""
    def templates(doc: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
        kind = doc["kind"]
        if kind == "List":
            return [t for item in doc["items"] for t in templates(item)]
        name = doc["metadata"]["name"]
        if kind == "Pod":
            return [(name, doc)]
        if kind == "CronJob":
            return [(name, doc["spec"]["jobTemplate"]["spec"]["template"])]
        if "template" in doc.get("spec", {}):
            return [(name, doc["spec"]["template"])]
        return []

    injected: list[str] = []
    left: list[str] = []
    for case in CASES:
        for doc in yaml.safe_load_all(GOLDENS.output(case).read_text()):
            for name, pod in templates(doc):
                names = [c["name"] for c in pod["spec"].get("initContainers", [])]
                (injected if PROXY_NAME in names else left).append(name)
                if PROXY_NAME in names:
                    assert names[:2] == ["controlplane-init", PROXY_NAME]
    assert sorted(left) == ["legacy", "node-agent"]
    assert len(injected) == 8


def test_stdin_to_file_and_already_injected_is_unchanged(tmp_path: Path) -> None:
    out = tmp_path / "out.yaml"
    source = (DATA / "deployment.in.yaml").read_text()
    result = _run("-f", "-", "-o", str(out), stdin=source)
    assert result.returncode == 0, result.stderr
    assert "Deployment shop/reviews-v1: injected" in result.stderr
    again = _run("-f", str(out))
    assert again.returncode == 0, again.stderr
    assert again.stdout == out.read_text()
    assert "already injected" in again.stderr


def test_flags_reach_the_sidecar() -> None:
    result = _run("-f", str(DATA / "pod.in.yaml"), "--proxy-image", "registry.local/envoy:1",
                  "--init-image", "registry.local/cp:2", "--xds-address", "10.0.0.5:18000",
                  "--proxy-uid", "2000", "--proxy-cpu", "50m", "--proxy-memory", "64Mi",
                  "--proxy-memory-limit", "256Mi", "--delta", "--proxy-log-level", "debug")
    assert result.returncode == 0, result.stderr
    (pod,) = yaml.safe_load_all(result.stdout)
    init, proxy = pod["spec"]["initContainers"]
    assert init["image"] == "registry.local/cp:2"
    assert init["args"][:2] == ["--proxy-uid", "2000"]
    assert init["args"][-2:] == ["--exclude-address", "10.0.0.5:18000"]
    assert proxy["image"] == "registry.local/envoy:1"
    assert proxy["securityContext"]["runAsUser"] == 2000
    assert proxy["resources"] == {"requests": {"cpu": "50m", "memory": "64Mi"},
                                  "limits": {"memory": "256Mi"}}
    assert proxy["args"][proxy["args"].index("--log-level") + 1] == "debug"
    boot = yaml.safe_load(proxy["args"][1])
    assert boot["dynamic_resources"]["ads_config"]["api_type"] == "DELTA_GRPC"
    assert boot["static_resources"]["clusters"][0]["load_assignment"]["endpoints"][0][
        "lb_endpoints"][0]["endpoint"]["address"]["socket_address"] == {
            "address": "10.0.0.5", "port_value": 18000}


@pytest.mark.parametrize(("args", "message"), [
    (["--proxy-cpu", "lots"], "--proxy-cpu must be a Kubernetes quantity"),
    (["--xds-address", "controlplane"], "--xds-address must be HOST:PORT"),
    (["--proxy-uid", "0"], "--proxy-uid must be a user id above 0"),
    (["--proxy-log-level", "loud"], "--proxy-log-level must be one of"),
    (["--proxy-image", ""], "--proxy-image must be an image reference"),
])
def test_bad_flags_are_named(args: list[str], message: str) -> None:
    result = _run("-f", str(DATA / "pod.in.yaml"), *args)
    assert result.returncode == 2
    assert message in result.stderr
    assert result.stdout == ""


def test_a_pod_it_cannot_inject_names_document_and_field(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text((DATA / "job.in.yaml").read_text() + "---\n" + yaml.safe_dump({
        "apiVersion": "apps/v1", "kind": "Deployment",
        "metadata": {"name": "clash", "namespace": "shop"},
        "spec": {"selector": {}, "template": {"metadata": {}, "spec": {"containers": [
            {"name": "app", "image": "x", "ports": [{"containerPort": 15001}]}]}}}}))
    result = _run("-f", str(bad))
    assert result.returncode == 1
    assert (f"{bad}: document 2 (Deployment shop/clash): "
            "spec.template.spec.containers[0].ports[0].containerPort: 15001 is a sidecar "
            "port") in result.stderr
    assert "move the app to another port" in result.stderr
    assert result.stdout == ""


@pytest.mark.parametrize(("text", "message"), [
    ("kind: Pod\nmetadata: [", "not valid YAML"),
    ("- just\n- a list\n", "document 1 is not a Kubernetes object"),
    ("apiVersion: v1\nkind: List\nitems:\n- apiVersion: v1\n  kind: Pod\n  metadata: "
     "{name: p}\n  spec: {containers: []}\n",
     "document 1 (List default/(unnamed)): items[0].spec.containers: missing or empty"),
    ("apiVersion: batch/v1\nkind: CronJob\nmetadata: {name: c}\nspec: {schedule: x}\n",
     "spec.jobTemplate.spec.template: CronJob without a pod template"),
])
def test_manifest_errors(text: str, message: str) -> None:
    with pytest.raises(ManifestError, match=None) as info:
        inject_manifest(text, InjectConfig(), source="m.yaml")
    assert message in str(info.value)
    assert str(info.value).startswith("m.yaml: ")


def test_missing_file_is_named(tmp_path: Path) -> None:
    result = _run("-f", str(tmp_path / "nope.yaml"))
    assert result.returncode == 1
    assert "cannot read" in result.stderr and "nope.yaml" in result.stderr


def test_opt_out_label_is_honoured_in_a_workload() -> None:
    text = (DATA / "deployment.in.yaml").read_text().replace(
        "labels: {app: reviews, version: v1}\n      annotations:",
        f'labels: {{app: reviews, version: v1, {INJECT_LABEL}: "false"}}\n      annotations:')
    out, outcomes = inject_manifest(text, InjectConfig())
    assert [o.injected for o in outcomes] == [False]
    assert "opts out" in outcomes[0].reason
    assert list(yaml.safe_load_all(out)) == list(yaml.safe_load_all(text))


def test_init_container_args_are_what_controlplane_capture_takes() -> None:
    """Each golden's init container, run as ``controlplane capture --dry-run``: the flags
    injection writes are the capture command's, and the pod's exclusions reach the rules."""
    checked = 0
    for case in CASES:
        for doc in yaml.safe_load_all(GOLDENS.output(case).read_text()):
            spec = doc.get("spec", {}).get("template", {}).get("spec", {})
            inits = [c for c in spec.get("initContainers", [])
                     if c["name"] == "controlplane-init"]
            for init in inits:
                assert init["command"] == ["controlplane", "capture"]
                result = subprocess.run(
                    [sys.executable, "-m", "controlplane", "capture", "--dry-run",
                     "--log-level", "error", *init["args"]],
                    capture_output=True, text=True, timeout=60, check=False)
                assert result.returncode == 0, f"{case}: {result.stderr}"
                assert "REDIRECT --to-ports 15001" in result.stdout
                if case == "deployment":
                    assert "--dports 5432,6379 -j RETURN" in result.stdout
                    assert "-d 169.254.169.254/32 -j RETURN" in result.stdout
                if case == "statefulset":
                    assert "--dport 5432 -j CONTROLPLANE_IN_REDIRECT" in result.stdout
                checked += 1
    assert checked >= 5
