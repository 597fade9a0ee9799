"""Where a gateway's TLS certificates come from: the ``Certificates`` protocol.

A Gateway listener names its certificates (``tls.certificateRefs``: Secrets in a cluster,
``certificates`` entries in a mesh file); the mesh holds those names only. The key
pairs are read at the edge by a provider and handed, per stream, to that gateway's
proxies alone (``cache/gateway_secrets.py``): never to a group snapshot, the snapshot
store, the mesh model or a log.

- ``FileCertificates``: file mode, the PEM files of each ``certificates`` entry, read when
  a gateway needs them and again when they change on disk (``watch`` polls their stat).
- the Kubernetes provider (``sources/kubernetes``) implements the same protocol over
  Secrets of type ``kubernetes.io/tls``.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

import structlog

if TYPE_CHECKING:
    from controlplane.mesh.model import Mesh

log = structlog.get_logger("controlplane.certificates")

MAX_PEM_BYTES = 1 << 20  # a chain of a few certificates is a few KiB
# (namespace, name) -> (cert_file, key_file): what a mesh's ``certificates`` say.
Files = Mapping[tuple[str, str], tuple[str, str]]
_Stat = tuple[int, int, int] | None  # (inode, size, mtime_ns); None: unreadable


@dataclass(frozen=True, slots=True)
class CertificatePair:
    """A PEM certificate chain and its private key. The key is left out of ``repr``, so
    a pair that reaches a log by mistake shows no secret."""

    chain_pem: bytes
    key_pem: bytes = field(repr=False)


class Certificates(Protocol):
    """A source of gateway certificates by (namespace, name)."""

    def pair(self, namespace: str, name: str) -> CertificatePair | None:
        """The certificate named so, checked (the key matches the certificate); None when
        there is none or it cannot be used (the provider logs why, without the key)."""
        ...

    def subscribe(self, changed: Callable[[], None]) -> None:
        """Call ``changed`` (on the event loop) whenever any pair may have changed: the
        server then re-reads what its gateway streams use."""
        ...


class NoCertificates:
    """No provider: every listener that needs a certificate waits for one."""

    def pair(self, namespace: str, name: str) -> CertificatePair | None:
        return None

    def subscribe(self, changed: Callable[[], None]) -> None:
        return None


def check_pair(chain_pem: bytes, key_pem: bytes) -> str | None:
    """Why the pair cannot serve TLS (not PEM, the key is not the certificate's), or None."""
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    try:
        certificate = x509.load_pem_x509_certificate(chain_pem)
    except ValueError:
        return "the certificate file holds no PEM certificate"
    try:
        key = serialization.load_pem_private_key(key_pem, password=None)
    except (ValueError, TypeError):
        return "the key file holds no unencrypted PEM private key"
    mine = certificate.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    theirs = key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    if mine != theirs:
        return "the private key is not the certificate's (its public key differs)"
    return None


class FileCertificates:
    """The PEM files of a mesh file's ``certificates`` entries, read by the server.

    ``files`` says, when asked, which files each certificate has (the current mesh's
    entries). A pair is read on first use and kept while its files' stat is unchanged;
    ``watch`` notices a changed or replaced file (a renewal, a Secret volume's symlink
    swap) and tells the subscribers."""

    def __init__(self, files: Callable[[], Files]) -> None:
        self._files = files
        self._read: dict[tuple[str, str], tuple[tuple[_Stat, _Stat], CertificatePair | None]] = {}
        self._subscribers: list[Callable[[], None]] = []
        self._seen: dict[tuple[str, str], tuple[tuple[str, str], _Stat, _Stat]] = {}

    def subscribe(self, changed: Callable[[], None]) -> None:
        self._subscribers.append(changed)

    def pair(self, namespace: str, name: str) -> CertificatePair | None:
        key = (namespace, name)
        paths = self._files().get(key)
        if paths is None:
            return None
        stats = (_stat(paths[0]), _stat(paths[1]))
        held = self._read.get(key)
        if held is not None and held[0] == stats:
            return held[1]
        made = self._load(namespace, name, paths)
        self._read[key] = (stats, made)
        return made

    def _load(self, namespace: str, name: str, paths: tuple[str, str]) -> CertificatePair | None:
        try:
            chain = _read(paths[0])
            key = _read(paths[1])
        except (OSError, ValueError) as exc:  # the message names the file, not its content
            log.error("certificates.unreadable", certificate=f"{namespace}/{name}",
                      error=str(exc), hint="the gateway listeners that name it are not "
                      "served until the files can be read; check the paths and permissions")
            return None
        why = check_pair(chain, key)
        if why is not None:
            log.error("certificates.invalid", certificate=f"{namespace}/{name}",
                      cert_file=paths[0], key_file=paths[1], error=why,
                      hint="give a PEM certificate chain and its own unencrypted key")
            return None
        log.info("certificates.read", certificate=f"{namespace}/{name}", cert_file=paths[0])
        return CertificatePair(chain, key)

    def poll(self) -> bool:
        """Stat every entry's files; True (subscribers told) when any entry or file changed
        since the last poll."""
        now = {key: (paths, _stat(paths[0]), _stat(paths[1]))
               for key, paths in self._files().items()}
        if now == self._seen:
            return False
        self._seen = now
        self._read = {k: v for k, v in self._read.items() if k in now}
        for changed in list(self._subscribers):
            try:
                changed()
            except Exception:
                log.exception("certificates.subscriber_failed", hint="a bug: report it")
        return True

    async def watch(self, interval: float = 1.0) -> None:
        """Run for the process's life: poll every ``interval`` seconds."""
        self._seen = {key: (paths, _stat(paths[0]), _stat(paths[1]))
                      for key, paths in self._files().items()}
        while True:
            await asyncio.sleep(interval)
            try:
                self.poll()
            except Exception:
                log.exception("certificates.poll_failed", hint="polled again shortly")


def mesh_files(mesh: Mesh | None) -> Files:
    """The files of a mesh's ``certificates`` entries that name them."""
    if mesh is None:
        return {}
    return {(c.namespace, c.name): (c.cert_file, c.key_file) for c in mesh.certificates
            if c.cert_file is not None and c.key_file is not None}


def _stat(path: str) -> _Stat:
    try:
        found = os.stat(path)
    except OSError:
        return None
    return (found.st_ino, found.st_size, found.st_mtime_ns)


def _read(path: str) -> bytes:
    with open(path, "rb") as handle:
        data = handle.read(MAX_PEM_BYTES + 1)
    if len(data) > MAX_PEM_BYTES:
        raise ValueError(f"{path} is larger than {MAX_PEM_BYTES} bytes; a PEM certificate "
                         "or key is a few KiB: point at the right file")
    return data
