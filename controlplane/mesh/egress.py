"""What a service's ``tcp`` and ``tls`` ports accept: the checks that keep a policy from
looking applied where a sidecar only moves bytes.

A ``tcp`` or ``tls`` port is proxied as a byte stream (``tls``: the app's own TLS, routed
by its server name, never terminated), so a policy field about requests has nothing to
act on there. An external service with no HTTP or gRPC port that sets one is refused,
naming the field and what does apply (Istio's connectionPool.tcp and outlierDetection). ``tls`` is
for ``external_name`` services: a mesh service's TLS port is ``tcp``, reached by its
cluster IP like any other.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING, Final

from pydantic_core import InitErrorDetails

from controlplane.mesh.base import problem

if TYPE_CHECKING:
    from controlplane.mesh.service import Service

OPAQUE: Final = ("tcp", "tls")  # ports the sidecar proxies as bytes
ROUTED: Final = ("http", "grpc")
# Policy fields about requests: nothing to act on in a byte stream.
REQUEST_FIELDS: Final = ("timeout", "retries", "split", "match", "fault", "rate_limit",
                         "fallback")
APPLIES: Final = ("connect_timeout, idle_timeout, circuit_breaker.max_connections and "
                  "max_pending_requests, outlier_detection, load_balancer.policy")


def opaque_problems(service: Service) -> list[InitErrorDetails]:
    """``tls`` on a service without ``external_name``, and request policy on an external
    service whose every port is ``tcp`` or ``tls``."""
    found: list[InitErrorDetails] = []
    if service.external_name is None:
        for index, port in enumerate(service.service_ports):
            if port.protocol == "tls":
                loc: tuple[str | int, ...] = (("ports", index, "protocol") if service.ports
                                              else ("protocol",))
                found.append(problem(loc, "tls", (
                    "tls is for an external_name service (the sidecar routes the app's own "
                    "TLS by its server name); a mesh service's TLS port is tcp, reached "
                    "by its cluster IP")))
    if service.external_name is None or any(port.protocol in ROUTED
                                            for port in service.service_ports):
        return found  # a mesh service's TCP ports: unchecked, as before (see the notes)
    policy = service.policy
    why = ("does not apply: every port of this service is tcp or tls, which the sidecar "
           "proxies as bytes, with no requests to act on; remove it (what applies to TCP: "
           f"{APPLIES}), or give the service an http or grpc port")
    for name in REQUEST_FIELDS:
        if getattr(policy, name) is not None:
            found.append(problem(("policy", name), getattr(policy, name), why))
    breaker = policy.circuit_breaker
    for name in ("max_requests", "max_retries"):
        if breaker is not None and getattr(breaker, name) is not None:
            found.append(problem(("policy", "circuit_breaker", name),
                                 getattr(breaker, name), why))
    hashing = policy.load_balancer.hash if policy.load_balancer else None
    for name in ("header", "cookie"):
        if hashing is not None and getattr(hashing, name) is not None:
            found.append(problem(("policy", "load_balancer", "hash", name),
                                 getattr(hashing, name), why))
    return found


def shared_port_warnings(services: Iterable[Service]) -> list[str]:
    """External ``tcp`` ports that several external hosts share (or a ``tcp`` and a
    ``tls`` one): valid, but sidecars route none of them there (translator/egress.py),
    so ``controlplane validate`` and the sources should say so."""
    hosts: dict[int, dict[str, tuple[str, str]]] = {}
    for service in sorted(services, key=lambda s: s.key):
        for port in service.service_ports if service.external_name else []:
            if port.protocol in OPAQUE:
                hosts.setdefault(port.port, {}).setdefault(
                    service.external_name or "", (service.key, port.protocol))
    found = []
    for number, by_host in sorted(hosts.items()):
        named = list(by_host.values())
        if len(named) > 1 and any(protocol == "tcp" for _, protocol in named):
            shown = ", ".join(f"{key} ({protocol})" for key, protocol in named)
            found.append(
                f"port {number} is a tcp port of several external hosts ({shown}): "
                "sidecars cannot tell them apart and route none of them on it (captured "
                "calls there go where the app's DNS sent them under ALLOW_ANY and are "
                "closed under REGISTRY_ONLY); give each its own port, or use protocol "
                "tls for those that speak TLS first")
    return found
