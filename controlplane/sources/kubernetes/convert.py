"""Kubernetes objects -> the mesh model. Pure functions over the API's JSON (camelCase
dicts), so they are tested without a cluster and nothing downstream knows the source.

- A Service becomes a mesh service; its ports become the mesh ports. A port's protocol
  comes from ``appProtocol``, else the port name's prefix (``http``, ``http2``, ``grpc``,
  ``h2c``, ``tcp``, ``tls``...), else http. UDP and SCTP ports are left out.
- Every EndpointSlice labelled with the Service's name is merged; endpoints are matched
  to Service ports by port name (what ``targetPort`` names resolve to), deduplicated by
  address, and keep their conditions (ready, serving, terminating) and zone.
- An ExternalName Service becomes an external DNS service.
- Label subsets (a policy's ``split`` or ``match`` by ``labels``) need the labels of the
  Pods behind the endpoints: each endpoint's ``targetRef`` names its Pod, and the Pod's
  metadata gives the labels. Only the label keys some subset selects are copied, and
  only for Services whose policy has subsets, so a Pod relabelled by a controller
  (``pod-template-hash``) changes nothing else.
- A TrafficPolicy's spec (minus ``targetRef``) is the service's policy; it is validated
  here, and a policy that fails is left out (the service still serves) and reported.
- A Sidecar becomes a ``sidecars`` entry (what the sidecars it selects may reach; see
  ``sidecars.py``); the Service annotation ``mesh.controlplane.io/export-to`` becomes the
  service's ``exportTo`` (where it is visible).
- A SecurityPolicy becomes a service's, a namespace's or the mesh's ``security`` block
  (``securitypolicies.py``); a Pod's ``mesh.controlplane.io/service-account`` annotation
  (written by injection) becomes its endpoints' ``service_account``: the identity
  callers verify, and the sign that it has a sidecar that speaks mesh mTLS; with the
  label ``mesh.controlplane.io/proxyless: grpc`` (also injection's) the endpoint is a
  proxyless gRPC server's instead (``proxyless``: mTLS only under STRICT).

One object's fault stays with that object: a Service that cannot be converted is left
out, an EndpointSlice that cannot be read is left out of its Service, a policy the model
refuses (alone, or with its Service, or against the rest of the mesh) is left out of its
Service with ``Accepted: False``. No object of any shape makes ``convert`` raise.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from pydantic import ValidationError

from controlplane.mesh.loader import describe_error
from controlplane.mesh.model import Mesh, OutboundTrafficPolicy, Policy, Service
from controlplane.mesh.scope import Sidecar
from controlplane.mesh.security import Security
from controlplane.sources.kubernetes.kinds import ROOT_NAMESPACE, SERVICE_NAME_LABEL
from controlplane.sources.kubernetes.policies import (
    Verdict,
    choose_policies,
    rejected,
    subset_keys,
    unresolved_subsets,
)
from controlplane.sources.kubernetes.programmed import origins
from controlplane.sources.kubernetes.routes import RouteConversion, overridden_by_routes
from controlplane.sources.kubernetes.securitypolicies import (
    SecurityPolicies,
    without_sidecars,
)
from controlplane.sources.kubernetes.services import (
    Key,
    Malformed,
    Obj,
    PodLabels,
    key,
    meta,
    protocol_of,
    service_data,
)
from controlplane.sources.kubernetes.sidecars import choose_sidecars, unresolved_hosts
from controlplane.sources.kubernetes.telemetry import Applied, choose_telemetry

__all__ = ["Conversion", "Converter", "Key", "Obj", "Verdict", "convert", "key",
           "protocol_of", "service_data"]


@dataclass
class Conversion:
    mesh: Mesh
    verdicts: dict[Key, Verdict] = field(default_factory=dict)  # per TrafficPolicy
    skipped: list[str] = field(default_factory=list)  # objects left out, and why
    sidecar_verdicts: dict[Key, Verdict] = field(default_factory=dict)  # per Sidecar
    security_verdicts: dict[Key, Verdict] = field(default_factory=dict)  # per SecurityPolicy
    telemetry_verdicts: dict[Key, Verdict] = field(default_factory=dict)  # per Telemetry
    # Per served Service ("namespace/name"): the policy objects that shaped it, as
    # (kind, namespace, name); where a proxy's NACK is reported (programmed.py).
    origins: dict[str, tuple[tuple[str, str, str], ...]] = field(default_factory=dict)


@dataclass(frozen=True)
class _Outcome:
    """One Service's conversion: the service (None: left out), the problems met, and
    why its policy was dropped ("" when it was applied or there was none)."""

    service: Service | None
    problems: tuple[str, ...] = ()
    policy_dropped: str = ""


# Per Service: the objects its conversion read (compared by identity), its Pods' service
# accounts and proxyless labels (by value), and the outcome.
_Memo = tuple[tuple[Obj, ...], tuple[tuple[Key, str | None, bool], ...], _Outcome]


def convert(services: Iterable[Obj], slices: Iterable[Obj], policies: Iterable[Obj],
            pods: Mapping[Key, Obj] | None = None, sidecars: Iterable[Obj] = (),
            security_policies: Iterable[Obj] = (), telemetries: Iterable[Obj] = (), *,
            outbound_traffic_policy: OutboundTrafficPolicy = "ALLOW_ANY",
            root_namespace: str = ROOT_NAMESPACE) -> Conversion:
    """One conversion, from nothing (``Converter`` remembers between batches). ``pods``:
    Pod metadata by (namespace, name), or None when Pods are not watched;
    ``outbound_traffic_policy``: the mesh's (a serve setting: a cluster has no object
    that says it); ``root_namespace``: the control plane's, where a SecurityPolicy
    without target is mesh-wide."""
    return Converter(outbound_traffic_policy, root_namespace).convert(
        services, slices, policies, pods, sidecars, security_policies, telemetries)


class Converter:
    """Converts again only the Services whose inputs changed since the last batch.

    The source's stores replace an object's dict only when it changed, so a Service whose
    own dict, slice dicts and policy dict are the very same objects as last time converts
    to the same mesh service. The memo holds those dicts, so their ids cannot be reused.
    """

    def __init__(self, outbound_traffic_policy: OutboundTrafficPolicy = "ALLOW_ANY",
                 root_namespace: str = ROOT_NAMESPACE) -> None:
        self._memo: dict[Key, _Memo] = {}
        self.outbound_traffic_policy: OutboundTrafficPolicy = outbound_traffic_policy
        self.security = SecurityPolicies(root_namespace)
        # Per Service: (the service as built, the security applied, the result), so an
        # unchanged service with unchanged security is the very same object next batch.
        self._secured: dict[Key, tuple[Service, Security, Service]] = {}
        self._observed = Applied()  # the same for Telemetry objects

    def convert(self, services: Iterable[Obj], slices: Iterable[Obj],
                policies: Iterable[Obj], pods: Mapping[Key, Obj] | None = None,
                sidecars: Iterable[Obj] = (),
                security_policies: Iterable[Obj] = (),
                telemetries: Iterable[Obj] = (),
                routes: RouteConversion | None = None) -> Conversion:
        """``routes``: the Gateway API's, converted (routes.py), into the mesh as they are."""
        by_service: dict[Key, list[Obj]] = {}
        for slice_ in slices:
            labels = meta(slice_).get("labels")
            owner = labels.get(SERVICE_NAME_LABEL) if isinstance(labels, Mapping) else None
            if owner and isinstance(owner, str):
                by_service.setdefault((key(slice_)[0], owner), []).append(slice_)
        service_objs = {key(s): s for s in services if isinstance(s, Mapping)}
        chosen, verdicts = choose_policies(policies, service_objs, pods is not None)
        result = Conversion(Mesh(), verdicts)
        built: list[Service] = []
        memo: dict[Key, _Memo] = {}
        for svc_key in sorted(service_objs):
            policy = chosen.get(svc_key)
            own_slices = by_service.get(svc_key, [])
            keys = subset_keys(policy[1]) if policy else frozenset()
            # Pods: their labels for subsets, their service accounts for identities.
            labels = PodLabels(pods or {}, keys) if keys or pods is not None else None
            # The Pods themselves only when subsets read their labels; else only their
            # service accounts (compared by value): a relabel converts nothing again.
            inputs = (service_objs[svc_key], *own_slices,
                      *((policy[0],) if policy else ()),
                      *(labels.pods(own_slices) if labels and keys else ()))
            accounts = labels.accounts(own_slices) if labels else ()
            known = self._memo.get(svc_key)
            if known is not None and known[1] == accounts and len(known[0]) == len(
                    inputs) and all(a is b for a, b in zip(known[0], inputs, strict=True)):
                outcome = known[2]
            else:
                outcome = _build(svc_key, service_objs[svc_key], own_slices,
                                 policy[1] if policy else None, labels)
            memo[svc_key] = (inputs, accounts, outcome)
            result.skipped.extend(outcome.problems)
            if policy is not None and outcome.policy_dropped:
                verdicts[key(policy[0])] = rejected(policy[0], "Invalid",
                                                    outcome.policy_dropped)
            if outcome.service is not None:
                built.append(outcome.service)
        self._memo = memo
        security = self.security.choose(security_policies, service_objs)
        result.security_verdicts = security.verdicts
        built = [self._with_security(s, security.services) for s in built]
        self._secured = {k: v for k, v in self._secured.items() if k in security.services}
        telemetry = choose_telemetry(telemetries, service_objs, self.security.root_namespace)
        result.telemetry_verdicts = telemetry.verdicts
        built = self._observed.apply(built, telemetry.services)
        scoped, result.sidecar_verdicts = choose_sidecars(sidecars)
        result.mesh = _mesh(built, result, {k: key(p[0]) for k, p in chosen.items()}, scoped)
        update: dict[str, Any] = {}
        if self.outbound_traffic_policy != result.mesh.outbound_traffic_policy:
            update["outbound_traffic_policy"] = self.outbound_traffic_policy
        if security.mesh != result.mesh.security:
            update["security"] = security.mesh
        if telemetry.mesh != result.mesh.telemetry:
            update["telemetry"] = telemetry.mesh
        if routes is not None:
            update.update(http_routes=routes.http_routes, grpc_routes=routes.grpc_routes,
                          reference_grants=routes.reference_grants)
        if update:
            result.mesh = result.mesh.model_copy(update=update)
        _resolve_sidecars(result)
        without_sidecars(result.mesh, security.applied_to, result.security_verdicts)
        for service in result.mesh.services:
            applied = chosen.get((service.namespace, service.name))
            policy_key = key(applied[0]) if applied is not None else None
            verdict = verdicts.get(policy_key) if policy_key is not None else None
            if policy_key is not None and verdict is not None and verdict.accepted:
                verdicts[policy_key] = dataclasses.replace(
                    verdict, unresolved=unresolved_subsets(service),
                    overridden=overridden_by_routes(result.mesh, service.key))
        result.origins = origins(result.mesh, {k: key(p[0]) for k, p in chosen.items()},
                                 verdicts, security.applied_to)
        return result


    def _with_security(self, service: Service, chosen: Mapping[Key, Security]) -> Service:
        """The service with the SecurityPolicy chosen for it, if any (validated alone, so
        it is set as it is)."""
        service_key = (service.namespace, service.name)
        security = chosen.get(service_key)
        if security is None:
            return service
        known = self._secured.get(service_key)
        if known is not None and known[0] is service and known[1] is security:
            return known[2]
        secured = service.model_copy(update={"security": security})
        self._secured[service_key] = (service, security, secured)
        return secured


