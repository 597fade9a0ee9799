"""The webhook's certificate in a cluster: kept in a Secret that the replicas share, and
its CA written into the ``caBundle`` of every webhook of our MutatingWebhookConfiguration.

Concurrency is the API server's: a create that finds the Secret already there (409
AlreadyExists) reads the one another replica made; a replacement or a ``caBundle`` patch
carries the resourceVersion it was computed from, and a 409 Conflict means "read again
and decide again". The official client is synchronous: call these from a thread.
"""

from __future__ import annotations

import base64
import datetime
import json
from collections.abc import Callable, Sequence
from typing import Any, Final

import structlog
from kubernetes import client
from kubernetes.client.exceptions import ApiException

from controlplane.inject.certs import (
    SECRET_TYPE,
    CertificateError,
    CertificateSource,
    ServingCert,
    from_secret_data,
    needs_renewal,
    renewed,
    secret_data,
    self_made,
)
from controlplane.security.ca import CertificateAuthority

log = structlog.get_logger("controlplane.webhook.certs")

_RETRIES: Final = 5
_MERGE_PATCH: Final = "application/merge-patch+json"


def _raw(call: Callable[..., Any], *args: Any) -> dict[str, Any]:
    """A read as the server sent it (JSON), not as the client's models rebuild it: what
    is written back then holds exactly what was read, and no field the models lack."""
    response = call(*args, _preload_content=False)
    found: dict[str, Any] = json.loads(response.data)
    return found


def _api_error(exc: ApiException, what: str, rule: str) -> CertificateError:
    if exc.status == 403:
        return CertificateError(f"not allowed to {what}: {exc.reason}; the control plane's "
                                f"service account needs {rule} (deploy/kubernetes/"
                                "02-rbac.yaml grants it)")
    try:
        message = str(json.loads(exc.body or "{}").get("message") or "")
    except (ValueError, AttributeError):
        message = ""
    return CertificateError(f"cannot {what}: {exc.status} {exc.reason}"
                            f"{': ' + message if message else ''}; retried with backoff")


class SecretCertificates:
    """A self-made certificate kept in ``namespace/name`` (type kubernetes.io/tls)."""

    def __init__(self, api: client.ApiClient, namespace: str, name: str,
                 ca: Callable[[], CertificateAuthority] | None = None) -> None:
        self.core = client.CoreV1Api(api)
        self.namespace = namespace
        self.name = name
        self.ca = ca  # the mesh CA: it issues the certificate (certs.py)

    @property
    def where(self) -> str:
        return f"Secret {self.namespace}/{self.name}"

    def _body(self, cert: ServingCert, version: str | None = None,
              type_: str = SECRET_TYPE) -> client.V1Secret:
        return client.V1Secret(
            api_version="v1", kind="Secret", type=type_, data=dict(secret_data(cert)),
            metadata=client.V1ObjectMeta(
                name=self.name, namespace=self.namespace, resource_version=version,
                labels={"app.kubernetes.io/name": "controlplane",
                        "app.kubernetes.io/component": "webhook-certificate"}))

    def ensure(self, names: Sequence[str], now: datetime.datetime) -> ServingCert:
        """The shared certificate: read it, or make it, or renew it, whichever is due."""
        rule = f"secrets get/create/update in {self.namespace}"
        ca = self.ca() if self.ca is not None else None
        for _ in range(_RETRIES):
            try:
                secret = _raw(self.core.read_namespaced_secret, self.name, self.namespace)
            except ApiException as exc:
                if exc.status != 404:
                    raise _api_error(exc, f"read {self.where}", rule) from exc
                fresh = self_made(names, now, ca)
                try:
                    self.core.create_namespaced_secret(self.namespace, self._body(fresh))
                except ApiException as create_exc:
                    if create_exc.status == 409:
                        continue  # another replica made it first: use theirs
                    raise _api_error(create_exc, f"create {self.where}", rule) from create_exc
                log.info("webhook.certificate_made", secret=self.where, **fresh.describe())
                return fresh
            try:
                current: ServingCert | None = from_secret_data(secret.get("data"), self.where)
            except CertificateError as exc:
                log.warning("webhook.certificate_unusable", secret=self.where, error=str(exc),
                            hint="it is replaced by a new one")
                current = None
            if current is not None and not needs_renewal(current, names, now, ca):
                return current
            fresh = (renewed(current, names, now, ca)
                     if current is not None and (current.ca_key_pem is not None or ca)
                     else self_made(names, now, ca))
            try:
                self.core.replace_namespaced_secret(
                    self.name, self.namespace,
                    # A Secret's type cannot change; ours works under any type.
                    self._body(fresh, secret["metadata"]["resourceVersion"],
                               str(secret.get("type") or SECRET_TYPE)))
            except ApiException as exc:
                if exc.status in (404, 409):
                    continue  # another replica renewed (or deleted) it: decide again
                raise _api_error(exc, f"update {self.where}", rule) from exc
            log.info("webhook.certificate_renewed", secret=self.where, **fresh.describe())
            return fresh
        raise CertificateError(f"{self.where} kept changing under us ({_RETRIES} tries); "
                               "retried with backoff")


