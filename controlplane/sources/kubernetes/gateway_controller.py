"""The gateway controller inside the Kubernetes source: what it does with each batch.

1. ``convert``: our GatewayClasses, Gateways and TLSRoutes into mesh entries
   (``gateways.py``), and the Secrets their listeners name handed to the certificates
   provider to watch (``certificates.py``).
2. ``reconcile`` (one task at a time, off the event loop for the API calls): each
   Gateway's Deployment, Service and ServiceAccount applied (``deployer.py``; only when
   what we want of them changed), the objects of a Gateway that left our class removed,
   then the status of our GatewayClasses, Gateways and TLSRoutes written where it differs
   (``gateway_status.py``), with listener conditions and route parents from attachment
   (``mesh/gateway_attach.py``).

A Gateway whose Service waits for a load balancer address is looked at again every
``ADDRESS_RECHECK`` seconds (a load balancer's address is a status change, which the
source's store does not count as a change).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Final

import structlog
from kubernetes import client
from kubernetes.client.exceptions import ApiException

from controlplane.mesh.model import Mesh
from controlplane.mesh.route_status import Condition
from controlplane.sources.kubernetes.certificates import ClusterCertificates
from controlplane.sources.kubernetes.deployer import (
    Deployer,
    desired,
    resource_name,
    service_type,
)
from controlplane.sources.kubernetes.gateway_status import (
    GatewayState,
    GatewayStatusWriter,
    ListenerState,
    class_status,
    differs,
    gateway_status,
    route_parents,
)
from controlplane.sources.kubernetes.gateways import Gateways, convert_gateways
from controlplane.sources.kubernetes.kinds import GATEWAY_CLASSES, GATEWAYS, TLS_ROUTES, Kind
from controlplane.sources.kubernetes.services import Key, meta

log = structlog.get_logger("controlplane.source.kubernetes")

ADDRESS_RECHECK: Final = 5.0  # seconds between looks at a Service awaiting its address
# Listener conditions and route parents from attachment: (mesh) -> per Gateway key, its
# listeners' states; and per TLSRoute key, its parent statuses. Set by the caller (H5's
# mesh/gateway_attach.py), so this module stays independent of how attachment decides.
Attach = Callable[[Mesh], tuple[Mapping[Key, tuple[ListenerState, ...]],
                                 Mapping[Key, tuple[Any, ...]]]]


@dataclass(frozen=True)
class Deployed:
    uid: str
    gateway_class: str
    digest: str  # what was applied (the objects' hash annotations, joined)
    problem: str  # "" when every object is in place


class GatewayController:
    def __init__(self, api: client.ApiClient, *, deployer: Deployer | None,
                 certificates: ClusterCertificates | None, write_status: bool,
                 attach: Attach | None = None) -> None:
        """``deployer`` None: Gateways get no Deployment (someone else runs their Envoy);
        ``certificates`` None: no listener gets a certificate."""
        self.deployer = deployer
        self.certificates = certificates
        self.status = GatewayStatusWriter(api) if write_status else None
        self.attach = attach
        self._core = client.CoreV1Api(api)
        self._deployed: dict[Key, Deployed] = {}
        self._last: tuple[Gateways, Mesh, dict[tuple[Kind, Key], Any]] | None = None
        self._running: asyncio.Task[None] | None = None
        self._again = False

    # -- per batch, on the event loop

    def convert(self, classes: Iterable[Any], gateways: Iterable[Any],
                tls_routes: Iterable[Any], grants: Iterable[Any] = ()) -> Gateways:
        provider = self.certificates
        result = convert_gateways(
            classes, gateways, tls_routes, grants,
            usable=(lambda ref: provider.pair(*ref) is not None) if provider else
            (lambda ref: False))
        if provider is not None:
            provider.want(result.secrets)
        return result

    @staticmethod
    def mesh_update(result: Gateways) -> dict[str, Any]:
        """The mesh fields the gateways set (validated entries, as the model has them)."""
        from controlplane.mesh.gateways import Certificate, Gateway, TLSRoute

        return {"gateways": [Gateway.model_validate(g) for g in result.gateways],
                "tls_routes": [TLSRoute.model_validate(r) for r in result.tls_routes],
                "certificates": [Certificate.model_validate(c) for c in result.certificates]}

    def reconcile(self, result: Gateways, mesh: Mesh,
                  statuses: dict[tuple[Kind, Key], Any]) -> None:
        """Deploy and write status for this batch (``statuses``: each object's status as
        last seen, by kind and key). One reconcile runs at a time; a newer batch waits for
        it and then runs with the latest state."""
        self._last = (result, mesh, statuses)
        if self._running is not None and not self._running.done():
            self._again = True
            return
        self._running = asyncio.create_task(self._loop())

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

    async def _loop(self) -> None:
        while True:
            self._again = False
            assert self._last is not None
            try:
                waiting = await self._reconcile(*self._last)
            except Exception:
                log.exception("gateway.reconcile_failed",
                              hint="retried with the next change; please report this")
                waiting = False
            if self._again:
                continue
            if not waiting:
                return
            await asyncio.sleep(ADDRESS_RECHECK)

    async def _reconcile(self, result: Gateways, mesh: Mesh,
                         statuses: dict[tuple[Kind, Key], Any]) -> bool:
        """Returns whether a Gateway waits for its Service's address."""
        await asyncio.to_thread(self._deploy, result)
        listeners: Mapping[Key, tuple[ListenerState, ...]] = {}
        parents: Mapping[Key, tuple[Any, ...]] = {}
        if self.attach is not None:
            listeners, parents = self.attach(mesh)
        waiting = False
        writes: list[tuple[Kind, str, str, dict[str, Any]]] = []
        for name, obj in sorted(result.classes.items()):
            body = class_status(_generation(obj), statuses.get((GATEWAY_CLASSES, ("", name))))
            writes.append((GATEWAY_CLASSES, "", name, body))
        for gateway_key, obj in sorted(result.objects.items()):
            addresses, address_problem = await asyncio.to_thread(self._addresses, obj)
            waiting = waiting or bool(address_problem)
            state = self._state(result, gateway_key, obj, listeners.get(gateway_key, ()),
                                addresses, address_problem)
            current = statuses.get((GATEWAYS, gateway_key))
            writes.append((GATEWAYS, *gateway_key, gateway_status(state, current)))
        for route_key, obj in sorted(result.route_objects.items()):
            found = parents.get(route_key)
            if found is None:
                continue
            current = statuses.get((TLS_ROUTES, route_key))
            writes.append((TLS_ROUTES, *route_key,
                           route_parents(found, _generation(obj), current)))
        if self.status is not None:
            for kind, namespace, name, body in writes:
                if differs(body, statuses.get((kind, (namespace, name)))):
                    await asyncio.to_thread(self.status.write, kind, namespace, name, body)
        return waiting

    def _state(self, result: Gateways, gateway_key: Key, obj: Mapping[str, Any],
               listeners: tuple[ListenerState, ...], addresses: tuple[tuple[str, str], ...],
               address_problem: str) -> GatewayState:
        verdict = result.verdicts[gateway_key]
        if verdict.problem:
            reason = ("ListenersNotValid" if "listeners" in verdict.problem.split(":")[0]
                      else "InvalidParameters")
            return GatewayState(verdict.generation, (
                Condition("Accepted", False, reason, verdict.problem),
                Condition("Programmed", False, "Invalid", "not accepted: " + verdict.problem)))
        deployed = self._deployed.get(gateway_key)
        accepted = Condition("Accepted", True, "Accepted",
                             "served by the mesh's gateway controller")
        if self.deployer is not None and deployed is not None and deployed.problem:
            programmed = Condition("Programmed", False, "NoResources", deployed.problem)
        elif address_problem:
            programmed = Condition("Programmed", False, "AddressNotAssigned", address_problem)
        else:
            programmed = Condition("Programmed", True, "Programmed",
                                   "its Envoy deployment is configured by the control plane")
        return GatewayState(verdict.generation, (accepted, programmed), listeners, addresses)

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
                                  for _, o in desired(obj, self.deployer.config,
                                                      self.deployer.bootstrap))
            except ValueError:
                digest = ""
            before = self._deployed.get(gateway_key)
            if before is not None and before.digest == digest and before.uid == uid \
                    and not before.problem:
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


