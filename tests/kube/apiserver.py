"""A Kubernetes API server double that speaks the real list/watch wire protocol.

Why: no cluster is reachable in CI, and a mock of the client would test nothing. This is
an HTTP server on 127.0.0.1 that the *official* ``kubernetes`` client talks to unchanged
(``kubeconfig()`` writes the file it loads), so the code under test is the code that
runs against a real cluster. It serves the kinds in ``kinds.WATCHED`` and behaves like
kube-apiserver where the source can tell the difference:

- one global resourceVersion counter (etcd's revision), as a string on every object
  and list; uid, creationTimestamp, generation (bumped by spec changes), defaults
  (a Service's clusterIP, port protocols, targetPort; a Pod's scheme defaults and its
  ``Pending`` status with a qosClass on create), validation errors as 422 Status
  objects with the real messages (loopback EndpointSlice addresses; a Pod's containers,
  their names and images, and its spec being immutable but for images; the TrafficPolicy
  CRD's structural schema, which also prunes unknown fields with a ``Warning`` header);
- LIST with labelSelector, fieldSelector (metadata.name/namespace), limit/continue
  (every page is a consistent snapshot at the first page's resourceVersion);
  built-in list items carry no kind/apiVersion, custom-resource items do;
- WATCH: a chunked 200 with one JSON event per line, replayed from a bounded history
  after ``resourceVersion`` (or the current state as ADDED events when it is unset or
  "0"), label-selector transitions as ADDED/DELETED, BOOKMARKs, ``timeoutSeconds``,
  and ``410 Expired`` as an ERROR event in a 200 stream when the version is older than
  the history (``compact()``);
- the ``status`` subresource (Services, Pods, TrafficPolicies): updates of the main
  resource ignore status, updates of ``/status`` ignore everything else; no-op writes do
  not bump the resourceVersion or make an event;
- content negotiation by the Accept header (clauses by q, then in order): JSON objects,
  or, as client-go's metadata client asks (``as=PartialObjectMetadataList`` to LIST,
  ``as=PartialObjectMetadata`` to WATCH and GET; ``g=meta.k8s.io``, ``v=v1`` or
  ``v1beta1``), PartialObjectMetadata carrying each object's whole metadata: bookmarks
  too, ERROR events stay Status objects, an empty list has ``"items": null``. The real
  server's mismatches are kept: ``as=PartialObjectMetadata`` on a LIST is a 406 even with
  a fallback clause after it, ``as=PartialObjectMetadataList`` on a WATCH sends whole
  objects. Nothing acceptable is a ``406 NotAcceptable`` Status;
- PATCH as merge patch and JSON patch; strategic merge and server-side apply are refused
  with 415 rather than approximated.

Faults the real world has and tests need: ``drop_watches()`` (connections cut
mid-stream), ``pause()``/``resume()`` (silent connections), ``fail_next()`` (error
responses), ``restart()`` (the same port, optionally with the history gone), and
``requests`` (what the client asked for, Accept header included, to assert re-lists).

Authentication and RBAC as the control plane meets them: ``kubeconfig()`` gives the
server's service account, whose requests are authorized by the ClusterRole shipped in
deploy/kubernetes (``tests/kube/rbac.py``; 403 in the real format), bound cluster-wide or,
with ``rbac=Rbac(namespaces=[...])``, in some namespaces only; ``kubeconfig(admin=True)``
is a cluster admin (what tests write with); any other token is a 401.

Like a real server on the points the source relies on: a BOOKMARK about once a minute
(``bookmark_interval``, shorter in tests); ``restart()`` comes back with an empty watch
cache (every older resourceVersion is 410 Expired); a LIST at a resourceVersion newer
than the server has waits ``too_large_wait`` seconds, then answers 504 "Too large
resource version" with ``Retry-After`` (what a lagging replica, or one restored from an
etcd backup, answers; ``restore()`` makes one).

Not modelled: namespaces as objects (any namespace exists), finalizers, field managers,
HTTP/2; YAML, protobuf
and Table responses (where the real server would send one, a 406 says the double
cannot); for Pods, any scheduler or kubelet (a Pod stays Pending until ``update_status``),
admission plugins (service account volume, tolerations, priority) and graceful deletion
(a DELETE removes the Pod at once, as for one never scheduled).

It runs in its own thread with its own event loop, so synchronous code (the client)
and async tests can both use it; every method here is thread-safe.

Layout: this module is the HTTP server and its Python API; the rest of the double is
split by topic, each module importing only those before it: ``constants``, ``errors``
(Status objects), ``wire`` (selectors, patches), ``admission`` (defaults, validation),
``negotiation`` (Accept headers), ``storage`` (objects, history, watchers), ``rbac``.
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
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from aiohttp import web

from controlplane.sources.kubernetes.kinds import (
    ENDPOINT_SLICES,
    TRAFFIC_POLICIES,
    WATCHED,
    Kind,
)
from tests.kube.admission import (
    _prune,
    traffic_policy_schema,
)
from tests.kube.constants import (
    _BUILTIN,
    _STATUS_SUBRESOURCE,
    _TRUE,
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
from tests.kube.storage import (
    _event_line,
    _kind_named,
    _kind_of,
    _parse_bool,
    _parse_version,
    _Store,
    _Watcher,
)
from tests.kube.wire import (
    FieldSelector,
    LabelSelector,
    json_patch,
    merge_patch,
)

__all__ = ["ADMIN_TOKEN", "TOKEN", "ApiServerDouble", "RecordedRequest", "StatusError",
           "status_object"]

# --- HTTP -------------------------------------------------------------------------------


@dataclass(frozen=True)
class RecordedRequest:
    """One request as the API server's audit log would name it."""

    method: str
    path: str
    query: Mapping[str, str]
    verb: str  # list | watch | get | create | update | patch | delete | other
    kind: Kind | None = None
    namespace: str | None = None
    name: str | None = None
    subresource: str | None = None
    accept: str | None = None  # the Accept header: whole objects or metadata only


