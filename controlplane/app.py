"""``controlplane serve``: wires source -> pipeline -> cache -> xDS server, plus admin.

The process outlives its inputs: a source that fails is logged and started again (the
last good mesh is served meanwhile), a mesh that cannot be built is rejected, and groups
that no proxy uses any more are swept away. On SIGTERM streams are ended cleanly, so
sidecars reconnect at once (their bootstrap caps the back-off at a second).
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import signal
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import grpc
import structlog

from controlplane.admin import AdminState, start_admin
from controlplane.cache import certificates as gateway_certs
from controlplane.cache.cache import SnapshotCache
from controlplane.cache.gateway_secrets import GatewaySecrets
from controlplane.cache.store import SnapshotStore
from controlplane.inject.certs import (
    CertificateSource,
    DirectoryStore,
    FileCertificates,
    dns_names,
)
from controlplane.inject.config import InjectConfig
from controlplane.inject.webhook import Webhook, WebhookState
from controlplane.mesh.gateways import gateway_identity
from controlplane.mesh.model import Mesh
from controlplane.mesh.security import MeshIdentity
from controlplane.observe.convergence import Convergence
from controlplane.observe.rejections import Rejections
from controlplane.pipeline import Pipeline
from controlplane.security.ca import CertificateAuthority
from controlplane.server import StreamRegistry, XdsServer, create_server
from controlplane.server.csds import AckedConfigs, ClientStatus
from controlplane.server.limits import Limits
from controlplane.server.secured import Secured
from controlplane.server.settle import RECLAIM_AGAIN_SECONDS, reclaim
from controlplane.settings import ServeSettings, split_address
from controlplane.sources import Source, open_source
from controlplane.trust import open_trust

log = structlog.get_logger("controlplane.serve")


@dataclass
class Running:
    """A started server, for the CLI and for tests that run it in-process."""

    settings: ServeSettings
    pipeline: Pipeline
    cache: SnapshotCache
    registry: StreamRegistry
    grpc_server: grpc.aio.Server
    xds_port: int
    admin_runner: Any
    admin_port: int
    source_task: asyncio.Task[None]
    store: SnapshotStore | None
    xds: XdsServer | None = None
    sweeper: asyncio.Task[None] | None = None
    webhook: Webhook | None = None
    secured: Secured | None = None  # the CA, authentication, SDS, xDS TLS (issue 11)
    convergence: Convergence | None = None  # each change followed to the proxies (issue 12)
    ticker: asyncio.Task[None] | None = None  # its clock: ends changes, warns of laggards
    certificate_watch: asyncio.Task[None] | None = None  # gateway certificates' files

    async def stop(self, grace: float = 1.0) -> None:
        """Stop taking new streams, end the open ones once their writes are done (they
        reconnect elsewhere), and cut what is left after ``grace`` seconds."""
        for task in (self.source_task, self.sweeper, self.ticker, self.certificate_watch):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        stopping = asyncio.ensure_future(self.grpc_server.stop(grace))
        if self.xds is not None:
            self.xds.shutdown()
        await stopping
        if self.xds is not None:  # handlers of calls that just ended may still unwind
            left = await self.xds.drain(max(grace, 10.0))  # 1000 unwind in ~1 s, idle
            if left:
                log.warning("serve.handlers_left", count=left,
                            hint="they are cut now; their clients reconnect")
        if self.secured is not None:
            await self.secured.stop()
        self.pipeline.close()
        if self.webhook is not None:
            await self.webhook.stop()
        await self.admin_runner.cleanup()
        if self.store is not None:
            self.store.close()


def limits(settings: ServeSettings) -> Limits:
    """The xDS server's bounds on what clients send, from the settings."""
    return Limits(
        max_node_id_bytes=settings.max_node_id_bytes,
        max_node_bytes=settings.max_node_bytes,
        max_names_per_request=settings.max_names_per_request,
        max_unknown_types=settings.max_unknown_types,
        max_streams=settings.max_streams,
        log_lines_per_second=settings.stream_log_rate,
        max_large_writes=settings.max_large_writes,
        large_write_bytes=settings.large_write_bytes,
        large_write_turn_seconds=settings.large_write_turn_seconds,
    )


