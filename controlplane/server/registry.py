"""The streams that are open now, for /debug/proxies and /debug/config_dump."""

from __future__ import annotations

import itertools
from typing import Any

from controlplane.server.stream import StreamBase


class StreamRegistry:
    def __init__(self) -> None:
        self._streams: dict[int, StreamBase] = {}
        self._ids = itertools.count(1)

    def next_id(self) -> int:
        return next(self._ids)

    def add(self, stream: StreamBase) -> None:
        self._streams[stream.stream_id] = stream

    def remove(self, stream: StreamBase) -> None:
        self._streams.pop(stream.stream_id, None)

    def streams(self) -> list[StreamBase]:
        return list(self._streams.values())

    def by_node(self, node_id: str) -> list[StreamBase]:
        return [s for s in self._streams.values() if s.proxy and s.proxy.node_id == node_id]

    def describe(self) -> list[dict[str, Any]]:
        return [s.describe() for s in sorted(self._streams.values(), key=lambda s: s.stream_id)]

    def __len__(self) -> int:
        return len(self._streams)
