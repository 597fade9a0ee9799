"""Injection for proxyless gRPC pods (``mesh.controlplane.io/proxyless: grpc``).

A pod whose app speaks xDS itself (grpcio, grpc-go, grpc-java on ``xds:///`` targets)
gets no Envoy and no capture. It gets what such an app needs to join the mesh, the
equivalent of Istio's ``grpc-agent`` template:

- ``controlplane-grpc-bootstrap`` (init) runs ``controlplane bootstrap --grpc`` with the
  pod's identity: node id ``<pod>.<namespace>`` and namespace from the downward API, the
  service as for a sidecar, the xDS server. With the mesh CA it adds the CA file, the
  projected token and ``--cert-dir``;
- ``controlplane-grpc-certs`` (init, only with the mesh CA) runs ``controlplane certs
  --once``, so the app starts with its certificate;
- ``controlplane-grpc-agent`` (native sidecar, only with the mesh CA) runs ``controlplane
  certs`` and writes the files again on every rotation;
- each app container gets ``GRPC_XDS_BOOTSTRAP`` and ``GRPC_EXPERIMENTAL_XDS_BOOTSTRAP_CALL_CREDS``
  (grpcio sends the token only with it) and read-only mounts of both volumes.

The CA reaches the pod's files through the downward API: the webhook writes the bundle
into the annotation ``mesh.controlplane.io/xds-ca``, and the projected token volume
projects it as a file next to the token. No shell is needed in any image. The certificate
files live on a memory-backed emptyDir, so the key is never written to the node's disk.

The key is written 0600 by the agent and read by the app, so the agent runs as the app's
user. That user is the first app container's ``runAsUser``, else the pod's, which the
agent inherits. A pod that sets neither runs the agent as the image's user.

The app may serve too (``grpc.server(xds=True)``): the bootstrap always has
``--grpc-server``. A process that only calls never asks for a server Listener, so the
template is harmless to it. The pod gets the ``service-account`` annotation (its
identity, as sidecars get it) beside the label ``mesh.controlplane.io/proxyless: grpc``;
together they tell the Kubernetes source that its endpoints are a proxyless server's:
sidecars call them with mesh mTLS (offering ``h2``) under STRICT, in plaintext otherwise.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Mapping
from typing import Any, Final

from controlplane.inject import config as names
from controlplane.inject import podspec, template
from controlplane.inject.config import InjectConfig, InjectError

ANNOTATION: Final = names.PREFIX + "proxyless"
"""On a pod: which proxyless template it gets instead of the sidecar (``grpc``)."""
KINDS: Final = ("grpc",)
LABEL: Final = ANNOTATION
"""Written on an injected pod (``grpc``), so ``kubectl get pods -l`` finds them."""
XDS_CA_ANNOTATION: Final = names.PREFIX + "xds-ca"
"""Written on an injected pod: the mesh CA's bundle, projected into its token volume."""

BOOTSTRAP_NAME: Final = "controlplane-grpc-bootstrap"
CERTS_NAME: Final = "controlplane-grpc-certs"
AGENT_NAME: Final = "controlplane-grpc-agent"
OUR_CONTAINERS: Final = (BOOTSTRAP_NAME, CERTS_NAME, AGENT_NAME)
_INJECTION: Final = "proxyless injection"

VOLUME: Final = "controlplane-grpc"
DIRECTORY: Final = "/var/run/controlplane-grpc"
BOOTSTRAP_PATH: Final = DIRECTORY + "/bootstrap.json"
CERT_DIR: Final = DIRECTORY + "/certs"
CA_FILE: Final = "xds-ca.pem"
CA_PATH: Final = names.TOKEN_DIR + "/" + CA_FILE

BOOTSTRAP_ENV: Final = "GRPC_XDS_BOOTSTRAP"
CALL_CREDS_ENV: Final = "GRPC_EXPERIMENTAL_XDS_BOOTSTRAP_CALL_CREDS"
_FORBIDDEN_ENV: Final = (BOOTSTRAP_ENV, "GRPC_XDS_BOOTSTRAP_CONFIG")

CERTS_TIMEOUT: Final = 120
"""How long ``controlplane certs --once`` waits for the first certificate before the init
container fails (the kubelet then restarts it with backoff)."""

RESOURCES: Final = {"requests": {"cpu": "10m", "memory": "64Mi"},
                    "limits": {"memory": "128Mi"}}
"""Each of ours. Measured (bench/cli_startup.py): ``controlplane bootstrap`` peaks at
16 MiB resident, the running ``certs`` agent holds 58.5 MiB (gRPC, protobuf and the xDS
messages). No CPU limit: the agent is idle but for a rotation."""

STATUS_VERSION: Final = 1