def _build(svc_key: Key, service: Obj, slices: list[Obj], policy: dict[str, Any] | None,
           labels: PodLabels | None = None) -> _Outcome:
    """The mesh service, or why there is none; a policy the model refuses together with
    this Service is dropped (and said why), the Service served without it."""
    where = f"service {svc_key[0]}/{svc_key[1]}"
    problems: list[str] = []
    try:
        data = service_data(service, slices, labels, problems)
    except Malformed as exc:
        return _Outcome(None, (f"{where}: {exc}; fix the Service",))
    except Exception as exc:  # a shape nothing above foresaw: this Service only
        return _Outcome(None, (f"{where}: cannot be converted ({type(exc).__name__}: {exc}); "
                               "compare it with a Service the API server accepts",))
    if data is None:
        return _Outcome(None, (f"{where}: no TCP ports",))
    dropped = ""
    if policy is not None:
        governed = {**data, "policy": policy}
        try:
            return _Outcome(Service.model_validate(governed), tuple(problems))
        except ValidationError as exc:
            why = "; ".join(describe_error(e, governed) for e in exc.errors())
            dropped = f"with Service {svc_key[1]!r}: {why}"
    try:
        plain = Service.model_validate(data)
    except ValidationError as exc:
        why = "; ".join(describe_error(e, data) for e in exc.errors())
        return _Outcome(None, (*problems, f"{where}: {why}"))
    return _Outcome(plain, tuple(problems), dropped)


