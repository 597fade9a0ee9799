"""Gateway API ingress objects for the API server double (GatewayClass, Gateway, TLSRoute)
and the ``kubernetes.io/tls`` Secrets their listeners name, as a user writes them."""

from __future__ import annotations

import base64
import contextlib
from collections.abc import Iterator
from typing import Any

from controlplane.sources.kubernetes.kinds import (
    GATEWAY_CLASSES,
    GATEWAY_CONTROLLER,
    GATEWAYS,
    TCP_ROUTES,
    TLS_ROUTES,
)
from tests.kube.apiserver import ApiServerDouble
from tests.kube.rbac import Rbac, granted_certificates
from tests.support.gateway_certs import ServerFiles

Obj = dict[str, Any]


@contextlib.contextmanager
def gateway_api() -> Iterator[ApiServerDouble]:
    """The API server double as shipped, with the example RoleBinding applied in "default"
    (the Gateways' namespace): the server may read that namespace's Secrets, no other's."""
    double = ApiServerDouble(bookmark_interval=0.5,
                             rbac=Rbac(roles=granted_certificates("default"))).start()
    try:
        yield double
    finally:
        double.stop()


def gateway_class(name: str = "controlplane", controller: str = GATEWAY_CONTROLLER) -> Obj:
    return {"apiVersion": GATEWAY_CLASSES.api_version, "kind": GATEWAY_CLASSES.kind,
            "metadata": {"name": name}, "spec": {"controllerName": controller}}


def gateway(name: str, listeners: list[Obj], namespace: str = "default",
            class_name: str = "controlplane", annotations: dict[str, str] | None = None,
            **spec: Any) -> Obj:
    metadata: Obj = {"name": name, "namespace": namespace}
    if annotations:
        metadata["annotations"] = dict(annotations)
    return {"apiVersion": GATEWAYS.api_version, "kind": GATEWAYS.kind, "metadata": metadata,
            "spec": {"gatewayClassName": class_name, "listeners": listeners, **spec}}


def https_listener(name: str, port: int, secret: str, hostname: str | None = None,
                   **tls: Any) -> Obj:
    listener: Obj = {"name": name, "port": port, "protocol": "HTTPS",
                     "tls": {"mode": "Terminate",
                             "certificateRefs": [{"kind": "Secret", "name": secret}], **tls}}
    if hostname:
        listener["hostname"] = hostname
    return listener


def tls_route(name: str, spec: Obj, namespace: str = "default") -> Obj:
    return {"apiVersion": TLS_ROUTES.api_version, "kind": TLS_ROUTES.kind,
            "metadata": {"name": name, "namespace": namespace}, "spec": spec}


def tcp_route(name: str, spec: Obj, namespace: str = "default") -> Obj:
    return {"apiVersion": TCP_ROUTES.api_version, "kind": TCP_ROUTES.kind,
            "metadata": {"name": name, "namespace": namespace}, "spec": spec}


def tls_secret(name: str, files: ServerFiles, namespace: str = "default",
               type_: str = "kubernetes.io/tls") -> Obj:
    """What ``kubectl create secret tls NAME --cert --key`` makes."""
    return {"apiVersion": "v1", "kind": "Secret", "type": type_,
            "metadata": {"name": name, "namespace": namespace},
            "data": {"tls.crt": base64.b64encode(files.cert.read_bytes()).decode(),
                     "tls.key": base64.b64encode(files.key.read_bytes()).decode()}}
