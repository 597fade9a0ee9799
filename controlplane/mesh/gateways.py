"""Ingress in the mesh model: Gateways, TLSRoutes and (file mode) certificates.

Each entry mirrors the Gateway API object it stands for (``gateway.networking.k8s.io``
v1 Gateway, v1alpha2 TLSRoute) with ``name``/``namespace`` beside the spec's own
camelCase fields, so a spec copies across; the bounds are the API's (64 listeners, 64
certificateRefs, 8 route kinds, 16 hostnames...). The model checks shape only: whether
a certificate exists or a route may attach is decided by ``gateway_attach.py`` and
reported as conditions, so one bad listener or route never fails the mesh.

A ``certificates`` entry is what a Secret of type ``kubernetes.io/tls`` is in a cluster:
a name a listener's certificateRefs point at. In file mode it names the PEM files, read
at the edge (``cache/certificates.py``); the model never holds a key.
"""

from __future__ import annotations

import hashlib
import re
from typing import Annotated, Final, Literal

from pydantic import AfterValidator, Field, model_validator

from controlplane.mesh.limits import Port
from controlplane.mesh.route_filters import GATEWAY_GROUP, Group, Kind, Namespace
from controlplane.mesh.route_match import _GatewayModel
from controlplane.mesh.routes import (
    MAX_ROUTES,
    BackendRef,
    Hostname,
    ParentRef,
    unique_objects,
)

__all__ = [
    "MAX_CERTIFICATES",
    "MAX_GATEWAYS",
    "MAX_TLS_ROUTES",
    "AllowedRoutes",
    "Certificate",
    "CertificateRef",
    "Certificates",
    "Gateway",
    "Gateways",
    "Listener",
    "ListenerTLS",
    "RouteGroupKind",
    "RouteNamespaces",
    "TLSRoute",
    "TLSRouteRule",
    "TLSRoutes",
]

MAX_GATEWAYS: Final = 1_000
MAX_TLS_ROUTES: Final = MAX_ROUTES
MAX_CERTIFICATES: Final = 10_000
MAX_PATH: Final = 4096

_NAME: Final = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")


def _object_name(value: str) -> str:
    if not _NAME.fullmatch(value):
        raise ValueError(f"{value[:80]!r} must be a lower-case DNS subdomain (letters, "
                         "digits, '-' and '.'), as a Kubernetes object name")
    return value


def _path(value: str) -> str:
    if "\x00" in value or "\n" in value:
        raise ValueError("a file path must not hold NUL or newline characters")
    return value


ObjectName = Annotated[str, Field(min_length=1, max_length=253), AfterValidator(_object_name)]
FilePath = Annotated[str, Field(min_length=1, max_length=MAX_PATH), AfterValidator(_path)]
_Spec = _GatewayModel  # camelCase names as the API writes them, snake_case accepted too


class CertificateRef(_Spec):
    """A listener's ``tls.certificateRefs[]`` entry: a Secret (``certificates`` entry)."""

    group: Group = ""
    kind: Kind = "Secret"
    name: ObjectName
    namespace: Namespace | None = None  # default: the Gateway's; another needs a grant


class ListenerTLS(_Spec):
    mode: Literal["Terminate", "Passthrough"] = "Terminate"
    certificate_refs: list[CertificateRef] = Field(default_factory=list, max_length=64)
    options: dict[Annotated[str, Field(max_length=253)],
                  Annotated[str, Field(max_length=4096)]] = Field(
        default_factory=dict, max_length=16)


class RouteNamespaces(_Spec):
    from_: Literal["All", "Same", "Selector"] = Field("Same", alias="from")
    selector: dict[str, object] | None = None  # Selector: not in file mode (no namespace labels)


class RouteGroupKind(_Spec):
    group: Group = GATEWAY_GROUP
    kind: Kind


class AllowedRoutes(_Spec):
    namespaces: RouteNamespaces = Field(default_factory=lambda: RouteNamespaces.model_validate({}))
    kinds: list[RouteGroupKind] = Field(default_factory=list, max_length=8)


class Listener(_Spec):
    """One Gateway listener: a port, a protocol, an optional hostname (SNI and Host)."""

    name: Annotated[str, Field(min_length=1, max_length=253), AfterValidator(_object_name)]
    hostname: Hostname | None = None
    port: Port
    protocol: Annotated[str, Field(min_length=1, max_length=255)]
    tls: ListenerTLS | None = None
    allowed_routes: AllowedRoutes = Field(default_factory=AllowedRoutes)


