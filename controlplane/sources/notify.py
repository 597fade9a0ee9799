"""Filesystem notifications for the file source: a wake-up when a directory changes.

The mesh file's directory is watched, not the file: editors save by renaming a new file
over the old one, and Kubernetes ConfigMap volumes swap a ``..data`` symlink, both of
which a watch on the file itself would lose. Any change in the directory wakes the
source, which then compares the file's stat (a few microseconds), so a busy directory
costs stats, not reads.

The watch is inotify on Linux through the ``watchfiles`` package, run on a daemon
thread that hands each wake-up to the event loop. When notifications cannot start (no
inotify instance left, a directory that does not exist yet) the
caller polls instead; watchfiles itself falls back to polling when the kernel's watch
limit is reached, at the poll interval given here.
"""

from __future__ import annotations

import asyncio
import os
import threading
import time
from collections.abc import Sequence
from pathlib import Path

import structlog
from watchfiles._rust_notify import RustNotify  # documented: watchfiles' Rust backend

__all__ = ["DirectoryWatch", "NotifyUnavailable", "RustNotify", "Wakeups", "watched_directories"]

log = structlog.get_logger("controlplane.source.file")

STEP_MS = 10
"""How often the watch thread looks for queued events: the wake-up latency (one or two
steps) against the idle cost (about 0.6 % of a core at 10 ms, measured here)."""
DEBOUNCE_MS = STEP_MS
"""Events are handed over as soon as a step finds them: the source settles in-place
writes itself (by stat), so grouping them here would only add latency."""
TIMEOUT_MS = 1000


class NotifyUnavailable(Exception):
    """Notifications could not start; the message says why, for the log."""


def watched_directories(path: Path) -> tuple[Path, ...]:
    """The directories whose changes can change what ``path`` reads: its own, and the
    one of the file it links to (a symlink to a file elsewhere, edited in place)."""
    own = path.absolute().parent
    try:
        target = path.resolve().parent
    except (OSError, RuntimeError):  # a symlink loop: the source reports the read error
        return (own,)
    return (own,) if target == own else (own, target)


def _identity(directories: Sequence[Path]) -> tuple[tuple[int, int], ...] | None:
    """Device and inode of each directory: a directory replaced (deleted and made
    again) keeps its name but loses its watch, so the watch must start again."""
    try:
        return tuple((s.st_dev, s.st_ino) for s in (os.stat(d) for d in directories))
    except OSError:
        return None


def _env_forces_polling() -> bool:
    """``WATCHFILES_FORCE_POLLING`` (watchfiles' own switch) turns notifications off,
    for file systems whose changes inotify never sees (NFS, some container mounts)."""
    value = os.environ.get("WATCHFILES_FORCE_POLLING", "")
    return bool(value) and value.lower() not in {"false", "disable", "disabled"}


class DirectoryWatch:
    """Sets an event on the loop whenever something in ``directories`` changes.

    ``failure`` is set (and the event too) when the watch thread dies; ``stale()``
    says when the directories are no longer the ones watched. Both mean: close this
    watch and start another, or poll."""

    def __init__(self, path: Path, loop: asyncio.AbstractEventLoop,
                 poll_delay_ms: int = 200) -> None:
        self.path = path
        self.directories = watched_directories(path)
        self._identity = _identity(self.directories)
        if self._identity is None:
            raise NotifyUnavailable(f"{self.directories[0]} does not exist")
        try:
            watcher = RustNotify([str(d) for d in self.directories], False, False,
                                 poll_delay_ms, False, True)
        except (OSError, RuntimeError) as exc:
            raise NotifyUnavailable(str(exc) or type(exc).__name__) from exc
        self.changed = asyncio.Event()
        self.woken_at: float | None = None
        """When the first change since the last ``wait`` was seen (``time.time()``)."""
        self.failure: str | None = None
        self._loop = loop
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(watcher,), daemon=True,
                                        name=f"notify:{path.name}")
        self._thread.start()

    def _run(self, watcher: RustNotify) -> None:
        """The watch thread: wait for events in Rust (the GIL released), then wake the
        loop. Closes the watcher itself, since it is in use until this returns."""
        try:
            while not self._stop.is_set():
                found = watcher.watch(DEBOUNCE_MS, STEP_MS, TIMEOUT_MS, self._stop)
                if isinstance(found, set) and found:
                    self._wake()
        except Exception as exc:  # any failure means: poll instead
            self.failure = f"{type(exc).__name__}: {exc}"
            self._wake()
        finally:
            watcher.close()

    def _wake(self) -> None:
        try:  # the time taken here, on the thread: the loop may be busy a while
            self._loop.call_soon_threadsafe(self._woke, time.time())
        except RuntimeError:  # the loop is closed: nobody to wake
            self._stop.set()

    def _woke(self, at: float) -> None:
        if not self.changed.is_set():
            self.woken_at = at
            self.changed.set()

    async def wait(self, timeout: float) -> bool:
        """Until a change or ``timeout`` seconds; True when woken by a change.
        (``asyncio.timeout``, not ``wait_for``: on 3.11 the latter swallows a
        cancellation that meets an event already set, and the source never stops.)"""
        if not self.changed.is_set():
            try:
                async with asyncio.timeout(timeout):
                    await self.changed.wait()
            except TimeoutError:
                return False
        self.changed.clear()
        return True

    def stale(self) -> bool:
        """True when the watch no longer covers the file: the thread died, a directory
        was replaced, or the file now links into another directory."""
        return (self.failure is not None or not self._thread.is_alive()
                or watched_directories(self.path) != self.directories
                or _identity(self.directories) != self._identity)

    def close(self) -> None:
        """Stop the thread (within one step); it closes the watcher on its way out."""
        self._stop.set()


