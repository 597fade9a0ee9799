"""Security in the mesh model: mTLS modes and authorization rules (issue 11).

The mesh file's ``security`` block (mesh-wide, per namespace and per service) and the
identity the control plane's CA gives workloads. Istio's semantics, which users know: the
effective mTLS mode is the service's, else its namespace's, else the mesh's, else
``permissive``; the rules of all three levels apply to a service, deny rules first, and
once any allow rule applies a request must match one. Pure models, no protobuf.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Annotated, Final, Literal, NamedTuple

from pydantic import (
    AfterValidator,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from controlplane.mesh.base import _Model, problem
from controlplane.mesh.limits import HeaderValue, Port, dns_label, header_name
from controlplane.mesh.policy import PathMatch

if TYPE_CHECKING:
    from controlplane.mesh.endpoints import Endpoint
    from controlplane.mesh.model import Mesh
    from controlplane.mesh.service import Service

MtlsMode = Literal["strict", "permissive", "disable"]
Action = Literal["allow", "deny"]
DEFAULT_MODE: Final[MtlsMode] = "permissive"
MAX_RULES: Final = 100  # per level; each becomes an RBAC policy in the service's listener
MAX_ITEMS: Final = 64  # per list inside a rule
MAX_NAMESPACE_BLOCKS: Final = 10_000
SPIFFE: Final = "spiffe://"
_TRUST_DOMAIN: Final = re.compile(r"^[a-z0-9]([-a-z0-9._]*[a-z0-9])?$")
_SA_NAME: Final = re.compile(
    r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?(\.[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?)*$")
_METHOD: Final = re.compile(r"^[A-Z][A-Z0-9_-]{0,31}$")


def service_account_name(value: str) -> str:
    """A Kubernetes ServiceAccount name: a lower-case DNS subdomain."""
    if len(value) > 253 or not _SA_NAME.fullmatch(value):
        raise ValueError(
            f"service account {value[:80]!r} must be a ServiceAccount name: lower-case "
            "letters, digits, '-' and '.', such as 'reviews'"
        )
    return value


ServiceAccountName = Annotated[str, AfterValidator(service_account_name)]


def valid_trust_domain(value: str) -> str:
    if len(value) > 255 or not _TRUST_DOMAIN.fullmatch(value):
        raise ValueError(
            f"trust domain {value[:80]!r} must be lower-case letters, digits, '-', '.' "
            "and '_', such as 'cluster.local'"
        )
    return value


class MeshIdentity(_Model):
    """Set by the server when it runs a CA (never read from a mesh file): workloads are
    ``spiffe://<trust_domain>/ns/<namespace>/sa/<service account>``."""

    trust_domain: Annotated[str, AfterValidator(valid_trust_domain)] = "cluster.local"

    def spiffe(self, namespace: str, service_account: str) -> str:
        return f"{SPIFFE}{self.trust_domain}/ns/{namespace}/sa/{service_account}"


class Mtls(_Model):
    mode: MtlsMode = DEFAULT_MODE
    """strict: inbound accepts only mesh mTLS; permissive: mTLS and plaintext on the same
    port (for migration); disable: plaintext only, and callers do not use mTLS to it."""


