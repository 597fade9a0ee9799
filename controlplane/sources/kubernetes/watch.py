"""List, then watch from the list's resourceVersion, forever, for one kind.

The official client is synchronous, so each watcher runs in a thread and hands what it
sees to the event loop. The loop is kopf's: list and mark "listed"; watch from the
resourceVersion with bookmarks (which keep it fresh); when a watch ends (the server's
timeout, a dropped connection) watch again from the last resourceVersion; when a watch
is silent past the inactivity timeout (no bookmark either) or 410 Gone, list again, which
replaces what was known, so nothing stale and nothing duplicated survives; on errors back
off with jitter, at most about a second, so every watch is back within a second of the
API's return.

A 403 is not an outage: the server may not read this kind here (RBAC). The watcher says
so once (``Forbidden``, with the rule to add) and keeps asking, slowly, so a fixed role
takes effect without a restart; the other kinds and namespaces carry on.
"""

from __future__ import annotations

import json
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import structlog
import urllib3
from kubernetes import client, watch
from kubernetes.client.exceptions import ApiException

from controlplane import metrics
from controlplane.sources.kubernetes.kinds import (
    ENDPOINT_SLICES,
    GATEWAY_API,
    GATEWAY_API_RELEASE,
    METADATA_LIST_ACCEPT,
    METADATA_WATCH_ACCEPT,
    PODS,
    SECRETS,
    SERVICES,
    Kind,
)

log = structlog.get_logger("controlplane.source.kubernetes")


@dataclass(frozen=True)
class WatchTiming:
    """How long to wait for what. Defaults suit a real cluster; tests shorten them."""

    server_timeout: int = 300  # asked of the API server: end each watch after this long
    inactivity: float = 330.0  # no byte (not even a bookmark) for this long: reconnect
    connect: float = 5.0
    backoff_initial: float = 0.5
    backoff_max: float = 1.0  # an API back after an outage is seen within about this long
    forbidden_retry: float = 10.0  # how often a kind the server may not read is asked again
    page_size: int = 500


@dataclass(frozen=True)
class Listed:
    """A complete list: the truth for ``namespace`` (None: all namespaces)."""

    kind: Kind
    namespace: str | None
    items: list[dict[str, Any]]
    received: float = field(default_factory=time.time)  # for convergence (sources/base.py)


@dataclass(frozen=True)
class Listing:
    """The watch failed (an error, an outage, 410): what is known of ``kind`` in
    ``namespace`` may be stale until the next ``Listed``, so the source holds batches."""

    kind: Kind
    namespace: str | None


@dataclass(frozen=True)
class Forbidden:
    """The server may not list ``kind`` in ``namespace`` (403): what to add, and where."""

    kind: Kind
    namespace: str | None
    message: str


@dataclass(frozen=True)
class Changed:
    kind: Kind
    type: str  # ADDED | MODIFIED | DELETED
    obj: dict[str, Any]
    received: float = field(default_factory=time.time)  # when the watch read it


Event = Listed | Listing | Forbidden | Changed


class Gone(Exception):
    """The resourceVersion we watch from is too old (410): list again."""


class Silent(Exception):
    """No byte, not even a bookmark, past the inactivity timeout: list again. A server
    restored from a backup (or a lagging replica) is silent to a watch from a version it
    has not reached, so watching again from the same version would wait forever."""


