"""Snapshots by proxy group, and waiting for the next one.

The xDS server depends only on :class:`ConfigWatcher`; this cache is one implementation.
A group is asked for by the first proxy that belongs to it, through ``on_new_group``,
so the pipeline builds config only for the groups that are connected.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Protocol

from controlplane.cache.snapshot import Snapshot
from controlplane.errors import TranslationError
from controlplane.proxy import ProxyIdentity


class ConfigWatcher(Protocol):
    """What the xDS server needs from a cache."""

    async def next_snapshot(self, proxy: ProxyIdentity, after: Snapshot | None) -> Snapshot:
        """The group's snapshot once it differs from ``after`` (at once if it does already)."""
        ...

    def current(self, proxy: ProxyIdentity) -> Snapshot | None:
        """The group's snapshot now, if there is one."""
        ...


class SnapshotCache:
    def __init__(self, on_new_group: Callable[[ProxyIdentity], None] | None = None) -> None:
        self._snapshots: dict[str, Snapshot] = {}
        self._changed: dict[str, asyncio.Event] = {}
        self._members: dict[str, ProxyIdentity] = {}
        self.on_new_group = on_new_group

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

    def groups(self) -> dict[str, ProxyIdentity]:
        """Every group a proxy has asked for, with one member's identity (to translate)."""
        return dict(self._members)

    def snapshots(self) -> dict[str, Snapshot]:
        return dict(self._snapshots)

    def current(self, proxy: ProxyIdentity) -> Snapshot | None:
        return self._snapshots.get(proxy.group)

    async def next_snapshot(self, proxy: ProxyIdentity, after: Snapshot | None) -> Snapshot:
        group = proxy.group
        if group not in self._members:
            self._members[group] = proxy
            if self.on_new_group is not None:
                self.on_new_group(proxy)
        while True:
            snapshot = self._snapshots.get(group)
            if snapshot is not None and (after is None or snapshot.version != after.version):
                return snapshot
            event = self._changed.get(group)
            if event is None:
                event = self._changed[group] = asyncio.Event()
            await event.wait()