class HeaderCondition(_Model):
    """A request header: ``exact`` value, ``prefix``, or ``present: true``."""

    name: str = Field(min_length=1, max_length=256)
    exact: HeaderValue | None = None
    prefix: HeaderValue | None = Field(default=None, min_length=1)
    present: Literal[True] | None = None

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        if value != value.lower() or value.startswith(":"):
            raise ValueError(f"header name {value[:40]!r} must be lower-case, not a "
                             "pseudo-header (use methods and paths for :method and :path)")
        return header_name(value)

    @model_validator(mode="after")
    def _one_form(self) -> HeaderCondition:
        given = [k for k in ("exact", "prefix", "present") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError("give exactly one of exact, prefix or present: true"
                             + (f" (found {', '.join(given)})" if given else ""))
        return self


def principal(value: str) -> str:
    """A SPIFFE ID, exactly, or ending in ``*`` (a prefix), or ``*`` alone (any mesh
    workload)."""
    if value == "*":
        return value
    if not value.startswith(SPIFFE) or "*" in value[:-1] or len(value) > 2048 or any(
            c in value for c in " \t\r\n\x00"):
        raise ValueError(
            f"principal {value[:80]!r} must be a SPIFFE ID such as "
            "'spiffe://cluster.local/ns/default/sa/reviews', optionally ending in '*' "
            "(a prefix), or '*' alone (any mesh workload)"
        )
    return value


def namespaced_account(value: str) -> str:
    """``namespace/name`` of a ServiceAccount."""
    namespace, slash, name = value.partition("/")
    if not slash:
        raise ValueError(f"{value[:80]!r} must be namespace/name, such as 'default/reviews'")
    dns_label(namespace, "namespace")
    service_account_name(name)
    return value


Principal = Annotated[str, AfterValidator(principal)]
NamespacedAccount = Annotated[str, AfterValidator(namespaced_account)]
Namespace = Annotated[str, AfterValidator(lambda v: dns_label(v, "namespace"))]


def method(value: str) -> str:
    if not _METHOD.fullmatch(value):
        raise ValueError(f"method {value[:40]!r} must be an upper-case HTTP method such as "
                         "GET or POST")
    return value


class Source(_Model):
    """Who calls. Fields inside one source are ANDed; omitted fields match anyone. A
    plaintext caller has no principal, so it matches no principal, service account or
    namespace condition."""

    principals: list[Principal] | None = Field(default=None, min_length=1,
                                               max_length=MAX_ITEMS)
    service_accounts: list[NamespacedAccount] | None = Field(default=None, min_length=1,
                                                             max_length=MAX_ITEMS)
    namespaces: list[Namespace] | None = Field(default=None, min_length=1,
                                               max_length=MAX_ITEMS)


class Operation(_Model):
    """What is called. Fields inside one operation are ANDed; omitted fields match any
    request. ``ports`` are the service's ports (or the ports its endpoints serve them on);
    ``methods``, ``paths`` and ``headers`` are HTTP-only."""

    methods: list[Annotated[str, AfterValidator(method)]] | None = Field(
        default=None, min_length=1, max_length=MAX_ITEMS)
    paths: list[PathMatch] | None = Field(default=None, min_length=1, max_length=MAX_ITEMS)
    ports: list[Port] | None = Field(default=None, min_length=1, max_length=MAX_ITEMS)
    headers: list[HeaderCondition] | None = Field(default=None, min_length=1,
                                                  max_length=MAX_ITEMS)

    @property
    def http_only(self) -> bool:
        """Whether it has a condition only an HTTP request can meet."""
        return any(x is not None for x in (self.methods, self.paths, self.headers))


class AuthorizationRule(_Model):
    """One rule: ``action`` when a request comes ``from`` one of the sources and goes
    ``to`` one of the operations (omitted: anyone, anything)."""

    model_config = ConfigDict(serialize_by_alias=True, validate_by_name=True,
                              validate_by_alias=True)

    name: str
    action: Action = "allow"
    from_: list[Source] | None = Field(default=None, alias="from", min_length=1,
                                       max_length=MAX_ITEMS)
    to: list[Operation] | None = Field(default=None, min_length=1, max_length=MAX_ITEMS)

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        return dns_label(value, "rule name")

    @property
    def needs_principal(self) -> bool:
        """Whether every source it names asks who the caller is (so only mTLS callers
        can match it)."""
        return bool(self.from_) and all(
            s.principals or s.service_accounts or s.namespaces for s in self.from_ or [])


class Security(_Model):
    """A service's (or a namespace's) security: its mTLS mode and authorization rules."""

    mtls: Mtls | None = None
    authorization: list[AuthorizationRule] = Field(default_factory=list,
                                                   max_length=MAX_RULES)

    @model_validator(mode="after")
    def _unique(self) -> Security:
        """Rule names are unique in a block: they name the rule in 403s and stats."""
        seen: dict[str, int] = {}
        problems = []
        for index, rule in enumerate(self.authorization):
            if rule.name in seen:
                problems.append(problem(
                    ("authorization", index, "name"), rule.name,
                    f"{rule.name!r} repeats authorization[{seen[rule.name]}]; rule names "
                    "are unique in a block (they name the rule in 403s and stats)"))
            seen.setdefault(rule.name, index)
        if problems:
            raise ValidationError.from_exception_data(type(self).__name__, problems)
        return self


class MeshSecurity(Security):
    """The mesh-wide block, with per-namespace blocks (``namespaces``)."""

    namespaces: dict[Namespace, Security] = Field(default_factory=dict,
                                                  max_length=MAX_NAMESPACE_BLOCKS)


class ScopedRule(NamedTuple):
    """A rule and the block it came from: ``mesh``, ``namespace/NS`` or the service's
    ``name.namespace``."""

    scope: str
    rule: AuthorizationRule

    @property
    def policy_name(self) -> str:
        """How Envoy's RBAC filter (its 403 details and logs) names the rule."""
        return f"{self.scope}:{self.rule.name}"


class Effective(NamedTuple):
    mode: MtlsMode
    rules: tuple[ScopedRule, ...]


def effective(mesh: Mesh, service: Service) -> Effective:
    """The mTLS mode and every authorization rule that apply to ``service``."""
    return effective_in(mesh.security, service)


def effective_in(security: MeshSecurity, service: Service) -> Effective:
    own = service.security
    namespace = security.namespaces.get(service.namespace)
    mode: MtlsMode = DEFAULT_MODE
    for block in (own, namespace, security):
        if block is not None and block.mtls is not None:
            mode = block.mtls.mode
            break
    rules = [
        *(ScopedRule("mesh", r) for r in security.authorization),
        *(ScopedRule(f"namespace/{service.namespace}", r)
          for r in (namespace.authorization if namespace else [])),
        *(ScopedRule(service.key, r) for r in (own.authorization if own else [])),
    ]
    return Effective(mode, tuple(rules))


def has_sidecar(service: Service, endpoint: Endpoint) -> bool:
    """Whether the endpoint's workload runs a mesh sidecar (it accepts mesh mTLS unless
    its service's mode is ``disable``): it names its service account, or its service
    lists the accounts its workloads run as. A proxyless gRPC server has none."""
    if endpoint.proxyless:
        return False
    return endpoint.service_account is not None or service.service_accounts is not None


def takes_mtls(service: Service, endpoint: Endpoint, mode: MtlsMode) -> bool:
    """Whether callers use mesh mTLS to the endpoint under ``mode``: a sidecar takes it
    unless ``disable``; a proxyless gRPC server only under ``strict`` (else it serves
    plaintext: gRPC cannot tell mesh mTLS from plaintext on one port)."""
    if endpoint.proxyless:
        return mode == "strict"
    return mode != "disable" and has_sidecar(service, endpoint)


def service_identities(service: Service) -> list[str]:
    """The service accounts the service's workloads run as, sorted, each once."""
    found = set(service.service_accounts or ())
    found.update(e.service_account for e in service.endpoints if e.service_account)
    return sorted(found)


def security_warnings(mesh: Mesh) -> list[str]:
    """What is valid but will not do what it seems to (``controlplane validate`` prints
    these): a rule naming callers without a mesh identity, a strict service whose
    callers cannot use mTLS to it."""
    found: list[str] = []
    named = [("security", None, mesh.security),
             *((f"security.namespaces.{ns}", None, block)
               for ns, block in sorted(mesh.security.namespaces.items())),
             *((f"services[{i}] ({s.key}).security", s, s.security)
               for i, s in enumerate(mesh.services) if s.security is not None)]
    if mesh.identity is None:
        for where, _, block in named:
            for at, rule in enumerate(block.authorization if block else []):
                if any(s.principals or s.service_accounts or s.namespaces
                       for s in rule.from_ or []):
                    found.append(
                        f"{where}.authorization[{at}] ({rule.name}): names callers, whom "
                        "only mesh mTLS identifies; unless the server runs a CA (serve "
                        "--ca-dir, or --source kubernetes) those conditions never match")
    for index, service in enumerate(mesh.services):
        if service.external_name is not None or not service.endpoints:
            continue
        if effective(mesh, service).mode == "strict" and not any(
                takes_mtls(service, e, "strict") for e in service.endpoints):
            found.append(
                f"services[{index}] ({service.key}): mtls mode strict, but no endpoint has "
                "a sidecar (give service_accounts, or each endpoint's service_account), so "
                "callers use plaintext and are refused")
        found.extend(_proxyless_port_warnings(index, service))
        if effective(mesh, service).mode == "strict" and not service_identities(service) and any(
                e.proxyless for e in service.endpoints):
            found.append(
                f"services[{index}] ({service.key}): a proxyless endpoint names no "
                "service_account, so callers check only that its certificate is the mesh's, "
                "not whose it is; give each endpoint's service_account (or the service's "
                "service_accounts)")
    return found


def _proxyless_port_warnings(index: int, service: Service) -> list[str]:
    """A proxyless gRPC server speaks only HTTP/2, which callers use on ``grpc`` ports;
    on an ``http`` port they use HTTP/1.1, and on a ``tcp`` one the server gets no gRPC."""
    if not any(e.proxyless for e in service.endpoints):
        return []
    return [f"services[{index}] ({service.key}): port {p.port} ({p.protocol}) is served by "
            "proxyless gRPC endpoints, which speak only gRPC over HTTP/2: callers speak "
            f"{'HTTP/1.1' if p.protocol == 'http' else 'TCP'} to them there; give the port "
            "protocol: grpc"
            for p in service.service_ports if p.protocol != "grpc"
            and any(e.proxyless and e.port_for(p) is not None for e in service.endpoints)]
