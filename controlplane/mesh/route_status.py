"""What attachment says about each route and parent: the Gateway API's conditions.

Pure data, shared by the file source (which logs what is not accepted), the Kubernetes
source (which writes ``status.parents[]``) and the gateways (which add their parents).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

from controlplane.mesh.routes import ParentRef, RouteKey

CONTROLLER: Final = "mesh.controlplane.io/gateway-controller"  # DESIGN.md section 5

# Condition types and the spec's reasons, as written on a route's status.
ACCEPTED: Final = "Accepted"
RESOLVED_REFS: Final = "ResolvedRefs"
NO_MATCHING_PARENT: Final = "NoMatchingParent"
NOT_ALLOWED_BY_LISTENERS: Final = "NotAllowedByListeners"
NO_MATCHING_LISTENER_HOSTNAME: Final = "NoMatchingListenerHostname"
UNSUPPORTED_VALUE: Final = "UnsupportedValue"
BACKEND_NOT_FOUND: Final = "BackendNotFound"
INVALID_KIND: Final = "InvalidKind"
REF_NOT_PERMITTED: Final = "RefNotPermitted"
UNSUPPORTED_PROTOCOL: Final = "UnsupportedProtocol"

__all__ = ["ACCEPTED", "BACKEND_NOT_FOUND", "CONTROLLER", "INVALID_KIND",
           "NOT_ALLOWED_BY_LISTENERS", "NO_MATCHING_LISTENER_HOSTNAME", "NO_MATCHING_PARENT",
           "REF_NOT_PERMITTED", "RESOLVED_REFS", "UNSUPPORTED_PROTOCOL", "UNSUPPORTED_VALUE",
           "Condition", "ParentRef", "ParentStatus", "RouteKey", "accepted", "resolved"]


@dataclass(frozen=True, slots=True)
class Condition:
    type: str  # "Accepted" | "ResolvedRefs" | (gateways) "Programmed" ...
    status: bool
    reason: str  # the Gateway API's reason names
    message: str


@dataclass(frozen=True, slots=True)
class ParentStatus:
    parent: ParentRef  # as written in the route
    conditions: tuple[Condition, ...]

    def condition(self, type_: str) -> Condition | None:
        return next((c for c in self.conditions if c.type == type_), None)

    @property
    def accepted(self) -> bool:
        found = self.condition(ACCEPTED)
        return found is not None and found.status


def accepted(reason: str = ACCEPTED, message: str = "") -> Condition:
    """``Accepted`` True with reason Accepted, or False with ``reason``."""
    ok = reason == ACCEPTED
    return Condition(ACCEPTED, ok, reason, message or ("the route is attached to this parent"
                                                       if ok else ""))


def resolved(reason: str = RESOLVED_REFS, message: str = "") -> Condition:
    """``ResolvedRefs`` True with reason ResolvedRefs, or False with ``reason``."""
    ok = reason == RESOLVED_REFS
    return Condition(RESOLVED_REFS, ok, reason, message or ("every backendRef resolves"
                                                            if ok else ""))
