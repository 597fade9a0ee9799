"""Scoping: which services a sidecar may reach (``sidecars:`` entries, like Istio's
``Sidecar`` egress hosts) and where a service is visible (``exportTo`` on a service).

A sidecar that holds only the services it calls holds a fraction of a big mesh's
config. ``ScopeIndex`` answers "what does the sidecar of service S in namespace N
see?" for one mesh, in time proportional to the answer, and hands equal answers out as
the same frozenset so the assembly can share what it builds for them.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Annotated, Final

from pydantic import AfterValidator, ConfigDict, Field, field_validator
from pydantic_core import InitErrorDetails

from controlplane.mesh.base import _Model, problem
from controlplane.mesh.limits import dns_label
from controlplane.mesh.policy import MatchRoute, SplitTarget
from controlplane.mesh.service import ANY, OWN, Service

MAX_SIDECARS: Final = 100_000  # one per workload of a very big mesh
MAX_EGRESS: Final = 16
MAX_HOSTS: Final = 10_000


def host_pattern(value: str) -> str:
    """``namespace/name``: each side a DNS label or ``*``; the namespace may be ``.``
    (the sidecar's own namespace)."""
    namespace, slash, name = value.partition("/")
    ok = bool(slash) and len(value) <= 127 and _part(namespace, (ANY, OWN)) and _part(name, (ANY,))
    if not ok:
        raise ValueError(
            f"host {value[:80]!r} must be namespace/name, such as 'pay/payments', "
            "'pay/*' (every service of pay), '*/ratings' (ratings in every namespace), "
            "'./*' (the sidecar's own namespace) or '*/*'"
        )
    return value


def _part(value: str, special: tuple[str, ...]) -> bool:
    if value in special:
        return True
    try:
        dns_label(value, "")
    except ValueError:
        return False
    return True


HostPattern = Annotated[str, AfterValidator(host_pattern)]


class WorkloadSelector(_Model):
    """The sidecars an entry applies to: those of one service (``node.cluster``)."""

    service: str

    @field_validator("service")
    @classmethod
    def _service(cls, value: str) -> str:
        return dns_label(value, "service")


class Egress(_Model):
    """The services reachable through the egress listener, as ``namespace/name``."""

    hosts: list[HostPattern] = Field(max_length=MAX_HOSTS)

    @field_validator("hosts")
    @classmethod
    def _some(cls, hosts: list[str]) -> list[str]:
        if not hosts:
            raise ValueError("give at least one host, such as './*' (the sidecar's own "
                             "namespace) or 'pay/payments'")
        return hosts


class Sidecar(_Model):
    """What the sidecars of ``namespace`` (or, with ``workloadSelector``, of one service
    there) may reach. No entry for a sidecar: every service exported to its namespace."""

    name: str
    namespace: str = "default"
    workload_selector: WorkloadSelector | None = Field(default=None, alias="workloadSelector")
    egress: list[Egress] = Field(max_length=MAX_EGRESS)

    model_config = ConfigDict(serialize_by_alias=True)

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        return dns_label(value, "sidecar name")

    @field_validator("egress")
    @classmethod
    def _some(cls, egress: list[Egress]) -> list[Egress]:
        if not egress:
            raise ValueError("give at least one entry, such as {hosts: ['./*']}")
        return egress

    @field_validator("namespace")
    @classmethod
    def _namespace(cls, value: str) -> str:
        return dns_label(value, "namespace")

    @property
    def key(self) -> str:
        return f"{self.name}.{self.namespace}"

    @property
    def applies_to(self) -> tuple[str, str | None]:
        """(namespace, service or None for the whole namespace): at most one entry each."""
        selector = self.workload_selector
        return self.namespace, selector.service if selector else None

    def patterns(self) -> list[tuple[str, str]]:
        """Every host as (namespace or ``*``, name or ``*``), ``.`` resolved."""
        found = []
        for egress in self.egress:
            for host in egress.hosts:
                namespace, _, name = host.partition("/")
                found.append((self.namespace if namespace == OWN else namespace, name))
        return found


def sidecar_problems(sidecars: Iterable[tuple[int, Sidecar]]) -> list[InitErrorDetails]:
    """Two entries with one name in a namespace, or two that apply to the same sidecars
    (which would leave it to chance which one wins)."""
    names: dict[str, int] = {}
    scopes: dict[tuple[str, str | None], int] = {}
    problems: list[InitErrorDetails] = []
    for index, sidecar in sidecars:
        if sidecar.key in names:
            problems.append(problem(
                ("sidecars", index, "name"), sidecar.name,
                f"repeats sidecar {sidecar.name!r} in namespace {sidecar.namespace!r} "
                f"(first at sidecars[{names[sidecar.key]}]); merge the two entries"))
            continue
        names[sidecar.key] = index
        scope = sidecar.applies_to
        if scope in scopes:
            whom = (f"the sidecars of service {scope[1]!r}" if scope[1] is not None
                    else "every sidecar")
            field = "workloadSelector" if scope[1] is not None else "name"
            problems.append(problem(
                ("sidecars", index, field), sidecar.name,
                f"applies to {whom} in namespace {scope[0]!r}, as sidecars[{scopes[scope]}] "
                "does; merge their egress hosts into one entry"))
            continue
        scopes[scope] = index
    return problems


def exported_namespaces(service: Service) -> frozenset[str] | None:
    """The namespaces whose sidecars may see ``service``; None for every namespace."""
    if service.export_to is None or ANY in service.export_to:
        return None
    return frozenset(service.namespace if n == OWN else n for n in service.export_to)


class ScopeIndex:
    """One mesh's scoping rules, indexed so that ``visible`` costs about the size of
    its answer; answers are memoized per entry, so the sidecars an entry applies to
    share one frozenset."""

    def __init__(self, services: Mapping[str, Service], sidecars: list[Sidecar]) -> None:
        self._services = services
        self._entries = {sidecar.applies_to: sidecar for sidecar in sidecars}
        self._restricted = {
            key: namespaces for key, service in services.items()
            if (namespaces := exported_namespaces(service)) is not None
        }
        self._routing = {key: found for key, service in services.items()
                         if (found := targets(service))}
        self._by_namespace: dict[str, list[str]] = {}
        self._by_name: dict[str, list[str]] = {}
        for key, service in services.items():
            self._by_namespace.setdefault(service.namespace, []).append(key)
            self._by_name.setdefault(service.name, []).append(key)
        self._exported: dict[str, frozenset[str] | None] = {}
        self._scoped: dict[tuple[str, str | None], frozenset[str] | None] = {}
        self._with_own: dict[tuple[str, str], frozenset[str] | None] = {}

    def visible(self, service: str, namespace: str) -> frozenset[str] | None:
        """The keys of the services the sidecar of ``service`` in ``namespace`` may
        reach, or None when that is every service of the mesh."""
        entry = (namespace, service) if (namespace, service) in self._entries else (namespace, None)
        if entry not in self._scoped:
            self._scoped[entry] = self._compute(entry)
        seen = self._scoped[entry]
        own = f"{service}.{namespace}"
        if seen is None or own in seen or own not in self._services:
            return seen
        if (namespace, service) not in self._with_own:  # its own service, always
            self._with_own[namespace, service] = self._whole(self._closure({own}) | seen)
        return self._with_own[namespace, service]

    def exported(self, namespace: str) -> frozenset[str] | None:
        """What ``exportTo`` lets the sidecars of ``namespace`` see (None: everything)."""
        if namespace not in self._exported:
            hidden = [key for key, allowed in self._restricted.items() if namespace not in allowed]
            self._exported[namespace] = (
                frozenset(self._services.keys() - hidden) if hidden else None
            )
        return self._exported[namespace]

    def _compute(self, entry: tuple[str, str | None]) -> frozenset[str] | None:
        sidecar = self._entries.get(entry)
        exported = self.exported(entry[0])
        if sidecar is None:
            return None if exported is None else self._whole(self._closure(exported))
        found: set[str] = set()
        for namespace, name in sidecar.patterns():
            if namespace == ANY and name == ANY:
                found.update(self._services)
            elif namespace == ANY:
                found.update(self._by_name.get(name, ()))
            elif name == ANY:
                found.update(self._by_namespace.get(namespace, ()))
            elif f"{name}.{namespace}" in self._services:
                found.add(f"{name}.{namespace}")
        if exported is not None:
            found &= exported
        return self._whole(self._closure(found))

    def _closure(self, keys: set[str] | frozenset[str]) -> set[str]:
        """``keys`` and every service their routes lead to (split, match and fallback
        targets, and theirs): a route to a cluster the sidecar lacks would fail. A
        target comes along even when not exported to the caller: its owner routes there."""
        found = set(keys)
        todo = [key for key in keys if key in self._routing]
        while todo:
            for target in self._routing.get(todo.pop(), ()):
                if target not in found and target in self._services:
                    found.add(target)
                    todo.append(target)
        return found

    def _whole(self, keys: set[str]) -> frozenset[str] | None:
        return None if len(keys) == len(self._services) else frozenset(keys)


def targets(service: Service) -> list[str]:
    """The keys of the services ``service``'s policy sends requests to."""
    policy = service.policy
    legs: list[SplitTarget | MatchRoute] = [*(policy.split or []), *(policy.match or [])]
    found = [
        f"{leg.service}.{leg.namespace or service.namespace}"
        for leg in legs
        if leg.service is not None
    ]
    fallback = policy.fallback.target(service.namespace) if policy.fallback else None
    if fallback is not None:
        found.append(f"{fallback[0]}.{fallback[1]}")
    return found


def unmatched_hosts(sidecars: list[Sidecar], services: Mapping[str, Service]) -> list[str]:
    """The host patterns that match no service (``sidecars[0] (frontend.shop).egress[0]
    .hosts[1] (pay/paymnts)``): valid, since services come and go, but a typo here cuts
    the sidecar off from what it meant to call, so sources warn."""
    namespaces = {service.namespace for service in services.values()}
    names = {service.name for service in services.values()}
    found = []
    for index, sidecar in enumerate(sidecars):
        for at, egress in enumerate(sidecar.egress):
            for number, host in enumerate(egress.hosts):
                namespace, _, name = host.partition("/")
                namespace = sidecar.namespace if namespace == OWN else namespace
                if namespace == ANY and name == ANY:
                    hit = bool(services)
                elif namespace == ANY:
                    hit = name in names
                elif name == ANY:
                    hit = namespace in namespaces
                else:
                    hit = f"{name}.{namespace}" in services
                if not hit:
                    found.append(f"sidecars[{index}] ({sidecar.key}).egress[{at}]"
                                 f".hosts[{number}] ({host})")
    return found