async def follow(source: Source, pipeline: Pipeline, retry: float = 1.0,
                 identity: MeshIdentity | None = None) -> None:
    """Feed the source's meshes to the pipeline for as long as the process lives. A source
    that fails or ends is started again after ``retry`` seconds (doubling to 30). With a CA
    running, each mesh says so (``identity``): the translator then emits mTLS and SDS."""
    frozen = False
    delay = retry
    size = 0
    while True:
        try:
            async for mesh in source.updates():
                delay = retry
                if not await pipeline.apply(_with_identity(mesh, identity)):
                    continue
                if not frozen:
                    # What the first mesh built lives long: keep it out of later
                    # collections (half of a change's CPU went to the collector).
                    gc.freeze()
                    frozen = True
                elif len(mesh.services) * 2 < size and size >= 200:
                    # Now, and again once the streams have sent the smaller config and
                    # their proxies ACKed it (until then they hold the old snapshots).
                    reclaim(size, len(mesh.services))
                    asyncio.get_running_loop().call_later(
                        RECLAIM_AGAIN_SECONDS, reclaim, size, len(mesh.services))
                size = len(mesh.services)
            log.error("source.ended", source=source.name, retry_in=delay,
                      hint="the last good mesh is still served; the source is started again")
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.exception("source.failed", source=source.name, retry_in=delay,
                          error=f"{type(exc).__name__}: {exc}",
                          hint="the last good mesh is still served; the source is started "
                          "again")
        await asyncio.sleep(delay)
        delay = min(delay * 2, 30.0)


def _with_identity(mesh: Mesh, identity: MeshIdentity | None) -> Mesh:
    if identity is None or mesh.identity == identity:
        return mesh
    return mesh.model_copy(update={"identity": identity})


async def sweep(pipeline: Pipeline, ttl: float, secured: Secured | None = None) -> None:
    """Forget proxy groups, and workload identities, that have had no proxy connected for
    ``ttl`` seconds."""
    while True:
        await asyncio.sleep(min(max(ttl / 4, 0.05), 5.0))
        try:
            pipeline.expire_groups(ttl)
            if secured is not None:
                secured.watcher.expire(ttl)
        except Exception:
            log.exception("groups.sweep_failed", hint="retried at the next sweep")


def inject_config(settings: ServeSettings) -> InjectConfig:
    """What the webhook injects, from the ``inject_*`` settings (checked: a bad value is
    an error at start naming the setting)."""
    config = InjectConfig(
        proxy_image=settings.inject_proxy_image, init_image=settings.inject_init_image,
        xds_address=settings.inject_xds_address, proxy_uid=settings.inject_proxy_uid,
        proxy_cpu=settings.inject_proxy_cpu, proxy_memory=settings.inject_proxy_memory,
        proxy_memory_limit=settings.inject_proxy_memory_limit, delta=settings.inject_delta,
        log_level=settings.inject_log_level)
    try:
        return config.check()
    except ValueError as exc:  # it names `controlplane inject`'s flag: say where it was set
        raise ValueError(f"injection setting (--inject-* or CONTROLPLANE_INJECT_*): {exc}"
                         ) from None


