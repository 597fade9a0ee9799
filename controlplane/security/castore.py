"""Where the mesh CA is kept: a directory (file mode), the operator's files, or a Kubernetes
Secret in cert-manager's format (``tls.crt``, ``tls.key``, ``ca.crt``) shared by replicas.

Side effects live here (files, the API server); what a rotation or a prune computes is
pure (``rotated``, ``pruned``). A rotation makes a new root that signs from then on and
keeps the old roots in the bundle, so certificates and tokens issued before stay trusted
until ``prune`` drops them (after every sidecar has its new certificate: one workload
certificate lifetime, 24 h by default). Error messages say what to do and never hold a key.
The Kubernetes client is synchronous: call the ``*_secret`` functions from a thread.
"""

from __future__ import annotations

import base64
import contextlib
import datetime
import fcntl
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import structlog
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from controlplane.security.ca import ROOT_DAYS, CaProblem, CertificateAuthority

log = structlog.get_logger("controlplane.ca")

CERT_FILE: Final = "ca.crt"
KEY_FILE: Final = "ca.key"
ROOTS_FILE: Final = "roots.pem"
LOCK_FILE: Final = ".lock"
CA_SECRET: Final = "controlplane-ca"
SECRET_TYPE: Final = "kubernetes.io/tls"
# cert-manager's key names: a cert-manager CA Certificate's Secret can be used as is.
TLS_CRT, TLS_KEY, CA_CRT = "tls.crt", "tls.key", "ca.crt"
CERT_MANAGER_ANNOTATION: Final = "cert-manager.io/certificate-name"
_RETRIES: Final = 5


class CaError(Exception):
    """The CA cannot be read, made or kept; the message says what to do."""


@dataclass(frozen=True, slots=True)
class Pems:
    """A CA as kept: the signing certificate (and chain), its key, the bundle (or None:
    the signing certificate's roots)."""

    cert: bytes
    key: bytes
    bundle: bytes | None

    def authority(self, where: str) -> CertificateAuthority:
        try:
            return CertificateAuthority.from_pem(self.cert, self.key, self.bundle)
        except CaProblem as exc:
            raise CaError(f"the CA in {where}: {exc}") from None


def _pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def new_pems(trust_domain: str, now: datetime.datetime, days: int = ROOT_DAYS) -> Pems:
    ca = CertificateAuthority.create(trust_domain, now, days)
    key = ca.signing_key().private_bytes(serialization.Encoding.PEM,
                                         serialization.PrivateFormat.PKCS8,
                                         serialization.NoEncryption())
    return Pems(_pem(ca.signer_cert), key, ca.bundle_pem)


def rotated(current: CertificateAuthority, trust_domain: str, now: datetime.datetime,
            days: int = ROOT_DAYS) -> Pems:
    """A new root that signs from now on; the bundle keeps every current root after it.
    The signing certificate is followed by the new root cross-signed by the current CA
    (and the current CA's own chain): every chain issued until the prune carries it, so
    a peer that still trusts only the old root (a sidecar not yet sent the new bundle, a
    bootstrap's ``--xds-ca``) verifies it too."""
    fresh = new_pems(trust_domain, now, days)
    root = x509.load_pem_x509_certificate(fresh.cert)
    cross = current.cross_sign(root, now)
    kept = [r for r in current.roots if r.not_valid_after_utc > now]
    chain = _pem(cross) + b"".join(_pem(c) for c in current.chain)
    return Pems(fresh.cert + chain, fresh.key, fresh.cert + b"".join(_pem(r) for r in kept))


def pruned(current: CertificateAuthority, kept: Pems) -> Pems:
    """The bundle cut to the roots the signer is or chains to (the others are dropped),
    and a root's cross-signed copies with them."""
    mine = [r for r in current.roots if current.signed_under(r)]
    cert = _pem(current.signer_cert) if current.signer_cert in mine else kept.cert
    return Pems(cert, kept.key, b"".join(_pem(r) for r in mine))


# -- a directory -----------------------------------------------------------------------------


