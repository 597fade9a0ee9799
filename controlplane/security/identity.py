"""A workload's identity: ``spiffe://<trust-domain>/ns/<namespace>/sa/<serviceaccount>``.

The SPIFFE ID is what a workload certificate carries (its only SAN), what a sidecar checks
its peer against and what authorization rules name. Only this Kubernetes-shaped path is
accepted (Istio's): a parsed ID always formats back to the same string, and every part is a
name Kubernetes allows, so it can never smuggle a second path segment or a query.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Final

DEFAULT_TRUST_DOMAIN: Final = "cluster.local"
SCHEME: Final = "spiffe://"
MAX_URI_LENGTH: Final = 2048  # the SPIFFE ID standard's limit

# SPIFFE: a trust domain is lowercase letters, digits, '.', '-' and '_' (no port, no user);
# dot-separated like a DNS name, so no empty part.
_TRUST_DOMAIN = re.compile(r"(?=.{1,255}$)[a-z0-9_-]+(\.[a-z0-9_-]+)*")
# Kubernetes: a namespace is a DNS label; a ServiceAccount name a DNS subdomain.
_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?")
_SUBDOMAIN = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*")


def trust_domain_problem(value: str) -> str | None:
    """Why ``value`` is no trust domain, or None."""
    if not _TRUST_DOMAIN.fullmatch(value):
        return (f"trust domain {value!r} must be 1-255 lowercase letters, digits, '-' or "
                "'_' in dot-separated parts (e.g. cluster.local)")
    return None


def namespace_problem(value: str) -> str | None:
    if not _LABEL.fullmatch(value):
        return (f"namespace {value!r} must be a DNS label: at most 63 lowercase letters, "
                "digits or '-', starting and ending with a letter or digit")
    return None


def service_account_problem(value: str) -> str | None:
    if len(value) > 253 or not _SUBDOMAIN.fullmatch(value):
        return (f"service account {value!r} must be a DNS subdomain: at most 253 lowercase "
                "letters, digits, '-' or '.', each part starting and ending with a letter "
                "or digit")
    return None


@dataclass(frozen=True, slots=True)
class SpiffeId:
    """One workload identity. Made only valid: the constructor refuses bad parts."""

    trust_domain: str
    namespace: str
    service_account: str

    def __post_init__(self) -> None:
        problem = (trust_domain_problem(self.trust_domain)
                   or namespace_problem(self.namespace)
                   or service_account_problem(self.service_account))
        if problem is not None:
            raise ValueError(problem)

    @property
    def uri(self) -> str:
        return f"{SCHEME}{self.trust_domain}/ns/{self.namespace}/sa/{self.service_account}"

    def __str__(self) -> str:
        return self.uri

    @classmethod
    def parse(cls, uri: str) -> SpiffeId:
        """The identity ``uri`` names; ValueError saying what is wrong with it."""
        shown = uri if len(uri) <= 120 else uri[:117] + "..."
        if len(uri) > MAX_URI_LENGTH:
            raise ValueError(f"SPIFFE ID {shown!r} is longer than {MAX_URI_LENGTH} bytes")
        if not uri.startswith(SCHEME):
            raise ValueError(f"SPIFFE ID {shown!r} must start with {SCHEME!r} (e.g. "
                             f"spiffe://{DEFAULT_TRUST_DOMAIN}/ns/default/sa/default)")
        rest = uri[len(SCHEME):]
        if any(c in rest for c in "?#"):
            raise ValueError(f"SPIFFE ID {shown!r} must have no query or fragment")
        domain, slash, path = rest.partition("/")
        if not slash:
            raise ValueError(f"SPIFFE ID {shown!r} has no path: a workload's is "
                             "/ns/<namespace>/sa/<serviceaccount>")
        problem = trust_domain_problem(domain)
        if problem is not None:
            raise ValueError(f"SPIFFE ID {shown!r}: {problem}")
        parts = path.split("/")
        if len(parts) != 4 or parts[0] != "ns" or parts[2] != "sa":
            raise ValueError(f"SPIFFE ID {shown!r}: the path must be "
                             "/ns/<namespace>/sa/<serviceaccount>")
        try:
            return cls(domain, parts[1], parts[3])
        except ValueError as exc:
            raise ValueError(f"SPIFFE ID {shown!r}: {exc}") from None

    @classmethod
    def from_service_account(cls, trust_domain: str, qualified: str) -> SpiffeId:
        """From ``namespace/name`` (the mesh file's ``service_accounts`` form)."""
        namespace, slash, name = qualified.partition("/")
        if not slash:
            raise ValueError(f"service account {qualified!r} must be namespace/name")
        return cls(trust_domain, namespace, name)
