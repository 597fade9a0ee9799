"""TCPRoute in the mesh model (``gateway.networking.k8s.io/v1alpha2``, experimental).

A TCPRoute forwards every connection of the listener it attaches to (a ``TCP`` listener,
or a ``TLS`` listener terminating TLS) to its weighted backends: it has no matches, as a
TCP stream carries nothing to match on but its port. Fields and bounds are the API's
(16 rules, 16 backendRefs a rule, 32 parentRefs); what it attaches to is decided by
``gateway_attach.py``, so one bad route never fails the mesh.
"""

from __future__ import annotations

from typing import Annotated, Final

from pydantic import AfterValidator, Field

from controlplane.mesh.gateways import ObjectName
from controlplane.mesh.route_filters import Namespace
from controlplane.mesh.route_match import _GatewayModel
from controlplane.mesh.routes import MAX_ROUTES, BackendRef, ParentRef, unique_objects

__all__ = ["MAX_TCP_ROUTES", "TCPRoute", "TCPRouteRule", "TCPRoutes"]

MAX_TCP_ROUTES: Final = MAX_ROUTES


class TCPRouteRule(_GatewayModel):
    name: ObjectName | None = None
    backend_refs: list[BackendRef] = Field(min_length=1, max_length=16)


class TCPRoute(_GatewayModel):
    """Every connection of a listener to weighted backends (no hostnames: a TCP
    listener has no SNI to pick by; a TLS Terminate listener's hostname already did)."""

    name: ObjectName
    namespace: Namespace = "default"
    parent_refs: list[ParentRef] = Field(default_factory=list, max_length=32)
    rules: list[TCPRouteRule] = Field(min_length=1, max_length=16)

    @property
    def hostnames(self) -> list[str]:
        """None of its own: the route serves whatever its listener does."""
        return []

    @property
    def key(self) -> tuple[str, str, str]:
        return ("TCPRoute", self.namespace, self.name)


TCPRoutes = Annotated[list[TCPRoute], Field(max_length=MAX_TCP_ROUTES),
                      AfterValidator(lambda v: unique_objects(v, "TCPRoute"))]
