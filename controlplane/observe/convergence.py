"""How long a change takes to reach the proxies, measured by the server.

The pipeline says what each publish changed (group -> type -> version) and when its
source saw the change; the streams say when a proxy ACKs (server/observer.py). A proxy
has converged on a change once it ACKed every changed type it subscribes to; the change
is complete once every stream connected at publish time has (or left). Each ACK costs a
few dict lookups: a change at a thousand sidecars is a thousand ACKs per type.

A newer change to the same group and type supersedes an older one still pending: a
stream that ACKs the newer version got the older change too, and is credited for both,
each from its own source event. A stream that takes the new snapshot and is sent nothing
of a type (nothing it subscribes to changed) is not waited for on that type.
"""

from __future__ import annotations

import asyncio
import contextvars
import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import structlog

from controlplane import metrics
from controlplane.observe.changes import (
    MAX_LAGGARDS,
    TYPE_LABELS,
    Change,
    ObservedStream,
    Waiter,
)

log = structlog.get_logger("controlplane.convergence")

MAX_PENDING = 64  # changes followed at once; the oldest is dropped beyond
KEEP_DONE = 32  # ended changes kept for /debug/changes
_HINT = ("they keep their previous config: look for a NACK (controlplane status, "
         "/debug/proxies last_nack) or a stuck or overloaded sidecar (its /config_dump and "
         "logs); a proxy that reconnects gets the current config")


