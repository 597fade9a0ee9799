"""Which mesh objects the proxies reject now: an observer of the streams' NACKs.

A NACK is kept per (stream, type) until that stream ACKs the type again or ends; it
names the services its resources come from (``origins.py``) and, through ``resolve``,
the policy objects that shaped them (a TrafficPolicy, a SecurityPolicy; the Service
itself always). ``by_policy()`` is what the Kubernetes source writes to a policy's
``Programmed`` condition; ``summary()`` is ``/debug/rejections``.

An ACK is the commonest request (a thousand per change at a thousand streams): it costs
two dict operations here. The work of finding origins is done per NACK, and once per
distinct (type, rejected version, ACKed version, own service), however many proxies
send it. Bounded: an error is kept to ``MAX_ERROR`` characters, at most ``max_origins``
distinct (type, service) origins are tracked (more are counted, not kept), and entries
are bounded by the connected streams.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final, Protocol

import structlog

from controlplane import metrics, resource
from controlplane.cache.snapshot import Snapshot, TypeSnapshot
from controlplane.observe import origins
from controlplane.proxy import ProxyIdentity

log = structlog.get_logger("controlplane.observe")

MAX_ERROR: Final = 1024
MAX_ORIGINS: Final = 1000
LOG_LINES_PER_SECOND: Final = 20  # xds.nack_origin lines, all streams together
_MEMO: Final = 16
PolicyKey = tuple[str, str, str]  # (kind, namespace, name)
Resolve = Callable[[str], Sequence[PolicyKey]]  # a service ("ns/name") -> its policies


class _TypeState(Protocol):
    sent_version: str
    acked_version: str
    nacked_version: str


class ObservedStream(Protocol):
    """What an observer reads of a stream (controlplane/server/stream.py's StreamBase)."""

    stream_id: int
    proxy: ProxyIdentity | None
    snapshot: Snapshot | None

    def type_states(self) -> Mapping[str, _TypeState]: ...


@dataclass(frozen=True)
class Rejected:
    """How one policy object fares: how many proxies reject what it shaped, the latest
    Envoy error, the types rejected (short names: cds, lds, ...)."""

    proxies: int
    error: str
    types: list[str]


@dataclass(frozen=True, slots=True)
class _Entry:
    node_id: str
    type_url: str
    version: str
    error: str
    services: tuple[str, ...]
    at: float


class Rejections:
    """The StreamObserver that keeps the NACKs standing now, by origin."""

    def __init__(self, resolve: Resolve | None = None, max_origins: int = MAX_ORIGINS,
                 clock: Callable[[], float] = time.time) -> None:
        self.resolve = resolve
        self.max_origins = max_origins
        self.clock = clock
        # Called (on the event loop) when by_policy() may have changed; debounced by it.
        self.on_change: Callable[[], None] | None = None
        self.dropped = 0  # origins not tracked: past max_origins
        self._acked: dict[tuple[int, str], TypeSnapshot] = {}
        self._entries: dict[tuple[int, str], _Entry] = {}
        self._refs: dict[tuple[str, str], int] = {}  # (type, service) -> entries naming it
        self._memo: dict[tuple[str, str, str, str | None], tuple[str, ...]] = {}
        self._shown = -1
        self._log_second = 0
        self._log_lines = 0
        self._suppressed = 0

    # StreamObserver

    def acked(self, stream: ObservedStream, type_url: str) -> None:
        key = (stream.stream_id, type_url)
        snapshot = stream.snapshot
        typed = snapshot.types.get(type_url) if snapshot is not None else None
        if typed is not None and self._acked.get(key) is not typed:
            state = stream.type_states().get(type_url)
            if state is not None and state.acked_version == typed.version:
                self._acked[key] = typed
        if key in self._entries:
            # Cleared when the proxy holds what was last sent; a request that only says
            # it still holds an older version (SotW, new names after a NACK) is no fix.
            state = stream.type_states().get(type_url)
            if state is None or state.acked_version == state.sent_version:
                self._drop(key)
                self._changed()

    def nacked(self, stream: ObservedStream, type_url: str, error: str) -> None:
        key = (stream.stream_id, type_url)
        proxy = stream.proxy
        state = stream.type_states().get(type_url)
        version = state.nacked_version if state is not None else ""
        snapshot = stream.snapshot
        typed = snapshot.types.get(type_url) if snapshot is not None else None
        nacked = typed if typed is not None and typed.version == version else None
        services = self._origins(type_url, error, nacked, self._acked.get(key), proxy)
        entry = _Entry(proxy.node_id if proxy is not None else "", type_url, version,
                       error[:MAX_ERROR], services, self.clock())
        old = self._entries.get(key)
        if old is not None and (old.version, old.error, old.services) == (
                entry.version, entry.error, entry.services):
            return  # the same rejection again
        if old is not None:
            self._drop(key)
        services = self._admit(type_url, services)
        self._entries[key] = _Entry(entry.node_id, type_url, version, entry.error, services,
                                    entry.at)
        self._log(type_url, version, services)
        self._changed()

    def closed(self, stream: ObservedStream) -> None:
        gone = False
        for type_url in resource.PUSH_ORDER:
            key = (stream.stream_id, type_url)
            self._acked.pop(key, None)
            if key in self._entries:
                self._drop(key)
                gone = True
        if gone:
            self._changed()

    # Views

    def origin(self, stream_id: int, type_url: str) -> str:
        """The origin of a stream's standing NACK of ``type_url``, for a log line."""
        entry = self._entries.get((stream_id, type_url))
        return origins.shown(entry.services) if entry is not None else "unknown"

    def by_policy(self) -> dict[PolicyKey, Rejected]:
        """Every object (Services included) some proxy rejects what it shaped of."""
        nodes: dict[PolicyKey, set[str]] = {}
        types: dict[PolicyKey, set[str]] = {}
        latest: dict[PolicyKey, _Entry] = {}
        for entry in self._entries.values():
            for key in self._policies(entry.services):
                nodes.setdefault(key, set()).add(entry.node_id)
                types.setdefault(key, set()).add(resource.short_name(entry.type_url))
                if key not in latest or entry.at >= latest[key].at:
                    latest[key] = entry
        return {key: Rejected(len(nodes[key]), latest[key].error, sorted(types[key]))
                for key in sorted(nodes)}

    def proxies(self) -> int:
        """Proxies whose latest response of some type is rejected."""
        return len({entry.node_id for entry in self._entries.values()})

    def summary(self) -> dict[str, Any]:
        """``/debug/rejections``: each standing NACK with its origin, and per object."""
        rejections = [
            {"node_id": e.node_id, "stream_id": stream_id, "type": resource.short_name(t),
             "version": e.version, "error": e.error, "at": e.at,
             "services": list(e.services),
             "policies": [{"kind": k, "namespace": n, "name": m}
                          for k, n, m in self._policies(e.services)]}
            for (stream_id, t), e in sorted(self._entries.items(),
                                             key=lambda item: -item[1].at)]
        objects = [{"kind": k, "namespace": n, "name": m, "proxies": r.proxies,
                    "types": r.types, "error": r.error}
                   for (k, n, m), r in self.by_policy().items()]
        return {"proxies": self.proxies(), "rejections": rejections, "objects": objects,
                "untracked_origins": self.dropped}

    # Internals

    def _policies(self, services: Sequence[str]) -> list[PolicyKey]:
        found: dict[PolicyKey, None] = {}
        for service in services:
            namespace, _, name = service.partition("/")
            found.setdefault(("Service", namespace, name), None)
            if self.resolve is not None:
                try:
                    resolved = self.resolve(service)
                except Exception:  # a source's bug must not reach the stream
                    log.exception("rejections.resolve_failed", service=service,
                                  hint="the rejection is kept under its service; report this")
                    resolved = ()
                for key in resolved:
                    found.setdefault(key, None)
        return list(found)

    def _origins(self, type_url: str, error: str, nacked: TypeSnapshot | None,
                 acked: TypeSnapshot | None, proxy: ProxyIdentity | None) -> tuple[str, ...]:
        """What the error names (a bounded text, scanned each time), else what changed
        between the versions: memoized, so a change every proxy rejects is looked into
        once."""
        named = origins.in_error(error[:MAX_ERROR], proxy)
        if named:
            return tuple(named[:origins.MAX_SERVICES])
        own = origins.own_service(proxy)
        memo_key = (type_url, nacked.version if nacked else "",
                    acked.version if acked else "", own)
        found = self._memo.get(memo_key)
        if found is None:
            found = tuple(origins.changed(type_url, nacked, acked, proxy))
            if len(self._memo) >= _MEMO:
                self._memo.clear()
            self._memo[memo_key] = found
        return found

    def _log(self, type_url: str, version: str, services: tuple[str, ...]) -> None:
        """One warning per new rejection, at most ``LOG_LINES_PER_SECOND`` in all (the
        rest are counted and said with the next line)."""
        second = int(self.clock())
        if second != self._log_second:
            self._log_second, self._log_lines = second, 0
        if self._log_lines >= LOG_LINES_PER_SECOND:
            self._suppressed += 1
            return
        self._log_lines += 1
        dropped, self._suppressed = self._suppressed, 0
        log.warning("xds.nack_origin", type=resource.short_name(type_url), version=version,
                    origin=origins.shown(services),
                    policies=[f"{k}/{n}/{m}" for k, n, m in self._policies(services)
                              if k != "Service"],
                    hint="the proxy keeps its last accepted version; fix the object named "
                    "in origin (see /debug/rejections)",
                    **({"suppressed_before": dropped} if dropped else {}))

    def _admit(self, type_url: str, services: tuple[str, ...]) -> tuple[str, ...]:
        """The services that fit within ``max_origins`` (counted from here on)."""
        kept = []
        for service in services:
            origin = (type_url, service)
            count = self._refs.get(origin)
            if count is None and len(self._refs) >= self.max_origins:
                self.dropped += 1
                continue
            self._refs[origin] = (count or 0) + 1
            kept.append(service)
        return tuple(kept)

    def _drop(self, key: tuple[int, str]) -> None:
        entry = self._entries.pop(key)
        for service in entry.services:
            origin = (entry.type_url, service)
            left = self._refs.get(origin, 0) - 1
            if left > 0:
                self._refs[origin] = left
            else:
                self._refs.pop(origin, None)

    def _changed(self) -> None:
        shown = self.proxies()
        if shown != self._shown:
            self._shown = shown
            metrics.PROXY_NACKS.set(shown)
        if self.on_change is not None:
            try:
                self.on_change()
            except Exception:
                log.exception("rejections.on_change_failed",
                              hint="policy status may lag; report this")
