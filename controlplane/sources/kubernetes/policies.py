"""TrafficPolicies -> which policy governs which Service, and each policy's verdict.

A verdict becomes the policy's status: ``Accepted`` (is the spec valid, and applied?) and,
for an accepted policy with label subsets, ``ResolvedRefs`` (does every subset select an
endpoint? one that selects none answers 503 to its share of the traffic).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError

from controlplane.mesh.loader import describe_error
from controlplane.mesh.model import Policy, Service
from controlplane.sources.kubernetes.kinds import POLICY_KIND
from controlplane.sources.kubernetes.services import Key, Obj, key, meta


@dataclass(frozen=True)
class Verdict:
    """What becomes a TrafficPolicy's (or a Sidecar's) status conditions."""

    accepted: bool
    reason: str  # Accepted | Invalid | TargetNotFound | Conflicted | Unsupported
    message: str
    generation: int = 0
    uid: str = ""  # a policy deleted and created again is another object: write again
    unresolved: str = ""  # accepted, but a subset selects no endpoint: why, else ""
    unresolved_reason: str = ""  # ResolvedRefs' reason when not the kind's usual one
    kind: str = POLICY_KIND  # whose verdict: TrafficPolicy or Sidecar (status goes there)
    # A TrafficPolicy's fields a Gateway API route replaces ("": none; None: not known,
    # no Overridden condition), said in its Overridden condition.
    overridden: str | None = None


def generation_of(policy: Obj) -> int:
    value = meta(policy).get("generation")
    return value if isinstance(value, int) and not isinstance(value, bool) else 0


def uid_of(policy: Obj) -> str:
    return str(meta(policy).get("uid") or "")


def subset_keys(spec: Mapping[str, Any]) -> frozenset[str]:
    """The label keys a policy's split and match legs select on."""
    found: set[str] = set()
    for field in ("split", "match"):
        legs = spec.get(field)
        for leg in legs if isinstance(legs, list) else []:
            labels = leg.get("labels") if isinstance(leg, Mapping) else None
            if isinstance(labels, Mapping):
                found.update(str(label) for label in labels)
    return frozenset(found)


def unresolved_subsets(service: Service) -> str:
    """Why some label subset of the service's policy selects no endpoint, or ""."""
    policy = service.policy
    legs = [*(("split", i, t.labels) for i, t in enumerate(policy.split or [])),
            *(("match", i, t.labels) for i, t in enumerate(policy.match or []))]
    empty = []
    for field, index, labels in legs:
        if labels is None or service.external_name is not None:
            continue
        if not any(all(e.labels.get(k) == v for k, v in labels.items())
                   for e in service.endpoints):
            shown = ", ".join(f"{k}={v}" for k, v in sorted(labels.items()))
            empty.append(f"spec.{field}[{index}].labels ({shown})")
    if not empty:
        return ""
    return (f"{'; '.join(empty)}: no endpoint of Service {service.name!r} has these labels, "
            "so its share of the traffic fails with 503; check the Pods' labels, or scale "
            "up that version")


def rejected(policy: Obj, reason: str, message: str) -> Verdict:
    return Verdict(False, reason, message, generation_of(policy), uid_of(policy))


def choose_policies(policies: Iterable[Obj], services: Mapping[Key, Obj], pod_labels: bool,
                    ) -> tuple[dict[Key, tuple[Obj, dict[str, Any]]], dict[Key, Verdict]]:
    """Validate every TrafficPolicy; the oldest valid one per Service applies. Returns,
    per Service, the policy object and its spec without ``targetRef``. Without
    ``pod_labels`` (Pods not watched) a policy with label subsets is refused. A policy of
    any shape gets a verdict; none raises."""
    chosen: dict[Key, tuple[Obj, dict[str, Any]]] = {}
    owner: dict[Key, Key] = {}
    verdicts: dict[Key, Verdict] = {}
    ordered = sorted((p for p in policies if isinstance(p, Mapping)), key=lambda p: (
        str(meta(p).get("creationTimestamp") or ""), key(p)))
    for policy in ordered:
        try:
            verdict, spec, target_key = _judge(policy, services, pod_labels)
        except Exception as exc:  # a shape nothing above foresaw: this policy only
            verdict, spec, target_key = rejected(
                policy, "Invalid", f"spec: cannot be read ({type(exc).__name__}: {exc}); "
                "compare it with the TrafficPolicy reference in the README"), {}, None
        if target_key is not None and target_key in chosen:
            verdict = rejected(
                policy, "Conflicted",
                f"Service {target_key[1]!r} already has TrafficPolicy {owner[target_key][1]!r} "
                "(the oldest applies); merge the two")
        elif target_key is not None:
            chosen[target_key] = (policy, spec)
            owner[target_key] = key(policy)
        verdicts[key(policy)] = verdict
    return chosen, verdicts


def _judge(policy: Obj, services: Mapping[Key, Obj], pod_labels: bool,
           ) -> tuple[Verdict, dict[str, Any], Key | None]:
    """The verdict on one policy, its spec, and the Service it would apply to (or None)."""
    policy_key = key(policy)
    raw = policy.get("spec")
    if not isinstance(raw, Mapping):
        return rejected(policy, "Invalid", "spec: must be an object with targetRef and "
                        "the policy fields"), {}, None
    spec = dict(raw)
    target = spec.pop("targetRef", None)
    if (not isinstance(target, Mapping) or target.get("kind", "Service") != "Service"
            or not isinstance(target.get("name"), str) or not target.get("name")):
        return rejected(policy, "Invalid", "spec.targetRef: must be {kind: Service, name: "
                        "<service>} in the policy's namespace"), spec, None
    try:
        Policy.model_validate(spec)
    except ValidationError as exc:
        problems = "; ".join(describe_error(e, spec, root="spec") for e in exc.errors())
        return rejected(policy, "Invalid", problems), spec, None
    subsets = [f"spec.{field}[{i}].labels" for field in ("split", "match")
               for i, leg in enumerate(spec.get(field) or []) if leg.get("labels")]
    if subsets and not pod_labels:
        return rejected(
            policy, "Unsupported",
            f"{subsets[0]}: label subsets need Pod labels, which this server does not "
            "watch (--no-pod-labels); drop that flag, or make each version a Service "
            "and split across Services ({service: reviews-v2, weight: 10})"), spec, None
    target_key = (policy_key[0], str(target["name"]))
    if target_key not in services:
        return rejected(
            policy, "TargetNotFound",
            f"spec.targetRef: no Service {target_key[1]!r} in namespace {target_key[0]!r}; "
            "the policy applies once it exists"), spec, None
    return Verdict(True, "Accepted", f"applied to Service {target_key[1]!r}",
                   generation_of(policy), uid_of(policy)), spec, target_key