SAFETY_NET = 2.0
"""With notifications on, the stat is still checked this often (or at the poll interval,
when that is longer): a file system whose changes inotify misses (an NFS server's own
writes) is then only slow, not stuck."""
RETRY = 10.0
"""How often notifications that could not start are tried again, while polling."""


class Wakeups:
    """When the file source looks at its file again: on a notification (and at the
    safety-net interval), or every ``poll_interval`` when notifications are off or
    could not start; then they are tried again every ``RETRY`` seconds."""

    def __init__(self, path: Path, poll_interval: float, enabled: bool = True) -> None:
        self.path = path
        self.poll_interval = poll_interval
        self.enabled = enabled
        self.watch: DirectoryWatch | None = None
        self.problem: str | None = None
        """Why notifications are off now (None when on, or not wanted)."""
        self._retry_at = 0.0
        self.woken_at: float | None = None
        """When the notification that ended the last ``next`` came (``time.time()``);
        None when it ended otherwise (a poll, the safety net)."""
        if enabled and _env_forces_polling():
            self.enabled = False
            log.info("source.file_polling", path=str(path), reason="WATCHFILES_FORCE_POLLING "
                     "is set", poll_interval=poll_interval)

    @property
    def notifying(self) -> bool:
        return self.watch is not None

    async def next(self) -> bool:
        """Wait for the next look; True when a notification woke it."""
        self.woken_at = None
        loop = asyncio.get_running_loop()
        if self.watch is not None and self.watch.stale():
            reason = self.watch.failure or "the watched directories changed"
            log.info("source.file_notify_restart", path=str(self.path), reason=reason)
            self.watch.close()
            self.watch = None
            self._retry_at = 0.0
        if self.watch is None and self.enabled and loop.time() >= self._retry_at:
            self._start(loop)
            if self.watch is not None:
                return True  # a change since the last look may have had no watch to see it
        if self.watch is None:
            retry = self._retry_at - loop.time() if self.enabled else self.poll_interval
            await asyncio.sleep(max(0.0, min(self.poll_interval, retry)))
            return False
        watch = self.watch
        woken = await watch.wait(max(self.poll_interval, SAFETY_NET))
        self.woken_at = watch.woken_at if woken else None
        return woken

    def start(self) -> None:
        """Watch from now on (before the first look, so no save falls between)."""
        if self.enabled:
            self._start(asyncio.get_running_loop())

    def _start(self, loop: asyncio.AbstractEventLoop) -> None:
        try:
            self.watch = DirectoryWatch(self.path, loop, int(self.poll_interval * 1000))
        except NotifyUnavailable as exc:
            self._retry_at = loop.time() + RETRY
            if self.problem != str(exc):
                self.problem = str(exc)
                log.warning("source.file_polling", path=str(self.path), reason=str(exc),
                            poll_interval=self.poll_interval,
                            hint="saves are seen within the poll interval "
                            "(CONTROLPLANE_POLL_INTERVAL) instead of at once; notifications "
                            f"are tried again every {RETRY:g} s (an inotify limit: raise "
                            "fs.inotify.max_user_instances or max_user_watches)")
            return
        if self.problem is not None:
            log.info("source.file_notifying", path=str(self.path),
                     directories=[str(d) for d in self.watch.directories])
        self.problem = None

    def close(self) -> None:
        if self.watch is not None:
            self.watch.close()
            self.watch = None
