"""TrafficPolicy, Sidecar and SecurityPolicy status: an ``Accepted`` condition that says
whether the object applies, and if not, which field is wrong; for an accepted one, a
``ResolvedRefs`` condition that says whether every subset selects an endpoint (a
TrafficPolicy: reason ``NoMatchingEndpoints`` when one selects none, its traffic share
answers 503), every host pattern matches a Service (a Sidecar: ``NoMatchingServices``, a
likely typo) or the target Service exists (a SecurityPolicy: ``TargetNotFound``). On an
accepted TrafficPolicy or SecurityPolicy, a ``Programmed`` condition says whether the
proxies took what it shaped (``Rejected``: how many NACK it, and Envoy's error). Written
only when it differs from what is there, so two replicas agree and our own writes do not
echo back as changes."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Final

import structlog
from kubernetes import client
from kubernetes.client.exceptions import ApiException

from controlplane.sources.kubernetes.kinds import (
    ACCEPTED,
    CUSTOM,
    POLICY_KIND,
    RESOLVED_REFS,
    SECURITY_POLICY_KIND,
    SIDECAR_KIND,
    TELEMETRY_KIND,
    Kind,
)
from controlplane.sources.kubernetes.policies import Verdict
from controlplane.sources.kubernetes.services import Key

log = structlog.get_logger("controlplane.source.kubernetes")

_COMPARED = ("status", "reason", "message", "observedGeneration")
# ResolvedRefs per kind: the reason when something is unresolved, the message when not.
_RESOLVED = {
    POLICY_KIND: ("NoMatchingEndpoints", "every target selects at least one endpoint"),
    SIDECAR_KIND: ("NoMatchingServices", "every host matches at least one Service"),
    SECURITY_POLICY_KIND: ("TargetNotFound", "the target exists"),
    TELEMETRY_KIND: ("TargetNotFound", "the target exists"),
}
_KINDS: dict[str, Kind] = {kind.kind: kind for kind in CUSTOM}
PROGRAMMED: Final = "Programmed"  # on accepted ones: did the proxies take it?
OVERRIDDEN: Final = "Overridden"  # on accepted TrafficPolicies: does a route win?
PROGRAMMED_KINDS = frozenset({POLICY_KIND, SECURITY_POLICY_KIND})  # what proxies can NACK
# metav1.Condition's bound on a message; a longer one makes the API server refuse the write.
MAX_MESSAGE = 32768


def _bounded(message: str) -> str:
    if len(message) <= MAX_MESSAGE:
        return message
    tail = " ... (cut; the server's log has every problem)"
    return message[:MAX_MESSAGE - len(tail)] + tail


def _condition(type_: str, status: str, reason: str, message: str, generation: int,
               current: Mapping[str, Any] | None) -> dict[str, Any]:
    previous = _find(current, type_)
    since = previous.get("lastTransitionTime") if previous.get("status") == status else None
    return {
        "type": type_,
        "status": status,
        "reason": reason,
        "message": _bounded(message),
        "observedGeneration": generation,
        "lastTransitionTime": since or datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
    }


def condition(verdict: Verdict, current: Mapping[str, Any] | None) -> dict[str, Any]:
    """The ``Accepted`` condition."""
    return _condition(ACCEPTED, "True" if verdict.accepted else "False", verdict.reason,
                      verdict.message, verdict.generation, current)


@dataclass(frozen=True)
class Programmed:
    """The ``Programmed`` condition as this replica sees it (programmed.py)."""

    status: str  # "True" | "False"
    reason: str  # Programmed | Rejected
    message: str


def conditions(verdict: Verdict, current: Mapping[str, Any] | None,
               programmed: Programmed | None = None) -> list[dict[str, Any]]:
    """Every condition the verdict makes: ``Accepted``, and ``ResolvedRefs`` when accepted,
    then ``Programmed`` when given (accepted TrafficPolicies and SecurityPolicies)."""
    made = [condition(verdict, current)]
    if verdict.accepted:
        unresolved, resolved = _RESOLVED[verdict.kind]
        if verdict.unresolved:
            made.append(_condition(RESOLVED_REFS, "False",
                                   verdict.unresolved_reason or unresolved,
                                   verdict.unresolved, verdict.generation, current))
        else:
            made.append(_condition(RESOLVED_REFS, "True", "ResolvedRefs", resolved,
                                   verdict.generation, current))
        if programmed is not None and verdict.kind in PROGRAMMED_KINDS:
            made.append(_condition(PROGRAMMED, programmed.status, programmed.reason,
                                   programmed.message, verdict.generation, current))
        if verdict.overridden:  # a route attached to its Service replaces some fields
            made.append(_condition(OVERRIDDEN, "True", "RouteAttached", verdict.overridden,
                                   verdict.generation, current))
        elif verdict.overridden is not None:
            made.append(_condition(OVERRIDDEN, "False", "NotOverridden", "no Gateway API "
                                   "route replaces a field of this policy", verdict.generation,
                                   current))
    return made


def needs_write(verdict: Verdict, current: Mapping[str, Any] | None,
                programmed: Programmed | None = None) -> bool:
    wanted = conditions(verdict, current, programmed)
    listed = current.get("conditions") if isinstance(current, Mapping) else None
    present = [c for c in listed if isinstance(c, Mapping)] if isinstance(listed, list) else []
    if len(present) != len(wanted):
        return True
    return any(_find(current, w["type"]).get(k) != w[k] for w in wanted for k in _COMPARED)


def find(status: Mapping[str, Any] | None, type_: str) -> dict[str, Any]:
    """The condition of type ``type_`` in ``status`` (a copy), or {}."""
    return _find(status, type_)


def _find(status: Mapping[str, Any] | None, type_: str) -> dict[str, Any]:
    found = (status or {}).get("conditions") if isinstance(status, Mapping) else None
    for item in found if isinstance(found, list) else []:
        if isinstance(item, Mapping) and item.get("type") == type_:
            return dict(item)
    return {}


class StatusWriter:
    def __init__(self, api: client.ApiClient) -> None:
        self._custom = client.CustomObjectsApi(api)
        # (plural, namespace) where the server may not write status (403): what to add.
        self.forbidden: dict[tuple[str, str], str] = {}

    def write(self, policy: Key, verdict: Verdict, current: Mapping[str, Any] | None,
              programmed: Programmed | None = None) -> bool:
        """Blocking; run it off the event loop. Writes to the object of ``verdict.kind``
        (a TrafficPolicy or a Sidecar). Failures are logged, never raised; a 403 is logged
        once per kind and namespace and kept in ``forbidden`` until a write succeeds."""
        namespace, name = policy
        kind = _KINDS[verdict.kind]
        where = (kind.plural, namespace)
        body = {"status": {"conditions": conditions(verdict, current, programmed)}}
        try:
            self._custom.patch_namespaced_custom_object_status(
                kind.group, kind.version, namespace, kind.plural, name, body,
                _request_timeout=(5, 10))
        except ApiException as exc:
            if exc.status == 404:
                return True  # deleted meanwhile: nothing left to write
            if exc.status == 403:
                if where not in self.forbidden:
                    self.forbidden[where] = (
                        f"may not write {kind.kind} status in namespace {namespace!r}; add "
                        f"the rule {{apiGroups: [{kind.group!r}], resources: "
                        f"['{kind.plural}/status'], verbs: [get, update, patch]}} "
                        "to the ClusterRole (deploy/kubernetes/02-rbac.yaml); they apply "
                        "meanwhile, their status is not written")
                    log.error("policy.status_forbidden", namespace=namespace, kind=kind.kind,
                              problem=self.forbidden[where])
                return False
            log.warning("policy.status_failed", policy=f"{namespace}/{name}", kind=kind.kind,
                        status=exc.status, error=str(exc.reason),
                        hint="retried with the next change")
            return False
        except Exception as exc:
            log.warning("policy.status_failed", policy=f"{namespace}/{name}", kind=kind.kind,
                        error=f"{type(exc).__name__}: {exc}", hint="retried with the next change")
            return False
        self.forbidden.pop(where, None)
        log.info("policy.status", policy=f"{namespace}/{name}", kind=kind.kind,
                 accepted=verdict.accepted, reason=verdict.reason, message=verdict.message,
                 **({} if programmed is None else {"programmed": programmed.status,
                                                   "programmed_reason": programmed.reason}))
        return True
