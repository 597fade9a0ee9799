"""The gRPC edge: ADS (state-of-the-world and delta) and the per-type services.

Servicers stay thin. Each stream reads requests and waits for snapshots at once, hands
both to the protocol logic (``SotwStream`` / ``DeltaStream``) and writes the prepared
bytes it returns (``writes.py``: large writes take turns). Responses are already
encoded, so the response serializer is the identity: a resource's bytes are shared by
every stream that receives them. Between two events a stream keeps no request and no
response alive: at a thousand streams those would be most of the server's memory.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable, Sequence
from datetime import UTC, datetime
from typing import Any, NoReturn

import grpc
import structlog
from envoy.service.discovery.v3 import discovery_pb2

from controlplane import metrics, resource
from controlplane.cache.cache import ConfigWatcher
from controlplane.security.authn import AuthError, Caller
from controlplane.server import reflection
from controlplane.server.admission import Admission, NodeProblem
from controlplane.server.delta import DeltaStream
from controlplane.server.limits import LimitError, Limits, LogBudget
from controlplane.server.observer import StreamObserver, fan_out
from controlplane.server.registry import StreamRegistry
from controlplane.server.session import CredentialExpired, Malformed, StreamRun, warn
from controlplane.server.settle import FreezeWhenSettled
from controlplane.server.sotw import SotwStream
from controlplane.server.stream import MalformedRequest, ProtocolError, StreamBase
from controlplane.server.writes import ClientGone, WriteTurns, end_call

log = structlog.get_logger("controlplane.xds")

MAX_MESSAGE_BYTES = 256 * 1024 * 1024  # gRPC's 4 MB default is too small for big meshes
_GONE = "the client closed the stream during a write; it reconnects"
_SHUTTING_DOWN = "the control plane is shutting down; reconnect (Envoy does so by itself)"

# service -> (per-type URL or None for ADS, SotW method, delta method, fetch method)
SERVICES: dict[str, tuple[str | None, str, str, str | None]] = {
    "envoy.service.discovery.v3.AggregatedDiscoveryService": (
        None, "StreamAggregatedResources", "DeltaAggregatedResources", None),
    "envoy.service.cluster.v3.ClusterDiscoveryService": (
        resource.CLUSTER, "StreamClusters", "DeltaClusters", "FetchClusters"),
    "envoy.service.endpoint.v3.EndpointDiscoveryService": (
        resource.ENDPOINT, "StreamEndpoints", "DeltaEndpoints", "FetchEndpoints"),
    "envoy.service.listener.v3.ListenerDiscoveryService": (
        resource.LISTENER, "StreamListeners", "DeltaListeners", "FetchListeners"),
    "envoy.service.route.v3.RouteDiscoveryService": (
        resource.ROUTE, "StreamRoutes", "DeltaRoutes", "FetchRoutes"),
    "envoy.service.secret.v3.SecretDiscoveryService": (
        resource.SECRET, "StreamSecrets", "DeltaSecrets", "FetchSecrets"),
}


def _parser(cls: Any) -> Callable[[bytes], Any]:
    """Parse a request, or hand the stream a Malformed (gRPC would log a traceback
    and answer UNKNOWN for an exception raised here)."""
    def parse(data: bytes) -> Any:
        try:
            return cls.FromString(data)
        except Exception as exc:
            return Malformed(cls.DESCRIPTOR.name, str(exc)[:200])
    return parse


def _raw(message: Any) -> bytes:
    return message if isinstance(message, bytes) else bytes(message.SerializeToString())


class XdsServer:
    """Serves snapshots from a ConfigWatcher over every xDS flavour."""

    def __init__(self, watcher: ConfigWatcher, registry: StreamRegistry | None = None,
                 identifier: str = "controlplane", fetch_timeout: float = 5.0,
                 limits: Limits | None = None, admission: Admission | None = None,
                 observers: Sequence[StreamObserver] = ()) -> None:
        self.watcher = watcher
        self.observers = fan_out(observers)  # told of every stream's ACKs, NACKs and end
        self.admission = admission  # None: no identities (no CA), every stream admitted
        self.refusals = LogBudget(10.0)  # warnings for refused streams, server-wide
        self.registry = registry if registry is not None else StreamRegistry()
        self.identifier = identifier
        self.fetch_timeout = fetch_timeout
        self.limits = limits if limits is not None else Limits()
        self.turns = WriteTurns(self.limits)
        self.settle = FreezeWhenSettled(lambda: len(self.registry))
        self._closing = asyncio.Event()
        self._handlers: set[asyncio.Task[Any]] = set()  # streams' and fetches' handlers

    def _track(self) -> None:
        """Count the running handler's task until it ends (``drain``)."""
        task = asyncio.current_task()
        if task is not None and task not in self._handlers:
            self._handlers.add(task)
            task.add_done_callback(self._handlers.discard)

    def shutdown(self) -> None:
        """Ask every stream to end once its current writes are done (UNAVAILABLE, so the
        client reconnects, to another replica or to this one once it is back)."""
        self._closing.set()

    async def drain(self, timeout: float) -> int:
        """Wait up to ``timeout`` seconds for the handlers still running to end; how many
        did not. gRPC's stop returns once its core is done with every call, which can be
        before the handlers of calls the clients just left have unwound (a thousand at
        once, on a busy machine): the process would then end with them still running,
        and gRPC prints a CancelledError traceback for each one that is cut."""
        running = [t for t in self._handlers if not t.done()]
        if not running:
            return 0
        _, left = await asyncio.wait(running, timeout=timeout)
        await asyncio.sleep(0)  # gRPC's task around each handler takes note of its end
        return len(left)

    def handlers(self) -> list[grpc.GenericRpcHandler]:
        result: list[grpc.GenericRpcHandler] = []
        for service, (type_url, sotw, delta, fetch) in SERVICES.items():
            api = resource.short_name(type_url) if type_url else "ads"
            methods: dict[str, grpc.RpcMethodHandler] = {
                sotw: grpc.stream_stream_rpc_method_handler(
                    self._stream_handler(SotwStream, api, type_url),
                    request_deserializer=None,  # bytes: most ACKs need no parsing (sotw.py)
                    response_serializer=_raw),
                delta: grpc.stream_stream_rpc_method_handler(
                    self._stream_handler(DeltaStream, api, type_url),
                    request_deserializer=_parser(discovery_pb2.DeltaDiscoveryRequest),
                    response_serializer=_raw),
            }
            if fetch is not None and type_url is not None:
                methods[fetch] = grpc.unary_unary_rpc_method_handler(
                    self._fetch_handler(api, type_url),
                    request_deserializer=_parser(discovery_pb2.DiscoveryRequest),
                    response_serializer=_raw)
            result.append(grpc.method_handlers_generic_handler(service, methods))
        return result

    def _stream_handler(self, kind: type[SotwStream | DeltaStream], api: str,
                        type_url: str | None) -> Callable[..., Awaitable[None]]:
        async def handle(_requests: Any, context: grpc.aio.ServicerContext) -> None:
            self._track()
            cap = self.limits.max_streams
            if cap and len(self.registry) >= cap:
                metrics.STREAMS_REFUSED.labels("streams").inc()
                await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED,
                                    f"this server has {cap} streams open, its limit; retry "
                                    "later or connect to another replica")
            if self._closing.is_set():
                await context.abort(grpc.StatusCode.UNAVAILABLE, _SHUTTING_DOWN)
            caller = await self._authenticate(context)
            stream = kind(self.registry.next_id(), api, type_url, self.identifier, self.limits)
            await self._serve(stream, context, caller)
        return handle

    async def _authenticate(self, context: grpc.aio.ServicerContext) -> Caller | None:
        """The stream's caller, or the call ends with UNAUTHENTICATED / PERMISSION_DENIED
        and nothing is kept (no stream, no group, no per-client metric label)."""
        if self.admission is None:
            return None
        try:
            return await self.admission.authenticate(context.invocation_metadata())
        except AuthError as exc:
            await self._refuse(context, exc)

    async def _refuse(self, context: grpc.aio.ServicerContext, exc: AuthError) -> NoReturn:
        metrics.STREAMS_REFUSED.labels(exc.status.lower()).inc()
        warn(self.refusals, "xds.stream_refused", status=exc.status, error=str(exc)[:500],
             peer=context.peer())
        await context.abort(grpc.StatusCode[exc.status], str(exc))
        raise AssertionError("grpc.aio's abort raises")  # typed as returning, it never does

    def _fetch_handler(self, api: str, type_url: str) -> Callable[..., Awaitable[bytes]]:
        async def handle(request: discovery_pb2.DiscoveryRequest,
                         context: grpc.aio.ServicerContext) -> bytes:
            self._track()
            caller = await self._authenticate(context)
            stream = SotwStream(0, api, type_url, self.identifier, self.limits)
            if isinstance(request, Malformed):
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, request.message)
            try:
                stream.on_request(request)
            except ProtocolError as exc:
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
            except LimitError as exc:
                await context.abort(grpc.StatusCode[exc.status], str(exc))
            assert stream.proxy is not None
            if self.admission is not None:
                try:
                    stream.proxy = self.admission.admit(caller, stream.proxy, stream.node)
                except AuthError as exc:
                    await self._refuse(context, exc)
                except NodeProblem as exc:
                    await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
            stream.proxy = self.watcher.identities.resolve(stream.proxy)
            self.watcher.connect(stream.proxy)
            try:
                async with asyncio.timeout(self.fetch_timeout):
                    snapshot = await self.watcher.next_snapshot(stream.proxy, None)
            except TimeoutError:
                await context.abort(grpc.StatusCode.UNAVAILABLE,
                                    "no configuration built yet; retry when /readyz is ready")
            finally:
                self.watcher.disconnect(stream.proxy)
            pushes = stream.on_snapshot(snapshot)
            return pushes[0].encode() if pushes else b""
        return handle

    async def _serve(self, stream: StreamBase, context: grpc.aio.ServicerContext,
                     caller: Caller | None = None) -> None:
        self.registry.add(stream)
        self.settle.opened(stream.stream_id)
        metrics.CONNECTED_PROXIES.labels(stream.protocol).inc()
        structlog.contextvars.bind_contextvars(stream_id=stream.stream_id, api=stream.api,
                                               protocol=stream.protocol)
        budget = LogBudget(self.limits.log_lines_per_second)
        run = StreamRun(stream, context, self.watcher, self.turns, budget)
        run.observers = self.observers
        admission = self.admission
        if admission is not None:
            run.admit = lambda proxy: admission.admit(caller, proxy, stream.node)
        closing = asyncio.ensure_future(self._closing.wait())
        expiry = _expiry(run, caller)
        run.start()
        try:
            waits: set[asyncio.Future[Any]] = {run.ended, closing}
            await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
            if run.ended.done():
                run.ended.result()  # the client's EOF, or what ended the stream
            else:
                async with run.lock:  # the writes under way finish first
                    log.info("xds.stream_shutdown", hint="the client reconnects")
                    await end_call(context, grpc.StatusCode.UNAVAILABLE, _SHUTTING_DOWN)
        except ProtocolError as exc:
            malformed = isinstance(exc, MalformedRequest)
            metrics.STREAMS_REFUSED.labels("malformed" if malformed else "protocol").inc()
            warn(budget, "xds.protocol_error", error=str(exc))
            with contextlib.suppress(ClientGone):
                await end_call(context, grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        except AuthError as exc:
            metrics.STREAMS_REFUSED.labels(exc.status.lower()).inc()
            warn(self.refusals, "xds.stream_refused", status=exc.status, error=str(exc)[:500])
            with contextlib.suppress(ClientGone):
                await end_call(context, grpc.StatusCode[exc.status], str(exc))
        except NodeProblem as exc:
            metrics.STREAMS_REFUSED.labels("node").inc()
            warn(budget, "xds.protocol_error", error=str(exc))
            with contextlib.suppress(ClientGone):
                await end_call(context, grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        except LimitError as exc:
            metrics.STREAMS_REFUSED.labels(exc.reason).inc()
            warn(budget, "xds.limit_exceeded", status=exc.status, error=str(exc))
            with contextlib.suppress(ClientGone):
                await end_call(context, grpc.StatusCode[exc.status], str(exc))
        except CredentialExpired as exc:
            log.info("xds.credential_expired", hint="the client reconnects with its current "
                     "credential")
            with contextlib.suppress(ClientGone):
                await end_call(context, grpc.StatusCode.UNAVAILABLE, str(exc))
        except ClientGone as exc:
            log.info("xds.client_gone", error=str(exc)[:200], hint=_GONE)
        except asyncio.CancelledError:  # gRPC ends the handler of a call the client left
            if run.left_mid_write():
                log.info("xds.client_gone", error="cancelled during a write", hint=_GONE)
            raise
        except grpc.aio.AbortError:
            raise
        except Exception:
            log.exception("xds.stream_failed")
            raise
        finally:
            closing.cancel()
            if expiry is not None:
                expiry.cancel()
            await run.stop()
            if self.observers is not None:
                self.observers.closed(stream)
            self.registry.remove(stream)
            self.settle.closed(stream.stream_id)
            metrics.CONNECTED_PROXIES.labels(stream.protocol).dec()
            if stream.proxy is not None:  # bound by the reader, in its own context
                structlog.contextvars.bind_contextvars(node_id=stream.proxy.node_id)
            log.info("xds.stream_closed", **({"suppressed_logs": budget.suppressed}
                                              if budget.suppressed else {}))
            structlog.contextvars.unbind_contextvars("stream_id", "node_id", "api", "protocol")


def _expiry(run: StreamRun, caller: Caller | None) -> asyncio.TimerHandle | None:
    """A timer (not a task) that ends the stream when its credential expires, so a revoked
    one (a deleted pod's token) stops being served within its lifetime."""
    if caller is None or caller.expires is None:
        return None
    left = (caller.expires - datetime.now(UTC)).total_seconds()
    return asyncio.get_running_loop().call_later(max(left, 0.0), run.expire)


async def create_server(address: str, xds: XdsServer,
                        credentials: grpc.ServerCredentials | None = None,
                        extra: Sequence[grpc.GenericRpcHandler] = (),
                        max_connection_age: float = 0.0,
                        max_connection_age_grace: float = 0.0,
                        ) -> tuple[grpc.aio.Server, int]:
    """Bind ``HOST:PORT`` (port 0 picks a free one), over TLS with ``credentials``;
    returns the started server and its port. ``extra``: more services (CSDS), listed
    with the xDS ones by server reflection. ``max_connection_age`` (seconds, 0: none):
    gRPC sends a connection GOAWAY at that age (+/-10% jitter) and ends its streams
    ``max_connection_age_grace`` later, so clients reconnect and spread over replicas."""
    aged = [("grpc.max_connection_age_ms", int(max_connection_age * 1000)),
            ("grpc.max_connection_age_grace_ms", int(max_connection_age_grace * 1000)),
            ] if max_connection_age > 0 else []
    server = grpc.aio.server(options=[
        *aged,
        ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
        ("grpc.max_receive_message_length", xds.limits.max_request_bytes),
        ("grpc.keepalive_time_ms", 30_000),
        ("grpc.keepalive_timeout_ms", 10_000),
        ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
        ("grpc.keepalive_permit_without_calls", 1),
        # No BDP pings on every data read: xDS messages are small or come once; 1000
        # streams x 1 change: server CPU 0.346/0.314 -> 0.320/0.292 s per change (2 runs).
        ("grpc.http2.bdp_probe", 0),
    ])
    server.add_generic_rpc_handlers(xds.handlers())
    if extra:
        server.add_generic_rpc_handlers(list(extra))
    reflection.enable(server, [*SERVICES, *(h.service_name() for h in extra)])
    port = server.add_insecure_port(address) if credentials is None \
        else server.add_secure_port(address, credentials)
    if port == 0:
        raise OSError(f"cannot bind the xDS server to {address}; is the port in use?")
    await server.start()
    return server, port
