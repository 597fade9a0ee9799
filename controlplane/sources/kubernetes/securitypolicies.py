"""SecurityPolicy objects -> the mesh's ``security`` (mesh-wide, per namespace, per
service), and a verdict per object that becomes its status.

A SecurityPolicy's spec is the mesh file's ``security`` block (``mtls``,
``authorization``) plus an optional ``target: {name: SERVICE}``: with a target it is that
Service's block, without one its namespace's, and without one in the control plane's own
namespace the whole mesh's (Istio's root namespace). Validated with the model; its
``Accepted`` condition names every bad field. Two valid objects for the same scope: the
oldest applies, the other is ``Conflicted``. A target Service that does not exist is no
error (it may come later) but said, in ``ResolvedRefs``.

Security fails closed where it can: an object that was valid and is then edited into an
invalid one keeps applying as it last was (its status says so), rather than dropping a
deny rule or a strict mode because of a typo. A new object that was never valid applies
nothing: there is no earlier state to keep.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from typing import Final

from pydantic import ValidationError

from controlplane.mesh.loader import describe_error
from controlplane.mesh.model import Mesh
from controlplane.mesh.security import MeshSecurity, Security, effective, takes_mtls
from controlplane.sources.kubernetes.kinds import (
    ROOT_NAMESPACE,
    SECURITY_POLICY_KIND,
    SERVICE_ACCOUNT_ANNOTATION,
)
from controlplane.sources.kubernetes.policies import Verdict, generation_of, uid_of
from controlplane.sources.kubernetes.services import Key, Obj, key, meta

MESH: Final = ("", "")  # the scope of a mesh-wide object


@dataclass(frozen=True)
class _Valid:
    """A spec that passed the model: what it applies, to what, and from which generation."""

    security: Security
    scope: tuple[str, str]  # (namespace, service); service "" = the namespace; MESH
    generation: int


@dataclass
class SecurityChoice:
    """The outcome of one batch: what applies where, and every object's verdict."""

    mesh: MeshSecurity = field(default_factory=MeshSecurity)
    services: dict[Key, Security] = field(default_factory=dict)  # (namespace, service)
    verdicts: dict[Key, Verdict] = field(default_factory=dict)
    applied_to: dict[Key, Key] = field(default_factory=dict)  # policy -> its Service


def _verdict(obj: Obj, accepted: bool, reason: str, message: str) -> Verdict:
    return Verdict(accepted, reason, message, generation_of(obj), uid_of(obj),
                   kind=SECURITY_POLICY_KIND)


def _where(scope: tuple[str, str]) -> str:
    if scope == MESH:
        return "every service of the mesh"
    namespace, service = scope
    if not service:
        return f"every service of namespace {namespace!r}"
    return f"Service {service!r}"


