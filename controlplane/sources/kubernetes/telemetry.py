"""Telemetry objects -> the mesh's ``telemetry`` (mesh-wide, per namespace, per service),
and a verdict per object that becomes its status.

A Telemetry's spec is the mesh file's ``telemetry`` block in the API's camelCase
(``accessLog``, ``tracing``) plus an optional ``targetRef: {kind: Service, name: NAME}``:
with a target it is that Service's block, without one its namespace's, and without one
in the control plane's own namespace the whole mesh's. Validated with the model; its
``Accepted`` condition names every bad field. Two valid objects for one scope: the oldest
applies, the other is ``Conflicted``. A target Service that does not exist is no error
(it may come later) but said, in ``ResolvedRefs``. Telemetry is not a safeguard, so an
invalid edit applies nothing (unlike a SecurityPolicy, which keeps its last valid spec).
Also the CRD's spec schema (crd.py makes the CRD of it).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any, Final

from pydantic import ValidationError

from controlplane.mesh.loader import describe_error
from controlplane.mesh.service import Service
from controlplane.mesh.telemetry import (
    MAX_ADDRESS,
    MeshTelemetry,
    Telemetry,
)
from controlplane.sources.kubernetes.kinds import ROOT_NAMESPACE, TELEMETRY_KIND
from controlplane.sources.kubernetes.policies import Verdict, generation_of, uid_of
from controlplane.sources.kubernetes.services import Key, Obj, key, meta

MESH: Final = ("", "")  # the scope of a mesh-wide object
_FIELDS: Final = {"accessLog": "access_log", "tracing": "tracing"}  # API -> model
_DNS_LABEL: Final = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"


@dataclass
class TelemetryChoice:
    """The outcome of one batch: what applies where, and every object's verdict."""

    mesh: MeshTelemetry = field(default_factory=MeshTelemetry)
    services: dict[Key, Telemetry] = field(default_factory=dict)  # (namespace, service)
    verdicts: dict[Key, Verdict] = field(default_factory=dict)


def _verdict(obj: Obj, accepted: bool, reason: str, message: str) -> Verdict:
    return Verdict(accepted, reason, message, generation_of(obj), uid_of(obj),
                   kind=TELEMETRY_KIND)


def _where(scope: tuple[str, str]) -> str:
    if scope == MESH:
        return "every sidecar of the mesh"
    namespace, service = scope
    return f"the sidecars of Service {service!r}" if service else \
        f"every sidecar of namespace {namespace!r}"


def choose_telemetry(objs: Iterable[Obj], services: Mapping[Key, Obj],
           root_namespace: str = ROOT_NAMESPACE) -> TelemetryChoice:
    """Every Telemetry judged; per scope the oldest valid one applies. No object of any
    shape makes this raise."""
    result = TelemetryChoice()
    owners: dict[tuple[str, str], Key] = {}
    namespaces: dict[str, Telemetry] = {}
    ordered = sorted((o for o in objs if isinstance(o, Mapping)), key=lambda o: (
        str(meta(o).get("creationTimestamp") or ""), key(o)))
    for obj in ordered:
        try:
            verdict, found = _judge(obj, root_namespace)
        except Exception as exc:  # a shape nothing above foresaw: this object only
            verdict, found = _verdict(obj, False, "Invalid", (
                f"spec: cannot be read ({type(exc).__name__}: {exc}); compare it with "
                "deploy/kubernetes/examples/telemetry.yaml")), None
        if found is not None:
            scope, telemetry = found
            if scope in owners:
                verdict = _verdict(obj, False, "Conflicted", (
                    f"Telemetry {owners[scope][1]!r} already applies to {_where(scope)} "
                    "(the oldest applies); merge the two into one"))
            else:
                owners[scope] = key(obj)
                if scope == MESH:
                    result.mesh = MeshTelemetry(access_log=telemetry.access_log,
                                                tracing=telemetry.tracing)
                elif not scope[1]:
                    namespaces[scope[0]] = telemetry
                else:
                    result.services[scope] = telemetry
                    if scope not in services:
                        verdict = replace(verdict, unresolved=(
                            f"spec.targetRef: no Service {scope[1]!r} in namespace "
                            f"{scope[0]!r}; it applies once one exists, so check the "
                            "spelling"))
        result.verdicts[key(obj)] = verdict
    if namespaces:
        result.mesh = result.mesh.model_copy(update={"namespaces": dict(sorted(
            namespaces.items()))})
    return result


