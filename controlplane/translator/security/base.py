"""What the security features see, and the hooks they implement (like ``policies/``).

A feature turns its part of a service's security into Envoy config through a few hooks,
each optional: the outbound cluster and endpoints of a service (what its callers do),
and the inbound listener of its sidecars (what it accepts). Everything here is a
function of the service and the mesh, never of the proxy's identity, so proxy groups
keep sharing resources.
"""

from __future__ import annotations

from dataclasses import dataclass

from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.endpoint.v3 import endpoint_components_pb2
from envoy.config.listener.v3 import listener_components_pb2, listener_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import (
    http_connection_manager_pb2 as hcm_pb2,
)

from controlplane.mesh.model import Endpoint, Service, ServicePort
from controlplane.mesh.security import MeshIdentity, MtlsMode, ScopedRule


@dataclass(frozen=True, slots=True)
class Upstream:
    """What the callers of a service need to call it with mTLS: the mesh identity and
    the service's mode (never ``disable``: then callers use plaintext, no Upstream)."""

    identity: MeshIdentity
    mode: MtlsMode


@dataclass(frozen=True, slots=True)
class Inbound:
    """What a service's sidecars enforce inbound: the mode (mTLS only with an
    ``identity``) and the authorization rules of every level, for the service ``key``."""

    identity: MeshIdentity | None
    mode: MtlsMode
    rules: tuple[ScopedRule, ...]
    key: str

    @property
    def mtls(self) -> bool:
        """Whether inbound accepts mesh mTLS at all."""
        return self.identity is not None and self.mode != "disable"


@dataclass(frozen=True, slots=True)
class Port:
    """The port an inbound chain serves: the service port and the target port (where
    the endpoint, or the sidecar's inbound listener, takes it)."""

    service_port: ServicePort
    target: int

    @property
    def http(self) -> bool:
        return self.service_port.protocol != "tcp"

    def named(self, ports: list[int]) -> bool:
        """Whether a rule's ``ports`` name this one (by service or target port)."""
        return self.service_port.port in ports or self.target in ports


class SecurityFeature:
    """A security feature. Hooks mutate the message they are given, or return more."""

    name = "security"

    def cluster(self, ctx: Upstream, service: Service, cluster: cluster_pb2.Cluster) -> None:
        """Adjust an outbound cluster of ``service`` (each port, each subset)."""

    def lb_endpoint(self, ctx: Upstream, service: Service, endpoint: Endpoint,
                    lb_endpoint: endpoint_components_pb2.LbEndpoint) -> None:
        """Adjust one endpoint of ``service`` as its callers get it."""

    def http_filters(self, ctx: Inbound, port: Port) -> list[hcm_pb2.HttpFilter]:
        """HTTP filters in front of the app on ``port``, first of all."""
        return []

    def manager(self, ctx: Inbound, port: Port, manager: hcm_pb2.HttpConnectionManager) -> None:
        """Adjust the inbound HTTP connection manager of ``port``."""

    def network_filters(self, ctx: Inbound,
                        port: Port) -> list[listener_components_pb2.Filter]:
        """Network filters in front of the TCP proxy of a TCP ``port``."""
        return []

    def chains(self, ctx: Inbound, chain: listener_components_pb2.FilterChain,
               refuse: listener_components_pb2.FilterChain | None
               ) -> list[listener_components_pb2.FilterChain]:
        """The chains that replace an inbound ``chain`` (``refuse``: a chain that closes
        the connection, for a listener whose default chain would otherwise take it)."""
        return [chain]

    def listener(self, ctx: Inbound, listener: listener_pb2.Listener) -> None:
        """Adjust the inbound listener itself (its listener filters)."""
