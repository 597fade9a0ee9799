"""Versioned, consistent snapshots per proxy group (go-control-plane's ``cache``)."""

from controlplane.cache.cache import ConfigWatcher, SnapshotCache
from controlplane.cache.snapshot import Resource, Snapshot, TypeSnapshot, build_snapshot

__all__ = [
    "ConfigWatcher",
    "Resource",
    "Snapshot",
    "SnapshotCache",
    "TypeSnapshot",
    "build_snapshot",
]
