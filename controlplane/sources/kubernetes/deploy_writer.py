"""The deployer's edge: each Gateway's objects (``deployer.desired``) through the API.

GET each object; create it when missing; merge-patch it when the hash of what we want
(an annotation on it) differs; never touch an object of that name the Gateway does not
own (its ownerReferences); delete ours when a Gateway leaves our class. Blocking: the
controller runs it off the event loop.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from typing import Any

import structlog
from kubernetes import client
from kubernetes.client.exceptions import ApiException

from controlplane.inject.config import InjectConfig
from controlplane.sources.kubernetes.deployer import (
    HASH_ANNOTATION,
    MERGE_PATCH,
    Bootstrap,
    NotDeployable,
    Obj,
    desired,
    gateway_bootstrap,
    resource_name,
)
from controlplane.sources.kubernetes.kinds import (
    DEPLOYMENTS,
    GATEWAYS,
    SERVICE_ACCOUNTS,
    SERVICES,
    Kind,
)
from controlplane.sources.kubernetes.services import meta

log = structlog.get_logger("controlplane.source.kubernetes")


@dataclass(frozen=True)
class Outcome:
    """What applying one Gateway's objects came to: ``problem`` empty when all are in
    place (created, patched or already right), else what is wrong and what to do."""

    problem: str = ""
    written: int = 0  # objects created or patched


class Deployer:
    """Applies :func:`desired` through the API. Blocking: run it off the event loop."""

    def __init__(self, api: client.ApiClient, config: InjectConfig,
                 bootstrap: Bootstrap = gateway_bootstrap) -> None:
        self.config = config
        self.bootstrap = bootstrap
        # The mesh CA's trust bundle now, when xDS is served over TLS (the app sets it, as
        # for the injection webhook): the gateways' bootstrap verifies the server with it
        # and authenticates with the pod's projected token.
        self.bundle: Callable[[], bytes] | None = None
        self._core = client.CoreV1Api(api)
        self._apps = client.AppsV1Api(api)

    def current(self) -> InjectConfig:
        """The config with the trust bundle as it is now."""
        if self.bundle is None:
            return self.config
        pem = self.bundle().decode()
        return self.config if pem == self.config.xds_ca else replace(self.config, xds_ca=pem)

    def apply(self, gateway: Mapping[str, Any]) -> Outcome:
        where = "/".join(reversed(_gateway_key(gateway)))
        try:
            wanted = desired(gateway, self.current(), self.bootstrap)
        except NotDeployable as exc:
            return Outcome(f"{exc}")
        uid = str(meta(gateway).get("uid") or "")
        written = 0
        for kind, obj in wanted:
            try:
                written += self._apply_one(kind, obj, uid)
            except _NotOwned as exc:
                return Outcome(str(exc), written)
            except ApiException as exc:
                problem = _api_problem(kind, obj, exc)
                log.warning("gateway.deploy_failed", gateway=where, kind=kind.kind,
                            status=exc.status, problem=problem)
                return Outcome(problem, written)
            except Exception as exc:  # the API is away: the next batch tries again
                problem = (f"cannot reach the API server to write {kind.kind} "
                           f"{obj['metadata']['name']}: {type(exc).__name__}; retried")
                log.warning("gateway.deploy_failed", gateway=where, kind=kind.kind,
                            problem=problem)
                return Outcome(problem, written)
        if written:
            log.info("gateway.deployed", gateway=where, written=written)
        return Outcome("", written)

    def remove(self, namespace: str, gateway: str, gateway_class: str, uid: str) -> None:
        """A Gateway that is no longer ours (its class changed): delete what we made for
        it, if the Gateway owns it. (A deleted Gateway's objects go by garbage
        collection.)"""
        name = resource_name(gateway, gateway_class)
        for kind in (SERVICES, DEPLOYMENTS, SERVICE_ACCOUNTS):
            try:
                current = self._read(kind, namespace, name)
                if current is None or not _owned_by(current, uid):
                    continue
                self._delete(kind, namespace, name)
                log.info("gateway.removed", gateway=f"{namespace}/{gateway}", kind=kind.kind,
                         name=name)
            except Exception as exc:
                log.warning("gateway.remove_failed", gateway=f"{namespace}/{gateway}",
                            kind=kind.kind, error=f"{type(exc).__name__}: {exc}")

    def _apply_one(self, kind: Kind, obj: Obj, uid: str) -> int:
        data = obj["metadata"]
        namespace, name = data["namespace"], data["name"]
        current = self._read(kind, namespace, name)
        if current is None:
            self._create(kind, namespace, obj)
            return 1
        if not _owned_by(current, uid):
            raise _NotOwned(f"a {kind.kind} named {name!r} exists in namespace "
                            f"{namespace!r} and this Gateway does not own it; delete or "
                            "rename it, and the gateway's own is made")
        have = (meta(current).get("annotations") or {}).get(HASH_ANNOTATION)
        if have == data["annotations"][HASH_ANNOTATION]:
            return 0
        patch: Obj = {"metadata": {"labels": data["labels"],
                                   "annotations": data["annotations"],
                                   "ownerReferences": data["ownerReferences"]}}
        if "spec" in obj:
            spec = dict(obj["spec"])
            spec.pop("replicas", None)  # set at creation; a scaler's (or a user's) after
            patch["spec"] = spec
        self._patch(kind, namespace, name, patch)
        return 1

    def _call(self, verb: str, kind: Kind, *args: Any, **extra: Any) -> Any:
        """``{verb}_namespaced_{kind}`` of the client, as raw JSON (no models)."""
        api: Any = self._apps if kind == DEPLOYMENTS else self._core
        noun = {DEPLOYMENTS: "deployment", SERVICES: "service"}.get(kind, "service_account")
        return getattr(api, f"{verb}_namespaced_{noun}")(
            *args, _preload_content=False, _request_timeout=(5, 10), **extra)

    def _read(self, kind: Kind, namespace: str, name: str) -> Obj | None:
        try:
            response = self._call("read", kind, name, namespace)
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise
        found: Obj = json.loads(response.data)
        return found

    def _create(self, kind: Kind, namespace: str, obj: Obj) -> None:
        self._call("create", kind, namespace, obj)

    def _patch(self, kind: Kind, namespace: str, name: str, patch: Obj) -> None:
        self._call("patch", kind, name, namespace, patch, _content_type=MERGE_PATCH)

    def _delete(self, kind: Kind, namespace: str, name: str) -> None:
        self._call("delete", kind, name, namespace)


class _NotOwned(Exception):
    pass


def _gateway_key(gateway: Mapping[str, Any]) -> tuple[str, str]:
    data = meta(gateway)
    return str(data.get("name") or ""), str(data.get("namespace") or "default")


def _owned_by(obj: Mapping[str, Any], uid: str) -> bool:
    owners = meta(obj).get("ownerReferences")
    return isinstance(owners, list) and any(
        isinstance(o, Mapping) and o.get("uid") == uid and o.get("kind") == GATEWAYS.kind
        for o in owners)


def _api_problem(kind: Kind, obj: Obj, exc: ApiException) -> str:
    name = obj["metadata"]["name"]
    if exc.status == 403:
        verbs = "get, create, patch, delete"
        return (f"may not write {kind.plural} in namespace {obj['metadata']['namespace']!r}; "
                f"add the rule {{apiGroups: [{kind.group!r}], resources: [{kind.plural!r}], "
                f"verbs: [{verbs}]}} to the ClusterRole (deploy/kubernetes/02-rbac.yaml)")
    try:
        body = json.loads(exc.body) if exc.body else {}
    except (TypeError, ValueError):
        body = {}
    message = body.get("message") if isinstance(body, dict) else None
    return (f"the API server refused {kind.kind} {name}: {message or exc.reason} "
            f"(HTTP {exc.status}); retried with the next change")
