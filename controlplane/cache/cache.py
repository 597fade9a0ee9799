"""Snapshots by proxy group, and waiting for the next one.

The xDS server depends only on :class:`ConfigWatcher`; this cache is one implementation.
A group is asked for by the first proxy that belongs to it, through ``on_new_group``,
so the pipeline builds config only for the groups that are connected. Clients choose
their identity, so groups come and go: a group none of whose proxies has been connected
for a while is forgotten (``expire``), and with it its snapshot.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Protocol

from controlplane.cache.identities import Identities
from controlplane.cache.snapshot import Snapshot
from controlplane.errors import TranslationError
from controlplane.proxy import ProxyIdentity


class ConfigWatcher(Protocol):
    """What the xDS server needs from a cache."""

    identities: Identities
    """Resolves a stream's identity by the mesh, and says when it changes."""

    async def next_snapshot(self, proxy: ProxyIdentity, after: Snapshot | None) -> Snapshot:
        """The group's snapshot once it differs from ``after`` (at once if it does already)."""
        ...

    def current(self, proxy: ProxyIdentity) -> Snapshot | None:
        """The group's snapshot now, if there is one."""
        ...

    def connect(self, proxy: ProxyIdentity) -> None:
        """A stream of ``proxy`` opened: its group stays while any such stream is open."""
        ...

    def disconnect(self, proxy: ProxyIdentity) -> None:
        """That stream closed."""
        ...


class SnapshotCache:
    def __init__(self, on_new_group: Callable[[ProxyIdentity], None] | None = None) -> None:
        self._snapshots: dict[str, Snapshot] = {}
        self._changed: dict[str, asyncio.Event] = {}
        self._members: dict[str, ProxyIdentity] = {}
        self._connected: dict[str, int] = {}  # group -> streams open now
        self._idle_since: dict[str, float] = {}  # group -> monotonic time it became idle
        self.on_new_group = on_new_group
        self.identities = Identities()  # filled by the pipeline, read by the server

    def _register(self, proxy: ProxyIdentity) -> None:
        group = proxy.group
        if group in self._members:
            return
        self._members[group] = proxy
        self._idle_since[group] = time.monotonic()
        if self.on_new_group is not None:
            self.on_new_group(proxy)

    def connect(self, proxy: ProxyIdentity) -> None:
        group = proxy.group
        self._connected[group] = self._connected.get(group, 0) + 1
        self._register(proxy)
        self._idle_since.pop(group, None)

    def disconnect(self, proxy: ProxyIdentity) -> None:
        group = proxy.group
        left = self._connected.get(group, 0) - 1
        if left > 0:
            self._connected[group] = left
            return
        self._connected.pop(group, None)
        if group in self._members:
            self._idle_since[group] = time.monotonic()

    def connected(self, group: str) -> int:
        return self._connected.get(group, 0)

    def expire(self, ttl: float, now: float | None = None) -> list[str]:
        """Forget every group that has had no stream open for ``ttl`` seconds: its member,
        its snapshot, its waiters' event. Returns the groups forgotten."""
        now = time.monotonic() if now is None else now
        gone = [g for g, since in self._idle_since.items()
                if now - since >= ttl and not self._connected.get(g)]
        for group in gone:
            self._idle_since.pop(group, None)
            self._members.pop(group, None)
            self._snapshots.pop(group, None)
            event = self._changed.pop(group, None)
            if event is not None:
                event.set()  # nobody should be waiting; if someone is, let it look again
        return gone

    def set_snapshot(self, group: str, snapshot: Snapshot) -> bool:
        """Publish ``snapshot`` for ``group``; False when it is the one already served.
        An inconsistent snapshot raises TranslationError and the old one stays."""
        problems = snapshot.problems()
        if problems:
            raise TranslationError(
                f"snapshot for group {group} is inconsistent, keeping the last good one: "
                + "; ".join(problems)
            )
        current = self._snapshots.get(group)
        if current is not None and current.version == snapshot.version:
            return False
        self._snapshots[group] = snapshot
        event = self._changed.pop(group, None)
        if event is not None:
            event.set()
        return True

    def get(self, group: str) -> Snapshot | None:
        return self._snapshots.get(group)

    def __len__(self) -> int:
        """Groups known now."""
        return len(self._members)

    def known(self, group: str) -> bool:
        """Whether a proxy has asked for ``group`` (and it has not expired since)."""
        return group in self._members

    def groups(self) -> dict[str, ProxyIdentity]:
        """Every group a proxy has asked for, with one member's identity (to translate)."""
        return dict(self._members)

    def snapshots(self) -> dict[str, Snapshot]:
        return dict(self._snapshots)

    def current(self, proxy: ProxyIdentity) -> Snapshot | None:
        return self._snapshots.get(proxy.group)

    async def changed(self, proxy: ProxyIdentity) -> None:
        """Wait for the next change of the group's snapshot (or a ``wake``)."""
        group = proxy.group
        self._register(proxy)
        event = self._changed.get(group)
        if event is None:
            event = self._changed[group] = asyncio.Event()
        await event.wait()

    def wake(self, group: str) -> None:
        """Wake the group's waiters though its snapshot did not change: what a stream
        adds to it did (its identity's secrets, cache/secrets.py)."""
        event = self._changed.pop(group, None)
        if event is not None:
            event.set()

    async def next_snapshot(self, proxy: ProxyIdentity, after: Snapshot | None) -> Snapshot:
        group = proxy.group
        self._register(proxy)
        while True:
            snapshot = self._snapshots.get(group)
            if snapshot is not None and (after is None or snapshot.version != after.version):
                return snapshot
            event = self._changed.get(group)
            if event is None:
                event = self._changed[group] = asyncio.Event()
            await event.wait()
            self._register(proxy)  # the group may have expired meanwhile
