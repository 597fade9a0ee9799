"""``--source kubernetes``: Services, EndpointSlices, TrafficPolicies, Sidecars,
SecurityPolicies and Pod metadata in, meshes out.

Watchers (one thread per kind and namespace) feed one queue. Changes are batched: a
batch is converted once the stream has been quiet for ``quiet`` seconds, or ``max_delay``
after its first change at the latest (Istio's debounce, 100 ms / 10 s). Nothing is
yielded before every kind has been listed once, so the first mesh is complete; a batch
that converts to the mesh already served yields nothing.

A failed watch (an outage, 410 Gone) marks its kind stale until it is listed again; a
batch waits until no kind is stale (or ``max_delay`` after its first change), so after
an outage or a relist no mesh mixes one kind's fresh state with another's stale one.
A kind or namespace the server may not read (403) counts as listed (with what was known
of it, nothing at first) and is reported by ``problems()``: the rest is served.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import threading
import time
from collections.abc import AsyncIterator, Callable, Collection, Mapping
from dataclasses import dataclass

import structlog
from kubernetes import client

from controlplane import metrics
from controlplane.mesh.egress import shared_port_warnings
from controlplane.mesh.model import Mesh, OutboundTrafficPolicy
from controlplane.sources.base import stamp
from controlplane.sources.kubernetes.convert import Converter, Key
from controlplane.sources.kubernetes.gateway_controller import GatewayController
from controlplane.sources.kubernetes.kinds import (
    ENDPOINT_SLICES,
    GATEWAY_API,
    GRPC_ROUTES,
    HTTP_ROUTES,
    INGRESS,
    PODS,
    REFERENCE_GRANTS,
    ROOT_NAMESPACE,
    ROUTES,
    SECRETS,
    SECURITY_POLICIES,
    SERVICES,
    SIDECARS,
    TELEMETRIES,
    TRAFFIC_POLICIES,
    WATCHED,
    Kind,
)
from controlplane.sources.kubernetes.programmed import PolicyKey, RejectedLike
from controlplane.sources.kubernetes.route_status import RouteStatusWriter
from controlplane.sources.kubernetes.routes import RouteConverter
from controlplane.sources.kubernetes.status import StatusWriter
from controlplane.sources.kubernetes.status_writes import PolicyStatuses, RouteStatuses, Tasks
from controlplane.sources.kubernetes.store import ObjectStore, labels_only
from controlplane.sources.kubernetes.watch import (
    Changed,
    Event,
    Forbidden,
    Listed,
    Listing,
    Watcher,
    WatchTiming,
)

log = structlog.get_logger("controlplane.source.kubernetes")
# Per custom kind: the log events' prefix, and the event when a reference is unresolved.
_EVENTS: dict[Kind, str] = {TRAFFIC_POLICIES: "policy", SIDECARS: "sidecar",
                            SECURITY_POLICIES: "securitypolicy", TELEMETRIES: "telemetry"}
_UNRESOLVED: dict[Kind, str] = {TRAFFIC_POLICIES: "policy.no_matching_endpoints",
                                SIDECARS: "sidecar.no_matching_services",
                                SECURITY_POLICIES: "securitypolicy.target_not_found",
                                TELEMETRIES: "telemetry.target_not_found"}
_SHARED_PORT = ("give each of those ExternalName Services its own port or, when every "
                "host on it speaks TLS first, name each one's port (or set its appProtocol) tls")


@dataclass(frozen=True)
class Debounce:
    quiet: float = 0.1
    max_delay: float = 10.0


class KubernetesSource:
    name = "kubernetes"

    def __init__(self, api: client.ApiClient, namespaces: list[str] | None = None,
                 timing: WatchTiming | None = None, debounce: Debounce | None = None,
                 write_status: bool = True, pod_labels: bool = True,
                 outbound_traffic_policy: OutboundTrafficPolicy = "ALLOW_ANY",
                 root_namespace: str = ROOT_NAMESPACE, replica: str | None = None,
                 gateways: GatewayController | None = None) -> None:
        """``root_namespace``: the control plane's own, where a SecurityPolicy without a
        target applies to the whole mesh. ``replica``: this server's name in a policy's
        ``Programmed`` condition (default the host name: the pod's). ``gateways``: the
        gateway controller (default: status and certificates, no Envoy deployments)."""
        self.api = api
        self.kinds = [kind for kind in WATCHED if pod_labels or kind != PODS]
        self.namespaces: list[str | None] = list(namespaces) if namespaces else [None]
        self.timing = timing or WatchTiming()
        self.debounce = debounce or Debounce()
        self.status = StatusWriter(api) if write_status else None
        self.stores: dict[Kind, ObjectStore] = {
            SERVICES: ObjectStore(), ENDPOINT_SLICES: ObjectStore(),
            TRAFFIC_POLICIES: ObjectStore(keep_status=True),
            SIDECARS: ObjectStore(keep_status=True),
            SECURITY_POLICIES: ObjectStore(keep_status=True),
            TELEMETRIES: ObjectStore(keep_status=True),
            PODS: ObjectStore(reduce=labels_only),
            **{kind: ObjectStore(keep_status=kind in ROUTES) for kind in GATEWAY_API}}
        self.outbound_traffic_policy: OutboundTrafficPolicy = outbound_traffic_policy
        self.root_namespace = root_namespace
        self.converter = Converter(outbound_traffic_policy, root_namespace)
        self._forbidden: dict[tuple[Kind, str | None], str] = {}
        self._logged: set[str] = set()  # problems already logged: each is logged once
        self.policies = PolicyStatuses(self.status, self.stores,
                                       replica or socket.gethostname())
        self._origins: dict[str, tuple[PolicyKey, ...]] = {}
        # Gateway API routes: their status writes, where parent statuses come from
        # (gateways append theirs) and which Gateways are ours (a route only for
        # others' Gateways is not taken).
        self.route_status = RouteStatusWriter(api) if write_status else None
        self.routes = RouteStatuses(self.route_status, self.stores)
        self.route_converter = RouteConverter()
        # Gateways of our class (gateway_controller.py): their Envoys, status, certificates.
        self.gateways = gateways or GatewayController.plain(api, self.timing, write_status)
        self.stores.update({kind: ObjectStore(keep_status=True) for kind in INGRESS})
        self.our_gateways: Callable[[], Collection[Key]] = self.gateways.ours
        self.routes.sources.append(self.gateways.route_parents)
        # Where the server's gateway streams read certificates (app.gateway_certificates).
        self.certificates = self.gateways.certificates

    def origins(self, service: str) -> tuple[PolicyKey, ...]:
        """The policy objects that shaped a served Service (``namespace/name``)."""
        return self._origins.get(service, ())

    def watch_rejections(self, rejected: Callable[[], Mapping[PolicyKey, RejectedLike]],
                         ) -> Callable[[], None]:
        """Write each policy's ``Programmed`` condition from ``rejected`` (what the
        proxies reject now); returns what to call when that changes (from any thread;
        the writes follow within about a second)."""
        return self.policies.watch_rejections(rejected)

    def problems(self) -> list[str]:
        """What the source cannot see (for /readyz): each kind or namespace the server may
        not read, with the RBAC rule to add. Empty when it sees everything it watches."""
        found = [self._forbidden[k] for k in sorted(
            self._forbidden, key=lambda k: (k[0].plural, k[1] or ""))]
        if self.status is not None:
            found.extend(self.status.forbidden[k] for k in sorted(self.status.forbidden))
        if self.route_status is not None:
            found.extend(self.route_status.forbidden[k]
                         for k in sorted(self.route_status.forbidden))
        found.extend(self.gateways.problems())
        return found

    async def updates(self) -> AsyncIterator[Mesh]:
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[Event] = asyncio.Queue()
        stop = threading.Event()

        def emit(item: Event) -> None:
            with contextlib.suppress(RuntimeError):  # the loop closed: we are stopping
                loop.call_soon_threadsafe(queue.put_nowait, item)

        unlisted = {(kind, ns if kind.namespaced else None)  # GatewayClasses: one watch
                    for kind in self.kinds for ns in self.namespaces}
        self.gateways.start(lambda: queue.put_nowait(Changed(SECRETS, "MODIFIED", {})))
        stale: set[tuple[Kind, str | None]] = set()  # watch failed, not listed again yet
        for kind, namespace in sorted(unlisted, key=lambda k: (k[0].plural, k[1] or "")):
            Watcher(kind, self.api, namespace, emit, stop, self.timing).start()
        log.info("source.kubernetes_started",
                 namespaces=[n or "(all)" for n in self.namespaces])
        served: Mesh | None = None
        first_change = last_change = 0.0
        observed: float | None = None  # when the batch's first event came (time.time())
        dirty = False
        tasks: Tasks = set()
        self.policies.start(tasks)
        try:
            while True:
                timeout = None
                if dirty and not unlisted:
                    due = min(last_change + self.debounce.quiet,
                              first_change + self.debounce.max_delay)
                    if stale:
                        due = first_change + self.debounce.max_delay
                    timeout = max(0.0, due - time.monotonic())
                # asyncio.timeout, not wait_for: Python 3.11's wait_for returns an item
                # that lands with a cancel and drops the cancel (we would never stop).
                item: Event | None = None
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(timeout):
                        item = await queue.get()
                while item is not None:
                    if isinstance(item, Listing):
                        stale.add((item.kind, item.namespace))
                    elif isinstance(item, Listed | Forbidden):
                        unlisted.discard((item.kind, item.namespace))
                        stale.discard((item.kind, item.namespace))
                    if self._apply(item):
                        at = item.received if isinstance(item, Listed | Changed) \
                            else time.time()
                        observed = at if observed is None else min(observed, at)
                        now = time.monotonic()
                        if not dirty:
                            first_change = now
                        dirty, last_change = True, now
                    try:
                        item = queue.get_nowait()
                    except asyncio.QueueEmpty:
                        item = None
                if not dirty or unlisted:
                    continue
                now = time.monotonic()
                if stale and now - first_change < self.debounce.max_delay:
                    continue  # a kind is being listed again: wait for its fresh state
                if (now - last_change < self.debounce.quiet
                        and now - first_change < self.debounce.max_delay):
                    continue
                dirty = False
                batch_at, observed = observed, None
                try:
                    mesh = self._convert(tasks)
                except Exception:  # a bug, not an input: keep serving the last good mesh
                    log.exception("source.convert_failed", hint="the last good mesh is "
                                  "served; the next change tries again; please report this")
                    self.converter = Converter(self.outbound_traffic_policy,
                                               self.root_namespace)  # memo afresh
                    self.route_converter = RouteConverter()
                    continue
                if mesh == served:
                    metrics.K8S_REBUILDS.labels("unchanged").inc()
                    continue
                metrics.K8S_REBUILDS.labels("published").inc()
                served = mesh
                yield stamp(mesh, batch_at or time.time())
        finally:
            stop.set()
            self.gateways.stop()
            for task in tasks:
                task.cancel()

    def _apply(self, item: Event) -> bool:
        if isinstance(item, Listing):
            return False
        if isinstance(item, Forbidden):
            known = (item.kind, item.namespace) in self._forbidden
            self._forbidden[(item.kind, item.namespace)] = item.message
            return not known  # the first one may complete the first sync
        if isinstance(item, Changed) and item.kind == SECRETS:
            return True  # a gateway's certificate came, changed or went (certificates.py)
        store = self.stores[item.kind]
        if isinstance(item, Listed):
            if self._forbidden.pop((item.kind, item.namespace), None) is not None:
                log.info("watch.allowed", kind=item.kind.kind,
                         namespace=item.namespace or "all namespaces")
            store.replace(item.items, item.namespace)
            return True  # a (re)list always ends in a batch: the first one makes us ready
        return store.apply(item.type, item.obj)

    def _convert(self, tasks: Tasks) -> Mesh:
        pods = self.stores[PODS].objects if PODS in self.kinds else None
        ingress = self.gateways.convert(self.stores)
        gateways = self.our_gateways()
        routes = self.route_converter.convert(
            self.stores[HTTP_ROUTES].values(), self.stores[GRPC_ROUTES].values(),
            self.stores[REFERENCE_GRANTS].values(), gateways)
        result = self.converter.convert(
            self.stores[SERVICES].values(), self.stores[ENDPOINT_SLICES].values(),
            self.stores[TRAFFIC_POLICIES].values(), pods, self.stores[SIDECARS].values(),
            self.stores[SECURITY_POLICIES].values(), self.stores[TELEMETRIES].values(),
            routes)
        result.skipped.extend(routes.skipped)
        result.mesh = self.gateways.into(result.mesh, ingress)
        result.skipped.extend(ingress.skipped)
        self.gateways.reconcile(ingress, result.mesh, self.stores)
        self.routes.write(result.mesh, routes, gateways, tasks)
        problems = set(result.skipped)
        for problem in result.skipped:
            if problem not in self._logged:
                log.warning("source.object_skipped", problem=problem,
                            hint="fix the object; the other services are served as usual")
        for problem in shared_port_warnings(result.mesh.services):  # valid, not routed
            problems.add(problem)
            if problem not in self._logged:
                log.warning("mesh.egress_port_shared", problem=problem, hint=_SHARED_PORT)
        verdicts = {**{(TRAFFIC_POLICIES, k): v for k, v in result.verdicts.items()},
                    **{(SIDECARS, k): v for k, v in result.sidecar_verdicts.items()},
                    **{(SECURITY_POLICIES, k): v for k, v in result.security_verdicts.items()},
                    **{(TELEMETRIES, k): v for k, v in result.telemetry_verdicts.items()}}
        for target, verdict in verdicts.items():
            kind, (namespace, name) = target
            previous = self.policies.verdicts.get(target)
            event = _EVENTS[kind]
            if not verdict.accepted and previous != verdict:
                log.warning(f"{event}.rejected", **{event: f"{namespace}/{name}"},
                            reason=verdict.reason, message=verdict.message)
            if verdict.unresolved:
                problems.add(verdict.unresolved)
                if verdict.unresolved not in self._logged:
                    log.warning(_UNRESOLVED[kind],
                                **{event: f"{namespace}/{name}"}, message=verdict.unresolved)
        self._logged = problems
        self._origins = result.origins
        self.policies.update(verdicts, tasks)
        return result.mesh