class Watcher(threading.Thread):
    def __init__(self, kind: Kind, api: client.ApiClient, namespace: str | None,
                 emit: Callable[[Event], None], stop: threading.Event,
                 timing: WatchTiming, field_selector: str | None = None) -> None:
        """``field_selector``: only these objects (``metadata.name=NAME``): a gateway's
        Secrets are watched one by one, never all of them."""
        super().__init__(name=f"watch-{kind.plural}-{namespace or 'all'}", daemon=True)
        self.kind = kind
        self.namespace = namespace
        self.emit = emit
        self.stop_event = stop
        self.timing = timing
        self._list_fn, self._args = _list_function(kind, api, namespace)
        if field_selector:
            self._list_fn = _selected(self._list_fn, field_selector)
        self._failures = 0
        self._missing_logged = False
        self._forbidden_logged = False
        self._stale = False  # a Listing was emitted and no Listed since

    def run(self) -> None:
        where = self.namespace or "all namespaces"
        while not self.stop_event.is_set():
            try:
                items, version = self._list()
                self.emit(Listed(self.kind, self.namespace, items))
                self._stale = False
                if self._failures:
                    log.info("watch.recovered", kind=self.kind.kind, namespace=where,
                             failures=self._failures)
                self._failures = 0
                self._forbidden_logged = False
                self._missing_logged = False
                log.info("watch.listed", kind=self.kind.kind, namespace=where,
                         objects=len(items), resource_version=version)
                self._watch(version)
            except Gone:
                self._mark_stale()
                metrics.K8S_RELISTS.labels(self.kind.plural, "gone").inc()
                log.info("watch.expired", kind=self.kind.kind, namespace=where,
                         action="listing again")
            except Silent:
                self._mark_stale()
                metrics.K8S_RELISTS.labels(self.kind.plural, "silent").inc()
                log.warning("watch.silent", kind=self.kind.kind, namespace=where,
                            seconds=self.timing.inactivity, action="listing again",
                            hint="the API server sent nothing, not even a bookmark; it may "
                            "lag or have been restored from a backup")
            except ApiException as exc:
                if exc.status == 403:
                    self._forbidden(exc)
                elif exc.status == 404 and self.kind.group not in ("", ENDPOINT_SLICES.group):
                    # The CRD is not installed: serve without policies, and keep looking.
                    # Said (and listed empty) once per absence, not at every look: each
                    # Listed makes the source convert the mesh again.
                    optional = self.kind in GATEWAY_API
                    if not self._missing_logged:
                        self.emit(Listed(self.kind, self.namespace, []))
                    level = log.debug if self._missing_logged else (
                        log.warning if optional else log.error)
                    level("watch.kind_missing", kind=self.kind.kind, hint=_missing_hint(
                        self.kind))
                    self._missing_logged = True
                    if optional:  # many clusters never install it: look again slowly
                        metrics.K8S_RELISTS.labels(self.kind.plural, "error").inc()
                        self.stop_event.wait(self.timing.forbidden_retry)
                    else:
                        self._back_off()
                else:
                    self._failed(status=exc.status, error=str(exc.reason))
            except Exception as exc:  # connection refused, reset, timeouts: the API is away
                self._failed(error=f"{type(exc).__name__}: {exc}",
                             hint="retrying every second; check that the API server is "
                             "reachable")

    def _failed(self, **details: Any) -> None:
        """One failure: the first of a run is a warning, the rest (once a second during
        an outage, per kind and namespace) debug, until the next list succeeds."""
        self._mark_stale()
        level = log.debug if self._failures else log.warning
        level("watch.failed", kind=self.kind.kind, namespace=self.namespace or "all namespaces",
              **details)
        self._back_off()

    def _mark_stale(self) -> None:
        """Tell the source once per failure that this kind will be listed again."""
        if not self._stale:
            self._stale = True
            self.emit(Listing(self.kind, self.namespace))

    def _forbidden(self, exc: ApiException) -> None:
        """Say once what the server may not read and the rule that allows it; ask again
        every ``forbidden_retry`` seconds."""
        message = forbidden_message(self.kind, self.namespace, _status_message(exc))
        self.emit(Forbidden(self.kind, self.namespace, message))
        level = log.debug if self._forbidden_logged else log.error
        level("watch.forbidden", kind=self.kind.kind,
              namespace=self.namespace or "all namespaces", problem=message)
        self._forbidden_logged = True
        metrics.K8S_RELISTS.labels(self.kind.plural, "error").inc()
        self.stop_event.wait(self.timing.forbidden_retry)

    def _back_off(self) -> None:
        metrics.K8S_RELISTS.labels(self.kind.plural, "error").inc()
        delay = min(self.timing.backoff_max, self.timing.backoff_initial * 2 ** self._failures)
        self._failures = min(self._failures + 1, 16)
        self.stop_event.wait(delay * random.uniform(0.5, 1.0))

    def _list(self) -> tuple[list[dict[str, Any]], str]:
        """Every object, page by page (``limit``/``continue``), and the list's version."""
        items: list[dict[str, Any]] = []
        token: str | None = None
        while True:
            kwargs: dict[str, Any] = {"limit": self.timing.page_size, "_preload_content": False,
                                      "_request_timeout": (self.timing.connect, 60)}
            if token:
                kwargs["_continue"] = token
            response = self._list_fn(*self._args, **kwargs)
            page = json.loads(response.data)
            items.extend(page.get("items") or [])
            meta = page.get("metadata") or {}
            token = meta.get("continue")
            if not token:
                return items, str(meta.get("resourceVersion", ""))

    def _watch(self, version: str) -> None:
        """Watch until 410 (raises Gone) or stop; reconnect from ``version`` otherwise."""
        while not self.stop_event.is_set():
            stream = watch.Watch()
            try:
                for event in stream.stream(
                        self._list_fn, *self._args, resource_version=version,
                        allow_watch_bookmarks=True,
                        timeout_seconds=self.timing.server_timeout,
                        _request_timeout=(self.timing.connect, self.timing.inactivity)):
                    if self.stop_event.is_set():
                        stream.stop()
                        return
                    obj: dict[str, Any] = event["raw_object"]
                    version = str(obj.get("metadata", {}).get("resourceVersion") or version)
                    kind = event["type"]
                    metrics.K8S_EVENTS.labels(self.kind.plural, kind).inc()
                    if kind in ("ADDED", "MODIFIED", "DELETED"):
                        self.emit(Changed(self.kind, kind, obj))
            except ApiException as exc:
                if exc.status == 410:
                    raise Gone from exc
                raise
            except urllib3.exceptions.ReadTimeoutError as exc:
                raise Silent from exc
            except urllib3.exceptions.ProtocolError as exc:
                # Dropped mid-stream: watch again at once from where we were; if that
                # version expired meanwhile, the server says 410. (A refused connection is
                # not caught here: it backs off.)
                metrics.K8S_RELISTS.labels(self.kind.plural, "reconnect").inc()
                log.info("watch.reconnecting", kind=self.kind.kind,
                         reason=type(exc).__name__, resource_version=version)
                self.stop_event.wait(random.uniform(0.05, 0.25))


