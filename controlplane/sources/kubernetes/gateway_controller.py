"""The gateway controller inside the Kubernetes source: what it does with each batch.

1. ``convert``: our GatewayClasses, Gateways, TLSRoutes and TCPRoutes into mesh entries
   (``gateways.py``), and the Secrets their listeners name handed to the certificates
   provider to watch (``certificates.py``).
2. ``reconcile`` (one task at a time, off the event loop for the API calls): each
   Gateway's Deployment, Service and ServiceAccount applied (``deployer.py``; only when
   what we want of them changed), the objects of a Gateway that left our class removed,
   then the status of our GatewayClasses, Gateways and TLS/TCPRoutes written where it differs
   (``gateway_status.py``), with listener conditions and route parents from attachment
   (``mesh/gateway_attach.py``) and each Gateway's conditions from ``gateway_state.py``.

A Gateway whose Service waits for a load balancer address is looked at again every
``ADDRESS_RECHECK`` seconds (a load balancer's address is a status change, which the
source's store does not count as a change), and every deployed object every ``RESYNC``
seconds (one GET each; a Deployment someone deleted or edited is put back). Deployments
are not watched: that would need list/watch of every Deployment in the cluster.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final

import structlog
from kubernetes import client
from kubernetes.client.exceptions import ApiException

from controlplane.inject.config import InjectConfig
from controlplane.mesh.gateway_tcp import TCPRoute
from controlplane.mesh.gateways import Certificate, Gateway, TLSRoute
from controlplane.mesh.model import Mesh
from controlplane.mesh.route_status import ParentStatus, RouteKey
from controlplane.sources.kubernetes.certificates import UNKNOWN, ClusterCertificates
from controlplane.sources.kubernetes.deploy_writer import Deployer
from controlplane.sources.kubernetes.deployer import (
    desired,
    resource_name,
    service_type,
)
from controlplane.sources.kubernetes.gateway_state import (
    Attachment,
    attachment,
    gateway_state,
)
from controlplane.sources.kubernetes.gateway_status import (
    GatewayStatusWriter,
    class_status,
    differs,
    gateway_status,
    route_parents,
    service_addresses,
)
from controlplane.sources.kubernetes.gateways import (
    Gateways,
    certificate_entries,
    convert_gateways,
)
from controlplane.sources.kubernetes.kinds import (
    GATEWAY_CLASSES,
    GATEWAYS,
    INGRESS,
    REFERENCE_GRANTS,
    TCP_ROUTES,
    TLS_ROUTES,
    Kind,
)
from controlplane.sources.kubernetes.services import Key, key, meta
from controlplane.sources.kubernetes.watch import WatchTiming

if TYPE_CHECKING:
    from controlplane.settings import ServeSettings

log = structlog.get_logger("controlplane.source.kubernetes")

ADDRESS_RECHECK: Final = 5.0  # seconds between looks at a Service awaiting its address
RESYNC: Final = 60.0  # seconds between looks at every deployed object (one GET each)


@dataclass(frozen=True)
class Deployed:
    uid: str
    gateway_class: str
    digest: str  # what was applied (the objects' hash annotations, joined)
    problem: str  # "" when every object is in place


class GatewayController:
    def __init__(self, api: client.ApiClient, *, deployer: Deployer | None,
                 certificates: ClusterCertificates | None, write_status: bool,
                 attach: Callable[[Mesh], Attachment] = attachment) -> None:
        """``deployer`` None: Gateways get no Deployment (someone else runs their Envoy);
        ``certificates`` None: no listener gets a certificate."""
        self.deployer = deployer
        self.certificates = certificates
        self.status = GatewayStatusWriter(api) if write_status else None
        self.attach = attach
        self._core = client.CoreV1Api(api)
        self._deployed: dict[Key, Deployed] = {}
        self._last: tuple[Gateways, Mesh, Mapping[Kind, Any]] | None = None
        self._running: asyncio.Task[None] | None = None
        self._wake: asyncio.Event | None = None
        self._resync = False  # look at every deployed object again (drift, deletion)
        self._ours: frozenset[Key] = frozenset()

    @classmethod
    def plain(cls, api: client.ApiClient, timing: WatchTiming,
              write_status: bool) -> GatewayController:
        """Status and certificates, no deployments (what a source gets unless told)."""
        return cls(api, deployer=None, certificates=ClusterCertificates(api, timing),
                   write_status=write_status)

    # -- per batch, on the event loop

    def start(self, poke: Callable[[], None]) -> None:
        """``poke()`` (on the loop) when a certificate comes, changes or goes: a batch."""
        if self.certificates is not None:
            self.certificates.subscribe(poke)

    def ours(self) -> frozenset[Key]:
        """Our Gateways, as of the last conversion (HTTPRoutes to them are taken)."""
        return self._ours

    def route_parents(self, mesh: Mesh) -> Mapping[RouteKey, Sequence[ParentStatus]]:
        """HTTPRoutes' statuses for their Gateway parents (route_status.py)."""
        return self.attach(mesh).routes

    def convert(self, stores: Mapping[Kind, Any]) -> Gateways:
        """Our GatewayClasses, Gateways and TLSRoutes from the source's stores."""
        provider = self.certificates

        def usable(ref: tuple[str, str]) -> bool:
            """A pair is held, or the Secret's first read is on its way: a listener is not
            dropped for the moment a watch takes to list (a control plane's restart would
            drain every HTTPS listener of every gateway); its proxy waits for the secret."""
            return provider is not None and (provider.pair(*ref) is not None
                                             or provider.problem(ref) == UNKNOWN)

        result = convert_gateways(
            stores[GATEWAY_CLASSES].values(), stores[GATEWAYS].values(),
            stores[TLS_ROUTES].values(), stores[REFERENCE_GRANTS].values(),
            tcp_routes=stores[TCP_ROUTES].values())
        if provider is not None:
            provider.want(result.secrets)  # first: a Secret named now is being read
        result.certificates = certificate_entries(result.secrets, usable)
        self._ours = frozenset(result.objects)
        return result

    @staticmethod
    def into(mesh: Mesh, result: Gateways) -> Mesh:
        """The mesh with the gateways' fields (entries validated one by one already)."""
        return mesh.model_copy(update={
            "gateways": [Gateway.model_validate(g) for g in result.gateways],
            "tls_routes": [TLSRoute.model_validate(r) for r in result.tls_routes],
            "tcp_routes": [TCPRoute.model_validate(r) for r in result.tcp_routes],
            "certificates": [Certificate.model_validate(c) for c in result.certificates]})

    def reconcile(self, result: Gateways, mesh: Mesh, stores: Mapping[Kind, Any]) -> None:
        """Deploy and write status for this batch. One reconcile runs at a time; a newer
        batch waits for it and then runs with the latest state."""
        self._last = (result, mesh, stores)
        if self._wake is None:
            self._wake = asyncio.Event()
        self._wake.set()
        if self._running is None or self._running.done():
            self._running = asyncio.create_task(self._loop(self._wake))

    def problems(self) -> list[str]:
        found = [d.problem for d in self._deployed.values() if d.problem]
        if self.status is not None:
            found.extend(self.status.forbidden[k] for k in sorted(self.status.forbidden))
        return found

    def stop(self) -> None:
        if self._running is not None:
            self._running.cancel()
        if self.certificates is not None:
            self.certificates.stop()

    # -- the reconcile task

    async def _loop(self, wake: asyncio.Event) -> None:
        """Reconcile the latest batch; again at once when a newer one comes, after
        ``ADDRESS_RECHECK`` while a Service awaits its address, and every ``RESYNC``
        anyway (a deleted or edited Deployment is put back)."""
        while True:
            wake.clear()
            assert self._last is not None
            try:
                waiting = await self._reconcile(*self._last)
            except Exception:
                log.exception("gateway.reconcile_failed",
                              hint="retried with the next change; please report this")
                waiting = False
            try:
                async with asyncio.timeout(ADDRESS_RECHECK if waiting else RESYNC):
                    await wake.wait()  # not wait_for: it can swallow stop()'s cancel
            except TimeoutError:
                self._resync = not waiting

    async def _reconcile(self, result: Gateways, mesh: Mesh,
                         stores: Mapping[Kind, Any]) -> bool:
        """Returns whether a Gateway waits for its Service's address. Statuses are read
        from the stores now (a resync must not compare with what it saw a minute ago)."""
        await asyncio.to_thread(self._deploy, result)
        if self.certificates is not None and any(
                self.certificates.problem(ref) == UNKNOWN for ref in result.secrets):
            return False  # listener conditions follow once the Secrets are read (a batch)
        attached = self.attach(mesh)
        statuses = {(kind, k): stores[kind].status.get(k)
                    for kind in INGRESS for k in stores[kind].objects}
        waiting = False
        writes: list[tuple[Kind, str, str, dict[str, Any]]] = []
        for name, obj in sorted(result.classes.items()):
            body = class_status(_generation(obj), statuses.get((GATEWAY_CLASSES, key(obj))))
            writes.append((GATEWAY_CLASSES, key(obj)[0], name, body))
        for gateway_key, obj in sorted(result.objects.items()):
            addresses, address_problem = await asyncio.to_thread(self._addresses, obj)
            waiting = waiting or bool(address_problem)
            deployed = self._deployed.get(gateway_key)
            state = gateway_state(
                result.verdicts[gateway_key], attached.gateways.get(gateway_key), addresses,
                address_problem, deployed.problem if self.deployer is not None
                and deployed is not None else "", self.certificates)
            current = statuses.get((GATEWAYS, gateway_key))
            writes.append((GATEWAYS, *gateway_key, gateway_status(state, current)))
        for kind, objects, parents in (
                (TLS_ROUTES, result.route_objects, attached.tls_routes),
                (TCP_ROUTES, result.tcp_route_objects, attached.tcp_routes)):
            for route_key, obj in sorted(objects.items()):
                found = parents.get(route_key)
                if found is None:
                    continue
                current = statuses.get((kind, route_key))
                writes.append((kind, *route_key,
                               route_parents(found, _generation(obj), current)))
        if self.status is not None:
            for kind, namespace, name, body in writes:
                if differs(body, statuses.get((kind, (namespace, name)))):
                    await asyncio.to_thread(self.status.write, kind, namespace, name, body)
        return waiting

    def _deploy(self, result: Gateways) -> None:
        """Blocking. Apply what changed; remove what a Gateway that left us had."""
        if self.deployer is None:
            return
        current: dict[Key, Deployed] = {}
        for gateway_key, obj in sorted(result.objects.items()):
            if result.verdicts[gateway_key].problem:
                continue
            uid = str(meta(obj).get("uid") or "")
            gateway_class = str(obj["spec"].get("gatewayClassName"))
            try:
                digest = ",".join(o["metadata"]["annotations"]["mesh.controlplane.io/"
                                                              "gateway-hash"]
                                  for _, o in desired(obj, self.deployer.current(),
                                                      self.deployer.bootstrap))
            except ValueError:
                digest = ""
            before = self._deployed.get(gateway_key)
            if before is not None and before.digest == digest and before.uid == uid \
                    and not before.problem and not self._resync:
                current[gateway_key] = before
                continue
            outcome = self.deployer.apply(obj)
            current[gateway_key] = Deployed(uid, gateway_class, digest, outcome.problem)
        for gateway_key, before in self._deployed.items():
            if gateway_key in current:
                continue
            # No longer ours (its class changed), invalid, or deleted (garbage collection
            # may not have come yet): take back what we made for it, if it owns it.
            self.deployer.remove(gateway_key[0], gateway_key[1], before.gateway_class,
                                 before.uid)
        self._deployed = current
        self._resync = False

    def _addresses(self, gateway: Mapping[str, Any]) -> tuple[tuple[tuple[str, str], ...],
                                                              str]:
        """Blocking. The Gateway's addresses from its Service, or why there are none."""
        namespace = str(meta(gateway).get("namespace") or "default")
        name = resource_name(str(meta(gateway).get("name")),
                             str(gateway["spec"].get("gatewayClassName")))
        if self.deployer is None:
            return (), ""
        core: Any = self._core
        try:
            found = core.read_namespaced_service(name, namespace, _preload_content=False,
                                                 _request_timeout=(5, 10))
        except ApiException as exc:
            if exc.status == 404:
                return (), f"its Service {namespace}/{name} does not exist yet"
            return (), f"its Service {namespace}/{name} cannot be read (HTTP {exc.status})"
        except Exception as exc:
            return (), f"its Service {namespace}/{name} cannot be read ({type(exc).__name__})"
        service = json.loads(found.data)
        return service_addresses(service, _wanted_type(gateway))


