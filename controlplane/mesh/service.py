"""A service: its ports, endpoints and policy."""

from __future__ import annotations

import ipaddress
from typing import Annotated, Final

from pydantic import (
    AfterValidator,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from controlplane.mesh.base import _Model, problem
from controlplane.mesh.egress import opaque_problems
from controlplane.mesh.endpoints import Endpoint, Protocol, ServicePort
from controlplane.mesh.limits import Port, dns_label, hostname, ip_address
from controlplane.mesh.policy import Policy
from controlplane.mesh.security import Security, ServiceAccountName
from controlplane.mesh.telemetry import Telemetry

MAX_ENDPOINTS = 100_000
MAX_EXPORTS = 1000
MAX_CLUSTER_IPS = 16  # Kubernetes gives at most 2 (dual stack); a mesh file a few VIPs
ANY: Final = "*"  # exportTo and host patterns: every namespace (or name)
OWN: Final = "."  # exportTo: the service's namespace; host patterns: the sidecar's


def export_to(value: list[str] | None) -> list[str] | None:
    """``exportTo`` as a whole: ``*`` alone, each namespace once."""
    if value is None:
        return None
    if not value:
        raise ValueError("give at least one namespace: '.' (its own), namespace names, or "
                         "'*' (every namespace, the default)")
    if ANY in value and len(value) > 1:
        raise ValueError("'*' exports to every namespace: give it alone, or list namespaces")
    seen: dict[str, int] = {}
    for index, namespace in enumerate(value):
        if namespace in seen:
            raise ValueError(f"{namespace!r} is listed twice (items {seen[namespace]} and "
                             f"{index}); list it once")
        seen[namespace] = index
    return value


def export_namespace(value: str) -> str:
    """One ``exportTo`` item: ``*``, ``.`` or a namespace name."""
    if value in (ANY, OWN):
        return value
    try:
        return dns_label(value, "namespace")
    except ValueError as exc:
        raise ValueError(f"{exc}; or '.' (the service's own namespace) or '*' (every "
                         "namespace)") from None


ExportNamespace = Annotated[str, AfterValidator(export_namespace)]


def cluster_ip(value: str) -> str:
    """A virtual IP a sidecar can catch: an IP address that is neither loopback (never
    captured: calls to it stay on the host), nor unspecified, nor multicast."""
    ip_address(value)
    parsed = ipaddress.ip_address(value)
    if parsed.is_loopback or parsed.is_unspecified or parsed.is_multicast:
        raise ValueError(
            f"cluster IP {value!r} is a loopback, unspecified or multicast address, which "
            "capture never sees; give the service's virtual IP, such as 10.96.0.10"
        )
    return str(parsed) if parsed.version == 6 else value


ClusterIP = Annotated[str, AfterValidator(cluster_ip)]


class Service(_Model):
    """A service, in one of two forms: ``port`` + ``protocol`` (one port), or ``ports``
    (named ports, as a Kubernetes Service with several). With ``external_name`` it is a
    DNS name outside the mesh: no endpoints, and its ports are also the external host's.

    The one-port fields are stored as ``single_port``/``single_protocol`` (aliases ``port``
    and ``protocol``, so input and dumps keep the mesh file's keys) because ``port`` and
    ``protocol`` are properties that work in both forms: the first port's."""

    model_config = ConfigDict(serialize_by_alias=True)

    name: str
    namespace: str = "default"
    single_port: Port | None = Field(default=None, alias="port")
    single_protocol: Protocol | None = Field(default=None, alias="protocol")
    ports: list[ServicePort] | None = Field(default=None, min_length=1, max_length=1000)
    external_name: str | None = None
    endpoints: list[Endpoint] = Field(default_factory=list, max_length=MAX_ENDPOINTS)
    policy: Policy = Field(default_factory=Policy)
    export_to: list[ExportNamespace] | None = Field(
        default=None, alias="exportTo", max_length=MAX_EXPORTS
    )
    """Where the service is visible (Istio's ``exportTo``): ``*`` every namespace (the
    default), ``.`` its own, or namespace names. Sidecars elsewhere do not get it."""
    cluster_ips: list[ClusterIP] | None = Field(default=None, min_length=1,
                                                max_length=MAX_CLUSTER_IPS)
    """The service's virtual IPs (Kubernetes ``spec.clusterIPs``): a captured sidecar
    sends a connection to one of them, on a service port, to this service. None: no
    virtual IP (headless: callers reach the endpoints' addresses directly)."""
    service_accounts: list[ServiceAccountName] | None = Field(default=None, min_length=1,
                                                              max_length=MAX_EXPORTS)
    """The ServiceAccounts its workloads run as (mesh file): every endpoint then has a
    sidecar that accepts mesh mTLS, and callers verify it is one of these."""
    security: Security | None = None
    """Its mTLS mode and authorization rules (over the namespace's and the mesh's)."""
    telemetry: Telemetry | None = None
    """Its access log and tracing (over the namespace's and the mesh's)."""

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        return dns_label(value, "service name")

    @field_validator("namespace")
    @classmethod
    def _namespace(cls, value: str) -> str:
        return dns_label(value, "namespace")

    @field_validator("export_to")
    @classmethod
    def _export_to(cls, value: list[str] | None) -> list[str] | None:
        return export_to(value)

    @field_validator("cluster_ips")
    @classmethod
    def _cluster_ips(cls, value: list[str] | None) -> list[str] | None:
        if value is not None:
            seen: dict[str, int] = {}
            for index, ip in enumerate(value):
                if ip in seen:
                    raise ValueError(f"{ip} is listed twice (items {seen[ip]} and {index}); "
                                     "list it once")
                seen[ip] = index
        return value

    @field_validator("external_name")
    @classmethod
    def _external_name(cls, value: str | None) -> str | None:
        if value is not None:
            try:
                hostname(value)
            except ValueError:
                raise ValueError(
                    f"external_name {value[:80]!r} must be a lower-case DNS name such as "
                    "'billing.example.com' (dot-separated DNS labels, no trailing dot)"
                ) from None
        return value

    @model_validator(mode="after")
    def _consistent(self) -> Service:
        if self.ports is None:
            if self.single_port is None:
                raise ValueError("port: Field required (or ports: a list of named ports)")
        else:
            if self.single_port is not None:
                raise ValueError("give port (with protocol) or ports, not both")
            if self.single_protocol is not None:
                raise ValueError("protocol: with ports, each port names its own protocol")
            _unique_ports(self.ports)
        if self.external_name is not None and self.cluster_ips is not None:
            raise ValueError(
                "cluster_ips: a service with external_name has none (Kubernetes gives an "
                "ExternalName Service no cluster IP); remove one of the two"
            )
        if self.external_name is not None and self.endpoints:
            raise ValueError(
                "endpoints: a service with external_name has none; its DNS name is the backend"
            )
        kinds = {endpoint.address_type for endpoint in self.endpoints}
        if len(kinds) > 1:
            raise ValueError(
                "endpoints: mixes IP addresses and DNS names (address_type: dns); a service's "
                "endpoints are all one or all the other, split it into two services"
            )
        for index, endpoint in enumerate(self.endpoints):
            self._check_endpoint(index, endpoint)
        opaque = opaque_problems(self)  # tcp/tls ports: what a policy can do there
        if opaque:
            raise ValidationError.from_exception_data(type(self).__name__, opaque)
        self._check_rule_ports()
        return self

    def _check_rule_ports(self) -> None:
        """A rule's ``to.ports`` name ports of this service (or where its endpoints serve
        them): any other number would silently never match."""
        if self.security is None:
            return
        known = {p.port for p in self.service_ports}
        known |= {t for p in self.service_ports for e in self.endpoints
                  if (t := e.port_for(p)) is not None}
        shown = ", ".join(map(str, sorted(known)))
        found = [problem(("security", "authorization", at, "to", to, "ports", index), port,
                         f"{port} is not a port of this service ({shown}), nor one its "
                         "endpoints serve it on; name one of those")
                 for at, rule in enumerate(self.security.authorization)
                 for to, operation in enumerate(rule.to or [])
                 for index, port in enumerate(operation.ports or []) if port not in known]
        if found:
            raise ValidationError.from_exception_data(type(self).__name__, found)

    def _check_endpoint(self, index: int, endpoint: Endpoint) -> None:
        where = f"endpoints[{index}] ({endpoint.address})"
        if self.ports is None:
            if endpoint.port is None:
                raise ValueError(f"{where}: needs port; this service has a single port")
            return
        names = [p.name for p in self.ports]
        if endpoint.ports is None:
            raise ValueError(
                f"{where}: needs ports: {{name: port}}; this service's ports are named "
                f"{', '.join(names)}"
            )
        unknown = sorted(set(endpoint.ports) - set(names))
        if unknown:
            raise ValueError(
                f"{where}.ports: {', '.join(map(repr, unknown))} is not a port of this "
                f"service ({', '.join(names)})"
            )

    @property
    def key(self) -> str:
        """``name.namespace``: how the mesh and the translator refer to a service."""
        return f"{self.name}.{self.namespace}"

    @property
    def headless(self) -> bool:
        """No virtual IP but endpoints with IP addresses: callers connect to those."""
        return (self.cluster_ips is None and self.external_name is None
                and not self.resolves_dns and bool(self.endpoints))

    @property
    def named_ports(self) -> bool:
        """True in the ``ports`` form: resources are then per named port, even for one."""
        return self.ports is not None

    @property
    def resolves_dns(self) -> bool:
        """Its endpoints are DNS names (address_type: dns): its clusters resolve them."""
        return any(endpoint.is_dns for endpoint in self.endpoints)

    @property
    def service_ports(self) -> list[ServicePort]:
        """Every port, in the order given; a single-port service's one port is named ``""``."""
        if self.ports is not None:
            return list(self.ports)
        assert self.single_port is not None  # the validator demands it
        return [
            ServicePort.model_construct(
                name="", port=self.single_port, protocol=self.single_protocol or "http"
            )
        ]

    @property
    def port(self) -> int:
        """The first (or only) port's number."""
        return self.service_ports[0].port

    @property
    def protocol(self) -> Protocol:
        """The first (or only) port's protocol."""
        return self.service_ports[0].protocol


def _unique_ports(ports: list[ServicePort]) -> None:
    names: dict[str, int] = {}
    numbers: dict[int, int] = {}
    for index, port in enumerate(ports):
        if port.name in names:
            raise ValueError(
                f"ports[{index}].name: {port.name!r} repeats ports[{names[port.name]}]; "
                "port names are unique within a service"
            )
        if port.port in numbers:
            raise ValueError(
                f"ports[{index}].port: {port.port} repeats ports[{numbers[port.port]}]; "
                "ports are unique within a service"
            )
        names[port.name] = index
        numbers[port.port] = index
