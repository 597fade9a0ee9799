"""Keeping the streams' long-lived state out of the garbage collector's way.

``serve`` freezes what the first mesh built (``gc.freeze``: the collector no longer
looks at it). The streams come later: a thousand of them, with their groups'
snapshots, are most of what the collector then walks on every collection during a
change, about a tenth of the server's CPU per change at 1,000 streams. So once
streams have stopped arriving for ``settle_seconds``, what they made is frozen too.

A frozen object that later becomes part of a garbage cycle is never collected until
it is unfrozen. Streams that end leave some (an exception kept with its traceback),
so when a good part of the streams frozen so far has ended (a control-plane rollout
reconnects them all), the settle after it collects once over everything (unfreeze,
collect, freeze), as ``serve`` does when the mesh shrinks.

A process that never froze anything (tests, an embedding program) is left alone:
freezing is the program's choice, made by ``serve``.
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import gc
import time
from collections.abc import Callable

import structlog

log = structlog.get_logger("controlplane.xds")

RECLAIM_AGAIN_SECONDS = 3.0  # after a shrink: the streams have sent the smaller config


def reclaim(before: int, after: int) -> None:
    """The mesh shrank by half or more: collect what the old builds left in cycles
    (frozen ones included), then freeze again and hand the freed heap back to the
    system, so memory returns near its baseline. Called twice per shrink: the streams
    and what their proxies last ACKed hold the old snapshots until the new config is
    sent and ACKed, and whatever is alive at a freeze stays frozen."""
    started = time.perf_counter()
    gc.unfreeze()
    found = gc.collect()
    gc.freeze()
    trimmed = _trim_heap()
    log.info("memory.reclaimed", services_before=before, services_after=after,
             objects=found, heap_trimmed=trimmed,
             seconds=round(time.perf_counter() - started, 3))


def _trim_heap() -> bool:
    """glibc keeps freed memory for reuse; ``malloc_trim`` returns what it can to the
    system (about 10 MB more after a 2,000-service mesh went). False where there is no
    glibc (musl, macOS): nothing to do there."""
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
        trim = getattr(libc, "malloc_trim", None)
    except OSError:
        return False
    if trim is None:
        return False
    trim(0)
    return True


class FreezeWhenSettled:
    """Told of every stream that opens or closes; freezes once they settle."""

    def __init__(self, streams: Callable[[], int], settle_seconds: float = 2.0,
                 min_churn: int = 50) -> None:
        self.streams = streams  # streams open now
        self.settle_seconds = settle_seconds
        self.min_churn = min_churn
        self.freezes = 0
        self.collections = 0
        self._churn = 0  # streams opened or closed since the last freeze
        self._closed = 0  # of the streams frozen, how many have closed since
        self._newest = 0  # the newest stream's id (they increase)
        self._frozen_upto = 0  # streams with an id up to this one were open at the freeze
        self._frozen_streams = 0
        self._last = 0.0
        self._process_freezes = False
        self._timer: asyncio.TimerHandle | None = None

    def opened(self, stream_id: int) -> None:
        self._newest = max(self._newest, stream_id)
        self._note()

    def closed(self, stream_id: int) -> None:
        if stream_id <= self._frozen_upto:
            self._closed += 1
        self._note()

    def _note(self) -> None:
        self._churn += 1
        loop = asyncio.get_running_loop()
        self._last = loop.time()
        if self._timer is None:
            self._timer = loop.call_later(self.settle_seconds, self._check, loop)

    def _check(self, loop: asyncio.AbstractEventLoop) -> None:
        self._timer = None
        wait = self._last + self.settle_seconds - loop.time()
        if wait > 0:  # streams still arriving: look again once they have not for a while
            self._timer = loop.call_later(wait, self._check, loop)
            return
        if self._churn < max(self.min_churn, self._frozen_streams // 10):
            return
        # (get_freeze_count walks what is frozen: asked once per settle, until it says yes)
        if not self._process_freezes and not gc.get_freeze_count():
            self._churn = 0
            return  # this process does not freeze (see the module's docstring)
        self._process_freezes = True
        self.freeze()

    def freeze(self) -> None:
        """Freeze what exists now (collecting first, if many frozen streams ended)."""
        started = time.perf_counter()
        collected = None
        if self._closed >= max(self.min_churn, self._frozen_streams // 4):
            gc.unfreeze()
            collected = gc.collect()
            self.collections += 1
        gc.freeze()
        self.freezes += 1
        self._frozen_upto = self._newest
        self._frozen_streams = self.streams()
        self._churn = self._closed = 0
        log.info("gc.frozen", streams=self._frozen_streams, collected=collected,
                 seconds=round(time.perf_counter() - started, 4))