def _missing_hint(kind: Kind) -> str:
    """What to install when a kind's CRD is not there (404 on its list)."""
    if kind in GATEWAY_API:
        return (f"install the Gateway API CRDs (release {GATEWAY_API_RELEASE}: kubectl apply "
                f"--server-side -k deploy/gateway-api) to route with {kind.kind}s; the mesh "
                "is served without them meanwhile")
    return (f"apply its CustomResourceDefinition (deploy/kubernetes/01-crd*.yaml); services "
            f"are served without {kind.kind}s meanwhile")


def _status_message(exc: ApiException) -> str:
    """The message of the Status object the API server sent, or the HTTP reason."""
    try:
        body = json.loads(exc.body) if exc.body else {}
    except (TypeError, ValueError):
        body = {}
    message = body.get("message") if isinstance(body, dict) else None
    return str(message or exc.reason or f"HTTP {exc.status}")


def forbidden_message(kind: Kind, namespace: str | None, detail: str) -> str:
    """What the server may not do, and the RBAC rule to add (kubectl's YAML)."""
    where = f"in namespace {namespace!r}" if namespace else "cluster-wide"
    binding = (f"a RoleBinding in namespace {namespace!r} (or the ClusterRoleBinding)"
               if namespace else "a ClusterRoleBinding")
    return (f"may not list and watch {kind.plural} {where}: {detail}; add the rule "
            f"{{apiGroups: [{kind.group!r}], resources: [{kind.plural!r}], verbs: [get, "
            f"list, watch]}} to the ClusterRole (deploy/kubernetes/02-rbac.yaml) and bind it "
            f"to the server's service account with {binding}; the rest is served meanwhile")


def _metadata_only(list_fn: Callable[..., Any]) -> Callable[..., Any]:
    """``list_fn`` asking for PartialObjectMetadata, as client-go's metadata client does: a
    Pod's labels without its spec and status (most of its bytes). A plain function, not
    the client's method, so the client's watch does not build V1Pod models from it."""

    def list_metadata(*args: Any, **kwargs: Any) -> Any:
        accept = METADATA_WATCH_ACCEPT if kwargs.get("watch") else METADATA_LIST_ACCEPT
        return list_fn(*args, _headers={"Accept": accept}, **kwargs)

    return list_metadata


def _selected(list_fn: Callable[..., Any], field_selector: str) -> Callable[..., Any]:
    """``list_fn`` with a fieldSelector on every list and watch (a plain function, so
    the client's watch does not build models from what it reads)."""

    def list_selected(*args: Any, **kwargs: Any) -> Any:
        return list_fn(*args, field_selector=field_selector, **kwargs)

    return list_selected


def _list_function(kind: Kind, api: client.ApiClient,
                   namespace: str | None) -> tuple[Callable[..., Any], tuple[Any, ...]]:
    if kind == PODS:
        core = client.CoreV1Api(api)
        if namespace is None:
            return _metadata_only(core.list_pod_for_all_namespaces), ()
        return _metadata_only(core.list_namespaced_pod), (namespace,)
    if kind == SECRETS:  # only ever one namespace, one name (field_selector)
        return client.CoreV1Api(api).list_namespaced_secret, (namespace,)
    if kind == SERVICES:
        core = client.CoreV1Api(api)
        if namespace is None:
            return core.list_service_for_all_namespaces, ()
        return core.list_namespaced_service, (namespace,)
    if kind == ENDPOINT_SLICES:
        discovery = client.DiscoveryV1Api(api)
        if namespace is None:
            return discovery.list_endpoint_slice_for_all_namespaces, ()
        return discovery.list_namespaced_endpoint_slice, (namespace,)
    custom = client.CustomObjectsApi(api)
    if namespace is None or not kind.namespaced:  # GatewayClasses: cluster-scoped
        return custom.list_cluster_custom_object, (kind.group, kind.version, kind.plural)
    return custom.list_namespaced_custom_object, (kind.group, kind.version, namespace,
                                                  kind.plural)
