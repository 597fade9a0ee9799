"""Gateway certificates from Kubernetes Secrets (``type: kubernetes.io/tls``).

Only the Secrets our Gateways' ``certificateRefs`` name are read, each by its own watch
(``fieldSelector=metadata.name=NAME`` in its namespace), not every Secret of the cluster:
a server that listed every Secret would hold every credential of every namespace in its
memory (and its heap dumps) to use a handful, and would take every Secret's churn
(service-account tokens, Helm releases) as work. The set is bounded (``MAX_WATCHED``);
what falls over the bound is reported on its listener, never silently dropped. RBAC
cannot be that narrow (a role cannot name Secrets that users name later), so the
ClusterRole grants get/list/watch on Secrets and this module is what keeps the reads
narrow.

The key lives here and nowhere else: not in the source's stores or the mesh model (which
hold references), not in a log (problems name the Secret and the field, never a value).
``pair()`` hands a chain and key to the per-stream SDS path (``cache/gateway_secrets.py``),
which sends them only to the gateway that references them: this is the Kubernetes
implementation of ``cache/certificates.py``'s ``Certificates``.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import threading
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Final

import structlog
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from kubernetes import client

from controlplane.sources.kubernetes.kinds import CERTIFICATES_ROLE, ROOT_NAMESPACE, SECRETS
from controlplane.sources.kubernetes.services import meta
from controlplane.sources.kubernetes.watch import (
    Changed,
    Event,
    Forbidden,
    Listed,
    Watcher,
    WatchTiming,
)

log = structlog.get_logger("controlplane.source.kubernetes")

TLS_TYPE: Final = "kubernetes.io/tls"
MAX_WATCHED: Final = 256  # Secrets watched at once: 4 per listener of 64 Gateways
MAX_PEM: Final = 256 * 1024  # bytes of tls.crt or tls.key (a Secret may hold 1 MiB)
Ref = tuple[str, str]  # (namespace, name)
MISSING: Final = "not found"


@dataclass(frozen=True, slots=True)
class SecretPair:
    """A certificate chain and its key, as ``cache/certificates.py``'s SecretPair
    has them (the sources may not import the cache: the app wraps one in the other).
    The key is left out of ``repr``."""

    chain_pem: bytes
    key_pem: bytes = field(repr=False)


def check_pair(chain_pem: bytes, key_pem: bytes) -> str | None:
    """Why the pair cannot serve TLS, or None: PEM both, the key the first certificate's."""
    try:
        certificates = x509.load_pem_x509_certificates(chain_pem)
    except ValueError:
        return "tls.crt holds no PEM certificate"
    try:
        private = serialization.load_pem_private_key(key_pem, password=None)
    except (ValueError, TypeError):
        return "tls.key is not an unencrypted PEM private key"
    der, spki = serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    if certificates[0].public_key().public_bytes(der, spki) != \
            private.public_key().public_bytes(der, spki):
        return "tls.key is not the key of the first certificate in tls.crt"
    return None
UNKNOWN: Final = "not read yet"


def parse_secret(obj: Mapping[str, Any]) -> tuple[SecretPair | None, str]:
    """The pair of a ``kubernetes.io/tls`` Secret, or None and what is wrong with it
    (naming the field, never showing a value)."""
    if obj.get("type") != TLS_TYPE:
        return None, (f"type is {obj.get('type')!r}, not {TLS_TYPE!r}; make it with "
                      "`kubectl create secret tls NAME --cert=FILE --key=FILE`")
    data = obj.get("data")
    if not isinstance(data, Mapping):
        return None, "has no data; it needs tls.crt and tls.key"
    decoded: list[bytes] = []
    for entry in ("tls.crt", "tls.key"):
        raw = data.get(entry)
        if not isinstance(raw, str) or not raw:
            return None, f"data[{entry!r}] is missing or empty"
        if len(raw) > MAX_PEM * 4 // 3 + 4:
            return None, f"data[{entry!r}] is over {MAX_PEM // 1024} KiB"
        try:
            decoded.append(base64.b64decode(raw, validate=True))
        except (binascii.Error, ValueError):
            return None, f"data[{entry!r}] is not base64"
    why = check_pair(decoded[0], decoded[1])
    if why is not None:
        return None, why
    return SecretPair(decoded[0], decoded[1]), ""


