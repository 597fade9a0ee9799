"""MeshBuild: one mesh encoded once, as shared layers, assembled per proxy group.

A group's snapshot is a few shared layers plus its own resources:
- clusters of every service it sees, one layer per visible set;
- their load assignments, one layer per (visible set, zone);
- the egress route table, one per (namespace, visible set);
- a captured sidecar's egress listener, one per (visible set, egress port) (``capture``);
- its own listeners and inbound cluster (per group, kept while its service is unchanged).
The visible set comes from the scoping rules (``visible_services``), once per (service,
namespace, on_demand) and mesh; groups with equal sets share every layer.

A new mesh re-encodes only the services that changed, and each layer of the previous
build that holds one of them is derived from the old layer by replacing just those
(layers are made lazily, when a group asks, so layers nobody uses any more are left
behind). A group none of whose layers and own resources changed gets its previous
snapshot back as it is: per group, a change that is not its own costs a few lookups.

A service whose translation fails (a translator bug, a value nothing caught) is left
out of the build, or kept at its last good version when the previous build had one; it
is listed in ``rejected`` with the error. The rest of the mesh is built as usual.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from operator import attrgetter
from typing import Any, TypeAlias

from google.protobuf.message import Message

from controlplane import resource
from controlplane.assembly.capture import CaptureLayers
from controlplane.assembly.egress import EgressLayers, key_of
from controlplane.assembly.reuse import one_resource_layer
from controlplane.assembly.services import EncodedService, encode_services
from controlplane.assembly.visible import Visible, VisibleSets
from controlplane.cache.layers import Layer
from controlplane.cache.snapshot import (
    STANDARD,
    Resource,
    Snapshot,
    TypeSnapshot,
    encode_resource,
)
from controlplane.mesh.model import Mesh, Service
from controlplane.proxy import DEFAULT_NAMESPACE, SIDECAR, ProxyIdentity
from controlplane.translator import egress_route, proxy_resources, resource_name
from controlplane.translator.telemetry import Observed, observed

Make: TypeAlias = Callable[[Mesh, str], tuple[list[tuple[str, Message]], Mapping[str, str]]]
_FOREIGN = "\0foreign"  # the route table key of namespaces that have no services
_PROBE = ProxyIdentity(node_id="(probe)", service="(probe)")


class MeshBuild:
    """Immutable in what it serves; layers are filled in as groups ask for them."""

    mesh: Mesh  # what is served: rejected services at their last good version, or left out

    def __init__(self, mesh: Mesh, previous: MeshBuild | None = None,
                 replace: Mapping[str, str] | None = None) -> None:
        """``replace``: services (by key) already known to break the route tables, with
        the error; they are treated like services whose translation failed."""
        before = previous._services if previous is not None else {}
        self.rejected: dict[str, str] = dict(replace or {})
        encoded = encode_services(mesh, before, self.rejected)
        self._services: dict[str, EncodedService] = encoded.services
        self.encoded_bytes = encoded.encoded_bytes
        served, rerouted = encoded.served, encoded.rerouted
        # What is served: the mesh with each rejected service at its last good version.
        self.mesh = mesh if not self.rejected else mesh.model_copy(update={"services": served})
        self._frame = _frame(self.mesh)
        same_frame = previous is not None and previous._frame == self._frame
        # Services whose resources differ from the previous build's (added and removed too).
        self.changed = frozenset(k for k in {*before, *self._services}
                                 if before.get(k) is not self._services.get(k))
        # Those whose route-table part did; None: anything may have (the frame changed).
        self.rerouted: frozenset[str] | None = frozenset(rerouted) if same_frame else None
        # Those whose captured listener chains did (ports, cluster IPs, headless addresses).
        self.relistened = frozenset(encoded.relistened) if same_frame else None
        self._namespaces = frozenset(s.namespace for s in self.mesh.services)
        carry = previous is not None and same_frame and not rerouted
        self._visible: VisibleSets = VisibleSets(
            self.mesh, previous._visible if previous is not None and carry else None)
        self._clusters: dict[Visible, Layer] = {}
        self._endpoints: dict[tuple[Visible, str], Layer] = {}
        self._routes: dict[tuple[str, Visible], Layer] = {}
        self._shared: dict[tuple[str, str, Visible, Make], tuple[Layer, Mapping[str, str]]] = {}
        self._own: dict[str, tuple[EncodedService | None, dict[str, Layer]]] = {}
        self._capture: CaptureLayers = CaptureLayers(
            previous._capture if previous is not None else None)
        self._egress: EgressLayers = EgressLayers(
            previous._egress if previous is not None else None)
        self._typed: dict[tuple[str, ...], TypeSnapshot] = {}
        # The previous build's layers, to derive ours from, until ``settle``.
        self._before = before
        self._old: MeshBuild | None = previous
        self._same_frame = same_frame

    # -- what a group sees ---------------------------------------------------------------

    def observed(self, proxy: ProxyIdentity) -> Observed:
        """What ``proxy``'s sidecars record (access log, tracing): mesh/telemetry.py."""
        return observed(self.mesh, self.mesh.service(proxy.service, proxy.namespace), proxy)

    def visible(self, proxy: ProxyIdentity) -> Visible:
        """The services ``proxy`` sees (None: all), once per (service, namespace,
        on_demand); equal sets are the same object, so their layers are shared."""
        return self._visible.of(proxy)

    def sees_all(self, proxy: ProxyIdentity) -> bool:
        """Whether ``proxy`` sees every service (False when its scope cannot be read)."""
        try:
            return self.visible(proxy) is None
        except Exception:
            return False

    def last_good(self, key: str) -> Service | None:
        """The service ``key`` as this build serves it (None when it is not served)."""
        found = self._services.get(key)
        return found.service if found is not None else None

    # -- shared layers -------------------------------------------------------------------

    def cluster_layer(self, visible: Visible) -> Layer:
        """Every visible service's clusters."""
        found = self._clusters.get(visible)
        if found is None:
            old = self._old._clusters.get(visible) if self._old is not None else None
            found = self._derive(resource.CLUSTER, old, visible, _clusters, _clusters)
            self._clusters[visible] = found
        return found

    def endpoint_layer(self, visible: Visible, zone: str = "") -> Layer:
        """Every visible service's load assignments, as a proxy in ``zone`` gets them."""
        key = (visible, zone)
        found = self._endpoints.get(key)
        if found is None:
            old = self._old._endpoints.get(key) if self._old is not None else None
            found = self._derive(resource.ENDPOINT, old, visible,
                                 lambda e: self._variant(e, zone), _assignments)
            self._endpoints[key] = found
        return found

    def route_layer(self, namespace: str, visible: Visible = None) -> Layer:
        """The egress route table of ``namespace`` over the visible services, encoded
        once for all its groups. A namespace without services of its own gets no bare
        names, so all such share one table: proxies choose their namespace."""
        key = (self._namespace_key(namespace), visible)
        found = self._routes.get(key)
        if found is None:
            old = self._old._routes.get(key) if self._old is not None else None
            if old is not None and not self._rerouted(visible):
                found = old
            else:
                found = one_resource_layer(
                    resource.ROUTE, egress_route(self.mesh, namespace, visible), old)
            self._routes[key] = found
        return found

    def route(self, namespace: str, visible: Visible = None) -> Resource:
        """The egress RouteConfiguration itself."""
        [config] = self.route_layer(namespace, visible).resources.values()
        return config

    def shared_layer(self, type_url: str, namespace: str, visible: Visible,
                     make: Make) -> tuple[Layer, Mapping[str, str]]:
        """An extra layer per (namespace, visible set), such as on-demand VirtualHosts:
        ``make(mesh of the visible services, namespace)`` gives (name, message) pairs
        and aliases; encoded once, carried over while no visible service's routing
        changes (``make`` is part of the key: pass a module-level function)."""
        key = (type_url, self._namespace_key(namespace), visible, make)
        found = self._shared.get(key)
        if found is None:
            old = self._old._shared.get(key) if self._old is not None else None
            if old is not None and not self._rerouted(visible):
                found = old
            else:
                pairs, aliases = make(self._mesh_of(visible), namespace)
                prior = old[0].resources if old is not None else {}
                layer = Layer.of(type_url, (encode_resource(type_url, n, m, prior.get(n))
                                            for n, m in pairs))
                if old is not None and old[0].version == layer.version:
                    layer = old[0]
                found = (layer, aliases)
            self._shared[key] = found
        return found

    def own_layers(self, proxy: ProxyIdentity) -> dict[str, Layer]:
        """The group's own resources by type (its listeners, its inbound cluster)."""
        return self._own_layers(proxy)[0]

    def _own_layers(self, proxy: ProxyIdentity) -> tuple[dict[str, Layer], int]:
        """They depend on the proxy and its own service only: kept while that service
        is unchanged. Also the bytes serialized to make them."""
        group = proxy.group
        service = self._services.get(f"{proxy.service}.{proxy.namespace}")
        found = self._own.get(group)
        if found is not None and found[0] is service:
            return found[1], 0
        old = self._old._own.get(group) if self._old is not None else None
        if old is not None and old[0] is service and self._same_frame:
            self._own[group] = old
            return old[1], 0
        layers: dict[str, Layer] = {}
        encoded = 0
        for type_url, messages in proxy_resources(self.mesh, proxy).items():
            prior = old[1].get(type_url) if old is not None else None
            made = []
            for message in messages:
                name = resource_name(message)
                made.append(encode_resource(type_url, name, message,
                                            prior.resources.get(name) if prior else None))
            encoded += sum(r.size for r in made)
            layer = Layer.of(type_url, made)
            layers[type_url] = prior if prior is not None and prior.version == layer.version \
                else layer
        self._own[group] = (service, layers)
        return layers, encoded

    # -- snapshots -----------------------------------------------------------------------

    def snapshot(self, proxy: ProxyIdentity, reuse: Snapshot | None = None) -> Snapshot:
        """The group's snapshot; ``reuse`` itself when nothing of the group changed."""
        if proxy.kind != SIDECAR:
            from controlplane.assembly.kinds import builder_for  # its builders import this
            builder = builder_for(proxy.kind)
            if builder is not None:
                return builder(self, proxy, reuse)
        if proxy.on_demand:
            from controlplane.assembly.ondemand import ondemand_snapshot  # imports this one
            return ondemand_snapshot(self, proxy, reuse)
        return self.assemble(proxy, self.visible(proxy), reuse)

    def probe(self) -> Snapshot:
        """Everything, for a neutral proxy: what the pipeline checks a mesh with."""
        return self.assemble(_PROBE, None, None)

    def assemble(self, proxy: ProxyIdentity, visible: Visible,
                 reuse: Snapshot | None) -> Snapshot:
        own, encoded = self._own_layers(proxy)
        shared: dict[str, tuple[Layer, ...]] = {
            resource.CLUSTER: (self.cluster_layer(visible),),
            resource.ENDPOINT: (self.endpoint_layer(visible, proxy.zone),),
            resource.ROUTE: (self.route_layer(proxy.namespace, visible),),
        }
        if proxy.capture:
            shared[resource.LISTENER] = (self._capture.layer(self, visible, proxy.egress_port,
                                                             self.observed(proxy)),)
        elif (egress := self._egress.layer(self, visible, proxy, self.observed(proxy))):
            shared[resource.LISTENER] = (egress,)  # external TCP/TLS ports on loopback
        old = reuse.types if reuse is not None else {}
        types: dict[str, TypeSnapshot] = {}
        for type_url in STANDARD:
            layers, mine = shared.get(type_url, ()), own.get(type_url)
            if mine is None:
                types[type_url] = self.typed(type_url, layers, old.get(type_url))
            else:
                types[type_url] = TypeSnapshot.layered(type_url, layers, mine,
                                                       reuse=old.get(type_url))
        return Snapshot.of(types, encoded, reuse)

    def typed(self, type_url: str, layers: tuple[Layer, ...],
              reuse: TypeSnapshot | None = None) -> TypeSnapshot:
        """A TypeSnapshot of shared layers only, one object for every group that has
        them: their diffs are computed once for all those groups' streams."""
        key = (type_url, *(layer.version for layer in layers))
        found = self._typed.get(key)
        if (reuse is not None and found is not reuse
                and (found is None or found.version == reuse.version)
                and reuse.made_of(type_url, layers)):
            found = self._typed[key] = reuse  # the object groups have now: no change
        if found is None:
            found = self._typed[key] = TypeSnapshot.layered(type_url, layers)
        return found

    # -- keeping it small ----------------------------------------------------------------

    def settle(self) -> None:
        """Let go of the previous build (kept only to derive layers from): call once
        every known group has been assembled."""
        self._old = None
        self._before = {}
        self._capture.settle()
        self._egress.settle()

    def forget(self, proxies: Iterable[ProxyIdentity]) -> None:
        """Drop layers, route tables and zone variants no group uses any more: proxies
        choose their namespace and zone, so these would otherwise grow with every name
        seen. The neutral probe's (every service, no zone, default namespace) stay."""
        members = [*proxies, _PROBE]
        views = self._visible.keep(members)
        visible = {*views.values(), None}
        zones = {(v, p.zone) for p, v in views.items()} | {(None, "")}
        routes = {(self._namespace_key(p.namespace), v) for p, v in views.items()}
        routes |= {(self._namespace_key(p.namespace), None) for p in members
                   if views[p] is None}
        routes |= {(self._namespace_key(DEFAULT_NAMESPACE), None), (_FOREIGN, None)}
        groups = {p.group for p in members}
        # list() first: a worker thread may be adding entries (list() of a dict is atomic).
        self._clusters = {k: v for k, v in list(self._clusters.items()) if k in visible}
        self._endpoints = {k: v for k, v in list(self._endpoints.items()) if k in zones}
        self._routes = {k: v for k, v in list(self._routes.items()) if k in routes}
        self._shared = {k: v for k, v in list(self._shared.items()) if k[1:3] in routes}
        self._own = {k: v for k, v in list(self._own.items()) if k in groups}
        self._capture.keep({(views[p], p.egress_port, self.observed(p))
                            for p in members if p.capture})
        self._egress.keep({key_of(p, views[p], self.observed(p)) for p in members
                           if not p.capture})
        self._typed = {}
        used = {p.zone for p in members if p.zone}
        for encoded in list(self._services.values()):
            for zone in [z for z in list(encoded.zoned) if z not in used]:
                encoded.zoned.pop(zone, None)

    @property
    def _zoned(self) -> dict[tuple[Visible, str], Layer]:
        """The zone variants of the endpoint layers held now."""
        return {k: v for k, v in list(self._endpoints.items()) if k[1]}

    def assignments(self, zone: str) -> list[Resource]:
        """Every ClusterLoadAssignment as a proxy in ``zone`` gets it."""
        return list(self.endpoint_layer(None, zone).resources.values())

    # -- helpers -------------------------------------------------------------------------

    def _derive(self, type_url: str, old: Layer | None, visible: Visible, pick: _Pick,
                named: _Pick) -> Layer:
        """The layer of ``visible`` services' ``pick``: ``old`` with the changed services
        replaced (O(changed) plus a copy), or made from scratch when there is no old.
        ``named`` gives an old service's resources under the same names as ``pick``."""
        if old is None:
            keys: Iterable[str] = (self._services if visible is None
                                   else [k for k in visible if k in self._services])
            return Layer.of(type_url, (r for k in keys for r in pick(self._services[k])))
        touched = [k for k in self.changed if visible is None or k in visible]
        if not touched:
            return old
        remove = [r.name for k in touched if (e := self._before.get(k)) is not None
                  for r in named(e)]
        add = [r for k in touched if (e := self._services.get(k)) is not None for r in pick(e)]
        return old.replace(remove, add)

    def _variant(self, encoded: EncodedService, zone: str) -> tuple[Resource, ...]:
        """``encoded``'s assignments for ``zone``; a variant serialized now is counted
        in ``encoded_bytes`` (once per service and zone that has proxies)."""
        fresh = bool(zone) and zone not in encoded.zoned
        variant = encoded.assignments(zone)
        if fresh:
            self.encoded_bytes += sum(v.size for v, a in zip(
                variant, encoded.load_assignments, strict=True) if v is not a)
        return variant

    def _rerouted(self, visible: Visible) -> bool:
        """Whether a service the route table of ``visible`` shows changed its routing."""
        if self.rerouted is None:
            return True
        if visible is None:
            return bool(self.rerouted)
        return any(k in visible for k in self.rerouted)

    def _mesh_of(self, visible: Visible) -> Mesh:
        if visible is None:
            return self.mesh
        return self.mesh.model_copy(
            update={"services": [s for s in self.mesh.services if s.key in visible]})

    def _namespace_key(self, namespace: str) -> str:
        return namespace if namespace in self._namespaces else _FOREIGN


_Pick: TypeAlias = Callable[[EncodedService], Iterable[Resource]]


_clusters: _Pick = attrgetter("clusters")
_assignments: _Pick = attrgetter("load_assignments")


def _frame(mesh: Mesh) -> dict[str, Any]:
    """Everything in the mesh but its services (the scoping rules, say)."""
    return {name: getattr(mesh, name) for name in type(mesh).model_fields if name != "services"}
