"""A Kubernetes API server double that speaks the real list/watch wire protocol.

Why: no cluster is reachable in CI, and a mock of the client would test nothing. This is
an HTTP server on 127.0.0.1 that the *official* ``kubernetes`` client talks to unchanged
(``kubeconfig()`` writes the file it loads), so the code under test is the code that
runs against a real cluster. It serves the kinds in ``kinds.WATCHED``, and the Secrets
and MutatingWebhookConfigurations (cluster-scoped) the injection webhook writes, and
behaves like
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

ServiceAccount tokens (``tests/kube/tokens.py``): ServiceAccounts, TokenRequest (the
``token`` subresource, pod-bound, audiences, expiry) and TokenReview in the real wire
format, so the control plane's proxy authentication runs against it unchanged;
``pod_token()`` is what the kubelet would mount, ``review_token()`` what TokenReview says.
Such a token for the API server's own audience authenticates to the double too (RBAC
binds nothing to any account but the control plane's).

The gateway controller's writes: apps/v1 Deployments (stored as sent, with a status
subresource; no controller makes pods or sets their status) and garbage collection: when
an object is deleted, every object whose ownerReferences name only owners that are gone
(by uid) is deleted too, at once (background propagation; a real collector takes a
moment).

Not modelled: namespaces as objects (any namespace exists), finalizers, field managers,
HTTP/2; YAML, protobuf
and Table responses (where the real server would send one, a 406 says the double
cannot); for Pods, any scheduler or kubelet (a Pod stays Pending until ``update_status``),
admission plugins (service account volume, tolerations, priority) and graceful deletion
(a DELETE removes the Pod at once, as for one never scheduled).

It runs in its own thread with its own event loop, so synchronous code (the client)
and async tests can both use it; every method here is thread-safe.

Layout: this module is the double's Python API (lifecycle, the world, faults); the rest
is split by topic, each module importing only those before it: ``constants``, ``errors``
(Status objects), ``wire`` (selectors, patches), ``admission`` (defaults, validation),
``negotiation`` (Accept headers), ``storage`` (objects, history, watchers), ``rbac``,
``routing`` (paths and verbs), ``writes`` and ``http`` (the handlers).
"""

from __future__ import annotations

import asyncio
import copy
import json
import socket
import threading
from pathlib import Path

from controlplane.sources.kubernetes.kinds import (
    PODS,
    SECURITY_POLICIES,
    SIDECARS,
    TELEMETRIES,
    TRAFFIC_POLICIES,
    Kind,
)
from tests.kube import gateway_api
from tests.kube.admission import (
    security_policy_schema,
    sidecar_schema,
    telemetry_schema,
    traffic_policy_schema,
)
from tests.kube.constants import (
    ADMIN_TOKEN,
    TOKEN,
    Obj,
)
from tests.kube.errors import (
    StatusError,
    status_object,
)
from tests.kube.http import _Handlers
from tests.kube.rbac import Rbac
from tests.kube.routing import RecordedRequest, _Failure
from tests.kube.storage import (
    _kind_named,
    _kind_of,
    _Store,
)
from tests.kube.tokens import TokenAuthority

__all__ = ["ADMIN_TOKEN", "TOKEN", "ApiServerDouble", "RecordedRequest", "StatusError",
           "status_object"]


class ApiServerDouble(_Handlers):
    """See the module docstring. ``start()`` it (or use it as a context manager), point
    the client at ``kubeconfig(path)``, change the world with ``create``/``update``/
    ``delete``/``apply``, and break it with the fault methods."""

    def __init__(self, port: int = 0, *, history_limit: int = 1000,
                 bookmark_interval: float = 60.0, crd_installed: bool = True,
                 crd_schema: Obj | None = None, rbac: Rbac | bool = True,
                 too_large_wait: float = 3.0, min_token_seconds: int = 600,
                 token_leeway: float = 60.0, gateway_api_installed: bool = True) -> None:
        """``crd_installed=False`` makes TrafficPolicy, Sidecar and SecurityPolicy paths
        404 until ``install_crd()``; ``gateway_api_installed=False`` the Gateway API's
        (tests/kube/gateway_api.py) until ``install_gateway_api()``; ``crd_schema``
        (TrafficPolicy's) defaults to the schema of the CRD the project ships, as the
        others' always do; ``rbac``:
        True authorizes the service account with the shipped ClusterRole, False allows
        it everything, an ``Rbac`` is that policy (``self.rbac`` may change at any time).
        ``min_token_seconds`` (the real 600) and ``token_leeway`` (go-jose's 60 s past
        ``exp``) may be lowered for tests of token rotation and expiry."""
        self.port = port
        self.bookmark_interval = bookmark_interval
        self.rbac: Rbac | None = Rbac() if rbac is True else (rbac or None)
        self.too_large_wait = too_large_wait
        self.crd_installed = crd_installed
        self.gateway_api_installed = gateway_api_installed
        self._store = _Store(history_limit, {
            TRAFFIC_POLICIES: crd_schema or traffic_policy_schema(),
            SIDECARS: sidecar_schema(), SECURITY_POLICIES: security_policy_schema(),
            TELEMETRIES: telemetry_schema(), **gateway_api.schemas()})
        self.tokens = TokenAuthority(self._store, min_seconds=min_token_seconds,
                                     leeway=token_leeway)
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
            namespace = (meta.get("namespace") or "default") if kind.namespaced else ""
            exists = (namespace, meta.get("name", "")) in (
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

    def pod_token(self, namespace: str, pod: str, audiences: tuple[str, ...] = (
            "controlplane",), expiration_seconds: int = 3600) -> str:
        """What the kubelet mounts in a projected token volume: a token of the pod's
        ServiceAccount (``spec.serviceAccountName``, else ``default``), bound to the pod.
        Raises StatusError as TokenRequest would (no such pod or ServiceAccount)."""
        found = self.get(PODS, namespace, pod)
        account = found.get("spec", {}).get("serviceAccountName") or "default"
        response = self.tokens.request(namespace, account, {
            "spec": {"audiences": list(audiences), "expirationSeconds": expiration_seconds,
                     "boundObjectRef": {"kind": "Pod", "apiVersion": "v1", "name": pod,
                                        "uid": found["metadata"]["uid"]}}})
        return str(response["status"]["token"])

    def review_token(self, token: str, audiences: tuple[str, ...] = ("controlplane",)) -> Obj:
        """A TokenReview's status, as ``POST .../tokenreviews`` answers it."""
        review = self.tokens.review({"spec": {"token": token, "audiences": list(audiences)}})
        status: Obj = review["status"]
        return status

    def install_crd(self) -> None:
        """Serve TrafficPolicies and Sidecars (after ``crd_installed=False``)."""
        self.crd_installed = True

    def install_gateway_api(self) -> None:
        """Serve the Gateway API kinds (after ``gateway_api_installed=False``)."""
        self.gateway_api_installed = True

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