def _resolve_sidecars(result: Conversion) -> None:
    """An applied Sidecar whose host patterns match no Service says so (ResolvedRefs)."""
    services = result.mesh.by_key
    for sidecar in result.mesh.sidecars:
        sidecar_key = (sidecar.namespace, sidecar.name)
        verdict = result.sidecar_verdicts.get(sidecar_key)
        if verdict is not None and verdict.accepted:
            result.sidecar_verdicts[sidecar_key] = dataclasses.replace(
                verdict, unresolved=unresolved_hosts(sidecar, services))


def _mesh(built: list[Service], result: Conversion, policy_of: Mapping[Key, Key],
          sidecars: list[Sidecar]) -> Mesh:
    """A policy may split to a service that is not there (deleted, or not yet created):
    that policy is dropped (``Accepted: False``) and its service served without it; a
    service that fails on its own account is left out. Dropping one may strand another's
    target, hence the loop (bounded: each round changes at least one service)."""
    services = list(built)
    for _ in range(2 * len(built) + 1):
        try:
            return Mesh(services=services, sidecars=sidecars)
        except ValidationError as exc:
            names = {"services": [{"name": s.name, "namespace": s.namespace} for s in services]}
            by_index: dict[int, list[str]] = {}
            in_policy: set[int] = set()
            for error in exc.errors():
                loc = error["loc"]
                if len(loc) < 2 or loc[0] != "services" or not isinstance(loc[1], int) \
                        or not 0 <= loc[1] < len(services):
                    return _mesh_one_by_one(services, result, sidecars)
                by_index.setdefault(loc[1], []).append(describe_error(error, names))
                if len(loc) > 2 and loc[2] == "policy":
                    in_policy.add(loc[1])
            kept = []
            for index, service in enumerate(services):
                why = "; ".join(by_index.get(index, []))
                owner = policy_of.get((service.namespace, service.name))
                if not why:
                    kept.append(service)
                elif index in in_policy and owner is not None and owner in result.verdicts:
                    old = result.verdicts[owner]
                    result.verdicts[owner] = Verdict(False, "Invalid", why, old.generation,
                                                     old.uid)
                    kept.append(service.model_copy(update={"policy": Policy()}))
                else:
                    result.skipped.append(f"service {service.namespace}/{service.name}: {why}")
            services = kept
    return _mesh_one_by_one(services, result, sidecars)


def _mesh_one_by_one(services: list[Service], result: Conversion,
                     sidecars: list[Sidecar]) -> Mesh:
    """The mesh refused for a reason no single service carries: add services one at a
    time, leaving out each that the mesh refuses. Slow, and only ever a fallback."""
    kept: list[Service] = []
    for service in services:
        try:
            Mesh(services=[*kept, service], sidecars=sidecars)
        except ValidationError as exc:
            why = "; ".join(str(e["msg"]) for e in exc.errors())
            result.skipped.append(f"service {service.namespace}/{service.name}: {why}")
            continue
        kept.append(service)
    return Mesh(services=kept, sidecars=sidecars)