@contextlib.contextmanager
def _locked(path: Path, exclusive: bool) -> Iterator[None]:
    """Readers share, writers exclude (the server polls while `ca rotate` writes)."""
    fd = os.open(path / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
        yield
    finally:
        os.close(fd)


def _write(target: Path, data: bytes, mode: int) -> None:
    temporary = target.with_name(target.name + ".tmp")
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    os.chmod(temporary, mode)
    temporary.replace(target)


def _read_dir(path: Path) -> Pems | None:
    cert, key, roots = path / CERT_FILE, path / KEY_FILE, path / ROOTS_FILE
    if not cert.exists() and not key.exists():
        return None
    if not cert.exists() or not key.exists():
        have, lacks = (CERT_FILE, KEY_FILE) if cert.exists() else (KEY_FILE, CERT_FILE)
        raise CaError(f"the CA directory {path} has {have} but no {lacks}: restore it, or "
                      "empty the directory to make a new CA (every sidecar then needs a new "
                      "token and bootstrap)")
    if key.stat().st_mode & 0o077:
        log.warning("ca.key_readable_by_others", file=str(key),
                    hint=f"chmod 600 {key}: the CA key signs every identity of the mesh")
    try:
        return Pems(cert.read_bytes(), key.read_bytes(),
                    roots.read_bytes() if roots.exists() else None)
    except OSError as exc:
        raise CaError(f"cannot read the CA in {path}: {exc.strerror}; check its "
                      "permissions (the server's user must read ca.crt and ca.key)") from None


def _save_dir(path: Path, pems: Pems) -> None:
    _write(path / ROOTS_FILE, pems.bundle or pems.cert, 0o644)
    _write(path / KEY_FILE, pems.key, 0o600)
    _write(path / CERT_FILE, pems.cert, 0o644)


def _open_dir(path: Path, create: bool) -> None:
    if path.is_dir():
        return
    if not create:
        raise CaError(f"there is no CA directory {path}: make one with `controlplane ca init "
                      f"--ca-dir {path}`, or give --ca-cert/--ca-key")
    try:
        path.mkdir(parents=True, mode=0o700, exist_ok=True)
    except OSError as exc:
        raise CaError(f"cannot make the CA directory {path}: {exc.strerror}; give a "
                      "writable --ca-dir") from None


def load_dir(path: Path, trust_domain: str, now: datetime.datetime,
             create: bool = True) -> CertificateAuthority:
    """The CA kept in ``path`` (``ca.crt``, ``ca.key`` 0600, ``roots.pem``); made there on
    first use when ``create``."""
    path = Path(path)
    _open_dir(path, create)
    with _locked(path, exclusive=False):
        found = _read_dir(path)
    if found is None:
        if not create:
            raise CaError(f"the directory {path} holds no CA: make one with `controlplane ca "
                          f"init --ca-dir {path}`")
        with _locked(path, exclusive=True):
            found = _read_dir(path)  # another process may have made it meanwhile
            if found is None:
                found = new_pems(trust_domain, now)
                _save_dir(path, found)
                log.info("ca.created", directory=str(path),
                         ca=found.authority(str(path)).describe())
    return found.authority(f"the directory {path}")


def rotate_dir(path: Path, trust_domain: str, now: datetime.datetime,
               days: int = ROOT_DAYS) -> CertificateAuthority:
    """A new root signs from now on; the old ones stay in ``roots.pem`` until pruned."""
    path = Path(path)
    _open_dir(path, create=False)
    with _locked(path, exclusive=True):
        found = _read_dir(path)
        if found is None:
            raise CaError(f"the directory {path} holds no CA to rotate: make one with "
                          f"`controlplane ca init --ca-dir {path}`")
        fresh = rotated(found.authority(str(path)), trust_domain, now, days)
        _save_dir(path, fresh)
    ca = fresh.authority(str(path))
    log.info("ca.rotated", directory=str(path), ca=ca.describe())
    return ca


def prune_dir(path: Path) -> CertificateAuthority:
    """Drop from ``roots.pem`` every root the signer does not chain to."""
    path = Path(path)
    _open_dir(path, create=False)
    with _locked(path, exclusive=True):
        found = _read_dir(path)
        if found is None:
            raise CaError(f"the directory {path} holds no CA: nothing to prune")
        fresh = pruned(found.authority(str(path)), found)
        _save_dir(path, fresh)
    ca = fresh.authority(str(path))
    log.info("ca.pruned", directory=str(path), ca=ca.describe())
    return ca


def load_files(cert: Path, key: Path, bundle: Path | None = None) -> CertificateAuthority:
    """A CA the operator brings (``--ca-cert``, ``--ca-key``, ``--ca-bundle``)."""
    pems: list[bytes] = []
    for flag, file in (("--ca-cert", cert), ("--ca-key", key), ("--ca-bundle", bundle)):
        if file is None:
            continue
        try:
            pems.append(Path(file).read_bytes())
        except OSError as exc:
            raise CaError(f"cannot read {flag} {file}: {exc.strerror}; give a readable PEM "
                          "file") from None
    return Pems(pems[0], pems[1], pems[2] if bundle is not None else None).authority(
        f"{cert} (--ca-cert) with {key} (--ca-key)")


# -- a Kubernetes Secret ---------------------------------------------------------------------


def _secret_rule(namespace: str, name: str) -> str:
    return (f"secrets get/update on {name} and create in {namespace} (deploy/kubernetes/"
            "02-rbac.yaml grants it)")


def _api_error(exc: Exception, what: str, namespace: str, name: str) -> CaError:
    status = getattr(exc, "status", None)
    if status == 403:
        return CaError(f"not allowed to {what}: the control plane's service account needs "
                       f"{_secret_rule(namespace, name)}")
    message = ""
    body = getattr(exc, "body", None)
    with contextlib.suppress(ValueError, AttributeError, TypeError):
        message = str(json.loads(body or "{}").get("message") or "")
    if status is None:
        return CaError(f"cannot {what}: {type(exc).__name__}; check that the API server is "
                       "reachable (--kubeconfig)")
    return CaError(f"cannot {what}: {status}{': ' + message if message else ''}; retried")


def _read_secret(core_v1: Any, namespace: str, name: str) -> dict[str, Any] | None:
    from kubernetes.client.exceptions import ApiException
    try:
        response = core_v1.read_namespaced_secret(name, namespace, _preload_content=False)
    except ApiException as exc:
        if exc.status == 404:
            return None
        raise _api_error(exc, f"read Secret {namespace}/{name}", namespace, name) from None
    except Exception as exc:  # urllib3: the API server unreachable
        raise _api_error(exc, f"read Secret {namespace}/{name}", namespace, name) from None
    found: dict[str, Any] = json.loads(response.data)
    return found


def _pems_of(secret: dict[str, Any], where: str) -> Pems:
    data = secret.get("data") or {}
    try:
        raw = {k: base64.b64decode(v) for k, v in data.items() if k in (TLS_CRT, TLS_KEY,
                                                                           CA_CRT)}
    except (ValueError, TypeError):
        raise CaError(f"{where} holds data that is not base64; fix or delete it (a deleted "
                      "CA Secret is made again: every sidecar then gets new certificates)"
                      ) from None
    if TLS_CRT not in raw or TLS_KEY not in raw:
        raise CaError(f"{where} has no {TLS_CRT} and {TLS_KEY}: give the CA there in "
                      "cert-manager's format (tls.crt, tls.key, ca.crt), or delete it so "
                      "that a CA is made")
    return Pems(raw[TLS_CRT], raw[TLS_KEY], raw.get(CA_CRT) or None)


def _body(namespace: str, name: str, pems: Pems, version: str | None = None,
          type_: str = SECRET_TYPE) -> dict[str, Any]:
    data = {TLS_CRT: pems.cert, TLS_KEY: pems.key, CA_CRT: pems.bundle or pems.cert}
    metadata: dict[str, Any] = {
        "name": name, "namespace": namespace,
        "labels": {"app.kubernetes.io/name": "controlplane",
                   "app.kubernetes.io/component": "mesh-ca"}}
    if version is not None:
        metadata["resourceVersion"] = version
    return {"apiVersion": "v1", "kind": "Secret", "type": type_, "metadata": metadata,
            "data": {k: base64.b64encode(v).decode() for k, v in data.items()}}


def load_secret(core_v1: Any, namespace: str, name: str = CA_SECRET,
                trust_domain: str = "cluster.local",
                now: datetime.datetime | None = None,
                create: bool = True) -> CertificateAuthority:
    """The CA in Secret ``namespace/name``; made when absent (``create``). Replicas share
    it: a create that loses the race (409) reads the winner's."""
    from kubernetes.client.exceptions import ApiException
    where = f"Secret {namespace}/{name}"
    for _ in range(_RETRIES):
        secret = _read_secret(core_v1, namespace, name)
        if secret is not None:
            return _pems_of(secret, where).authority(where)
        if not create:
            raise CaError(f"there is no {where}: make it with `controlplane ca init "
                          f"--secret {name} --namespace {namespace}`, or let the server "
                          "make it (it does at start)")
        if now is None:
            raise ValueError("load_secret: now is needed to make a CA")
        fresh = new_pems(trust_domain, now)
        try:
            core_v1.create_namespaced_secret(namespace, _body(namespace, name, fresh))
        except ApiException as exc:
            if exc.status == 409:
                continue  # another replica made it first: read theirs
            raise _api_error(exc, f"create {where}", namespace, name) from None
        except Exception as exc:
            raise _api_error(exc, f"create {where}", namespace, name) from None
        ca = fresh.authority(where)
        log.info("ca.created", secret=where, ca=ca.describe())
        return ca
    raise CaError(f"{where} kept appearing and vanishing ({_RETRIES} tries); retried")


def _replace_secret(core_v1: Any, namespace: str, name: str, what: str,
                    change: Any) -> CertificateAuthority:
    """Read, compute (``change(ca, pems) -> Pems``), replace with the version read."""
    from kubernetes.client.exceptions import ApiException
    where = f"Secret {namespace}/{name}"
    secret = _read_secret(core_v1, namespace, name)
    if secret is None:
        raise CaError(f"there is no {where} to {what}: the server makes it at start, or "
                      f"`controlplane ca init --secret {name} --namespace {namespace}`")
    annotations = (secret.get("metadata") or {}).get("annotations") or {}
    if CERT_MANAGER_ANNOTATION in annotations:
        raise CaError(f"{where} is cert-manager's (Certificate "
                      f"{annotations[CERT_MANAGER_ANNOTATION]!r}): {what} it there (e.g. "
                      "`cmctl renew`); the control plane picks the change up by itself")
    pems = _pems_of(secret, where)
    fresh: Pems = change(pems.authority(where), pems)
    body = _body(namespace, name, fresh, secret["metadata"]["resourceVersion"],
                 str(secret.get("type") or SECRET_TYPE))
    try:
        core_v1.replace_namespaced_secret(name, namespace, body)
    except ApiException as exc:
        if exc.status == 409:
            raise CaError(f"{where} changed while it was being written; run the command "
                          "again") from None
        raise _api_error(exc, f"update {where}", namespace, name) from None
    ca = fresh.authority(where)
    log.info(f"ca.{what}d", secret=where, ca=ca.describe())
    return ca


def rotate_secret(core_v1: Any, namespace: str, name: str, trust_domain: str,
                  now: datetime.datetime, days: int = ROOT_DAYS) -> CertificateAuthority:
    return _replace_secret(core_v1, namespace, name, "rotate",
                           lambda ca, _pems: rotated(ca, trust_domain, now, days))


def prune_secret(core_v1: Any, namespace: str, name: str) -> CertificateAuthority:
    return _replace_secret(core_v1, namespace, name, "prune", pruned)
