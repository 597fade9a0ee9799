"""Versioned, consistent snapshots per proxy group (go-control-plane's ``cache``), made
of layers shared between groups."""

from controlplane.cache.cache import ConfigWatcher, SnapshotCache
from controlplane.cache.layers import Layer
from controlplane.cache.snapshot import Resource, Snapshot, TypeSnapshot, build_snapshot

__all__ = [
    "ConfigWatcher",
    "Layer",
    "Resource",
    "Snapshot",
    "SnapshotCache",
    "TypeSnapshot",
    "build_snapshot",
]
