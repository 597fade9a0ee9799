"""Which services a rejected response comes from: pure functions over resource names.

An Envoy NACK names a type and an error, not a mesh object. The services are found, in
this order, from:

1. the error text: Envoy names the cluster (``outbound|9080||reviews.default.svc...``),
   a domain or a service's FQDN it refused; ``listener(s) inbound`` or a refused
   inbound cluster is the proxy's own service;
2. else the resources of the rejected version that differ from the version the proxy
   last ACKed: a cluster or endpoint name (``outbound|PORT|SUBSET|NAME.NS.svc...``), a
   virtual host (``NAME.NS`` or ``NAME.NS:PORT``, also ``egress/...`` in VHDS), a
   listener's named filter chain; the ``inbound`` listener and route are the proxy's own
   service. Inside the one ``egress`` route table, the virtual hosts that differ.

Names are the translator's (controlplane/translator/names.py). Secrets, the egress
listener and the catch-all clusters belong to no service: such a rejection is shown
with no origin. A service is named ``namespace/name``.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Final

from google.protobuf.message import Message

from controlplane import resource
from controlplane.cache.snapshot import TypeSnapshot
from controlplane.proxy import ProxyIdentity
from controlplane.translator import names

MAX_SERVICES: Final = 32  # per rejection: past this many, the origin is not one object
_LABEL = r"[a-z0-9](?:[-a-z0-9]{0,61}[a-z0-9])?"
_DOMAIN = re.escape(names.CLUSTER_DOMAIN)
_FQDN = re.compile(rf"(?<![-a-z0-9.])({_LABEL})\.({_LABEL})\.svc\.{_DOMAIN}")
_CLUSTER = re.compile(rf"^(outbound|inbound)\|\d+\|[^|]*\|({_LABEL})\.({_LABEL})\.svc\.{_DOMAIN}$")
_VHOST = re.compile(rf"^({_LABEL})\.({_LABEL})(?::\d+)?$")
_INBOUND_IN_ERROR = re.compile(r"listener\(s\) inbound\b|\binbound\|\d+\|")


def service_key(name: str, namespace: str) -> str:
    return f"{namespace}/{name}"


def own_service(proxy: ProxyIdentity | None) -> str | None:
    return None if proxy is None or not proxy.service else service_key(proxy.service,
                                                                         proxy.namespace)


def of_name(name: str, type_url: str, proxy: ProxyIdentity | None = None) -> str | None:
    """The service a resource (or virtual host, or filter chain) name belongs to."""
    if name in (names.INBOUND_LISTENER, names.INBOUND_ROUTE) and type_url in (
            resource.LISTENER, resource.ROUTE):
        return own_service(proxy)
    found = _CLUSTER.match(name)
    if found is not None:
        if found.group(1) == "inbound":
            return own_service(proxy) or service_key(found.group(2), found.group(3))
        return service_key(found.group(2), found.group(3))
    if type_url in (resource.ROUTE, resource.VIRTUAL_HOST):
        vhost = _VHOST.match(name.removeprefix(f"{names.EGRESS_ROUTE}/"))
        if vhost is not None:
            return service_key(vhost.group(1), vhost.group(2))
    return None


def in_error(error: str, proxy: ProxyIdentity | None = None) -> list[str]:
    """The services an Envoy error text names, in the order named."""
    found: dict[str, None] = {}
    if _INBOUND_IN_ERROR.search(error):
        own = own_service(proxy)
        if own is not None:
            found[own] = None
    for match in _FQDN.finditer(error):
        found.setdefault(service_key(match.group(1), match.group(2)), None)
    return list(found)


def _parts(message: Message, type_url: str) -> dict[str, bytes]:
    """A route table's virtual hosts, a listener's named filter chains: name -> bytes."""
    if type_url == resource.ROUTE:
        hosts = getattr(message, "virtual_hosts", ())
        return {h.name: h.SerializeToString(deterministic=True) for h in hosts}
    if type_url == resource.LISTENER:
        chains = getattr(message, "filter_chains", ())
        return {c.name: c.SerializeToString(deterministic=True) for c in chains if c.name}
    return {}


def _inner(name: str, type_url: str, new: Message | None, old: Message | None,
           ) -> list[str]:
    """The names of the parts that differ inside one resource that changed."""
    mine = _parts(new, type_url) if new is not None else {}
    theirs = _parts(old, type_url) if old is not None else {}
    return sorted(n for n in mine.keys() | theirs.keys() if mine.get(n) != theirs.get(n))


def changed(type_url: str, nacked: TypeSnapshot | None, acked: TypeSnapshot | None,
            proxy: ProxyIdentity | None = None) -> list[str]:
    """The services of the resources that differ between the two versions."""
    if nacked is None:
        return []
    found: dict[str, None] = {}
    for name in sorted(nacked.changed_since(acked)):
        service = of_name(name, type_url, proxy)
        if service is None and type_url in (resource.ROUTE, resource.LISTENER):
            new = nacked.resources.get(name)
            old = acked.resources.get(name) if acked is not None else None
            for part in _inner(name, type_url, new.message if new else None,
                               old.message if old else None):
                service = of_name(part, type_url if type_url == resource.ROUTE
                                  else resource.CLUSTER, proxy)
                if service is not None:
                    found.setdefault(service, None)
            continue
        if service is not None:
            found.setdefault(service, None)
        if len(found) >= MAX_SERVICES:
            break
    return list(found)[:MAX_SERVICES]


def origins(type_url: str, error: str, nacked: TypeSnapshot | None,
            acked: TypeSnapshot | None, proxy: ProxyIdentity | None = None) -> list[str]:
    """The services a rejection comes from: those the error names, else those whose
    resources changed since the last ACK. At most ``MAX_SERVICES``."""
    named = in_error(error, proxy)
    if named:
        return named[:MAX_SERVICES]
    return changed(type_url, nacked, acked, proxy)


def shown(services: Iterable[str]) -> str:
    """For a log line: ``service default/reviews, service default/ratings``."""
    listed = [f"service {s}" for s in services]
    return ", ".join(listed) if listed else "unknown"