class SecurityPolicies:
    """Chooses what applies, batch after batch, remembering each object's last valid
    spec (by uid) so that an invalid edit keeps the last good state."""

    def __init__(self, root_namespace: str = ROOT_NAMESPACE) -> None:
        self.root_namespace = root_namespace
        self._last_good: dict[tuple[Key, str], _Valid] = {}
        # The last judgement of each object: the source's store replaces an object's dict
        # only when it changed, so the same dict is judged the same (no model validation).
        self._judged: dict[tuple[Key, str], tuple[Obj, Verdict, _Valid | None]] = {}

    def choose(self, objs: Iterable[Obj], services: Mapping[Key, Obj]) -> SecurityChoice:
        """Every SecurityPolicy judged; per scope the oldest valid one applies. No object
        of any shape makes this raise."""
        result = SecurityChoice()
        owners: dict[tuple[str, str], Key] = {}
        namespaces: dict[str, Security] = {}
        last_good: dict[tuple[Key, str], _Valid] = {}
        judged: dict[tuple[Key, str], tuple[Obj, Verdict, _Valid | None]] = {}
        ordered = sorted((o for o in objs if isinstance(o, Mapping)), key=lambda o: (
            str(meta(o).get("creationTimestamp") or ""), key(o)))
        for obj in ordered:
            memo_key = (key(obj), uid_of(obj))
            known = self._judged.get(memo_key)
            if known is not None and known[0] is obj:
                verdict, valid = known[1], known[2]
            else:
                try:
                    verdict, valid = self._judge(obj, self._last_good.get(memo_key))
                except Exception as exc:  # a shape nothing above foresaw: this object only
                    verdict, valid = _verdict(
                        obj, False, "Invalid", f"spec: cannot be read ({type(exc).__name__}: "
                        f"{exc}); compare it with the SecurityPolicy reference in "
                        "deploy/kubernetes/README.md"), self._last_good.get(memo_key)
            judged[memo_key] = (obj, verdict, valid)
            if valid is not None:
                last_good[memo_key] = valid
                if valid.scope in owners:
                    verdict = _verdict(
                        obj, False, "Conflicted",
                        f"SecurityPolicy {owners[valid.scope][1]!r} already applies to "
                        f"{_where(valid.scope)} (the oldest applies); merge their rules "
                        "into one")
                else:
                    owners[valid.scope] = key(obj)
                    if valid.scope == MESH:
                        result.mesh = MeshSecurity(mtls=valid.security.mtls,
                                                   authorization=valid.security.authorization)
                    elif not valid.scope[1]:
                        namespaces[valid.scope[0]] = valid.security
                    else:
                        result.services[valid.scope] = valid.security
                        result.applied_to[key(obj)] = valid.scope
                        if verdict.accepted and valid.scope not in services:
                            verdict = _unresolved(verdict, valid.scope)
            result.verdicts[key(obj)] = verdict
        if namespaces:
            result.mesh = result.mesh.model_copy(update={"namespaces": dict(sorted(
                namespaces.items()))})
        self._last_good = last_good
        self._judged = judged
        return result

    def _judge(self, obj: Obj, previous: _Valid | None) -> tuple[Verdict, _Valid | None]:
        """The verdict on one object and what it applies: its spec when valid, else its
        last valid spec (``previous``), else nothing."""
        namespace, _ = key(obj)
        raw = obj.get("spec")
        problem = ""
        if not isinstance(raw, Mapping):
            problem = "spec: must be an object with mtls and/or authorization (and " \
                      "optionally target)"
        else:
            spec = dict(raw)
            target = spec.pop("target", None)
            if target is not None and (not isinstance(target, Mapping) or not isinstance(
                    target.get("name"), str) or not target.get("name") or set(target) - {
                    "name"}):
                problem = ("spec.target: must be {name: <service>}, a Service of the "
                           "policy's namespace (omit target for the whole namespace)")
            else:
                try:
                    security = Security.model_validate(spec)
                except ValidationError as exc:
                    problem = "; ".join(describe_error(e, spec, root="spec")
                                        for e in exc.errors())
        if problem:
            if previous is None:
                return _verdict(obj, False, "Invalid", problem + "; nothing of this "
                                "policy applies until it is fixed"), None
            return _verdict(obj, False, "Invalid", (
                f"{problem}; its last valid spec (generation {previous.generation}) still "
                f"applies to {_where(previous.scope)} until this is fixed")), previous
        assert isinstance(raw, Mapping)
        target_name = raw["target"]["name"] if raw.get("target") is not None else ""
        if target_name:
            scope: tuple[str, str] = (namespace, str(target_name))
        elif namespace == self.root_namespace:
            scope = MESH
        else:
            scope = (namespace, "")
        valid = _Valid(security, scope, generation_of(obj))
        return _verdict(obj, True, "Accepted", f"applies to {_where(scope)}"), valid


def _unresolved(verdict: Verdict, scope: tuple[str, str]) -> Verdict:
    return replace(verdict, unresolved=(
        f"spec.target: no Service {scope[1]!r} in namespace {scope[0]!r}; the policy "
        "applies once it exists, so check the spelling"))


def without_sidecars(mesh: Mesh, applied_to: Mapping[Key, Key],
                     verdicts: dict[Key, Verdict]) -> None:
    """An applied SecurityPolicy that makes its Service strict while no endpoint of it
    has a sidecar (its Pods are not injected): valid, but every caller is refused, since
    callers use plaintext to endpoints without a sidecar. Said in ``ResolvedRefs``."""
    for policy_key, (namespace, name) in applied_to.items():
        verdict = verdicts.get(policy_key)
        service = mesh.service(name, namespace)
        if verdict is None or not verdict.accepted or verdict.unresolved or service is None:
            continue
        if service.external_name is not None or not service.endpoints:
            continue
        if effective(mesh, service).mode == "strict" and not any(
                takes_mtls(service, e, "strict") for e in service.endpoints):
            verdicts[policy_key] = replace(verdict, unresolved_reason="NoSidecars", unresolved=(
                f"mtls.mode strict: no endpoint of Service {name!r} has a sidecar (its Pods "
                f"carry no {SERVICE_ACCOUNT_ANNOTATION} annotation: not injected), so its "
                "callers use plaintext and are refused; inject its Pods, or use permissive "
                "until they are"))