class GatewayAddress(_Spec):
    type: Annotated[str, Field(max_length=253)] = "IPAddress"
    value: Annotated[str, Field(min_length=1, max_length=253)]


class Gateway(_Spec):
    """A Gateway: the listeners an ingress proxy (``bootstrap --gateway NAME``) serves."""

    name: ObjectName
    namespace: Namespace = "default"
    gateway_class_name: ObjectName = "controlplane"
    listeners: list[Listener] = Field(min_length=1, max_length=64)
    addresses: list[GatewayAddress] = Field(default_factory=list, max_length=16)

    @property
    def key(self) -> str:
        return f"{self.name}.{self.namespace}"

    @property
    def service_account(self) -> str:
        """The ServiceAccount its proxies run as (``gateway_account``)."""
        return gateway_account(self.name, self.gateway_class_name)

    @model_validator(mode="after")
    def _distinct(self) -> Gateway:
        """Listener names are unique, as the API's validation has it (a listener is
        addressed by its name: sectionName)."""
        seen: set[str] = set()
        for index, listener in enumerate(self.listeners):
            if listener.name in seen:
                raise ValueError(f"listeners[{index}].name {listener.name!r} repeats an "
                                 "earlier listener's name; give each listener its own")
            seen.add(listener.name)
        return self


class TLSRouteRule(_Spec):
    name: ObjectName | None = None
    backend_refs: list[BackendRef] = Field(min_length=1, max_length=16)


class TLSRoute(_Spec):
    """TLS passthrough by SNI (``gateway.networking.k8s.io/v1alpha2`` TLSRoute)."""

    name: ObjectName
    namespace: Namespace = "default"
    parent_refs: list[ParentRef] = Field(default_factory=list, max_length=32)
    hostnames: list[Hostname] = Field(default_factory=list, max_length=16)
    rules: list[TLSRouteRule] = Field(min_length=1, max_length=16)

    @property
    def key(self) -> tuple[str, str, str]:
        return ("TLSRoute", self.namespace, self.name)


class Certificate(_Spec):
    """A TLS certificate a listener may name (a ``kubernetes.io/tls`` Secret). File mode:
    ``cert_file``/``key_file`` (PEM), read by the server when a gateway needs them; from
    Kubernetes the entry has no files (the Secret is read from the API)."""

    name: ObjectName
    namespace: Namespace = "default"
    cert_file: FilePath | None = Field(None, alias="cert_file")  # our own: snake_case
    key_file: FilePath | None = Field(None, alias="key_file")

    @model_validator(mode="after")
    def _both(self) -> Certificate:
        if (self.cert_file is None) != (self.key_file is None):
            raise ValueError("cert_file and key_file go together: give the PEM certificate "
                             "chain and its private key")
        return self


Gateways = Annotated[list[Gateway], Field(max_length=MAX_GATEWAYS),
                     AfterValidator(lambda v: unique_objects(v, "Gateway"))]
TLSRoutes = Annotated[list[TLSRoute], Field(max_length=MAX_TLS_ROUTES),
                      AfterValidator(lambda v: unique_objects(v, "TLSRoute"))]
Certificates = Annotated[list[Certificate], Field(max_length=MAX_CERTIFICATES),
                         AfterValidator(lambda v: unique_objects(v, "certificate"))]


def gateway_account(gateway: str, gateway_class: str) -> str:
    """``<gateway>-<class>``: the name of a Gateway's Deployment, Service and
    ServiceAccount in Kubernetes, and the identity its proxies must prove before they get
    its certificates (the lab's gateway runs as it too). Within a Service name's 63
    characters: a longer one is cut, with a hash of the whole so two stay apart."""
    name = f"{gateway}-{gateway_class}"
    if len(name) <= 63:
        return name
    digest = hashlib.sha256(name.encode()).hexdigest()[:8]
    return f"{name[:54].rstrip('-.')}-{digest}"


def gateway_identity(gateways: list[Gateway], namespace: str, name: str) -> str | None:
    """The ServiceAccount the proxies of Gateway ``namespace/name`` run as; None when the
    mesh has no such Gateway."""
    for gateway in gateways:
        if (gateway.namespace, gateway.name) == (namespace, name):
            return gateway.service_account
    return None
