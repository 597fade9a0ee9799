"""What a Gateway's status says, from what is known of it: the model's verdict,
attachment's (``mesh/gateway_attach.py``: listener conditions, route parents), its
deployment's problem and its Service's address. Pure: the controller gathers the facts."""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace

from controlplane.mesh.gateway_attach import gateway_attachments
from controlplane.mesh.model import Mesh
from controlplane.mesh.route_status import Condition, ParentStatus, RouteKey
from controlplane.sources.kubernetes.certificates import UNKNOWN, ClusterCertificates
from controlplane.sources.kubernetes.gateway_status import GatewayState, ListenerState
from controlplane.sources.kubernetes.gateways import GatewayVerdict
from controlplane.sources.kubernetes.kinds import GATEWAY_GROUP
from controlplane.sources.kubernetes.services import Key

# The attachment's message for a certificate the mesh does not have (gateway_listeners.py)
_NO_CERTIFICATE = re.compile(r"\((?P<namespace>[^/()]+)/(?P<name>[^()]+)\): no such certificate")
Attached = tuple[tuple[Condition, ...], tuple[ListenerState, ...]]  # conditions, listeners


@dataclass(frozen=True)
class Attachment:
    """What attachment (``mesh/gateway_attach.py``) says, as the status writers take it."""

    gateways: Mapping[Key, Attached]
    tls_routes: Mapping[Key, tuple[ParentStatus, ...]]  # their Gateway parents
    routes: Mapping[RouteKey, Sequence[ParentStatus]]  # HTTPRoutes' Gateway parents
    tcp_routes: Mapping[Key, tuple[ParentStatus, ...]] = field(default_factory=dict)


def attachment(mesh: Mesh) -> Attachment:
    found = gateway_attachments(mesh)
    gateways = {key_: (view.status.conditions, tuple(
        ListenerState(s.name, s.attached_routes,
                      tuple((GATEWAY_GROUP, kind) for kind in s.supported_kinds),
                      s.conditions) for s in view.status.listeners))
        for key_, view in found.gateways.items()}
    def of(wanted: str) -> dict[Key, tuple[ParentStatus, ...]]:
        return {(ns, name): parents for (kind, ns, name), parents in found.routes.items()
                if kind == wanted}

    return Attachment(
        gateways, of("TLSRoute"),
        {k: v for k, v in found.routes.items() if k[0] not in ("TLSRoute", "TCPRoute")},
        of("TCPRoute"))


def gateway_state(verdict: GatewayVerdict, attached: Attached | None,
                  addresses: tuple[tuple[str, str], ...], address_problem: str,
                  deploy_problem: str, certificates: ClusterCertificates | None,
                  ) -> GatewayState:
    """Accepted and Programmed: the model's verdict first, then attachment's (no valid
    listener), then the deployment's (``deploy_problem``) and its address."""
    if verdict.problem:
        reason = ("ListenersNotValid" if "listeners" in verdict.problem.split(":")[0]
                  else "InvalidParameters")
        return GatewayState(verdict.generation, (
            Condition("Accepted", False, reason, verdict.problem),
            Condition("Programmed", False, "Invalid", "not accepted: " + verdict.problem)))
    conditions, listeners = attached if attached is not None else ((), ())
    found = {c.type: c for c in conditions}
    accepted = found.get("Accepted") or Condition("Accepted", True, "Accepted",
                                                  "the Gateway is accepted")
    served = found.get("Programmed")
    if served is not None and not served.status:
        programmed = served  # no listener can be served: each says why
    elif deploy_problem:
        programmed = Condition("Programmed", False, "NoResources", deploy_problem)
    elif address_problem:
        programmed = Condition("Programmed", False, "AddressNotAssigned", address_problem)
    else:
        programmed = Condition("Programmed", True, "Programmed",
                               "its Envoy deployment is configured by the control plane")
    return GatewayState(verdict.generation, (accepted, programmed),
                        tuple(why_no_certificate(x, certificates) for x in listeners),
                        addresses)


def why_no_certificate(listener: ListenerState,
                       provider: ClusterCertificates | None) -> ListenerState:
    """A certificate the mesh lacks because its Secret cannot be read (missing, not
    TLS, or forbidden): the listener's message says why, from the provider."""
    conditions = list(listener.conditions)
    for index, condition in enumerate(conditions):
        found = _NO_CERTIFICATE.search(condition.message)
        if provider is None or condition.reason != "InvalidCertificateRef" or not found:
            continue
        problem = provider.problem((found["namespace"], found["name"]))
        if problem and problem != UNKNOWN:
            conditions[index] = Condition(
                condition.type, condition.status, condition.reason,
                f"{condition.message[:found.start()]}({found['namespace']}/"
                f"{found['name']}): Secret {problem}")
    return listener if tuple(conditions) == listener.conditions else replace(
        listener, conditions=tuple(conditions))
