"""The admin HTTP server: health, readiness, Prometheus metrics and debug views.

It runs on a thread and event loop of its own (thread.py) and reads the registry, the
cache and readiness on the xDS loop, where they live, so what it shows is exactly what
the streams hold, with no locking. The xDS loop serves xDS first: it only takes what a
view needs (cheap); the JSON rendering of debug views runs on a worker thread
(render.py), cached by snapshot version, and at most a few debug requests are served at
once, so a storm of debug requests delays neither pushes nor /healthz.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, generate_latest

from controlplane import metrics as _metrics  # noqa: F401  (defines the metrics served)
from controlplane import resource
from controlplane.admin.render import (
    Busy,
    Renderer,
    config_dump_body,
    parse_types,
    render_json,
    render_resources,
)
from controlplane.admin.thread import AdminThread, on_main
from controlplane.cache.cache import SnapshotCache
from controlplane.cache.snapshot import Snapshot
from controlplane.observe.convergence import Convergence
from controlplane.server.registry import StreamRegistry
from controlplane.server.stream import StreamBase

Readiness = Callable[[], tuple[bool, str]]
"""Returns (ready?, reason); the reason is shown by /readyz either way."""

ENDPOINTS: tuple[tuple[str, str], ...] = (
    ("/healthz", "200 while the process is alive"),
    ("/readyz", "200 once the source has synced and a first snapshot is built, else 503"),
    ("/metrics", "Prometheus metrics"),
    ("/debug/proxies", "connected proxies: node id, protocol, sent/ACKed versions, last NACK"),
    ("/debug/snapshots", "snapshot versions and resource counts per proxy group"),
    ("/debug/config_dump?node=ID", "the resources the proxy with node id ID is served "
     "(&type=clusters,routes,... for some types only)"),
    ("/debug/changes", "the last mesh changes: how many proxies took each, how fast "
     "(from the source event to each ACK), and who has not yet"),
    ("/debug/rejections", "config the proxies reject now (NACKs), traced to the services "
     "and policy objects it comes from"),
)
DEBUG_PREFIX = "/debug/"
LOOPBACK_ONLY = (
    "{path} answers only on loopback: it shows every proxy's configuration, so it is not "
    "published with /healthz, /readyz and /metrics. From your machine: kubectl "
    "port-forward -n <namespace> deploy/controlplane 19000, then curl "
    "http://127.0.0.1:19000{path}"
)


@dataclass
class AdminState:
    """What the admin server reads; owned by the server, shared, never copied."""

    registry: StreamRegistry
    """The open xDS streams."""
    cache: SnapshotCache
    """The published snapshots per proxy group."""
    readiness: Readiness
    """Whether the server is ready to serve config, and why (not)."""
    renderer: Renderer = field(default_factory=Renderer)
    """Renders debug views off the loop; closed with the admin server."""
    main_loop: asyncio.AbstractEventLoop | None = None
    """The xDS loop, where the registry, cache and readiness are read (set by
    ``start_admin``; None: the admin app runs on that loop itself)."""
    convergence: Convergence | None = None
    """Follows each mesh change to the proxies (/debug/changes, /debug/proxies)."""
    rejections: Callable[[], dict[str, Any]] | None = None
    """The standing NACKs by origin (observe/rejections.py), for /debug/rejections."""


_STATE: web.AppKey[AdminState] = web.AppKey("state", AdminState)


def create_admin_app(state: AdminState) -> web.Application:
    """The aiohttp application, not yet bound: tests and embedders choose how to run it."""
    app = web.Application(middlewares=[_json_errors, _debug_on_loopback])
    app[_STATE] = state
    app.router.add_get("/", _index)
    app.router.add_get("/healthz", _healthz)
    app.router.add_get("/readyz", _readyz)
    app.router.add_get("/metrics", _metrics_handler)
    app.router.add_get("/debug/proxies", _proxies)
    app.router.add_get("/debug/snapshots", _snapshots)
    app.router.add_get("/debug/config_dump", _config_dump)
    app.router.add_get("/debug/changes", _changes)
    app.router.add_get("/debug/rejections", _rejections)

    async def close_renderer(app: web.Application) -> None:
        app[_STATE].renderer.close()

    app.on_cleanup.append(close_renderer)
    return app


async def start_admin(state: AdminState, host: str, port: int) -> tuple[AdminThread, int]:
    """Serve the admin app on host:port (0 picks a free port) on its own thread, reading
    state on the calling (xDS) loop; returns the server, to ``await server.cleanup()`` on
    shutdown, and the port actually bound."""
    state.main_loop = asyncio.get_running_loop()
    server = AdminThread(create_admin_app(state), host, port)
    return server, await server.start()


@web.middleware
async def _json_errors(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    """Unknown paths and methods answer in JSON too, pointing at the index."""
    try:
        return await handler(request)
    except Busy as exc:
        renderer = request.app[_STATE].renderer
        return _json(
            {"error": f"busy: {exc} (at most {renderer.limit} at a time, so that xDS stays "
             "responsive); retry in a second"},
            status=503,
            headers={"Retry-After": "1"},
        )
    except web.HTTPNotFound:
        return _json(
            {"error": f"no admin endpoint at {request.path}; GET / lists them"}, status=404
        )
    except web.HTTPMethodNotAllowed as exc:
        return _json(
            {"error": f"{request.method} is not allowed on {request.path}; use "
             + ", ".join(sorted(exc.allowed_methods))},
            status=405,
            headers={"Allow": ",".join(sorted(exc.allowed_methods))},
        )


def is_loopback(peer: str | None) -> bool:
    """Whether a peer address is this host's loopback (127.0.0.0/8, ::1, or 127.x mapped
    into IPv6). No peer (a Unix socket, a test transport) is not loopback: refused."""
    if not peer:
        return False
    try:
        address = ipaddress.ip_address(peer.split("%", 1)[0])
    except ValueError:
        return False
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped.is_loopback
    return address.is_loopback


@web.middleware
async def _debug_on_loopback(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    """``/debug/*`` only for loopback peers (``kubectl port-forward`` arrives on the pod's
    loopback): probes and Prometheus reach the pod's admin port, and nothing else of it.
    The TCP peer decides, never a header a client could set."""
    if request.path.startswith(DEBUG_PREFIX) and not is_loopback(request.remote):
        return _json({"error": LOOPBACK_ONLY.format(path=request.path)}, status=403)
    return await handler(request)


async def _index(request: web.Request) -> web.Response:
    width = max(len(path) for path, _ in ENDPOINTS)
    lines = ["controlplane admin", ""]
    lines += [f"{path.ljust(width)}  {what}" for path, what in ENDPOINTS]
    lines += ["", f"{DEBUG_PREFIX}* answers loopback peers only (kubectl port-forward)."]
    return web.Response(text="\n".join(lines) + "\n")


async def _healthz(request: web.Request) -> web.Response:
    # A round trip through the xDS loop: a stuck loop fails the liveness probe.
    await on_main(request.app[_STATE].main_loop, lambda: None)
    return web.Response(text="ok")


async def _readyz(request: web.Request) -> web.Response:
    state = request.app[_STATE]
    ready, reason = await on_main(state.main_loop, state.readiness)
    return web.Response(text=reason, status=200 if ready else 503)


async def _metrics_handler(request: web.Request) -> web.Response:
    # Off the loop: with many groups the exposition is thousands of series.
    response = web.Response(body=await asyncio.to_thread(generate_latest, REGISTRY))
    # Set as a header: the exposition type carries a version parameter that aiohttp's
    # content_type argument would refuse.
    response.headers["Content-Type"] = CONTENT_TYPE_LATEST
    return response


async def _proxies(request: web.Request) -> web.StreamResponse:
    state = request.app[_STATE]
    async with state.renderer.slot():
        described = await on_main(state.main_loop, lambda: _described(state))
        return await _send(request, await state.renderer.run(lambda: render_json(described)))


def _described(state: AdminState) -> list[dict[str, Any]]:
    """Every stream, with the last change it converged on (on the xDS loop)."""
    described = state.registry.describe()
    if state.convergence is not None:
        for stream in described:
            stream["convergence"] = state.convergence.proxy(stream["stream_id"])
    return described


async def _changes(request: web.Request) -> web.StreamResponse:
    convergence = request.app[_STATE].convergence
    return await _tracker_view(request, None if convergence is None else convergence.summary,
                          "this server does not follow changes to the proxies; see "
                          "/debug/proxies for what each proxy ACKed")


async def _tracker_view(request: web.Request, summary: Callable[[], Any] | None,
                   missing: str) -> web.StreamResponse:
    """A tracker's summary, read on the xDS loop and rendered off it; 404 (``missing``
    says where to look instead) when the server runs without that tracker."""
    if summary is None:
        return _json({"error": missing}, status=404)
    state = request.app[_STATE]
    async with state.renderer.slot():
        found = await on_main(state.main_loop, summary)
        return await _send(request, await state.renderer.run(lambda: render_json(found)))


async def _snapshots(request: web.Request) -> web.StreamResponse:
    state = request.app[_STATE]

    def summarize() -> dict[str, Any]:
        snapshots = state.cache.snapshots()
        return {group: _summary(snapshots[group]) for group in sorted(snapshots)}

    async with state.renderer.slot():
        summary = await on_main(state.main_loop, summarize)
        return await _send(request, await state.renderer.run(lambda: render_json(summary)))


async def _config_dump(request: web.Request) -> web.StreamResponse:
    state = request.app[_STATE]
    node = request.query.get("node", "")
    if not node:
        return _json(
            {"error": "give the proxy's node id: /debug/config_dump?node=ID; "
             "see /debug/proxies for the connected ones"},
            status=400,
        )
    keys = parse_types(request.query.get("type", ""))
    if isinstance(keys, str):
        return _json({"error": keys}, status=400)
    found = await on_main(state.main_loop, lambda: _served_to(state, node))
    if found is None:
        return _json(
            {"error": f"no connected proxy with node id {node}; see /debug/proxies"},
            status=404,
        )
    group, snapshot = found
    version = snapshot.version if snapshot else None
    head = {"node": node, "group": group, "version": version}
    async with state.renderer.slot():
        # Versions are content hashes: one render serves every proxy with that content.
        resources = await state.renderer.cached(
            ("config_dump", version, keys), lambda: render_resources(snapshot, keys))
        return await _send(request, config_dump_body(head, resources))


async def _rejections(request: web.Request) -> web.StreamResponse:
    return await _tracker_view(request, request.app[_STATE].rejections,
                          "this server does not trace rejections (no observer); see "
                          "/debug/proxies for each proxy's last NACK")


def _served_to(state: AdminState, node: str) -> tuple[str, Snapshot | None] | None:
    """The group and snapshot of the proxy with node id ``node`` (on the xDS loop)."""
    streams = state.registry.by_node(node)
    if not streams:
        return None
    stream = _newest_with_snapshot(streams)
    assert stream.proxy is not None  # by_node matches on proxy.node_id
    group = stream.proxy.group
    return group, stream.snapshot or state.cache.get(group)


def _newest_with_snapshot(streams: list[StreamBase]) -> StreamBase:
    """The stream to dump: a proxy that reconnects briefly has two, and the newer one is
    what it will keep; per-type streams of one proxy all hold the same group."""
    ordered = sorted(streams, key=lambda s: s.stream_id, reverse=True)
    return next((s for s in ordered if s.snapshot is not None), ordered[0])


def _summary(snapshot: Snapshot) -> dict[str, Any]:
    return {
        "version": snapshot.version,
        "types": snapshot.versions(),
        "resources": {
            resource.short_name(t): len(typed.resources) for t, typed in snapshot.types.items()
        },
    }


def _json(body: Any, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(
        text=json.dumps(body, indent=2) + "\n",
        status=status,
        content_type="application/json",
        headers=headers,
    )


async def _send(request: web.Request, body: bytes) -> web.StreamResponse:
    """Send a rendered JSON body within the caller's slot: the slot is held until the
    body is (mostly) written, so slots bound the megabytes in flight too."""
    response = web.StreamResponse()
    response.content_type = "application/json"
    response.content_length = len(body)
    await response.prepare(request)
    await response.write(body)
    await response.write_eof()
    return response
