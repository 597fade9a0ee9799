"""The sidecar injection webhook: HTTPS on ``webhook_address`` (15017), ``POST /inject``
with an AdmissionReview v1, ``GET /healthz`` for probes.

The listener is bound at start (a taken port is an error then, not later) with a TLS
context that has no certificate yet; the certificate is fetched in the background (a
Secret, files, a directory) and loaded into the live context, then checked again every
``check_interval`` and reloaded when it changed (renewed by us, by another replica, or
by cert-manager). Until the first one is loaded, handshakes fail, which the API server
treats as the webhook being down (``failurePolicy: Ignore``: pods start uninjected), and
the control plane's own readiness never waits for it.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import datetime
import json
import socket
import ssl
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Final

import structlog
from aiohttp import web
from prometheus_client import Counter, Gauge, Histogram

from controlplane.inject.certs import CertificateSource, ServingCert
from controlplane.inject.config import InjectConfig
from controlplane.inject.webhook_review import BadReview, Decision, review

log = structlog.get_logger("controlplane.webhook")

INJECTIONS = Counter(
    "controlplane_injections_total",
    "AdmissionReviews the injection webhook answered, by result (injected; skipped: not "
    "wanted or already injected; error: admitted unchanged, fail open; denied: fail "
    "closed; invalid: not an AdmissionReview).",
    ["result"],
)
INJECTION_SECONDS = Histogram(
    "controlplane_injection_seconds",
    "Time to decide and build one injection patch (the request read and parsed, the "
    "answer encoded).",
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0),
)
CERTIFICATE_EXPIRY = Gauge(
    "controlplane_webhook_certificate_expiry_timestamp_seconds",
    "When the webhook's serving certificate expires (Unix time); renewed a third of its "
    "life before.",
)
# etcd stores objects of at most 1.5 MiB, and an AdmissionReview of a CREATE carries one
# object (an UPDATE two); 4 MiB holds any of them with their envelope, and bounds what a
# client that is not the API server can make us parse. (aiohttp's default, 1 MiB, would
# refuse large but legal pods.)
MAX_REQUEST_BYTES: Final = 4 * 1024 * 1024


@dataclass
class WebhookState:
    """What the handlers need; the certificate part is kept current by ``Webhook``."""

    config: InjectConfig
    fail_closed: bool = False
    bundle: Callable[[], bytes] | None = None
    """The mesh CA's trust bundle as it is now (the server's CA, polled): injected
    sidecars reach xDS over TLS, verifying it, with their projected token."""
    cert: ServingCert | None = None
    decisions: int = 0
    last_error: str = field(default="")


def use_bundle(state: WebhookState, bundle_pem: str) -> None:
    """Inject this trust bundle from now on (the mesh CA's roots changed: rotated, or
    pruned; a rotation keeps the old root in the bundle until the prune, so pods already
    running with the old bundle keep verifying the server)."""
    if bundle_pem != state.config.xds_ca:
        state.config = dataclasses.replace(state.config, xds_ca=bundle_pem).check()
        log.info("webhook.trust_bundle", roots=bundle_pem.count("BEGIN CERTIFICATE"))


def _decide(raw: bytes, state: WebhookState) -> tuple[Decision, str]:
    """Parse, decide, encode: the CPU-bound part, run off the event loop."""
    decision = review(json.loads(raw), state.config, state.fail_closed)
    return decision, json.dumps(decision.response, separators=(",", ":"))


def make_app(state: WebhookState, executor: ThreadPoolExecutor | None = None
             ) -> web.Application:
    """``executor``: where decisions are made. The webhook shares its event loop with the
    xDS streams; a rollout's burst of pods (milliseconds each) must not stall them."""
    app = web.Application(client_max_size=MAX_REQUEST_BYTES)

    async def inject(request: web.Request) -> web.Response:
        started = time.perf_counter()
        raw = await request.read()
        if state.bundle is not None:
            use_bundle(state, state.bundle().decode())
        try:
            decision, text = await asyncio.get_running_loop().run_in_executor(
                executor, _decide, raw, state)
        except (ValueError, BadReview) as exc:  # JSONDecodeError is a ValueError
            INJECTIONS.labels("invalid").inc()
            log.warning("webhook.bad_request", error=str(exc)[:300],
                        hint="only the API server should call this, with an "
                        "AdmissionReview v1")
            return web.json_response({"error": str(exc)[:1000]}, status=400)
        INJECTION_SECONDS.observe(time.perf_counter() - started)
        INJECTIONS.labels(decision.result).inc()
        state.decisions += 1
        _log(decision)
        return web.Response(text=text, content_type="application/json")

    async def healthz(request: web.Request) -> web.Response:
        return web.Response(text="ok" if state.cert is not None else "no certificate yet",
                            status=200 if state.cert is not None else 503)

    app.router.add_post("/inject", inject)
    app.router.add_get("/healthz", healthz)
    return app


