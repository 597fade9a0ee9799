"""Debug views rendered off the event loop, cached, and bounded.

Rendering a big config dump as JSON takes seconds of CPU; done on the event loop it froze
xDS pushes and /healthz. Here every render runs on one worker thread, finished renders
are kept by a key that says what they show (a snapshot's content-hash version), and
identical requests in flight share one render. Even a cached dump is megabytes to send,
so at most ``limit`` debug requests are served at once (rendered and sent); more are
refused at once, so that a storm of debug requests cannot queue up unbounded work.
"""

from __future__ import annotations

import asyncio
import json
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable, Hashable, Mapping
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from typing import Any

from google.protobuf import json_format
from google.protobuf.message import Message

from controlplane import resource
from controlplane.cache.snapshot import Snapshot

# The keys of /debug/config_dump, named like Envoy's own config dump sections.
DUMP_KEYS: dict[str, str] = {
    resource.CLUSTER: "clusters",
    resource.ENDPOINT: "endpoints",
    resource.LISTENER: "listeners",
    resource.ROUTE: "routes",
    resource.SECRET: "secrets",
    resource.VIRTUAL_HOST: "virtual_hosts",  # on-demand sidecars: the hosts they may fetch
}
_BY_NAME: dict[str, str] = {
    **{key: key for key in DUMP_KEYS.values()},
    **{resource.short_name(t): key for t, key in DUMP_KEYS.items()},
}


class Busy(Exception):
    """Too many debug requests are being served; the caller answers 503 and Retry-After."""


class Renderer:
    """One worker thread for debug renders, a size-bounded cache of their results, and a
    bound on debug requests in flight. Used only from the event loop's thread."""

    def __init__(self, limit: int = 4, cache_entries: int = 8,
                 cache_bytes: int = 32 * 1024 * 1024) -> None:
        self.limit = limit
        self.cache_entries = cache_entries
        self.cache_bytes = cache_bytes
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="admin-render")
        self._cache: OrderedDict[Hashable, bytes] = OrderedDict()
        self._cached_bytes = 0
        self._pending: dict[Hashable, asyncio.Future[bytes]] = {}
        self._running = 0
        self.renders = 0
        """Renders actually done (cache misses), for tests and the benchmark."""

    @property
    def running(self) -> int:
        return self._running

    @asynccontextmanager
    async def slot(self) -> AsyncIterator[None]:
        """One debug request served (rendered and sent); Busy when ``limit`` already are."""
        if self._running >= self.limit:
            raise Busy(f"{self._running} debug requests are being served")
        self._running += 1
        try:
            yield
        finally:
            self._running -= 1

    async def cached(self, key: Hashable, work: Callable[[], bytes]) -> bytes:
        """``work()`` rendered once per key: a cached result, or the one render in flight
        for it, or a new render."""
        hit = self._cache.get(key)
        if hit is not None:
            self._cache.move_to_end(key)
            return hit
        pending = self._pending.get(key)
        if pending is not None:
            return await asyncio.shield(pending)
        future = asyncio.ensure_future(self.run(work))
        self._pending[key] = future
        try:
            body = await asyncio.shield(future)
        finally:
            self._pending.pop(key, None)
        self._keep(key, body)
        return body

    async def run(self, work: Callable[[], bytes]) -> bytes:
        """``work()`` on the worker thread, uncached."""
        self.renders += 1
        return await asyncio.get_running_loop().run_in_executor(self._executor, work)

    def _keep(self, key: Hashable, body: bytes) -> None:
        if len(body) > self.cache_bytes or key in self._cache:
            return
        self._cache[key] = body
        self._cached_bytes += len(body)
        while self._cached_bytes > self.cache_bytes or len(self._cache) > self.cache_entries:
            _, old = self._cache.popitem(last=False)
            self._cached_bytes -= len(old)

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)
        self._cache.clear()
        self._cached_bytes = 0


def parse_types(text: str) -> tuple[str, ...] | str:
    """``?type=clusters,rds`` -> the dump keys asked for, in a fixed order (all when
    empty); or an error message listing the valid names."""
    if not text:
        return tuple(DUMP_KEYS.values())
    asked = {part.strip().lower() for part in text.split(",") if part.strip()}
    unknown = sorted(asked - _BY_NAME.keys())
    if unknown:
        return (f"unknown type {', '.join(unknown)}: give type= one or more of "
                + ", ".join(DUMP_KEYS.values()) + " (or cds, eds, lds, rds, sds), "
                "separated by commas")
    wanted = {_BY_NAME[name] for name in asked}
    return tuple(key for key in DUMP_KEYS.values() if key in wanted)


def render_resources(snapshot: Snapshot | None, keys: tuple[str, ...]) -> bytes:
    """The ``resources`` object of a config dump as compact JSON (runs on the worker)."""
    dump: dict[str, list[dict[str, Any]]] = {key: [] for key in keys}
    if snapshot is not None:
        for type_url, typed in snapshot.types.items():
            key = DUMP_KEYS.get(type_url, resource.short_name(type_url))
            if key in dump:
                dump[key] = [_to_dict(typed.resources[name].message)
                             for name in sorted(typed.resources)]
    return json.dumps(dump, separators=(",", ":")).encode()


def config_dump_body(head: Mapping[str, Any], resources: bytes) -> bytes:
    """``head`` (node, group, version) and the cached resources text, as one object."""
    text = json.dumps(dict(head), indent=2)
    return text[:-2].encode() + b',\n  "resources": ' + resources + b"\n}\n"


def render_json(body: Any) -> bytes:
    return (json.dumps(body, indent=2) + "\n").encode()


def _to_dict(message: Message) -> dict[str, Any]:
    """A resource as JSON; one that cannot be rendered (an Any of a type this process
    never imported) is shown with the reason rather than failing the whole dump."""
    try:
        rendered: dict[str, Any] = json_format.MessageToDict(
            message, preserving_proto_field_name=True
        )
    except (TypeError, KeyError, json_format.Error) as exc:
        return {"@type": message.DESCRIPTOR.full_name, "error": f"cannot render as JSON: {exc}"}
    return rendered
