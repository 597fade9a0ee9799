"""The Client Status Discovery Service on the xDS port: what every connected proxy is
served, and whether it took it (``envoy.service.status.v3``), for ``controlplane
status``, ``grpcurl`` and any other CSDS client.

Thin gRPC edge over ``csds_config``: it picks the proxies a request names, reads their
streams on the event loop (their state changes there), and answers one ClientStatus-
Response. Bounded: a StreamClientStatus client gets at most one answer per 100 ms (requests
in between are coalesced into the latest), and an answer larger than ``max_bytes`` is
sent without resource contents, or refused (RESOURCE_EXHAUSTED) if it is still too large.

Who may ask: with an authenticator (``--authentication token``), a caller whose credential's
namespace is ``status_namespace`` (the control plane's own); without one, anyone who can
reach the port (as for xDS itself).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable
from typing import Any, NoReturn

import grpc
import structlog
from envoy.service.status.v3 import csds_pb2
from envoy.type.matcher.v3 import node_pb2

from controlplane.cache.cache import ConfigWatcher
from controlplane.cache.snapshot import TypeSnapshot
from controlplane.security.authn import AuthError
from controlplane.server.admission import Admission
from controlplane.server.csds_config import Proxy, client_config, proxies
from controlplane.server.limits import LogBudget
from controlplane.server.registry import StreamRegistry
from controlplane.server.session import warn
from controlplane.server.stream import StreamBase

log = structlog.get_logger("controlplane.csds")

SERVICE = "envoy.service.status.v3.ClientStatusDiscoveryService"
STREAM_INTERVAL = 0.1  # seconds between two answers on one StreamClientStatus
MAX_ANSWER_BYTES = 64 * 1024 * 1024
MAX_MATCHERS = 64
_YIELD_EVERY = 50  # proxies rendered between two yields to the event loop


class BadRequest(Exception):
    """A request CSDS cannot answer: INVALID_ARGUMENT with this text."""


class AckedConfigs:
    """A StreamObserver that keeps, per stream and type, the snapshot whose version the
    proxy last ACKed, so CSDS can show what it holds beside what it is served (after a
    NACK they differ). O(1) per ACK; dropped with the stream."""

    def __init__(self) -> None:
        self._held: dict[int, dict[str, TypeSnapshot]] = {}

    def acked(self, stream: StreamBase, type_url: str) -> None:
        snapshot = stream.snapshot
        typed = snapshot.get(type_url) if snapshot is not None else None
        state = stream.type_states().get(type_url)
        if typed is not None and state is not None and typed.version == state.acked_version:
            self._held.setdefault(stream.stream_id, {})[type_url] = typed

    def nacked(self, stream: StreamBase, type_url: str, error: str) -> None:
        """Nothing to keep: the proxy still holds what it last ACKed."""

    def closed(self, stream: StreamBase) -> None:
        self._held.pop(stream.stream_id, None)

    def held(self, proxy: Proxy) -> dict[str, TypeSnapshot]:
        found: dict[str, TypeSnapshot] = {}
        for type_url, stream in proxy.types.items():
            typed = self._held.get(stream.stream_id, {}).get(type_url)
            if typed is not None:
                found[type_url] = typed
        return found

    def __len__(self) -> int:
        return len(self._held)


def node_filter(request: csds_pb2.ClientStatusRequest) -> Callable[[str], bool]:
    """Which node ids a request asks for (every one without matchers); BadRequest for a
    matcher this server does not evaluate."""
    matchers = list(request.node_matchers)
    if len(matchers) > MAX_MATCHERS:
        raise BadRequest(f"{len(matchers)} node_matchers, more than {MAX_MATCHERS}; ask "
                         "for fewer nodes, or for all of them with none")
    tests = [_node_test(m) for m in matchers]
    if not tests:
        return lambda _node_id: True
    return lambda node_id: any(test(node_id) for test in tests)


def _node_test(matcher: node_pb2.NodeMatcher) -> Callable[[str], bool]:
    if matcher.node_metadatas:
        raise BadRequest("node_matchers.node_metadatas is not supported; match the node "
                         "id (exact, prefix, suffix or contains)")
    string = matcher.node_id
    kind = string.WhichOneof("match_pattern")
    if kind is None:
        return lambda _node_id: True
    if kind not in ("exact", "prefix", "suffix", "contains"):
        raise BadRequest(f"node_matchers.node_id.{kind} is not supported; use exact, "
                         "prefix, suffix or contains")
    wanted: str = getattr(string, kind)
    fold = string.ignore_case

    def test(node_id: str) -> bool:
        text, pattern = (node_id.lower(), wanted.lower()) if fold else (node_id, wanted)
        if kind == "exact":
            return text == pattern
        if kind == "prefix":
            return text.startswith(pattern)
        if kind == "suffix":
            return text.endswith(pattern)
        return pattern in text
    return test


class ClientStatus:
    """The CSDS servicer of one xDS server."""

    def __init__(self, registry: StreamRegistry, watcher: ConfigWatcher, identifier: str,
                 admission: Admission | None = None,
                 status_namespace: str = "controlplane-system",
                 acked: AckedConfigs | None = None,
                 max_bytes: int = MAX_ANSWER_BYTES) -> None:
        self.registry = registry
        self.watcher = watcher
        self.identifier = identifier
        self.admission = admission
        self.status_namespace = status_namespace
        self.acked = acked
        self.max_bytes = max_bytes
        self.refusals = LogBudget(10.0)

    def handlers(self) -> list[grpc.GenericRpcHandler]:
        parse = _parser()
        return [grpc.method_handlers_generic_handler(SERVICE, {
            "StreamClientStatus": grpc.stream_stream_rpc_method_handler(
                self._stream, request_deserializer=parse, response_serializer=_identity),
            "FetchClientStatus": grpc.unary_unary_rpc_method_handler(
                self._fetch, request_deserializer=parse, response_serializer=_identity),
        })]

    async def answer(self, request: csds_pb2.ClientStatusRequest) -> bytes:
        """The encoded ClientStatusResponse to ``request``; BadRequest if it cannot be
        answered (too large even without contents, an unsupported matcher)."""
        wanted = node_filter(request)
        contents = not request.exclude_resource_contents
        configs = await self._configs(wanted, contents)
        body: bytes = csds_pb2.ClientStatusResponse(config=configs).SerializeToString()
        if len(body) > self.max_bytes and contents:
            configs = await self._configs(wanted, False)
            body = csds_pb2.ClientStatusResponse(config=configs).SerializeToString()
        if len(body) > self.max_bytes:
            raise _TooLarge(f"the status of {len(configs)} proxies is {len(body)} bytes, "
                            f"more than {self.max_bytes}; ask for fewer nodes "
                            "(node_matchers, controlplane status --node)")
        return body

    async def _configs(self, wanted: Callable[[str], bool],
                       contents: bool) -> list[csds_pb2.ClientConfig]:
        found = proxies(self.registry.streams())
        configs: list[csds_pb2.ClientConfig] = []
        for index, node_id in enumerate(sorted(found)):
            if not wanted(node_id):
                continue
            if index and index % _YIELD_EVERY == 0:
                await asyncio.sleep(0)  # other streams go on between big batches
            proxy = found[node_id]
            stream = next(iter(proxy.types.values()), None)
            identity = stream.proxy if stream is not None else None
            current = self.watcher.current(identity) if identity is not None else None
            held = self.acked.held(proxy) if self.acked is not None else {}
            configs.append(client_config(proxy, current, self.identifier, held, contents))
        return configs

    async def _admit(self, context: grpc.aio.ServicerContext) -> None:
        """Nothing when the caller may read the status; else the call ends with
        UNAUTHENTICATED or PERMISSION_DENIED and a message saying what to do."""
        admission = self.admission
        if admission is None or admission.authenticator is None:
            return
        try:
            caller = await admission.authenticate(context.invocation_metadata())
        except AuthError as exc:
            await self._refuse(context, exc.status, _for_status(exc.message))
        assert caller is not None
        own = caller.identity.namespace
        if own != self.status_namespace:
            await self._refuse(
                context, "PERMISSION_DENIED",
                f"the client status is for the control plane's operators: the credential "
                f"is of namespace {own!r}, not {self.status_namespace!r} "
                "(--status-namespace); use a token of that namespace (file mode: "
                f"controlplane bootstrap --namespace {self.status_namespace} --ca-dir DIR "
                "--token-file FILE ...)")

    async def _refuse(self, context: grpc.aio.ServicerContext, status: str,
                      message: str) -> NoReturn:
        warn(self.refusals, "csds.refused", status=status, error=message[:500],
             peer=context.peer())
        await context.abort(grpc.StatusCode[status], message)
        raise AssertionError("grpc.aio's abort raises")

    async def _fetch(self, request: Any, context: grpc.aio.ServicerContext) -> bytes:
        await self._admit(context)
        return await self._answer_or_abort(request, context)

    async def _answer_or_abort(self, request: Any, context: grpc.aio.ServicerContext) -> bytes:
        if isinstance(request, BadRequest):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(request))
        try:
            body: bytes = await self.answer(request)
            return body
        except _TooLarge as exc:
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, str(exc))
        except BadRequest as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        raise AssertionError("grpc.aio's abort raises")

    async def _stream(self, requests: AsyncIterator[Any],
                      context: grpc.aio.ServicerContext) -> AsyncIterator[bytes]:
        await self._admit(context)
        latest: list[Any] = []
        arrived = asyncio.Event()

        async def read() -> None:
            async for request in requests:
                latest[:] = [request]  # a burst keeps only its last request
                arrived.set()

        reader = asyncio.ensure_future(read())
        try:
            while True:
                waiting = asyncio.ensure_future(arrived.wait())
                await asyncio.wait({waiting, reader}, return_when=asyncio.FIRST_COMPLETED)
                waiting.cancel()
                if not arrived.is_set():
                    reader.result()  # the client's EOF (or its error)
                    return
                arrived.clear()
                started = time.monotonic()
                yield await self._answer_or_abort(latest.pop(), context)
                await asyncio.sleep(max(0.0, STREAM_INTERVAL - (time.monotonic() - started)))
        finally:
            reader.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await reader


class _TooLarge(Exception):
    pass


def _for_status(message: str) -> str:
    """An authentication error of the xDS port, told for a status client."""
    return (f"{message} (for controlplane status: --token-file FILE with a token of the "
            "control plane's namespace)")


def _parser() -> Callable[[bytes], Any]:
    def parse(data: bytes) -> Any:
        try:
            return csds_pb2.ClientStatusRequest.FromString(data)
        except Exception as exc:
            return BadRequest(f"the request is not a valid ClientStatusRequest "
                              f"({str(exc)[:200]}); send envoy.service.status.v3 messages")
    return parse


def _identity(data: bytes) -> bytes:
    return data