def service_addresses(service: Mapping[str, Any], wanted_type: str,
                      ) -> tuple[tuple[tuple[str, str], ...], str]:
    """A LoadBalancer's ingress addresses (IPs, host names), else (ClusterIP, NodePort)
    its cluster IPs; or why there are none yet and what to do."""
    spec = service.get("spec") if isinstance(service.get("spec"), Mapping) else {}
    status = service.get("status") if isinstance(service.get("status"), Mapping) else {}
    assert isinstance(spec, Mapping) and isinstance(status, Mapping)
    name = f"{meta(service).get('namespace')}/{meta(service).get('name')}"
    if wanted_type == "LoadBalancer":
        balancer = status.get("loadBalancer") if isinstance(status.get("loadBalancer"),
                                                            Mapping) else {}
        assert isinstance(balancer, Mapping)
        found: list[tuple[str, str]] = []
        for item in balancer.get("ingress") or []:
            if isinstance(item, Mapping) and item.get("ip"):
                found.append(("IPAddress", str(item["ip"])))
            elif isinstance(item, Mapping) and item.get("hostname"):
                found.append(("Hostname", str(item["hostname"])))
        if not found:
            return (), (f"waiting for a load balancer address for Service {name}; on a "
                        "cluster without load balancers, annotate the Gateway "
                        "mesh.controlplane.io/service-type: ClusterIP (or NodePort)")
        return tuple(found), ""
    ips = [ip for ip in spec.get("clusterIPs") or [spec.get("clusterIP")]
           if isinstance(ip, str) and ip and ip != "None"]
    if not ips:
        return (), f"its Service {name} has no cluster IP yet"
    return tuple(("IPAddress", ip) for ip in ips), ""


def _generation(obj: Mapping[str, Any]) -> int:
    value = meta(obj).get("generation")
    return value if isinstance(value, int) and not isinstance(value, bool) else 0