def _wanted_type(gateway: Mapping[str, Any]) -> str:
    try:
        return service_type(gateway)
    except ValueError:
        return "LoadBalancer"


def _generation(obj: Mapping[str, Any]) -> int:
    value = meta(obj).get("generation")
    return value if isinstance(value, int) and not isinstance(value, bool) else 0


def gateway_controller(api: client.ApiClient, settings: ServeSettings,
                       timing: WatchTiming, xds_ca: str | None = None) -> GatewayController:
    """The controller ``serve --source kubernetes`` runs: each Gateway's Envoy made with
    the injection settings' proxy image, resources, log level and xDS address
    (``xds_ca``: the mesh CA's bundle, when xDS is served over TLS)."""
    config = InjectConfig(
        proxy_image=settings.inject_proxy_image, init_image=settings.inject_init_image,
        xds_address=settings.inject_xds_address, proxy_uid=settings.inject_proxy_uid,
        proxy_cpu=settings.inject_proxy_cpu, proxy_memory=settings.inject_proxy_memory,
        proxy_memory_limit=settings.inject_proxy_memory_limit, delta=settings.inject_delta,
        log_level=settings.inject_log_level, xds_ca=xds_ca)
    try:
        config.check()
    except ValueError as exc:  # it names the flag: say where it was set, and why here
        raise ValueError(f"injection setting (--inject-* or CONTROLPLANE_INJECT_*), which "
                         f"gateway Deployments use too: {exc}") from None
    return GatewayController(api, deployer=Deployer(api, config),
                             certificates=ClusterCertificates(api, timing),
                             write_status=settings.write_status)


def trust_gateways(source: object, bundle: Callable[[], bytes]) -> None:
    """The app's one line when xDS is served over TLS: gateway Deployments then carry
    the mesh CA's bundle (as the webhook injects it) and the pod's projected token."""
    controller = getattr(source, "gateways", None)
    if isinstance(controller, GatewayController) and controller.deployer is not None:
        controller.deployer.bundle = bundle
