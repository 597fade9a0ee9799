"""The edge every status writer shares: a merge patch of an object's ``status``
subresource. Failures are logged, never raised ("failed": try again with the next
change); a 404 is "gone" (deleted meanwhile, nothing left to write); a 403 is logged
once per kind and namespace and kept in ``forbidden`` (what RBAC rule to add, for
/readyz) until a write there succeeds. Blocking: run it off the event loop."""

from __future__ import annotations

from typing import Any, Literal

import structlog
from kubernetes import client
from kubernetes.client.exceptions import ApiException

from controlplane.sources.kubernetes.kinds import Kind

log = structlog.get_logger("controlplane.source.kubernetes")

Outcome = Literal["written", "gone", "failed"]


class StatusPatcher:
    """``area`` names the log events (``<area>.status_forbidden``,
    ``<area>.status_failed``), ``subject`` the log field naming the object, and
    ``meanwhile`` what still works while status may not be written."""

    def __init__(self, api: client.ApiClient, area: str, subject: str,
                 meanwhile: str = "") -> None:
        self._custom = client.CustomObjectsApi(api)
        self._area, self._subject, self._meanwhile = area, subject, meanwhile
        # (plural, namespace) where the server may not write status (403): what to add.
        self.forbidden: dict[tuple[str, str], str] = {}

    def patch(self, kind: Kind, namespace: str, name: str, body: dict[str, Any]) -> Outcome:
        where = (kind.plural, namespace)
        shown = f"{namespace}/{name}"
        kwargs: dict[str, Any] = {"_request_timeout": (5, 10)}
        try:
            if kind.namespaced:
                self._custom.patch_namespaced_custom_object_status(
                    kind.group, kind.version, namespace, kind.plural, name, body, **kwargs)
            else:
                self._custom.patch_cluster_custom_object_status(
                    kind.group, kind.version, kind.plural, name, body, **kwargs)
        except ApiException as exc:
            if exc.status == 404:
                return "gone"
            if exc.status == 403:
                if where not in self.forbidden:
                    self.forbidden[where] = (
                        f"may not write {kind.kind} status"
                        f"{f' in namespace {namespace!r}' if namespace else ''}; add the "
                        f"rule {{apiGroups: [{kind.group!r}], resources: "
                        f"['{kind.plural}/status'], verbs: [get, update, patch]}} to the "
                        f"ClusterRole (deploy/kubernetes/02-rbac.yaml){self._meanwhile}")
                    log.error(f"{self._area}.status_forbidden", kind=kind.kind,
                              **({"namespace": namespace} if namespace else {}),
                              problem=self.forbidden[where])
                return "failed"
            log.warning(f"{self._area}.status_failed", kind=kind.kind,
                        **{self._subject: shown}, status=exc.status, error=str(exc.reason),
                        hint="retried with the next change")
            return "failed"
        except Exception as exc:
            log.warning(f"{self._area}.status_failed", kind=kind.kind, **{self._subject: shown},
                        error=f"{type(exc).__name__}: {exc}", hint="retried with the next change")
            return "failed"
        self.forbidden.pop(where, None)
        return "written"