@dataclass(frozen=True)
class _Target:
    kind: Kind
    namespace: str | None
    name: str | None
    subresource: str | None


@dataclass
class _Failure:
    remaining: int
    status: int
    path: str | None


def _route(path: str) -> _Target | None:
    """/api/v1[/namespaces/NS]/PLURAL[/NAME[/status]] and the /apis/GROUP/VERSION ones."""
    parts = [p for p in path.split("/") if p]
    if len(parts) >= 2 and parts[0] == "api":
        group, version, rest = "", parts[1], parts[2:]
    elif len(parts) >= 3 and parts[0] == "apis":
        group, version, rest = parts[1], parts[2], parts[3:]
    else:
        return None
    namespace = None
    if len(rest) >= 3 and rest[0] == "namespaces":
        namespace, rest = rest[1], rest[2:]
    if not rest or len(rest) > 3:
        return None
    kind = next((k for k in WATCHED if (k.group, k.version, k.plural) == (group, version,
                                                                          rest[0])), None)
    if kind is None:
        return None
    name = rest[1] if len(rest) >= 2 else None
    subresource = rest[2] if len(rest) == 3 else None
    if name is not None and namespace is None:
        return None  # namespaced objects are only addressable in their namespace
    if subresource is not None and (subresource != "status" or kind not in _STATUS_SUBRESOURCE):
        return None
    return _Target(kind, namespace, name, subresource)


def _verb(method: str, target: _Target | None, query: Mapping[str, str]) -> str:
    if target is None:
        return "other"
    if target.name is None:
        if method == "GET":
            return "watch" if query.get("watch", "") in _TRUE else "list"
        return {"POST": "create", "DELETE": "deletecollection"}.get(method, "other")
    return {"GET": "get", "PUT": "update", "PATCH": "patch", "DELETE": "delete"}.get(
        method, "other")