def certificates(settings: ServeSettings,
                 ca: Callable[[], CertificateAuthority] | None = None) -> CertificateSource:
    """Files when given; else in a cluster the shared Secret (and its CA in caBundle);
    else a directory of our own. With the mesh CA (``ca``), it issues the certificate and
    its bundle is the caBundle: xDS and the webhook from one CA."""
    local: CertificateSource | None = None
    if settings.webhook_cert is not None or settings.webhook_key is not None:
        if settings.webhook_cert is None or settings.webhook_key is None:
            raise ValueError("--webhook-cert and --webhook-key go together: give both, or "
                             "neither (a certificate is then made and kept)")
        local = FileCertificates(settings.webhook_cert, settings.webhook_key,
                                 settings.webhook_ca)
    if settings.source != "kubernetes":
        return local or DirectoryStore(settings.webhook_cert_dir, ca=ca)
    from controlplane.inject.webhook_kube import KubernetesCertificates, SecretCertificates
    from controlplane.sources.kubernetes import api_client
    from controlplane.sources.kubernetes.kinds import WEBHOOK_SECRET

    api = api_client(settings.kubeconfig, pool_size=2)
    return KubernetesCertificates(
        api, settings.webhook_configuration,
        local or SecretCertificates(api, settings.webhook_namespace, WEBHOOK_SECRET, ca=ca))


async def start_webhook(settings: ServeSettings,
                        bundle: Callable[[], bytes] | None = None,
                        ca: Callable[[], CertificateAuthority] | None = None,
                        ) -> Webhook | None:
    """The injection webhook, when it runs (``webhook_listen``); bound now, its
    certificate fetched in the background (readiness does not wait for it). ``bundle``:
    the mesh CA's trust bundle now (xDS over TLS): injected sidecars verify it."""
    address = settings.webhook_listen()
    if address is None:
        return None
    host, port = split_address(address, "--webhook-address")
    state = WebhookState(inject_config(settings),
                         fail_closed=settings.inject_failure_policy == "closed", bundle=bundle)
    webhook = Webhook(state, certificates(settings, ca),
                      dns_names(settings.webhook_service, settings.webhook_namespace))
    bound = await webhook.start(host, port)
    log.info("webhook.started", address=f"{host}:{bound}",
             failure_policy=settings.inject_failure_policy)
    return webhook


def readiness(pipeline: Pipeline, source: Source,
              webhook: Webhook | None = None) -> Callable[[], tuple[bool, str]]:
    """The pipeline's readiness, with what the source cannot see (a namespace the
    server may not read, and the RBAC rule to add) and a webhook still without its
    certificate: reported, never blocking the rest (xDS does not need the webhook)."""
    problems: Callable[[], list[str]] | None = getattr(source, "problems", None)

    def check() -> tuple[bool, str]:
        ready, detail = pipeline.readiness()
        seen = problems() if problems is not None else []
        detail += "; cannot read: " + "; ".join(seen) if seen else ""
        if webhook is not None and webhook.state.cert is None:
            why = webhook.state.last_error or "being fetched"
            detail += f"; injection webhook has no certificate yet ({why})"
        return ready, detail
    return check


def rejections_for(source: Source) -> Rejections:
    """The observer of NACKs (``/debug/rejections``). A source that knows which policy
    objects shaped a service (Kubernetes) names them, and writes their ``Programmed``
    condition as the rejections change."""
    rejections = Rejections(getattr(source, "origins", None))
    watch = getattr(source, "watch_rejections", None)
    if watch is not None:
        rejections.on_change = watch(rejections.by_policy)
    return rejections