def _judge(obj: Obj, root_namespace: str
           ) -> tuple[Verdict, tuple[tuple[str, str], Telemetry] | None]:
    found = _read(obj, root_namespace)
    if isinstance(found, str):
        return _verdict(obj, False, "Invalid", f"{found}; nothing of this Telemetry "
                        "applies until it is fixed"), None
    return _verdict(obj, True, "Accepted", f"applies to {_where(found[0])}"), found


def _read(obj: Obj, root_namespace: str) -> tuple[tuple[str, str], Telemetry] | str:
    """(scope, telemetry), or what is wrong with the spec."""
    namespace, _ = key(obj)
    raw = obj.get("spec")
    if not isinstance(raw, Mapping):
        return "spec: must be an object with accessLog and/or tracing (and optionally " \
               "targetRef)"
    spec = dict(raw)
    target = spec.pop("targetRef", None)
    target_name = ""
    if target is not None:
        if not isinstance(target, Mapping) or not isinstance(target.get("name"), str) or \
                not target["name"] or target.get("kind", "Service") != "Service" or \
                target.get("group", "") != "" or set(target) - {"group", "kind", "name"}:
            return ("spec.targetRef: must be {kind: Service, name: <service>}, a Service "
                    "of this namespace (omit targetRef for the whole namespace)")
        target_name = str(target["name"])
    data = {_FIELDS.get(str(k), str(k)): v for k, v in spec.items()}
    try:
        telemetry = Telemetry.model_validate(data)
    except ValidationError as exc:
        problems = [describe_error(e, data, root="spec").replace(
            "spec.access_log", "spec.accessLog") for e in exc.errors()]
        return "; ".join(dict.fromkeys(problems))
    if target_name:
        scope: tuple[str, str] = (namespace, target_name)
    elif namespace == root_namespace:
        scope = MESH
    else:
        scope = (namespace, "")
    return scope, telemetry


def spec_schema() -> dict[str, Any]:
    """The CRD's ``spec``: what a schema can say of the model (the model checks the rest,
    and the status names the field)."""
    return {
        "description": (
            "Access logs and tracing of sidecars, the mesh file's telemetry block. With "
            "targetRef: the sidecars of that Service of this namespace; without: of every "
            "service of this namespace, or, in the control plane's namespace, of the whole "
            "mesh. Each field takes the most specific object that sets it."),
        "type": "object",
        "properties": {
            "targetRef": {
                "description": "The Service whose sidecars this applies to, in this "
                               "namespace. Omitted: every sidecar of the namespace (the "
                               "mesh, in the control plane's namespace).",
                "type": "object",
                "required": ["name"],
                "properties": {
                    "group": {"type": "string", "enum": [""]},
                    "kind": {"type": "string", "enum": ["Service"]},
                    "name": {"type": "string", "pattern": _DNS_LABEL, "minLength": 1,
                             "maxLength": 63},
                },
            },
            "accessLog": {
                "description": "One JSON line per request (or TCP connection) on the "
                               "sidecar's stdout. On unless a Telemetry turns it off.",
                "type": "object",
                "properties": {"enabled": {"type": "boolean"}},
            },
            "tracing": {
                "description": "Spans to an OpenTelemetry collector over OTLP/gRPC. Off "
                               "unless a Telemetry gives an address; enabled: false turns "
                               "it off for a narrower scope.",
                "type": "object",
                "properties": {
                    "enabled": {"type": "boolean"},
                    "address": {"description": "HOST:PORT of the collector's OTLP/gRPC "
                                               "port, such as otel-collector.observability"
                                               ":4317.",
                                "type": "string", "maxLength": MAX_ADDRESS},
                    "sampling": {"description": "Percent (0-100) of new requests traced; "
                                                "default 100.",
                                 "type": "number", "minimum": 0, "maximum": 100},
                },
            },
        },
    }


class Applied:
    """Services with the Telemetry chosen for each. An unchanged service with unchanged
    telemetry is the very same object next batch (the pipeline reuses what it built for
    a service while the object is the same)."""

    def __init__(self) -> None:
        self._made: dict[Key, tuple[Service, Telemetry, Service]] = {}

    def apply(self, services: list[Service], chosen: Mapping[Key, Telemetry]) -> list[Service]:
        made: dict[Key, tuple[Service, Telemetry, Service]] = {}
        result = []
        for service in services:
            service_key = (service.namespace, service.name)
            telemetry = chosen.get(service_key)
            if telemetry is not None:
                known = self._made.get(service_key)
                if known is None or known[0] is not service or known[1] != telemetry:
                    known = (service, telemetry,
                             service.model_copy(update={"telemetry": telemetry}))
                made[service_key] = known
                service = known[2]
            result.append(service)
        self._made = made
        return result
