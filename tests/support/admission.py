"""AdmissionReview v1 requests as the API server sends them, and an HTTPS client that
trusts only the ``caBundle`` the control plane wrote (what the API server trusts).

Pods are sent defaulted (mutating admission sees the object after defaulting), with what
each controller sets: ``generateName``, ``ownerReferences``, its labels.
"""

from __future__ import annotations

import base64
import contextlib
import copy
import json
import ssl
import uuid
from collections.abc import Iterator
from typing import Any

import aiohttp

from controlplane import deploy
from controlplane.sources.kubernetes.kinds import MUTATING_WEBHOOKS, WEBHOOK_CONFIGURATION
from tests.kube.admission import _default_pod
from tests.kube.apiserver import ApiServerDouble
from tests.kube.wire import json_patch

Obj = dict[str, Any]
SERVICE_HOST = "controlplane.controlplane-system.svc"  # what the API server dials
_GROUPS = {"Pod": ("", "v1", "pods"), "Deployment": ("apps", "v1", "deployments"),
           "StatefulSet": ("apps", "v1", "statefulsets"),
           "DaemonSet": ("apps", "v1", "daemonsets"),
           "ReplicaSet": ("apps", "v1", "replicasets"), "Job": ("batch", "v1", "jobs"),
           "CronJob": ("batch", "v1", "cronjobs")}


@contextlib.contextmanager
def webhook_api() -> Iterator[ApiServerDouble]:
    """An API server double holding the shipped webhook configuration (no caBundle yet:
    the control plane writes it), stopped on the way out."""
    double = ApiServerDouble(crd_installed=False).start()
    try:
        double.create(deploy.mutating_webhook_configuration())
        yield double
    finally:
        double.stop()


def app_pod(name: str = "", *, generate_name: str = "", labels: Obj | None = None,
            owner: tuple[str, str] | None = None, annotations: Obj | None = None) -> Obj:
    """A defaulted Pod with one app container on 9080. ``owner``: (kind, name) of the
    controller that created it (then it has a generateName, not a name)."""
    meta: Obj = {"namespace": "shop", "labels": dict(labels or {"app": "reviews"})}
    if name:
        meta["name"] = name
    if generate_name:
        meta["generateName"] = generate_name
    if annotations:
        meta["annotations"] = dict(annotations)
    if owner is not None:
        api_version = "batch/v1" if owner[0] == "Job" else "apps/v1"
        meta["ownerReferences"] = [{"apiVersion": api_version, "kind": owner[0],
                                    "name": owner[1], "uid": str(uuid.uuid4()),
                                    "controller": True, "blockOwnerDeletion": True}]
    pod: Obj = {"apiVersion": "v1", "kind": "Pod", "metadata": meta, "spec": {
        "containers": [{"name": "reviews", "image": "registry.example/reviews:1",
                        "ports": [{"containerPort": 9080, "protocol": "TCP"}]}],
        "serviceAccountName": "reviews"}}
    _default_pod(pod)
    return pod


def workload(kind: str, name: str = "reviews") -> Obj:
    """A workload whose pod template is ``app_pod``'s (CronJob: in its job template)."""
    template = {"metadata": {"labels": {"app": name}},
                "spec": copy.deepcopy(app_pod()["spec"])}
    group, version, _ = _GROUPS[kind]
    spec: Obj = {"template": template}
    if kind in ("Deployment", "StatefulSet", "DaemonSet", "ReplicaSet"):
        spec["selector"] = {"matchLabels": {"app": name}}
    if kind == "CronJob":
        spec = {"schedule": "*/5 * * * *", "jobTemplate": {"spec": spec}}
    return {"apiVersion": f"{group}/{version}" if group else version, "kind": kind,
            "metadata": {"name": name, "namespace": "shop"}, "spec": spec}


def review_request(obj: Obj, namespace: str = "shop", operation: str = "CREATE") -> Obj:
    kind = obj["kind"]
    group, version, resource = _GROUPS[kind]
    gvk = {"group": group, "version": version, "kind": kind}
    gvr = {"group": group, "version": version, "resource": resource}
    request: Obj = {
        "uid": str(uuid.uuid4()), "kind": gvk, "resource": gvr, "requestKind": gvk,
        "requestResource": gvr, "namespace": namespace, "operation": operation,
        "userInfo": {"username": "system:serviceaccount:kube-system:replicaset-controller",
                     "groups": ["system:serviceaccounts", "system:authenticated"]},
        "object": obj, "oldObject": None, "dryRun": False,
        "options": {"apiVersion": "meta.k8s.io/v1", "kind": "CreateOptions"}}
    name = obj.get("metadata", {}).get("name") if isinstance(obj, dict) else None
    if name:
        request["name"] = name
    return {"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview",
            "request": request}


def ca_bundle(api: ApiServerDouble) -> bytes:
    """What the API server would trust: the caBundle of our configuration's webhooks
    (every one of them must carry the same)."""
    config = api.get(MUTATING_WEBHOOKS, "", WEBHOOK_CONFIGURATION)
    bundles = {h["clientConfig"].get("caBundle") for h in config["webhooks"]}
    assert len(bundles) == 1 and None not in bundles, bundles
    return base64.b64decode(bundles.pop())


def client_context(ca_pem: bytes) -> ssl.SSLContext:
    context = ssl.create_default_context(cadata=ca_pem.decode())
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    return context


async def send(session: aiohttp.ClientSession, port: int, review: Obj,
               context: ssl.SSLContext) -> Obj:
    """POST /inject over HTTPS to 127.0.0.1, checking the certificate for the Service's
    name as the API server does."""
    async with session.post(f"https://127.0.0.1:{port}/inject", json=review, ssl=context,
                            server_hostname=SERVICE_HOST) as response:
        assert response.status == 200, await response.text()
        answer: Obj = await response.json()
    assert answer["apiVersion"] == "admission.k8s.io/v1"
    assert answer["kind"] == "AdmissionReview"
    assert answer["response"]["uid"] == review["request"]["uid"]
    return answer["response"]


def patched(obj: Obj, response: Obj) -> Obj:
    """The object after the response's JSON patch (unchanged when it has none)."""
    if "patch" not in response:
        return copy.deepcopy(obj)
    assert response["patchType"] == "JSONPatch"
    operations = json.loads(base64.b64decode(response["patch"]))
    result: Obj = json_patch(copy.deepcopy(obj), operations)
    return result