async def start(settings: ServeSettings, source: Source | None = None) -> Running:
    source = source or open_source(settings)
    admin_host, admin_port = split_address(settings.admin_address, "--admin-address")
    split_address(settings.xds_address, "--xds-address")
    store = SnapshotStore(settings.snapshot_dir, settings.snapshot_keep) \
        if settings.snapshot_keep else None
    cache = SnapshotCache()
    registry = StreamRegistry()
    convergence = Convergence(registry.streams, settings.convergence_warn_after)
    pipeline = Pipeline(cache, store, convergence)
    secured = await open_trust(settings, cache)
    if secured is not None and secured.tls is not None and getattr(source, "gateways", None):
        # Gateway Deployments dial xDS over TLS too: they carry the mesh CA's bundle.
        from controlplane.sources.kubernetes.gateway_controller import trust_gateways
        trust = secured.trust
        trust_gateways(source, lambda: trust.current().bundle_pem)
    rejections = rejections_for(source)
    acked = AckedConfigs()  # what each proxy holds, for CSDS beside what it is served
    certs = gateway_certificates(source, pipeline)
    xds = XdsServer(GatewaySecrets(cache if secured is None else secured.watcher, cache, certs,
                                   lambda ns, name: gateway_identity(
                                       pipeline.mesh.gateways if pipeline.mesh else [],
                                       ns, name)),
                    registry,
                    settings.identifier, limits=limits(settings),
                    admission=None if secured is None else secured.admission,
                    observers=[convergence, acked, rejections])
    status = ClientStatus(registry, xds.watcher, settings.identifier, xds.admission,
                          settings.status_readers(), acked)
    grpc_server, xds_port = await create_server(
        settings.xds_address, xds,
        None if secured is None or secured.tls is None else secured.tls.credentials(),
        extra=status.handlers(), max_connection_age=settings.max_connection_age,
        max_connection_age_grace=settings.max_connection_age_grace)
    webhook: Webhook | None = None
    try:
        webhook = await start_webhook(  # its port is taken, a bad setting: fail
            settings, None if secured is None or secured.tls is None
            else lambda: secured.trust.current().bundle_pem,
            None if secured is None else secured.trust.current)
        runner, bound_admin = await start_admin(
            AdminState(registry=registry, cache=cache, rejections=rejections.summary,
                       convergence=convergence,
                       readiness=readiness(pipeline, source, webhook)),
            admin_host, admin_port)
    except BaseException:  # e.g. the admin port is taken: release the other ports too
        await grpc_server.stop(0)
        if webhook is not None:
            await webhook.stop()
        raise

    identity = None if secured is None else MeshIdentity(trust_domain=settings.trust_domain)
    task = asyncio.create_task(follow(source, pipeline, identity=identity), name="source")
    sweeper = asyncio.create_task(sweep(pipeline, settings.group_ttl, secured),
                                  name="group-sweeper")
    ticker = asyncio.create_task(convergence.watch(), name="convergence")
    certificate_watch = asyncio.create_task(certs.watch(), name="certificates") \
        if isinstance(certs, gateway_certs.FileCertificates) else None
    if secured is not None:
        secured.start(settings.ca_poll_interval)
    host = settings.xds_address.rpartition(":")[0]
    log.info("serve.started", source=source.name, xds=f"{host}:{xds_port}",
             admin=f"http://{admin_host}:{bound_admin}/", snapshot_dir=str(settings.snapshot_dir),
             tls=secured is not None and secured.tls is not None,
             identity=None if secured is None else settings.trust_domain,
             max_connection_age=settings.max_connection_age or None,
             max_connection_age_grace=settings.max_connection_age_grace)
    return Running(settings, pipeline, cache, registry, grpc_server, xds_port, runner,
                   bound_admin, task, store, xds, sweeper, webhook, secured,
                   convergence=convergence, ticker=ticker, certificate_watch=certificate_watch)


def gateway_certificates(source: Source, pipeline: Pipeline) -> gateway_certs.Certificates:
    """Where gateways' certificates come from: the source's own provider (Kubernetes:
    Secrets), else the files the current mesh's ``certificates`` entries name."""
    provided: gateway_certs.Certificates | None = getattr(source, "certificates", None)
    if provided is not None:
        return provided
    return gateway_certs.FileCertificates(lambda: gateway_certs.mesh_files(pipeline.mesh))


async def serve(settings: ServeSettings) -> None:
    """Run until SIGINT or SIGTERM, then stop gracefully."""
    # A change allocates many short-lived objects; collect the young generation less often.
    gc.set_threshold(10_000, 20, 20)
    running = await start(settings)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    done, _ = await asyncio.wait(
        [asyncio.create_task(stop.wait()), running.source_task],
        return_when=asyncio.FIRST_COMPLETED)
    if running.source_task in done and running.source_task.exception() is not None:
        log.error("serve.source_failed", error=str(running.source_task.exception()))
    log.info("serve.stopping", grace=settings.shutdown_grace)
    await running.stop(settings.shutdown_grace)
    log.info("serve.stopped")