class Convergence:
    """Follows each published change until the affected proxies ACKed it (one per
    server process). ``streams`` lists the open streams; ``clock`` is wall-clock time,
    comparable with the sources' event times."""

    def __init__(self, streams: Callable[[], Iterable[ObservedStream]] = tuple,
                 warn_after: float = 30.0, clock: Callable[[], float] = time.time,
                 max_pending: int = MAX_PENDING, keep: int = KEEP_DONE) -> None:
        self.streams = streams
        self.warn_after = warn_after
        self._clock = clock
        self._max_pending = max_pending
        self._pending: dict[int, Change] = {}  # by sequence, oldest first
        self._sequence = 0
        self._done: deque[Change] = deque(maxlen=keep)
        # (group, type URL) -> version -> the pending changes an ACK of it completes
        self._index: dict[tuple[str, str], dict[str, list[Change]]] = {}
        self._last: dict[int, tuple[int, float]] = {}  # stream id -> its last change
        self._histograms = {t: metrics.CONVERGENCE_SECONDS.labels(label)
                            for t, label in TYPE_LABELS.items()}

    # The pipeline's side.

    def published(self, generation: int, observed_at: float,
                  changed: Mapping[str, Mapping[str, str]]) -> None:
        """Generation ``generation`` of the mesh, from a source event at ``observed_at``,
        was published: ``changed`` is group -> {type URL: its new version}."""
        now = self._clock()
        change = Change(generation, observed_at, now)
        for stream in self.streams():
            proxy = stream.proxy
            types = changed.get(proxy.group) if proxy is not None else None
            if proxy is None or not types:
                continue
            states = stream.type_states()
            wanted = {t: v for t, v in types.items() if t in states}
            if wanted:
                change.waiting[stream.stream_id] = Waiter(stream, proxy.node_id,
                                                          proxy.group, wanted)
        change.affected = len(change.waiting)
        if not change.waiting:
            return  # no proxy takes it: nothing to follow
        self._index_change(change, changed)
        self._sequence += 1
        self._pending[self._sequence] = change
        # Streams of groups published first may have ACKed already (the pipeline lets
        # them run between slices of groups).
        for waiter in list(change.waiting.values()):
            self._settle(change, waiter, now)
        while len(self._pending) > self._max_pending:
            oldest = next(iter(self._pending.values()))
            log.warning("change.dropped", generation=oldest.generation,
                        pending=len(oldest.waiting), followed=self._max_pending,
                        hint="more changes are waiting for proxies than are followed; the "
                        "oldest is no longer measured (its proxies may still take it)")
            self._finish(oldest, "dropped")

    def _index_change(self, change: Change, changed: Mapping[str, Mapping[str, str]]) -> None:
        """Enter the change's (group, type, version)s; fold pending older changes of the
        same (group, type) into the new version (superseded)."""
        groups = {w.group for w in change.waiting.values()}
        superseded: dict[int, tuple[Change, set[tuple[str, str]]]] = {}
        for group in groups:
            for type_url, version in changed[group].items():
                versions = self._index.setdefault((group, type_url), {})
                older: list[Change] = []
                for waiting in versions.values():
                    for old in waiting:
                        if old.result or any(old is o for o in older):
                            continue
                        older.append(old)
                        superseded.setdefault(id(old), (old, set()))[1].add((group, type_url))
                        old.keys.append((group, type_url, version))
                versions[version] = [*older, change]
                change.keys.append((group, type_url, version))
        for old, keys in superseded.values():  # their streams now wait for the new version
            for waiter in old.waiting.values():
                for type_url in waiter.types:
                    if (waiter.group, type_url) in keys:
                        waiter.types[type_url] = changed[waiter.group][type_url]

    # The streams' side (server/observer.py's StreamObserver).

    def acked(self, stream: ObservedStream, type_url: str) -> None:
        proxy = stream.proxy
        if proxy is None:
            return
        versions = self._index.get((proxy.group, type_url))
        if versions is None:
            return  # nothing pending for its group and type: the common case
        state = stream.type_states().get(type_url)
        changes = versions.get(state.acked_version) if state is not None else None
        if not changes:
            return
        now = self._clock()
        oldest: float | None = None
        for change in list(changes):
            waiter = change.waiting.get(stream.stream_id)
            if waiter is None or waiter.types.pop(type_url, None) is None:
                continue
            waiter.acked = True
            oldest = change.observed_at if oldest is None else min(oldest, change.observed_at)
            self._settle(change, waiter, now)
        if oldest is not None:
            self._observe(type_url, now - oldest)

    def nacked(self, stream: ObservedStream, type_url: str, error: str) -> None:
        """A NACK does not converge; the stream stays a laggard (rejections.py says why)."""

    def closed(self, stream: ObservedStream) -> None:
        self._last.pop(stream.stream_id, None)
        for change in list(self._pending.values()):
            if change.waiting.pop(stream.stream_id, None) is not None:
                change.gone += 1
                if not change.waiting:
                    self._finish(change, "converged")

    # Time passing.

    def tick(self) -> None:
        """Let go of streams sent nothing, end complete changes, and warn of changes
        not complete after ``warn_after`` seconds (then no longer followed)."""
        now = self._clock()
        for change in list(self._pending.values()):
            for waiter in list(change.waiting.values()):
                self._settle(change, waiter, now)
            if not change.result and now - change.published_at >= self.warn_after:
                self._finish(change, "not_converged")

    async def watch(self, interval: float = 0.5) -> None:
        """``tick`` every ``interval`` seconds, for as long as the process lives."""
        while True:
            await asyncio.sleep(interval)
            try:
                self.tick()
            except Exception:
                log.exception("convergence.tick_failed", hint="a bug; retried next tick")

    def _settle(self, change: Change, waiter: Waiter, now: float) -> None:
        """Drop the types the stream ACKed or was sent nothing of; done when none left.
        A stream that moved to another group (its pod re-resolved) drops out."""
        stream = waiter.stream
        if stream.proxy is None or stream.proxy.group != waiter.group:
            del change.waiting[stream.stream_id]
            change.gone += 1
            if not change.waiting:
                self._finish(change, "converged")
            return
        states = stream.type_states()
        snapshot = stream.snapshot
        for type_url, version in list(waiter.types.items()):
            state = states.get(type_url)
            if state is None:
                del waiter.types[type_url]  # no longer subscribed
            elif state.acked_version == version:  # ACKed before we looked for it
                del waiter.types[type_url]
                waiter.acked = True
                self._observe(type_url, now - change.observed_at)
            elif state.sent_version != version and snapshot is not None:
                typed = snapshot.get(type_url)
                if typed is not None and typed.version == version:
                    del waiter.types[type_url]  # took the snapshot, was sent nothing
        if waiter.types:
            return
        del change.waiting[stream.stream_id]
        if waiter.acked:
            seconds = max(0.0, now - change.observed_at)
            change.seconds.append(seconds)
            self._last[stream.stream_id] = (change.generation, seconds)
        else:
            change.affected -= 1
        if not change.waiting:
            self._finish(change, "converged")

    def _observe(self, type_url: str, seconds: float) -> None:
        histogram = self._histograms.get(type_url)
        if histogram is not None:
            histogram.observe(max(0.0, seconds))

    def _finish(self, change: Change, result: str) -> None:
        for key, pending in list(self._pending.items()):
            if pending is change:
                del self._pending[key]
                break
        for group, type_url, version in change.keys:
            versions = self._index.get((group, type_url))
            waiting = versions.get(version) if versions is not None else None
            if versions is None or waiting is None:
                continue
            waiting[:] = [c for c in waiting if c is not change]
            if not waiting:
                del versions[version]
            if not versions:
                del self._index[group, type_url]
        change.keys.clear()
        change.result = result
        change.laggards = change.laggard_ids()
        left = change.left = len(change.waiting)
        change.waiting.clear()  # an ended change holds no stream
        self._done.append(change)
        metrics.CHANGES.labels(result).inc()
        # Not in the context of the stream whose ACK ended it: its node id, stream id...
        # would read as the change's.
        contextvars.Context().run(self._log_end, change, result, left)

    def _log_end(self, change: Change, result: str, left: int) -> None:
        figures = change.figures()
        if result == "converged" and figures is not None:
            log.info("change.converged", generation=change.generation,
                     proxies=len(change.seconds), seconds=figures["max"],
                     p50=figures["p50"], p99=figures["p99"])
        elif result == "not_converged":
            log.warning("change.not_converged", generation=change.generation,
                        laggards=change.laggards, not_converged=left,
                        converged=len(change.seconds), waited=self.warn_after,
                        hint=(f"these proxies (the first {MAX_LAGGARDS}) did not ACK the "
                              "change; " + _HINT))

    # What the admin shows.

    def summary(self) -> dict[str, Any]:
        """/debug/changes: the changes followed now and the last ones that ended."""
        changes = [*self._pending.values(), *self._done]
        changes.sort(key=lambda c: (c.generation, c.published_at), reverse=True)
        return {"changes": [c.describe() for c in changes]}

    def proxy(self, stream_id: int) -> dict[str, Any] | None:
        """The last change the stream converged on (for /debug/proxies)."""
        last = self._last.get(stream_id)
        if last is None:
            return None
        return {"generation": last[0], "seconds": round(last[1], 4)}