def kind_of(annotations: Mapping[str, str]) -> str | None:
    """The proxyless kind a pod asks for (None: a sidecar). Raises InjectError for a value
    this injector does not know."""
    value = annotations.get(ANNOTATION)
    if value is None:
        return None
    kind = value.strip().lower()
    if kind not in KINDS:
        raise InjectError(f'metadata.annotations["{ANNOTATION}"]',
                          f"{value!r} is not a proxyless kind; use \"grpc\" for an app whose "
                          "gRPC channels speak xDS themselves, or remove the annotation for "
                          "an Envoy sidecar")
    return kind


def inject_template(pod: Mapping[str, Any], config: InjectConfig,
                    service: str, service_account: str) -> dict[str, Any]:
    """``pod`` (a pod or a pod template) with the proxyless gRPC containers, volumes, env
    and annotations; an already injected one comes back equal. ``service`` is the one
    the pod belongs to (pod.service_name), ``service_account`` its ServiceAccount."""
    result: dict[str, Any] = copy.deepcopy(dict(pod))
    metadata = result.setdefault("metadata", {})
    annotations = dict(metadata.get("annotations") or {})
    if names.STATUS_ANNOTATION in annotations:
        return result
    kind = kind_of(annotations)
    spec = result.get("spec")
    if not isinstance(spec, dict):
        raise InjectError("spec", "missing or not an object; give a pod (or a pod template) "
                          "with metadata and spec")
    containers = podspec.containers(spec, "containers", True, OUR_CONTAINERS, _INJECTION)
    init_containers = podspec.containers(spec, "initContainers", False, OUR_CONTAINERS,
                                         _INJECTION)
    volumes = podspec.volumes(spec, (VOLUME, names.TOKEN_VOLUME),
                              "a volume proxyless injection adds")
    secure = config.xds_ca is not None
    user = _app_user(spec, containers)
    for index, container in enumerate(containers):
        _add_to_app(container, f"spec.containers[{index}]", secure)
    ours = [bootstrap_container(service, config, user)]
    if secure:
        ours += [certs_container(config, user), agent_container(config, user)]
    spec["initContainers"] = ours + init_containers
    spec["volumes"] = [*volumes, *proxyless_volumes(secure)]
    metadata["labels"] = {**dict(metadata.get("labels") or {}), LABEL: str(kind)}
    added = {names.SERVICE_ACCOUNT_ANNOTATION: service_account,
             names.STATUS_ANNOTATION: _status(config, [c["name"] for c in ours], str(kind))}
    if config.xds_ca is not None:
        added[XDS_CA_ANNOTATION] = config.xds_ca
    metadata["annotations"] = {**annotations, **added}
    return result


def bootstrap_args(service: str, config: InjectConfig) -> list[str]:
    """``controlplane bootstrap`` flags: the pod's node and namespace from the downward
    API, the server as sidecars dial it, and with the mesh CA its files."""
    args = ["--grpc", "--grpc-server", "--node-id", template.NODE_ID, "--service", service,
            "--namespace", "$(POD_NAMESPACE)", "--xds-address", config.xds_address]
    if config.xds_ca is not None:
        args += ["--xds-ca", CA_PATH, "--token-file", names.TOKEN_PATH,
                 "--cert-dir", CERT_DIR]
    return [*args, "-o", BOOTSTRAP_PATH]


def bootstrap_container(service: str, config: InjectConfig,
                        user: dict[str, Any]) -> dict[str, Any]:
    """Writes the gRPC bootstrap into the shared volume and exits."""
    return _ours(BOOTSTRAP_NAME, config.init_image, user, ["bootstrap"],
                 bootstrap_args(service, config), RESOURCES, env=[
                     {"name": env, "valueFrom": {"fieldRef": {"apiVersion": "v1",
                                                              "fieldPath": path}}}
                     for env, path in template.DOWNWARD_ENV[:2]],
                 token=config.xds_ca is not None)


def certs_container(config: InjectConfig, user: dict[str, Any]) -> dict[str, Any]:
    """Fetches the first certificate and exits: the app starts with one."""
    return _ours(CERTS_NAME, config.init_image, user, ["certs"],
                 ["--once", "--bootstrap", BOOTSTRAP_PATH, "--timeout", str(CERTS_TIMEOUT)],
                 RESOURCES, token=True)


def agent_container(config: InjectConfig, user: dict[str, Any]) -> dict[str, Any]:
    """Keeps the certificate files current for as long as the pod runs (a native
    sidecar: started before the app's containers, stopped after them)."""
    return {**_ours(AGENT_NAME, config.init_image, user, ["certs"], ["--bootstrap", BOOTSTRAP_PATH],
                    RESOURCES, token=True), "restartPolicy": "Always"}