def write_ca_bundle(api: client.ApiClient, configuration: str, ca_pem: bytes) -> bool:
    """Set ``caBundle`` of every webhook of the MutatingWebhookConfiguration to ``ca_pem``.
    False when the configuration does not exist (yet: ``kubectl apply`` creates the
    Deployment before it); nothing is written when it is already current."""
    admission = client.AdmissionregistrationV1Api(api)
    encoded = base64.b64encode(ca_pem).decode()
    rule = (f"mutatingwebhookconfigurations get/patch on {configuration} "
            "(admissionregistration.k8s.io)")
    for _ in range(_RETRIES):
        try:
            raw = _raw(admission.read_mutating_webhook_configuration, configuration)
        except ApiException as exc:
            if exc.status == 404:
                return False
            raise _api_error(exc, f"read MutatingWebhookConfiguration {configuration}",
                             rule) from exc
        hooks = raw.get("webhooks") or []
        if all(h.get("clientConfig", {}).get("caBundle") == encoded for h in hooks):
            return True
        for hook in hooks:
            hook.setdefault("clientConfig", {})["caBundle"] = encoded
        patch = {"metadata": {"resourceVersion": raw["metadata"]["resourceVersion"]},
                 "webhooks": hooks}
        try:
            admission.patch_mutating_webhook_configuration(configuration, patch,
                                                           _content_type=_MERGE_PATCH)
        except ApiException as exc:
            if exc.status == 409:
                continue  # changed since we read it (kubectl apply, the other replica)
            raise _api_error(exc, f"patch MutatingWebhookConfiguration {configuration}",
                             rule) from exc
        log.info("webhook.ca_bundle_written", configuration=configuration,
                 webhooks=[h.get("name") for h in hooks])
        return True
    raise CertificateError(f"MutatingWebhookConfiguration {configuration} kept changing "
                           f"under us ({_RETRIES} tries); retried with backoff")


class KubernetesCertificates:
    """The webhook's certificate source in a cluster: the shared Secret (or the operator's
    files), and its CA kept in ``caBundle``."""

    def __init__(self, api: client.ApiClient, configuration: str,
                 source: CertificateSource) -> None:
        self.api = api
        self.configuration = configuration
        self.source = source
        self._missing_logged = False

    def ensure(self, names: Sequence[str], now: datetime.datetime) -> ServingCert:
        return self.source.ensure(names, now)

    def publish(self, cert: ServingCert) -> bool:
        """Write the CA into ``caBundle``; False while the configuration does not exist
        (the webhook then asks again in seconds, not in an hour)."""
        if not cert.ca_pem:
            return True  # given files without a CA: someone else fills caBundle
        if write_ca_bundle(self.api, self.configuration, cert.ca_pem):
            self._missing_logged = False
            return True
        if not self._missing_logged:
            self._missing_logged = True
            log.warning("webhook.configuration_missing", configuration=self.configuration,
                        hint="kubectl apply -f deploy/kubernetes/ creates it; until its "
                        "caBundle is written the API server cannot call the webhook "
                        "(pods start without a sidecar); retried every few seconds")
        return False