class ClusterCertificates:
    """The ``Certificates`` of a cluster: ``pair(namespace, name)`` from the Secrets
    ``want()`` names. ``problem(ref)`` says why a wanted Secret cannot be used ("" when
    it can); ``on_change`` callbacks run (from a watch thread) when a pair appears,
    changes or goes."""

    def __init__(self, api: client.ApiClient, timing: WatchTiming | None = None) -> None:
        self.api = api
        self.timing = timing or WatchTiming()
        self._lock = threading.Lock()
        self._pairs: dict[Ref, SecretPair] = {}
        self._problems: dict[Ref, str] = {}
        self._watchers: dict[Ref, threading.Event] = {}
        self._callbacks: list[Callable[[], None]] = []
        self._loop: asyncio.AbstractEventLoop | None = None

    # -- what the SDS path reads

    def pair(self, namespace: str, name: str) -> SecretPair | None:
        with self._lock:
            return self._pairs.get((namespace, name))

    def subscribe(self, changed: Callable[[], None]) -> None:
        """Call ``changed()`` on the event loop (the one ``want`` was first called on)
        when a pair appears, changes or goes."""
        with self._lock:
            self._callbacks.append(changed)

    # -- what the source reads and says

    def problem(self, ref: Ref) -> str:
        """Why the Secret cannot be used ("" when it can)."""
        with self._lock:
            if ref in self._pairs:
                return ""
            if ref not in self._watchers:
                return (f"not read: more than {MAX_WATCHED} Secrets are referenced; "
                        "reference fewer")
            return self._problems.get(ref, UNKNOWN)

    def want(self, refs: Iterable[Ref]) -> set[Ref]:
        """Watch exactly these Secrets (the first ``MAX_WATCHED``, sorted); stop watching
        the others and forget their keys. Returns the refs newly watched."""
        wanted = sorted(set(refs))[:MAX_WATCHED]
        if self._loop is None:
            with contextlib.suppress(RuntimeError):
                self._loop = asyncio.get_running_loop()
        started: set[Ref] = set()
        gone = False
        with self._lock:
            for ref in [r for r in self._watchers if r not in wanted]:
                self._watchers.pop(ref).set()
                gone = self._pairs.pop(ref, None) is not None or gone
                self._problems.pop(ref, None)
            for ref in wanted:
                if ref in self._watchers:
                    continue
                stop = threading.Event()
                self._watchers[ref] = stop
                started.add(ref)
                Watcher(SECRETS, self.api, ref[0], self._emitter(ref), stop, self.timing,
                        field_selector=f"metadata.name={ref[1]}").start()
        if started:
            log.info("gateway.secrets_watched", added=[f"{n}/{m}" for n, m in sorted(started)],
                     watched=len(wanted))
        if gone:
            self._changed()
        return started

    def stop(self) -> None:
        with self._lock:
            for stop in self._watchers.values():
                stop.set()
            self._watchers.clear()
            self._pairs.clear()

    # -- the watch threads

    def _emitter(self, ref: Ref) -> Callable[[Event], None]:
        def emit(event: Event) -> None:
            self._apply(ref, event)
        return emit

    def _apply(self, ref: Ref, event: Event) -> None:
        found: Mapping[str, Any] | None
        if isinstance(event, Listed):
            found = next((o for o in event.items if meta(o).get("name") == ref[1]), None)
        elif isinstance(event, Changed):
            if meta(event.obj).get("name") != ref[1]:
                return
            found = None if event.type == "DELETED" else event.obj
        elif isinstance(event, Forbidden):
            self._set(ref, None, (
                f"may not be read: {event.message}; let the control plane read this "
                f"namespace's Secrets: kubectl create rolebinding {CERTIFICATES_ROLE} "
                f"--namespace {ref[0]} --clusterrole {CERTIFICATES_ROLE} "
                f"--serviceaccount {ROOT_NAMESPACE}:controlplane (deploy/kubernetes/"
                "examples/gateway-certificates.yaml)"))
            return
        else:
            return  # Listing: keep what we have until the list is back
        if found is None:
            self._set(ref, None, MISSING)
            return
        pair, problem = parse_secret(found)
        self._set(ref, pair, problem)

    def _set(self, ref: Ref, pair: SecretPair | None, problem: str) -> None:
        with self._lock:
            if ref not in self._watchers:
                return  # no longer wanted: a late event of a stopped watch
            before = self._pairs.get(ref), self._problems.get(ref)
            if pair is None:
                self._pairs.pop(ref, None)
                self._problems[ref] = problem
            else:
                self._pairs[ref] = pair
                self._problems.pop(ref, None)
            changed = before != (self._pairs.get(ref), self._problems.get(ref))
        if changed:
            if problem and problem != before[1]:
                log.warning("gateway.secret_unusable", secret=f"{ref[0]}/{ref[1]}",
                            problem=problem)
            elif pair is not None and before[0] is None:
                log.info("gateway.secret_loaded", secret=f"{ref[0]}/{ref[1]}")
            self._changed()

    def _changed(self) -> None:
        with self._lock:
            callbacks, loop = list(self._callbacks), self._loop
        if loop is None:
            return  # nothing is served yet: the first use reads what is there
        for callback in callbacks:
            with contextlib.suppress(RuntimeError):  # the loop closed: we are stopping
                loop.call_soon_threadsafe(callback)
