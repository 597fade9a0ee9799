"""One stream's life: a reader loop and a snapshot loop, writing under one lock.

Each loop awaits one thing (the next request, the group's next snapshot) and hands it
to the protocol logic; what that returns is written before the lock is let go, so
responses go out in the order of the events that caused them. No event waits on a set
of futures and no task is made per event: at a thousand streams that overhead was a
good part of the server's CPU per change.

A slow reader holds its own lock while its write waits, and its snapshot loop then
takes the group's *latest* snapshot: it skips versions it never got to, it does not
queue them. Between two events the loops keep no request and no encoded response.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from typing import Any

import grpc
import structlog

from controlplane import metrics, resource
from controlplane.cache.cache import ConfigWatcher
from controlplane.cache.snapshot import Snapshot
from controlplane.proxy import ProxyIdentity
from controlplane.server.limits import LogBudget
from controlplane.server.observer import Observers
from controlplane.server.stream import MalformedRequest, Push, StreamBase
from controlplane.server.writes import ClientGone, WriteTurns, write_now

log = structlog.get_logger("controlplane.xds")
# Labelled children, looked up once (a lookup per push was measurable at 1000 streams).
_PUSH_COUNTERS: dict[str, tuple[Any, Any]] = {}
_REQUEST_COUNTERS: dict[tuple[str, str], Any] = {}


class Tally:
    """Counter increments, added to Prometheus once per turn of the event loop: a change
    at a thousand streams is three thousand increments (a push, its bytes, the ACK),
    each taking the counter's lock; summed first, they are a handful."""

    def __init__(self) -> None:
        self._pending: dict[Any, float] = {}

    def add(self, counter: Any, amount: float = 1.0) -> None:
        pending = self._pending
        if not pending:
            asyncio.get_running_loop().call_soon(self.flush)
        pending[counter] = pending.get(counter, 0.0) + amount

    def flush(self) -> None:
        pending, self._pending = self._pending, {}
        for counter, amount in pending.items():
            counter.inc(amount)


TALLY = Tally()


class Malformed:
    """A request that did not parse; the stream ends with INVALID_ARGUMENT."""

    def __init__(self, kind: str, error: str) -> None:
        self.message = MalformedRequest.of(kind, error).args[0]


def warn(budget: LogBudget, event: str, **fields: Any) -> None:
    """A warning the client caused, within its stream's budget of log lines."""
    dropped = budget.take()
    if dropped is None:
        return
    if dropped:
        fields["suppressed_before"] = dropped
    log.warning(event, **fields)


class CredentialExpired(Exception):
    """The stream's credential expired: it ends (UNAVAILABLE) and the client reconnects
    with its current one (Envoy reads its token file again for each new stream)."""