class ApiServerDouble:
    """See the module docstring. ``start()`` it (or use it as a context manager), point
    the client at ``kubeconfig(path)``, change the world with ``create``/``update``/
    ``delete``/``apply``, and break it with the fault methods."""

    def __init__(self, port: int = 0, *, history_limit: int = 1000,
                 bookmark_interval: float = 60.0, crd_installed: bool = True,
                 crd_schema: Obj | None = None, rbac: Rbac | bool = True,
                 too_large_wait: float = 3.0) -> None:
        """``crd_installed=False`` makes TrafficPolicy paths 404 until ``install_crd()``;
        ``crd_schema`` defaults to the schema of the CRD the project ships; ``rbac``:
        True authorizes the service account with the shipped ClusterRole, False allows
        it everything, an ``Rbac`` is that policy (``self.rbac`` may change at any time)."""
        self.port = port
        self.bookmark_interval = bookmark_interval
        self.rbac: Rbac | None = Rbac() if rbac is True else (rbac or None)
        self.too_large_wait = too_large_wait
        self.crd_installed = crd_installed
        self._store = _Store(history_limit, crd_schema or traffic_policy_schema())
        self._failures: list[_Failure] = []
        self._requests: list[RecordedRequest] = []
        self.server_errors: list[BaseException] = []  # handler crashes: a bug in the double
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stopping: asyncio.Event | None = None

    # -- lifecycle

    def start(self) -> ApiServerDouble:
        """Listen on 127.0.0.1:``port`` (0: a free one, kept for restarts)."""
        if self._thread is not None:
            raise RuntimeError("already started")
        sock = socket.create_server(("127.0.0.1", self.port))  # SO_REUSEADDR on POSIX
        with self._store.lock:
            self._store.closing = False
        self.port = sock.getsockname()[1]
        ready = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(sock, ready), daemon=True,
                                        name=f"apiserver-double-{self.port}")
        self._thread.start()
        if not ready.wait(10) or self._loop is None:
            sock.close()
            self._thread = None
            cause = self.server_errors[-1] if self.server_errors else None
            raise RuntimeError("the API server double did not start") from cause
        return self

    def stop(self) -> None:
        """Close every watch cleanly (a graceful shutdown), then the listener."""
        thread, loop, stopping = self._thread, self._loop, self._stopping
        if thread is None:
            return
        with self._store.lock:
            self._store.closing = True
            for watcher in self._store.watchers:
                watcher.wake()
        if loop is not None and stopping is not None:
            loop.call_soon_threadsafe(stopping.set)
        thread.join(10)
        if thread.is_alive():
            raise RuntimeError("the API server double did not stop within 10 s")
        self._thread = self._loop = self._stopping = None

    def restart(self, keep_state: bool = False) -> None:
        """Stop and start on the same port. Objects and the resourceVersion counter always
        survive (they live in etcd); the watch history does not, as a fresh API server's
        watch cache starts empty, so every older resourceVersion gets 410 Expired.
        ``keep_state=True`` keeps the history (a load balancer's blip, not a restart)."""
        self.stop()
        if not keep_state:
            self._store.compact()
        self.start()

    def backup(self) -> Obj:
        """What etcd holds now: every object and the resourceVersion counter."""
        with self._store.lock:
            return {"version": self._store.version,
                    "objects": copy.deepcopy(self._store.objects)}

    def restore(self, backup: Obj, *, restart: bool = True) -> None:
        """Go back to an etcd backup: the objects and the counter go back in time, so a
        client's newer resourceVersion is "too large" for this server, and its watches
        from that version are silent. ``restart=False`` keeps the connections open (a
        load balancer moving clients to a replica that lags behind)."""
        if restart:
            self.stop()
        with self._store.lock:
            self._store.objects = copy.deepcopy(backup["objects"])
            self._store.version = int(backup["version"])
            self._store.compact()
        if restart:
            self.start()

    def __enter__(self) -> ApiServerDouble:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def url(self) -> str:
        if not self.port:
            raise RuntimeError("not started")
        return f"http://127.0.0.1:{self.port}"

    def kubeconfig(self, path: str | Path, *, admin: bool = False) -> Path:
        """Write a kubeconfig for this server and return its path: the control plane's
        service account (RBAC applies), or with ``admin`` a cluster admin."""
        path = Path(path)
        config = {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [{"name": "double", "cluster": {"server": self.url}}],
            "users": [{"name": "double", "user": {"token": ADMIN_TOKEN if admin else TOKEN}}],
            "contexts": [{"name": "double", "context": {"cluster": "double", "user": "double",
                                                        "namespace": "default"}}],
            "current-context": "double",
        }
        path.write_text(json.dumps(config, indent=2) + "\n")  # JSON is YAML
        return path

    # -- the world, from Python (each write is one resourceVersion and one event)

    @property
    def resource_version(self) -> str:
        """The current (latest) resourceVersion."""
        with self._store.lock:
            return str(self._store.version)

    def create(self, obj: Obj) -> Obj:
        """Create as a POST would (default namespace: ``default``); returns the stored
        object. Raises StatusError (409 AlreadyExists, 422 Invalid, ...)."""
        return self._store.create(obj)[0]

    def update(self, obj: Obj) -> Obj:
        """Replace as a PUT would: conditional on metadata.resourceVersion when it is set;
        the status of a kind with a status subresource is kept."""
        return self._store.update(obj)[0]

    def update_status(self, obj: Obj) -> Obj:
        """Replace the status as a PUT of /status would; everything else is kept."""
        return self._store.update(obj, subresource="status")[0]

    def apply(self, obj: Obj) -> Obj:
        """Create, or update unconditionally if it exists (a test convenience, not SSA)."""
        kind = _kind_of(obj)
        meta = obj.get("metadata", {})
        with self._store.lock:
            exists = (meta.get("namespace") or "default", meta.get("name", "")) in (
                self._store.objects[kind])
            if exists:
                return self._store.update(obj, unconditional=True)[0]
            fresh = copy.deepcopy(obj)
            fresh.get("metadata", {}).pop("resourceVersion", None)
            return self._store.create(fresh)[0]

    def delete(self, kind: Kind | str, namespace: str, name: str) -> Obj:
        """Delete; returns the last state (at the deletion's resourceVersion)."""
        return self._store.delete(_kind_named(kind), namespace, name)

    def get(self, kind: Kind | str, namespace: str, name: str) -> Obj:
        """The stored object (a copy); raises StatusError 404 when there is none."""
        return self._store.get(_kind_named(kind), namespace, name)

    def objects(self, kind: Kind | str) -> list[Obj]:
        """Every stored object of a kind, in key order (copies)."""
        with self._store.lock:
            current = self._store.objects[_kind_named(kind)]
            return [copy.deepcopy(current[k]) for k in sorted(current)]

    def install_crd(self) -> None:
        """Serve TrafficPolicies (after ``crd_installed=False``)."""
        self.crd_installed = True

    # -- faults

    def compact(self) -> None:
        """Forget the history: watches from any older resourceVersion get 410 Expired,
        continue tokens from before expire too."""
        self._store.compact()

    def drop_watches(self) -> int:
        """Cut every open watch connection mid-stream, without the chunked terminator;
        returns how many."""
        with self._store.lock:
            for watcher in self._store.watchers:
                watcher.dropped = True
                watcher.wake()
            return len(self._store.watchers)

    def pause(self) -> None:
        """Watches go silent (no events, no bookmarks) but stay open; new watches get
        their headers and then nothing. Events are held, not lost."""
        with self._store.lock:
            self._store.paused = True

    def resume(self) -> None:
        """Deliver what was held and carry on."""
        with self._store.lock:
            self._store.paused = False
            for watcher in self._store.watchers:
                watcher.wake()

    def bookmark_now(self) -> None:
        """Send a BOOKMARK on every watch that allows them."""
        with self._store.lock:
            for watcher in self._store.watchers:
                watcher.bookmark_requested = True
                watcher.wake()

    def fail_next(self, n: int = 1, status: int = 500, *, path: str | None = None) -> None:
        """The next ``n`` requests (whose path starts with ``path``, if given) fail with
        ``status`` and a Status body; 429 also carries ``Retry-After: 1``."""
        with self._store.lock:
            self._failures.append(_Failure(n, status, path))

    # -- observation

    @property
    def requests(self) -> list[RecordedRequest]:
        """Every request so far, in order (a copy)."""
        with self._store.lock:
            return list(self._requests)

    def count(self, verb: str, kind: Kind | str | None = None) -> int:
        """How many requests with this verb (list, watch, get, create, patch, ...)."""
        wanted = _kind_named(kind) if kind is not None else None
        return sum(1 for r in self.requests
                   if r.verb == verb and (wanted is None or r.kind == wanted))

    def clear_requests(self) -> None:
        with self._store.lock:
            self._requests.clear()

    @property
    def open_watches(self) -> int:
        with self._store.lock:
            return len(self._store.watchers)

    def wait_for_watches(self, count: int, kind: Kind | str | None = None,
                         timeout: float = 5.0) -> None:
        """Block until at least ``count`` watches (of ``kind``) are open."""
        wanted = _kind_named(kind) if kind is not None else None

        def enough() -> bool:
            return sum(1 for w in self._store.watchers
                       if wanted is None or w.kind == wanted) >= count

        with self._store.changed:
            if not self._store.changed.wait_for(enough, timeout):
                raise TimeoutError(f"fewer than {count} watches open after {timeout} s")

    async def async_wait_for_watches(self, count: int, kind: Kind | str | None = None,
                                     timeout: float = 5.0) -> None:
        """``wait_for_watches`` for async tests (keeps their loop running)."""
        await asyncio.to_thread(self.wait_for_watches, count, kind, timeout)

    # -- the server thread

    def _run(self, sock: socket.socket, ready: threading.Event) -> None:
        try:
            asyncio.run(self._serve(sock, ready))
        except BaseException as exc:
            self.server_errors.append(exc)
            ready.set()

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
            await runner.cleanup()

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
        if token != TOKEN:
            raise _error(401, "Unauthorized")
        rbac = self.rbac
        if rbac is None or target is None:
            return  # discovery, /version and health are open to every authenticated user
        if not rbac.allows(verb, target.kind, target.namespace, target.subresource):
            raise StatusError(rbac.forbidden(verb, target.kind, target.namespace, target.name,
                                             target.subresource))

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
        if target is None or (target.kind == TRAFFIC_POLICIES and not self.crd_installed):
            raise _resource_not_found()
        method = request.method
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
            if method == "POST" and target.namespace is not None:
                return await self._create(request, target, output)
        else:
            assert target.namespace is not None
            if method == "GET":
                return web.json_response(_represent(target.kind, self._store.get(
                    target.kind, target.namespace, target.name), output))
            if method in ("PUT", "PATCH"):
                return await self._write(request, target, output)
            if method == "DELETE" and target.subresource is None:
                gone = self._store.delete(target.kind, target.namespace, target.name)
                if target.kind == ENDPOINT_SLICES:  # its REST storage returns a Status
                    return web.json_response({
                        "kind": "Status", "apiVersion": "v1", "metadata": {},
                        "status": "Success", "details": {
                            **_details(target.kind, target.name),
                            "uid": gone["metadata"]["uid"]}})
                return web.json_response(_represent(target.kind, gone, output))
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

    # -- writes over HTTP

    async def _body(self, request: web.Request) -> Any:
        try:
            return await request.json(loads=json.loads)
        except ValueError as exc:
            raise _error(400, f"the object provided is unrecognized: {exc}") from None

    def _check_body(self, body: Any, target: _Target) -> Obj:
        if not isinstance(body, dict):
            raise _error(400, "the object provided is unrecognized (must be a JSON object)")
        kind = target.kind
        if body.get("apiVersion", kind.api_version) != kind.api_version:
            raise _error(400, f"the API version in the data ({body['apiVersion']}) does not "
                         f"match the expected API version ({kind.api_version})")
        if body.get("kind", kind.kind) != kind.kind:
            raise _error(400, f"the kind in the data ({body['kind']}) does not match the "
                         f"expected kind ({kind.kind})")
        meta = body.setdefault("metadata", {})
        if meta.get("namespace", target.namespace) != target.namespace:
            raise _error(400, "the namespace of the provided object does not match the "
                         "namespace sent on the request")
        meta["namespace"] = target.namespace
        if target.name is not None and meta.get("name", target.name) != target.name:
            raise _error(400, f"the name of the object ({meta['name']}) does not match the "
                         f"name on the URL ({target.name})")
        if target.name is not None:
            meta["name"] = target.name
        body["apiVersion"], body["kind"] = kind.api_version, kind.kind
        return body

    async def _create(self, request: web.Request, target: _Target,
                      output: _Output) -> web.Response:
        body = self._check_body(await self._body(request), target)
        body = self._field_validation(request, body, target)
        obj, warnings = self._store.create(body, target.namespace)
        return self._respond(_represent(target.kind, obj, output), warnings, status=201)

    async def _write(self, request: web.Request, target: _Target,
                     output: _Output) -> web.Response:
        assert target.namespace is not None and target.name is not None
        if request.method == "PUT":
            body = self._check_body(await self._body(request), target)
        else:
            body = self._check_body(
                self._patched(request, await self._body(request),
                              self._store.get(target.kind, target.namespace, target.name)),
                target)
        body = self._field_validation(request, body, target)
        obj, warnings = self._store.update(body, subresource=target.subresource)
        return self._respond(_represent(target.kind, obj, output), warnings, status=200)

    @staticmethod
    def _patched(request: web.Request, patch: Any, current: Obj) -> Any:
        content_type = request.content_type
        if content_type == "application/merge-patch+json":
            return merge_patch(current, patch)
        if content_type == "application/json-patch+json":
            if not isinstance(patch, list):
                raise _error(400, "the JSON patch must be a list of operations")
            try:
                return json_patch(current, patch)
            except (ValueError, KeyError, IndexError, TypeError) as exc:
                raise _error(422, f"the server rejected our request due to an error in our "
                             f"request: {exc}") from None
        # Strategic merge (built-ins only) and server-side apply are not implemented; a
        # loud 415 beats a silently wrong merge.
        raise _error(415, "the body of the request was in an unknown format - accepted media "
                     "types include: application/json-patch+json, "
                     "application/merge-patch+json (the API server double does not implement "
                     f"{content_type})")

    def _field_validation(self, request: web.Request, body: Obj, target: _Target) -> Obj:
        """fieldValidation=Strict turns pruned fields into a 400, as the real server does."""
        if request.query.get("fieldValidation") != "Strict" or self._store.crd_schema is None:
            return body
        if target.kind != TRAFFIC_POLICIES:
            return body
        pruned: list[str] = []
        _prune({k: v for k, v in body.items() if k != "metadata"}, self._store.crd_schema, "",
               pruned)
        if pruned:
            raise _error(400, "strict decoding error: " + ", ".join(
                f'unknown field "{p}"' for p in pruned))
        return body

    @staticmethod
    def _respond(obj: Obj, warnings: list[str], status: int) -> web.Response:
        """The object, with a ``Warning: 299`` header per pruned field (fieldValidation=Warn,
        the default)."""
        response = web.json_response(obj, status=status)
        for text in warnings:
            quoted = text.replace("\\", "\\\\").replace('"', '\\"')
            response.headers.add("Warning", f'299 - "{quoted}"')
        return response


_CONTINUE_EXPIRED: Final = (
    "The provided continue parameter is too old to display a consistent list result. You can "
    "start a new list without the continue parameter, or use the continue token in this "
    "response to retrieve the remainder of the results. Continuing with the provided token "
    "results in an inconsistent list - objects that were created, modified, or deleted "
    "between the time the first chunk was returned and now may show up in the list.")

