"""TrafficPolicy status: an ``Accepted`` condition that says whether the policy applies,
and if not, which field is wrong. Written only when it differs from what is there, so
two replicas agree and our own writes do not echo back as changes."""

from __future__ import annotations

from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

import structlog
from kubernetes import client
from kubernetes.client.exceptions import ApiException

from controlplane.sources.kubernetes.convert import Key, Verdict
from controlplane.sources.kubernetes.kinds import ACCEPTED, TRAFFIC_POLICIES

log = structlog.get_logger("controlplane.source.kubernetes")


def condition(verdict: Verdict, current: Mapping[str, Any] | None) -> dict[str, Any]:
    status = "True" if verdict.accepted else "False"
    previous = _accepted(current)
    since = previous.get("lastTransitionTime") if previous.get("status") == status else None
    return {
        "type": ACCEPTED,
        "status": status,
        "reason": verdict.reason,
        "message": verdict.message,
        "observedGeneration": verdict.generation,
        "lastTransitionTime": since or datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
    }


def needs_write(verdict: Verdict, current: Mapping[str, Any] | None) -> bool:
    previous = _accepted(current)
    wanted = condition(verdict, current)
    return any(previous.get(k) != wanted[k]
               for k in ("status", "reason", "message", "observedGeneration"))


def _accepted(status: Mapping[str, Any] | None) -> dict[str, Any]:
    for item in (status or {}).get("conditions") or []:
        if item.get("type") == ACCEPTED:
            return dict(item)
    return {}


class StatusWriter:
    def __init__(self, api: client.ApiClient) -> None:
        self._custom = client.CustomObjectsApi(api)

    def write(self, policy: Key, verdict: Verdict, current: Mapping[str, Any] | None) -> bool:
        """Blocking; run it off the event loop. Failures are logged, never raised."""
        namespace, name = policy
        body = {"status": {"conditions": [condition(verdict, current)]}}
        try:
            self._custom.patch_namespaced_custom_object_status(
                TRAFFIC_POLICIES.group, TRAFFIC_POLICIES.version, namespace,
                TRAFFIC_POLICIES.plural, name, body, _request_timeout=(5, 10))
        except ApiException as exc:
            if exc.status == 404:
                return True  # deleted meanwhile: nothing left to write
            log.warning("policy.status_failed", policy=f"{namespace}/{name}", status=exc.status,
                        error=str(exc.reason), hint="check RBAC: the server needs patch on "
                        "trafficpolicies/status (deploy/kubernetes/02-rbac.yaml)")
            return False
        except Exception as exc:
            log.warning("policy.status_failed", policy=f"{namespace}/{name}",
                        error=f"{type(exc).__name__}: {exc}")
            return False
        log.info("policy.status", policy=f"{namespace}/{name}", accepted=verdict.accepted,
                 reason=verdict.reason, message=verdict.message)
        return True