def proxyless_volumes(secure: bool) -> list[dict[str, Any]]:
    """The shared directory (memory-backed: the key stays off the node's disk) and, with
    the mesh CA, the token and the CA file in one projected volume."""
    shared = {"name": VOLUME, "emptyDir": {"medium": "Memory", "sizeLimit": "1Mi"}}
    if not secure:
        return [shared]
    token = template.token_volume()
    token["projected"]["sources"].append({"downwardAPI": {"items": [{
        "path": CA_FILE,
        "fieldRef": {"apiVersion": "v1",
                     "fieldPath": f"metadata.annotations['{XDS_CA_ANNOTATION}']"}}]}})
    return [shared, token]


def _ours(name: str, image: str, user: dict[str, Any], command: list[str],
          args: list[str], resources: Mapping[str, Any], *, token: bool,
          env: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    mounts: list[dict[str, Any]] = [{"name": VOLUME, "mountPath": DIRECTORY}]
    if token:
        mounts.append({"name": names.TOKEN_VOLUME, "mountPath": names.TOKEN_DIR,
                       "readOnly": True})
    return {
        "name": name,
        "image": image,
        "imagePullPolicy": "IfNotPresent",
        "command": ["controlplane", *command],
        "args": args,
        **({"env": env} if env else {}),
        "resources": {part: dict(values) for part, values in resources.items()},
        "volumeMounts": mounts,
        "securityContext": {
            **user,
            "privileged": False,
            "allowPrivilegeEscalation": False,
            "readOnlyRootFilesystem": True,
            "capabilities": {"drop": ["ALL"]},
            "seccompProfile": {"type": "RuntimeDefault"},
        },
    }


def _app_user(spec: Mapping[str, Any], containers: list[dict[str, Any]]) -> dict[str, Any]:
    """The first app container's own user and group (ours then write a key it can read;
    when it sets none, ours inherit the pod's, as the app does), and ``runAsNonRoot``
    unless that user is root, so a namespace enforcing Pod Security ``restricted``
    admits ours."""
    def ids(context: Any) -> dict[str, int]:
        if not isinstance(context, Mapping):
            return {}
        return {key: context[key] for key in ("runAsUser", "runAsGroup")
                if isinstance(context.get(key), int) and not isinstance(context[key], bool)}

    own = ids(containers[0].get("securityContext"))
    user = own.get("runAsUser", ids(spec.get("securityContext")).get("runAsUser"))
    return {**own, **({} if user == 0 else {"runAsNonRoot": True})}


def _add_to_app(container: dict[str, Any], where: str, secure: bool) -> None:
    """The bootstrap's env and read-only mounts, refusing what would contradict them."""
    env = container.get("env")
    if env is None:
        env = []
    if not isinstance(env, list):
        raise InjectError(f"{where}.env", "must be a list of variables")
    for index, item in enumerate(env):
        if isinstance(item, Mapping) and item.get("name") in _FORBIDDEN_ENV:
            raise InjectError(f"{where}.env[{index}].name",
                              f"{item.get('name')} is what proxyless injection sets (the "
                              "bootstrap it writes); remove it, or remove the annotation "
                              f"{ANNOTATION} and give the app its own bootstrap")
    added = [{"name": BOOTSTRAP_ENV, "value": BOOTSTRAP_PATH}]
    if secure and not any(isinstance(item, Mapping) and item.get("name") == CALL_CREDS_ENV
                          for item in env):
        added.append({"name": CALL_CREDS_ENV, "value": "true"})
    container["env"] = [*env, *added]
    mounts = container.get("volumeMounts")
    if mounts is None:
        mounts = []
    if not isinstance(mounts, list):
        raise InjectError(f"{where}.volumeMounts", "must be a list of mounts")
    ours = [{"name": VOLUME, "mountPath": DIRECTORY, "readOnly": True}]
    if secure:
        ours.append({"name": names.TOKEN_VOLUME, "mountPath": names.TOKEN_DIR,
                     "readOnly": True})
    taken = {mount["mountPath"] for mount in ours}
    for index, mount in enumerate(mounts):
        if isinstance(mount, Mapping) and mount.get("mountPath") in taken:
            raise InjectError(f"{where}.volumeMounts[{index}].mountPath",
                              f"{mount.get('mountPath')} is where proxyless injection mounts "
                              "the gRPC bootstrap and credentials; mount this elsewhere")
    container["volumeMounts"] = [*mounts, *ours]


def _status(config: InjectConfig, containers: list[str], kind: str) -> str:
    return json.dumps({"version": STATUS_VERSION, "proxyless": kind,
                       "initContainers": containers, "image": config.init_image},
                      separators=(",", ":"))
