"""The HTTP side of the double: the server thread, the middleware, LIST and WATCH.

Part of the API server double (tests/kube/apiserver.py).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import copy
import json
import socket
import threading
import time
from collections.abc import Callable
from typing import Any, Final

from aiohttp import web

from controlplane.sources.kubernetes.kinds import (
    CUSTOM,
    ENDPOINT_SLICES,
    GATEWAY_API,
    TOKEN_REVIEWS,
    TOKEN_SUBRESOURCE,
)
from tests.kube.constants import (
    _BUILTIN,
    ADMIN_TOKEN,
    TOKEN,
    Obj,
)
from tests.kube.errors import (
    StatusError,
    _details,
    _error,
    _resource_not_found,
    _too_large,
    status_object,
)
from tests.kube.negotiation import (
    _negotiate,
    _Output,
    _represent,
    _represent_list,
)
from tests.kube.rbac import Rbac
from tests.kube.routing import RecordedRequest, _Failure, _route, _Target, _verb
from tests.kube.storage import (
    _event_line,
    _parse_bool,
    _parse_version,
    _Watcher,
)
from tests.kube.tokens import TokenAuthority
from tests.kube.wire import (
    FieldSelector,
    LabelSelector,
)
from tests.kube.writes import _Writes


class _Handlers(_Writes):
    """The server thread, the middleware (records, injected failures, authentication and
    RBAC) and the LIST and WATCH handlers; ``ApiServerDouble`` sets the attributes."""

    port: int
    bookmark_interval: float
    rbac: Rbac | None
    too_large_wait: float
    crd_installed: bool
    gateway_api_installed: bool
    tokens: TokenAuthority
    _failures: list[_Failure]
    _requests: list[RecordedRequest]
    server_errors: list[BaseException]
    _loop: asyncio.AbstractEventLoop | None
    _stopping: asyncio.Event | None

    # -- the server thread

    def _run(self, sock: socket.socket, ready: threading.Event) -> None:
        loop = asyncio.new_event_loop()
        asyncio.set_event_loop(loop)  # this thread's, as asyncio.run makes it
        try:
            loop.run_until_complete(self._serve(sock, ready))
        except BaseException as exc:
            self.server_errors.append(exc)
            ready.set()
        finally:
            _close_loop(loop)

    async def _serve(self, sock: socket.socket, ready: threading.Event) -> None:
        app = web.Application(middlewares=[self._middleware])
        app.router.add_route("*", "/{tail:.*}", self._dispatch)
        runner = web.AppRunner(app, handle_signals=False, access_log=None, shutdown_timeout=2)
        await runner.setup()
        await web.SockSite(runner, sock).start()
        self._loop, self._stopping = asyncio.get_running_loop(), asyncio.Event()
        ready.set()
        try:
            await self._stopping.wait()
        finally:
            # A watch still streaming when the double stops can outlive aiohttp's
            # shutdown timeout: close what is left here, or its socket is found unclosed
            # by the garbage collector during some later test (a ResourceWarning).
            # abort, not close: shutdown already close()d them, and close() waits for a
            # stalled watch's write buffer to drain (never, once its reader stopped), so
            # the socket would outlive the loop (aiohttp also drops its transport then).
            open_ = [c.transport for c in runner.server.connections
                     if c.transport is not None] if runner.server is not None else []
            await runner.cleanup()
            for transport in open_:
                transport.abort()
            await asyncio.sleep(0)  # let the transports' close callbacks run

    @web.middleware
    async def _middleware(self, request: web.Request,
                          handler: Callable[[web.Request], Any]) -> web.StreamResponse:
        """Record the request, inject failures, and turn StatusErrors into responses."""
        target = _route(request.path)
        query = dict(request.query)
        verb = _verb(request.method, target, query)
        with self._store.lock:
            self._requests.append(RecordedRequest(
                request.method, request.path, query, verb,
                target.kind if target else None, target.namespace if target else None,
                target.name if target else None, target.subresource if target else None,
                request.headers.get("Accept")))
            failure = next((f for f in self._failures
                            if f.remaining > 0 and (f.path is None
                                                    or request.path.startswith(f.path))), None)
            if failure is not None:
                failure.remaining -= 1
                self._failures = [f for f in self._failures if f.remaining > 0]
        try:
            if failure is not None:
                raise self._injected(failure.status)
            self._authorize(request, target, verb)
            response: web.StreamResponse = await handler(request)
            return response
        except StatusError as exc:
            return web.json_response(exc.status, status=exc.code, headers=exc.headers)
        except Exception as exc:
            self.server_errors.append(exc)
            return web.json_response(status_object(500, f"Internal error occurred: {exc}"),
                                     status=500)

    def _authorize(self, request: web.Request, target: _Target | None, verb: str) -> None:
        """Authentication by bearer token, then RBAC for the service account."""
        token = request.headers.get("Authorization", "").removeprefix("Bearer ").strip()
        if token == ADMIN_TOKEN:
            return
        rbac = self.rbac
        user = rbac.user if rbac is not None and token == TOKEN else None
        if token != TOKEN:
            # A ServiceAccount token for the API server's audience authenticates as that
            # account; RBAC binds nothing but the control plane's account.
            user = self.tokens.username(token) if token.count(".") == 2 else None
            if user is None:
                raise _error(401, "Unauthorized")
        if rbac is None or target is None:
            return  # discovery, /version and health are open to every authenticated user
        if user != rbac.user or not rbac.allows(verb, target.kind, target.namespace,
                                                target.subresource, target.name):
            raise StatusError(rbac.forbidden(verb, target.kind, target.namespace, target.name,
                                             target.subresource, user=user))

    @staticmethod
    def _injected(code: int) -> StatusError:
        if code == 429:
            return StatusError(status_object(429, "Too many requests, please try again later.",
                                             details={"retryAfterSeconds": 1}),
                               {"Retry-After": "1"})
        if code == 500:
            return _error(500, "Internal error occurred: injected by the API server double")
        return _error(code, f"injected by the API server double ({code})")

    async def _dispatch(self, request: web.Request) -> web.StreamResponse:
        if request.path in ("/healthz", "/livez", "/readyz"):
            return web.Response(text="ok")
        if request.path == "/version":
            return web.json_response({"major": "1", "minor": "33", "gitVersion": "v1.33.0"})
        target = _route(request.path)
        if target is None or (target.kind in CUSTOM and not self.crd_installed) or (
                target.kind in GATEWAY_API and not self.gateway_api_installed):
            raise _resource_not_found()
        method = request.method
        if target.kind == TOKEN_REVIEWS or target.subresource == TOKEN_SUBRESOURCE:
            return await self._tokens(request, target)
        watch = (method == "GET" and target.name is None
                 and _parse_bool(request.query.get("watch"), "watch"))
        output = _negotiate(request.headers.get("Accept", ""), target.kind, watch)
        if target.name is None:
            if method == "GET":
                if watch:
                    return await self._watch(request, target, output)
                await self._fresh_enough(request.query.get("resourceVersion", ""),
                                         request.query.get("resourceVersionMatch", ""))
                return self._list(request, target, output)
            if method == "POST" and (target.namespace is not None
                                     or not target.kind.namespaced):
                return await self._create(request, target, output)
        else:
            namespace = target.namespace or ""  # "": a cluster-scoped object
            if method == "GET":
                return web.json_response(_represent(target.kind, self._store.get(
                    target.kind, namespace, target.name), output))
            if method in ("PUT", "PATCH"):
                return await self._write(request, target, output)
            if method == "DELETE" and target.subresource is None:
                gone = self._store.delete(target.kind, namespace, target.name)
                if target.kind == ENDPOINT_SLICES:  # its REST storage returns a Status
                    return web.json_response({
                        "kind": "Status", "apiVersion": "v1", "metadata": {},
                        "status": "Success", "details": {
                            **_details(target.kind, target.name),
                            "uid": gone["metadata"]["uid"]}})
                return web.json_response(_represent(target.kind, gone, output))
        raise _error(405, "the server does not allow this method on the requested resource")

    async def _tokens(self, request: web.Request, target: _Target) -> web.Response:
        """TokenReview (create only, nothing stored) and TokenRequest (a ServiceAccount's
        ``token`` subresource, POST only): both answer 201 with the object completed."""
        if request.method == "POST" and target.kind == TOKEN_REVIEWS and target.name is None:
            return web.json_response(self.tokens.review(await self._body(request)),
                                     status=201)
        if request.method == "POST" and target.subresource == TOKEN_SUBRESOURCE:
            assert target.namespace is not None and target.name is not None
            return web.json_response(self.tokens.request(
                target.namespace, target.name, await self._body(request)), status=201)
        raise _error(405, "the server does not allow this method on the requested resource")

    # -- LIST

    async def _fresh_enough(self, version: str, match: str) -> None:
        """A LIST at a resourceVersion (not "" or "0") newer than the server's waits for
        it, then fails as the watch cache does: 504 Too large resource version."""
        if version in ("", "0") or match == "Exact":
            return
        wanted = _parse_version(version)
        deadline = time.monotonic() + self.too_large_wait
        while True:
            with self._store.lock:
                current = self._store.version
            if current >= wanted:
                return
            if time.monotonic() >= deadline:
                raise _too_large(wanted, current)
            await asyncio.sleep(0.05)

    def _list(self, request: web.Request, target: _Target, output: _Output) -> web.Response:
        kind, query = target.kind, request.query
        labels = LabelSelector(query.get("labelSelector", ""))
        fields = FieldSelector(query.get("fieldSelector", ""))
        limit = int(query.get("limit") or 0)
        token = query.get("continue", "")
        with self._store.lock:
            if token:
                version, start = self._decode_continue(token)
                try:
                    state = self._store.state_at(kind, version)
                except StatusError:
                    raise _error(410, _CONTINUE_EXPIRED, "Expired") from None
            elif query.get("resourceVersionMatch") == "Exact":
                version = _parse_version(query.get("resourceVersion", ""))
                state, start = self._store.state_at(kind, version), None
            else:
                version, state, start = self._store.version, self._store.objects[kind], None
            keys = sorted(k for k, obj in state.items()
                          if (target.namespace is None or k[0] == target.namespace)
                          and labels.matches(obj) and fields.matches(obj))
            if start is not None:
                keys = [k for k in keys if "/".join(k) > start]
            page = keys[:limit] if limit > 0 else keys
            items = [copy.deepcopy(state[k]) for k in page]
        if kind in _BUILTIN:
            for item in items:
                item.pop("kind", None)
                item.pop("apiVersion", None)
        metadata: Obj = {"resourceVersion": str(version)}
        if len(page) < len(keys):
            metadata["continue"] = self._encode_continue(version, "/".join(page[-1]))
            if not labels.text and not query.get("fieldSelector"):
                metadata["remainingItemCount"] = len(keys) - len(page)
        return web.json_response(_represent_list(kind, {
            "kind": f"{kind.kind}List", "apiVersion": kind.api_version, "metadata": metadata,
            "items": items}, output))

    @staticmethod
    def _encode_continue(version: int, last_key: str) -> str:
        """The real token: base64url of {"v","rv","start"}, start just after the last key."""
        raw = json.dumps({"v": "meta.k8s.io/v1", "rv": version, "start": last_key + "\x00"},
                         separators=(",", ":"))
        return base64.urlsafe_b64encode(raw.encode()).decode().rstrip("=")

    @staticmethod
    def _decode_continue(token: str) -> tuple[int, str]:
        try:
            raw = json.loads(base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)))
            return int(raw["rv"]), str(raw["start"]).rstrip("\x00")
        except (ValueError, KeyError, TypeError) as exc:
            raise _error(400, f"continue key is not valid: {exc}") from None

    # -- WATCH

    async def _watch(self, request: web.Request, target: _Target,
                     output: _Output) -> web.StreamResponse:
        query = request.query
        try:
            timeout = int(query.get("timeoutSeconds") or 0)
        except ValueError:
            raise _error(400, f"invalid timeoutSeconds: {query['timeoutSeconds']!r}") from None
        loop = asyncio.get_running_loop()
        watcher = _Watcher(target.kind, target.namespace,
                           LabelSelector(query.get("labelSelector", "")),
                           FieldSelector(query.get("fieldSelector", "")),
                           _parse_bool(query.get("allowWatchBookmarks"), "allowWatchBookmarks"),
                           loop, asyncio.Event(), output)
        response = web.StreamResponse(headers={"Content-Type": "application/json",
                                               "Cache-Control": "no-cache, private"})
        response.enable_chunked_encoding()
        try:
            self._store.open_watch(watcher, query.get("resourceVersion", ""))
        except StatusError as exc:
            if exc.code != 410:
                raise
            # As the real server: a 200, then the Status as an ERROR event, then the end.
            await response.prepare(request)
            await response.write(_event_line("ERROR", exc.status))
            await response.write_eof()
            return response
        try:
            await response.prepare(request)
            await self._stream(request, response, watcher,
                               loop.time() + timeout if timeout else None)
        except ConnectionError:
            pass  # the client went away
        finally:
            self._store.close_watch(watcher)
        return response

    async def _stream(self, request: web.Request, response: web.StreamResponse,
                      watcher: _Watcher, deadline: float | None) -> None:
        loop = asyncio.get_running_loop()
        next_bookmark = loop.time() + self.bookmark_interval
        while True:
            watcher.wakeup.clear()
            transport = request.transport
            if watcher.dropped:
                if transport is not None:
                    transport.abort()  # no terminating chunk: the client sees a broken stream
                return
            if self._store.closing or transport is None or transport.is_closing():
                break
            now = loop.time()
            if not self._store.paused:
                if deadline is not None and now >= deadline:
                    break
                events, version = self._store.take(watcher)
                for type_, obj in events:
                    await response.write(_event_line(type_, _represent(watcher.kind, obj,
                                                                       watcher.output)))
                due = watcher.bookmark_requested or now >= next_bookmark
                if watcher.bookmarks and due:
                    watcher.bookmark_requested = False
                    next_bookmark = now + self.bookmark_interval
                if watcher.bookmarks and due and version >= watcher.since:
                    await response.write(_event_line("BOOKMARK", _represent(watcher.kind, {
                        "kind": watcher.kind.kind, "apiVersion": watcher.kind.api_version,
                        "metadata": {"resourceVersion": str(version)}}, watcher.output)))
            wait = 0.25  # also how soon a vanished client is noticed
            if not self._store.paused:
                if deadline is not None:
                    wait = min(wait, deadline - now)
                if watcher.bookmarks:
                    wait = min(wait, next_bookmark - now)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(watcher.wakeup.wait(), max(wait, 0.001))
        await response.write_eof()


_CONTINUE_EXPIRED: Final = (
    "The provided continue parameter is too old to display a consistent list result. You can "
    "start a new list without the continue parameter, or use the continue token in this "
    "response to retrieve the remainder of the results. Continuing with the provided token "
    "results in an inconsistent list - objects that were created, modified, or deleted "
    "between the time the first chunk was returned and now may show up in the list.")


def _close_loop(loop: asyncio.AbstractEventLoop) -> None:
    """asyncio.run's ending, and then one more step: a connection accepted as shutdown
    began (a watcher reconnecting) gets its transport after aiohttp's cleanup, and its
    accepting task, cancelled here, only schedules the socket's close; so every
    transport the loop still holds (the selector loop's own table by file descriptor:
    private, but this is a test double) is aborted and its close run before the loop
    closes. Otherwise the socket is found unclosed by the garbage collector during some
    later test (a ResourceWarning)."""
    try:
        tasks = asyncio.all_tasks(loop)
        for task in tasks:
            task.cancel()
        loop.run_until_complete(asyncio.gather(*tasks, return_exceptions=True))
        held: Any = getattr(loop, "_transports", {})
        for transport in list(held.values()):
            transport.abort()
        for _ in range(3):
            loop.run_until_complete(asyncio.sleep(0))
        loop.run_until_complete(loop.shutdown_asyncgens())
        loop.run_until_complete(loop.shutdown_default_executor())
    finally:
        asyncio.set_event_loop(None)
        loop.close()

