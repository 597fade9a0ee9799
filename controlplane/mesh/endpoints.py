"""Endpoints and service ports: where a service's instances are, and how to call them."""

from __future__ import annotations

import re
from typing import Literal

from pydantic import Field, ValidationInfo, field_validator, model_validator

from controlplane.mesh.base import _Model
from controlplane.mesh.limits import Labels, LabelValue, Port, dns_label, hostname, ip_address
from controlplane.mesh.security import service_account_name

Protocol = Literal["http", "grpc", "tcp", "tls"]  # tls: external_name services only
AddressType = Literal["ip", "dns"]
_POD_NAME = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*")


class Endpoint(_Model):
    """One backend instance. ``ready`` endpoints take traffic; ``serving`` and
    ``terminating`` ones drain; the rest are left out (Kubernetes' EndpointSlice conditions).

    ``address`` is an IP address, unless ``address_type: dns`` says it is a DNS name:
    the service's clusters then resolve it themselves (STRICT_DNS) instead of getting
    endpoints by EDS, so a service's endpoints are all IPs or all DNS names.

    ``port`` for an endpoint of a single-port service; ``ports`` (service port name ->
    port) for one of a service with named ports: a name it lacks is a port it does not
    serve, as a pod need not serve every port of its Service."""

    address_type: AddressType = "ip"  # before address: its validator reads it
    address: str = Field(min_length=1, max_length=253)
    port: Port | None = None
    ports: dict[str, Port] | None = Field(default=None, min_length=1)
    zone: LabelValue | None = None
    pod: str | None = Field(default=None, min_length=1, max_length=253)
    labels: Labels = Field(default_factory=dict)
    ready: bool = True
    serving: bool | None = None
    terminating: bool = False
    service_account: str | None = Field(default=None, min_length=1, max_length=253)
    """The ServiceAccount its workload runs as (Kubernetes: the pod's annotation); set,
    the endpoint has a mesh sidecar, and callers use mTLS to it (``security.py``)."""
    proxyless: bool = False
    """A proxyless gRPC server (``grpc.server(xds=True)``, no sidecar; Kubernetes: a pod
    injected with ``mesh.controlplane.io/proxyless: grpc``): it serves mesh mTLS only
    under STRICT, and with ALPN ``h2``; its ``service_account`` is its identity."""

    @model_validator(mode="after")
    def _one_port_form(self) -> Endpoint:
        if self.port is not None and self.ports is not None:
            raise ValueError("give port (single-port service) or ports (named ports), not both")
        if self.port is None and self.ports is None:
            raise ValueError("needs port (or ports: {name: port} when the service has named ports)")
        return self

    @field_validator("address")
    @classmethod
    def _address(cls, value: str, info: ValidationInfo) -> str:
        kind = info.data.get("address_type")
        if kind is None:  # itself invalid, and reported: no second error for the address
            return value
        return hostname(value) if kind == "dns" else ip_address(value)

    @field_validator("pod")
    @classmethod
    def _pod(cls, value: str | None) -> str | None:
        if value is not None and not _POD_NAME.fullmatch(value):
            raise ValueError(f"pod {value[:80]!r} must be a Pod's name, a lower-case DNS "
                             "name such as 'reviews-7d4f9-x2x8k'")
        return value

    @field_validator("service_account")
    @classmethod
    def _service_account(cls, value: str | None) -> str | None:
        return None if value is None else service_account_name(value)

    @field_validator("proxyless", mode="before")
    @classmethod
    def _proxyless(cls, value: object) -> object:
        if not isinstance(value, bool):
            raise ValueError(f"{str(value)[:40]!r} is not a boolean; write true for a "
                             "proxyless gRPC server (grpc.server(xds=True)), else false")
        return value

    @property
    def is_serving(self) -> bool:
        return self.ready if self.serving is None else self.serving

    @property
    def is_dns(self) -> bool:
        return self.address_type == "dns"

    def port_for(self, service_port: ServicePort) -> int | None:
        """Where this endpoint serves ``service_port``, or None when it does not."""
        if not service_port.name:
            return self.port
        return (self.ports or {}).get(service_port.name)


class ServicePort(_Model):
    """One port of a service: what clients call, and how they speak on it. The port of
    a single-port service has the name ``""``."""

    name: str
    port: Port
    protocol: Protocol = "http"

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        return dns_label(value, "port name")
