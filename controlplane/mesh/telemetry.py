"""Telemetry in the mesh model: sidecar access logs and tracing (issue 12).

The mesh file's ``telemetry`` block, mesh-wide, per namespace (``namespaces``) and per
service, like ``security``: each field takes the most specific level that sets it (the
service's, else its namespace's, else the mesh's, else the default: access log on,
tracing off). Metrics need no block: every sidecar started with a stats port serves them
(the bootstrap's ``--stats-port``), labelled by source and destination service.
Pure models, no protobuf.
"""

from __future__ import annotations

import ipaddress
from typing import TYPE_CHECKING, Annotated, Final, NamedTuple

from pydantic import AfterValidator, Field, model_validator

from controlplane.mesh.base import _Model
from controlplane.mesh.limits import Percent, dns_label, hostname

if TYPE_CHECKING:
    from controlplane.mesh.model import Mesh
    from controlplane.mesh.service import Service

MAX_NAMESPACE_BLOCKS: Final = 10_000
MAX_ADDRESS: Final = 260  # a DNS name (253) and ":65535"
DEFAULT_SAMPLING: Final = 100.0


def collector_address(value: str) -> str:
    """``HOST:PORT`` of an OTLP/gRPC collector: a DNS name or an IP ([v6] bracketed)."""
    hint = ("must be HOST:PORT of an OpenTelemetry collector's OTLP/gRPC port, such as "
            "'otel-collector.observability:4317' or '10.0.0.9:4317'")
    if len(value) > MAX_ADDRESS:
        raise ValueError(f"address {value[:80]!r}... is longer than {MAX_ADDRESS} "
                         f"characters; it {hint}")
    host, sep, port = value.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
        valid_host = _is_ip(host, 6)
    else:
        valid_host = _is_ip(host, 4) or _is_hostname(host)
    if not sep or not valid_host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"address {value[:80]!r} {hint}")
    return value


def _is_ip(value: str, version: int) -> bool:
    try:
        return ipaddress.ip_address(value).version == version and "%" not in value
    except ValueError:
        return False


def _is_hostname(value: str) -> bool:
    try:
        hostname(value)
    except ValueError:
        return False
    return True


class AccessLog(_Model):
    enabled: bool = True
    """One JSON line per request (or TCP connection) on the sidecar's stdout."""


class Tracing(_Model):
    """Spans to an OpenTelemetry collector over OTLP/gRPC. ``enabled: false`` turns it
    off for a namespace or service when a wider level turned it on."""

    enabled: bool = True
    address: Annotated[str, AfterValidator(collector_address)] | None = None
    """``HOST:PORT`` of the collector's OTLP/gRPC port (4317 by convention)."""
    sampling: Percent = DEFAULT_SAMPLING
    """Percent (0-100, as Envoy and Istio count it) of requests that start a trace; a
    request that arrives with a sampled ``traceparent`` is traced whatever this says."""

    @model_validator(mode="after")
    def _address(self) -> Tracing:
        if self.enabled and self.address is None:
            raise ValueError("address: Field required (HOST:PORT of the OpenTelemetry "
                             "collector), or enabled: false to turn tracing off here")
        return self


class Telemetry(_Model):
    """A service's (or a namespace's) telemetry."""

    access_log: AccessLog | None = None
    tracing: Tracing | None = None


def _namespace(value: str) -> str:
    return dns_label(value, "namespace")


class MeshTelemetry(Telemetry):
    """The mesh-wide block, with per-namespace blocks (``namespaces``)."""

    namespaces: dict[Annotated[str, AfterValidator(_namespace)], Telemetry] = Field(
        default_factory=dict, max_length=MAX_NAMESPACE_BLOCKS)


class EffectiveTelemetry(NamedTuple):
    """What a sidecar of one service does; hashable (it keys shared listeners)."""

    access_log: bool = True
    tracing: Tracing | None = None
    """None: no spans are made (trace context is still passed through)."""


DEFAULT: Final = EffectiveTelemetry()


def effective(mesh: Mesh, service: Service | None,
              namespace: str | None = None) -> EffectiveTelemetry:
    """What applies to ``service`` (None: a sidecar the mesh does not know, in
    ``namespace``): each field from the most specific level that sets it."""
    return effective_in(mesh.telemetry, service.telemetry if service else None,
                        service.namespace if service else namespace)


def effective_in(telemetry: MeshTelemetry, own: Telemetry | None,
                 namespace: str | None) -> EffectiveTelemetry:
    levels = (own, telemetry.namespaces.get(namespace) if namespace else None, telemetry)
    access = next((b.access_log for b in levels if b is not None and b.access_log), None)
    tracing = next((b.tracing for b in levels if b is not None and b.tracing), None)
    return EffectiveTelemetry(
        access_log=access.enabled if access is not None else True,
        tracing=tracing if tracing is not None and tracing.enabled else None,
    )