def _log(decision: Decision) -> None:
    fields = {"pod": decision.name, "namespace": decision.namespace, "kind": decision.kind,
              "result": decision.result, "reason": decision.reason}
    if decision.result in ("error", "denied"):
        log.warning("webhook.not_injected", **fields,
                    hint="fix the pod (the reason names the field), or opt it out with "
                    "the label mesh.controlplane.io/inject: \"false\"")
    else:
        log.info("webhook.decision", **fields)


class Webhook:
    """A running webhook: its listener, and the task that keeps its certificate."""

    def __init__(self, state: WebhookState, source: CertificateSource, names: Sequence[str],
                 check_interval: float = 3600.0, retry_interval: float = 5.0) -> None:
        self.state = state
        self.source = source
        self.names = list(names)
        self.check_interval = check_interval
        self.retry_interval = retry_interval  # while the CA cannot be published yet
        self.context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        self.context.minimum_version = ssl.TLSVersion.TLSv1_2
        self.port = 0
        self.has_certificate = asyncio.Event()
        self._runner: web.AppRunner | None = None
        self._task: asyncio.Task[None] | None = None
        # One thread: decisions in order, off the loop, never more than a core's worth.
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="webhook")

    async def start(self, host: str, port: int) -> int:
        """Bind now (errors now), fetch the certificate in the background; the port."""
        try:
            sock = socket.create_server((host, port), family=socket.AF_INET6 if ":" in host
                                        else socket.AF_INET)
        except OSError as exc:
            raise ValueError(
                f"cannot listen on {host}:{port} (--webhook-address): {exc.strerror or exc}; "
                "stop what uses it, choose another with --webhook-address "
                "(CONTROLPLANE_WEBHOOK_ADDRESS), or `off`") from exc
        self.port = sock.getsockname()[1]
        try:
            self._runner = web.AppRunner(make_app(self.state, self._executor),
                                         handle_signals=False,
                                         access_log=None, shutdown_timeout=2)
            await self._runner.setup()
            await web.SockSite(self._runner, sock, ssl_context=self.context).start()
        except BaseException:
            sock.close()
            raise
        self._task = asyncio.create_task(self._keep_certificate(), name="webhook-certificate")
        return self.port

    async def refresh(self) -> bool:
        """Ask the source once; load what it gives when it changed; publish its CA where
        the source does that (a cluster's caBundle). False: not published yet."""
        now = datetime.datetime.now(datetime.UTC)
        cert = await asyncio.to_thread(self.source.ensure, self.names, now)
        if cert != self.state.cert:
            await asyncio.to_thread(cert.load_into, self.context)
            log.info("webhook.certificate_loaded", **cert.describe())
            self.state.cert = cert
            CERTIFICATE_EXPIRY.set(cert.certificate.not_valid_after_utc.timestamp())
        publish = getattr(self.source, "publish", None)
        published = bool(await asyncio.to_thread(publish, cert)) if publish else True
        self.has_certificate.set()
        return published

    async def _keep_certificate(self) -> None:
        delay = 1.0
        while True:
            try:
                published = await self.refresh()
                delay = 1.0
                await asyncio.sleep(self.check_interval if published
                                    else min(self.check_interval, self.retry_interval))
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self.state.last_error = str(exc)
                log.error("webhook.certificate_failed", error=f"{type(exc).__name__}: {exc}",
                          retry_in=delay, serving=self.state.cert is not None,
                          hint="the webhook keeps its current certificate (none: the API "
                          "server cannot call it, pods start without a sidecar)")
                await asyncio.sleep(delay)
                delay = min(delay * 2, 60.0)

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        self._executor.shutdown(wait=False, cancel_futures=True)
