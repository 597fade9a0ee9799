"""Sidecar objects -> the mesh's ``sidecars`` entries (what each sidecar may reach), and a
verdict per object that becomes its status.

A Sidecar's spec is the mesh file's entry minus ``name`` and ``namespace`` (those come
from its metadata): ``workloadSelector: {service}`` (omitted: every sidecar of the
namespace) and ``egress: [{hosts: ["namespace/name", ...]}]``. Validated with the model;
an invalid one is left out (its sidecars see what they would see without it) and its
``Accepted`` condition names every bad field. Two valid objects that apply to the same
sidecars: the oldest applies, the other is ``Conflicted``. A host pattern that matches
no Service is fine (the Service may come later) but said, in ``ResolvedRefs``: a typo
there cuts the sidecar off from what it meant to call.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from pydantic import ValidationError

from controlplane.mesh.loader import describe_error
from controlplane.mesh.model import Service
from controlplane.mesh.scope import Sidecar, unmatched_hosts
from controlplane.sources.kubernetes.kinds import SIDECAR_KIND
from controlplane.sources.kubernetes.policies import Verdict, generation_of, uid_of
from controlplane.sources.kubernetes.services import Key, Obj, key, meta


def _rejected(obj: Obj, reason: str, message: str) -> Verdict:
    return Verdict(False, reason, message, generation_of(obj), uid_of(obj), kind=SIDECAR_KIND)


def _judge(obj: Obj) -> tuple[Verdict, Sidecar | None]:
    namespace, name = key(obj)
    spec = obj.get("spec")
    if not isinstance(spec, Mapping):
        return _rejected(obj, "Invalid", "spec: must be an object with egress (and "
                         "optionally workloadSelector)"), None
    data: dict[str, Any] = {**spec, "name": name, "namespace": namespace}
    try:
        sidecar = Sidecar.model_validate(data)
    except ValidationError as exc:
        problems = []
        for error in exc.errors():
            field = error["loc"][0] if error["loc"] else ""
            root = "metadata" if field in ("name", "namespace") else "spec"
            problems.append(describe_error(error, data, root=root))
        return _rejected(obj, "Invalid", "; ".join(problems)), None
    where = (f"the sidecars of service {sidecar.workload_selector.service!r}"
             if sidecar.workload_selector else "every sidecar of the namespace")
    return Verdict(True, "Accepted", f"applies to {where}", generation_of(obj), uid_of(obj),
                   kind=SIDECAR_KIND), sidecar


def choose_sidecars(objs: Iterable[Obj]) -> tuple[list[Sidecar], dict[Key, Verdict]]:
    """Every Sidecar object validated; per set of sidecars (a namespace, or one service
    there) the oldest valid object applies. No object of any shape makes this raise."""
    chosen: dict[tuple[str, str | None], Key] = {}
    sidecars: list[Sidecar] = []
    verdicts: dict[Key, Verdict] = {}
    ordered = sorted((o for o in objs if isinstance(o, Mapping)), key=lambda o: (
        str(meta(o).get("creationTimestamp") or ""), key(o)))
    for obj in ordered:
        try:
            verdict, sidecar = _judge(obj)
        except Exception as exc:  # a shape nothing above foresaw: this object only
            verdict, sidecar = _rejected(
                obj, "Invalid", f"spec: cannot be read ({type(exc).__name__}: {exc}); compare "
                "it with the Sidecar reference in deploy/kubernetes/README.md"), None
        if sidecar is not None:
            scope = sidecar.applies_to
            if scope in chosen:
                verdict = _rejected(
                    obj, "Conflicted",
                    f"Sidecar {chosen[scope][1]!r} already applies to the same sidecars (the "
                    "oldest applies); merge their egress hosts into one")
            else:
                chosen[scope] = key(obj)
                sidecars.append(sidecar)
        verdicts[key(obj)] = verdict
    return sidecars, verdicts


def unresolved_hosts(sidecar: Sidecar, services: Mapping[str, Service]) -> str:
    """Why some host pattern of an applied Sidecar matches no Service, or ""."""
    found = unmatched_hosts([sidecar], services)
    if not found:
        return ""
    prefix = f"sidecars[0] ({sidecar.key})."
    fields = "; ".join(f"spec.{item.removeprefix(prefix)}" for item in found)
    return (f"{fields}: matches no Service (yet); the sidecars reach it once it exists, so "
            "check the spelling (namespace/name)")