class StreamRun:
    """The two loops of one stream and what they share. ``ended`` completes when the
    client ends the stream (EOF), or holds the exception that ended it."""

    def __init__(self, stream: StreamBase, context: grpc.aio.ServicerContext,
                 watcher: ConfigWatcher, turns: WriteTurns, budget: LogBudget) -> None:
        self.stream = stream
        self.context = context
        self.watcher = watcher
        self.turns = turns
        self.budget = budget
        self.lock = asyncio.Lock()
        self.ended: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.connected: ProxyIdentity | None = None
        # The stream's workload, from its credential (server/admission.py): raises when
        # the node is not the caller's. None: no identities.
        self.admit: Callable[[ProxyIdentity], ProxyIdentity] | None = None
        self.identities = watcher.identities
        self._loop = asyncio.get_running_loop()
        self._moves: asyncio.Task[None] | None = None  # re-resolving after a pod changed
        self._again = False
        self.writing = False  # a write is under way
        self._reader: asyncio.Task[None] | None = None
        self._snapshots: asyncio.Task[None] | None = None
        self.observers: Observers | None = None  # told of ACKs and NACKs (observer.py)

    def start(self) -> None:
        self._reader = asyncio.ensure_future(self._read())

    def left_mid_write(self) -> bool:
        """Whether the stream ended, or is being ended, because the client left during a
        write (gRPC may cancel the handler before the failed write says so)."""
        if self.ended.done() and not self.ended.cancelled():
            return isinstance(self.ended.exception(), ClientGone)
        return self.writing

    async def stop(self) -> None:
        """End both loops and leave the group."""
        stream = self.stream
        if stream.declared is not None:
            self.identities.unfollow(stream.declared.node_id, stream.stream_id)
        for task in (self._reader, self._moves, self._snapshots):
            if task is not None:
                task.cancel()
                with contextlib.suppress(BaseException):
                    await task
        if self.connected is not None:
            self.watcher.disconnect(self.connected)
            self.connected = None
        if self.ended.done() and not self.ended.cancelled():
            self.ended.exception()  # retrieved: asyncio would warn of it otherwise

    def expire(self) -> None:
        """The credential this stream was admitted with is no longer valid."""
        self._end(CredentialExpired(
            "the credential this stream was opened with has expired; reconnect with the "
            "current one (Envoy reads its token file again on every new stream)"))

    def _end(self, error: BaseException | None) -> None:
        if self.ended.done():
            return
        if error is None:
            self.ended.set_result(None)
        else:
            self.ended.set_exception(error)

    async def _read(self) -> None:
        stream = self.stream
        try:
            while True:
                request = await self.context.read()
                if request is grpc.aio.EOF:
                    self._end(None)
                    return
                if isinstance(request, Malformed):
                    raise MalformedRequest(request.message)
                acked = stream.quick_ack(request)
                if acked is not None:  # the common case: no lock, nothing to write
                    del request
                    _count(acked, "ack")
                    if self.observers is not None:
                        self.observers.acked(stream, acked)
                    continue
                async with self.lock:
                    pushes = self._on_request(request)
                    del request
                    await self._write_all(pushes)
                if self._snapshots is None and stream.proxy is not None:
                    self._join(stream.proxy)
        except asyncio.CancelledError:
            raise
        except BaseException as exc:
            self._end(exc)

    def _join(self, declared: ProxyIdentity) -> None:
        """Join the group of ``declared`` as the mesh resolves it (its pod's zone and
        service: cache/identities.py), and follow its pod for changes."""
        stream = self.stream
        stream.declared = declared
        self.identities.follow(declared.node_id, stream.stream_id, self._pod_changed)
        proxy = stream.proxy = self.identities.resolve(declared)
        if proxy is not declared:
            log.info("xds.identity_resolved", group=proxy.group, zone=proxy.zone,
                     service=proxy.service)
        self.connected = proxy
        self.watcher.connect(proxy)
        self._snapshots = asyncio.ensure_future(self._follow(proxy))

    def _pod_changed(self) -> None:
        """The index changed this stream's pod (called by the pipeline, on any thread)."""
        self._loop.call_soon_threadsafe(self._schedule_move)

    def _schedule_move(self) -> None:
        self._again = True
        if self._moves is None or self._moves.done():
            self._moves = asyncio.ensure_future(self._move())

    async def _move(self) -> None:
        """Resolve again; a stream whose group changed leaves the old one and follows the
        new one, whose snapshot it is then sent as a change (SotW: the types that differ;
        delta: the diff against what the client holds). The stream stays open."""
        try:
            while self._again:
                self._again = False
                async with self.lock:
                    self._rejoin()
        except asyncio.CancelledError:
            raise
        except BaseException as exc:
            self._end(exc)

    def _rejoin(self) -> None:
        stream, old = self.stream, self.connected
        if old is None or stream.declared is None or self.ended.done():
            return
        proxy = self.identities.resolve(stream.declared)
        if proxy.group == old.group:
            return
        if self._snapshots is not None:
            self._snapshots.cancel()  # it waits for the old group's snapshot, or our lock
        stream.proxy = self.connected = proxy
        self.watcher.connect(proxy)
        self.watcher.disconnect(old)
        self._snapshots = asyncio.ensure_future(self._follow(proxy))
        log.info("xds.identity_moved", group=proxy.group, previous=old.group,
                 zone=proxy.zone, service=proxy.service)

    async def _follow(self, proxy: ProxyIdentity) -> None:
        snapshot: Snapshot | None = None
        try:
            while True:
                snapshot = await self.watcher.next_snapshot(proxy, snapshot)
                async with self.lock:
                    # The latest: a stream that was busy writing skips what it missed.
                    snapshot = self.watcher.current(proxy) or snapshot
                    await self._write_all(self.stream.on_snapshot(snapshot))
        except asyncio.CancelledError:
            raise
        except BaseException as exc:
            self._end(exc)

    async def _write_all(self, pushes: list[Push]) -> None:
        """Write in order; each push is encoded when its turn comes and dropped after."""
        pushes.reverse()
        turns = self.turns
        while pushes:
            push = pushes.pop()
            self.writing = True
            if turns.waits(push):
                await turns.write(self.context, push)
            else:  # (one coroutine less per push: most are small)
                await write_now(self.context, push.encode())
            self.writing = False
            _sent(push)

    def _on_request(self, request: Any) -> list[Push]:
        stream = self.stream
        is_new = stream.node is None
        handled = stream.on_request(request)
        if is_new and stream.proxy is not None and self.admit is not None:
            stream.proxy = self.admit(stream.proxy)  # before anything is sent or joined
        if is_new and stream.proxy is not None:
            structlog.contextvars.bind_contextvars(node_id=stream.proxy.node_id)
            log.info("xds.stream_opened", group=stream.proxy.group,
                     **({"workload": stream.proxy.workload} if stream.proxy.workload else {}))
        # A type URL the client made up is not a label: the series would be the client's.
        short = _count("" if handled.kind == "unknown_type" else handled.type_url,
                       handled.kind)
        if handled.kind == "nack":
            metrics.NACKS.labels(short).inc()
            warn(self.budget, "xds.nack", type=short, error=handled.error[:2048],
                 version=stream.type_states()[handled.type_url].nacked_version)
        elif handled.kind == "unknown_type":
            warn(self.budget, "xds.unknown_type", type=handled.type_url,
                 hint="this server serves clusters, endpoints, listeners, routes, secrets")
        observers = self.observers
        if observers is not None:
            if handled.kind == "ack":
                observers.acked(stream, handled.type_url)
            elif handled.kind == "nack":
                observers.nacked(stream, handled.type_url, handled.error)
        return handled.pushes


def _count(type_url: str, kind: str) -> str:
    """Count a request (of a type this server serves, or ""); its type's short name."""
    short = resource.short_name(type_url) if type_url else "unknown"
    counter = _REQUEST_COUNTERS.get((short, kind))
    if counter is None:
        counter = _REQUEST_COUNTERS[short, kind] = metrics.REQUESTS.labels(short, kind)
    TALLY.add(counter)
    return short


def _sent(push: Push) -> None:
    short = resource.short_name(push.type_url)
    counters = _PUSH_COUNTERS.get(short)
    if counters is None:
        counters = _PUSH_COUNTERS[short] = (metrics.PUSHES.labels(short),
                                            metrics.PUSH_BYTES.labels(short))
    TALLY.add(counters[0])
    TALLY.add(counters[1], push.size)
    log.debug("xds.push", type=short, version=push.version, nonce=push.nonce,
              resources=len(push.names), removed=len(push.removed), bytes=push.size)
