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
from typing import Any, Final

import structlog
from kubernetes import client

from controlplane.sources.kubernetes.conditions import condition_json, find_condition
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
from controlplane.sources.kubernetes.status_patch import StatusPatcher

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


def _condition(type_: str, status: str, reason: str, message: str, generation: int,
               current: Mapping[str, Any] | None) -> dict[str, Any]:
    return condition_json(type_, status, reason, message, generation, _find(current, type_))


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
    return find_condition(status.get("conditions") if isinstance(status, Mapping) else None,
                          type_)


class StatusWriter(StatusPatcher):
    def __init__(self, api: client.ApiClient) -> None:
        super().__init__(api, "policy", "policy",
                         "; they apply meanwhile, their status is not written")

    def write(self, policy: Key, verdict: Verdict, current: Mapping[str, Any] | None,
              programmed: Programmed | None = None) -> bool:
        """Blocking; run it off the event loop. Writes to the object of ``verdict.kind``
        (a TrafficPolicy or a Sidecar). Failures are logged, never raised; a 403 is logged
        once per kind and namespace and kept in ``forbidden`` until a write succeeds."""
        namespace, name = policy
        kind = _KINDS[verdict.kind]
        body = {"status": {"conditions": conditions(verdict, current, programmed)}}
        outcome = self.patch(kind, namespace, name, body)
        if outcome != "written":
            return outcome == "gone"
        log.info("policy.status", policy=f"{namespace}/{name}", kind=kind.kind,
                 accepted=verdict.accepted, reason=verdict.reason, message=verdict.message,
                 **({} if programmed is None else {"programmed": programmed.status,
                                                   "programmed_reason": programmed.reason}))
        return True
