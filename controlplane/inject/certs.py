"""The injection webhook's serving certificate, without manual openssl steps.

The API server calls the webhook over HTTPS and trusts only the ``caBundle`` of the
MutatingWebhookConfiguration. Either the operator gives a certificate (files, e.g.
cert-manager's Secret mounted; its CA, if given, goes into ``caBundle``), or the mesh CA
issues it (``ca=``: xDS and the webhook served from the same CA; ``caBundle`` is the mesh
trust bundle, so a root rotation reaches it, and no CA key is kept beside the serving
certificate), or, without a mesh CA, the control plane makes its own: an ECDSA P-256 CA
(10 years) and a serving certificate it signs (1 year) for the Service's DNS names.
Either kind is kept in the Secret ``controlplane-webhook-tls`` of the control plane's
namespace (or a directory), so every replica serves the same certificate and one
``caBundle`` fits all: the first replica creates it, the others read it (a create that
loses the race reads the winner's). The serving certificate is renewed once a third of
its life is left (or the mesh CA changed), so ``caBundle`` stays put; a self-made CA
nearing its end is replaced, and ``caBundle`` holds the new and the old CA until the old
one expires. Keys never reach a log line (only fingerprints and dates).

Kubernetes calls go through the official client, synchronously (run them in a thread).
"""

from __future__ import annotations

import base64
import datetime
import os
import secrets
import ssl
import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, Protocol

import structlog
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from controlplane.security.ca import CertificateAuthority

log = structlog.get_logger("controlplane.webhook.certs")

CA_DAYS: Final = 3650
LEAF_DAYS: Final = 365
SECRET_TYPE: Final = "kubernetes.io/tls"
# The Secret's keys: cert-manager's names, so either can fill it.
CERT_KEY, KEY_KEY, CA_KEY, CA_PRIVATE_KEY = "tls.crt", "tls.key", "ca.crt", "ca.key"
_CONFLICT_RETRIES: Final = 5


class CertificateError(Exception):
    """A certificate that cannot be read, made or kept; the message says what to do."""


@dataclass(frozen=True)
class ServingCert:
    """What the webhook serves and what the API server must trust (PEM bytes)."""

    cert_pem: bytes
    key_pem: bytes
    ca_pem: bytes  # the caBundle: one CA, two while a CA is being replaced, or none given
    ca_key_pem: bytes | None = None  # self-made only: to renew the serving certificate

    @property
    def certificate(self) -> x509.Certificate:
        return x509.load_pem_x509_certificate(self.cert_pem)

    def names(self) -> set[str]:
        try:
            sans = self.certificate.extensions.get_extension_for_class(
                x509.SubjectAlternativeName).value
        except x509.ExtensionNotFound:
            return set()
        return set(sans.get_values_for_type(x509.DNSName))

    def describe(self) -> dict[str, Any]:
        """For log lines: what it is, never the key."""
        cert = self.certificate
        return {"not_after": cert.not_valid_after_utc.isoformat(),
                "sha256": cert.fingerprint(hashes.SHA256()).hex()[:16],
                "names": sorted(self.names())}

    def ssl_context(self) -> ssl.SSLContext:
        """A server context for this certificate (TLS 1.2 and up)."""
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        self.load_into(context)
        return context

    def load_into(self, context: ssl.SSLContext) -> None:
        """(Re)load into a live context: handshakes from now on use it. The ssl module
        reads files only, so the key passes through a private temporary directory."""
        with tempfile.TemporaryDirectory(prefix="controlplane-webhook-") as folder:
            cert, key = Path(folder) / "tls.crt", Path(folder) / "tls.key"
            cert.write_bytes(self.cert_pem)
            fd = os.open(key, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "wb") as handle:
                handle.write(self.key_pem)
            context.load_cert_chain(cert, key)


def dns_names(service: str, namespace: str) -> list[str]:
    """The names the API server may use for the Service (it uses ``svc.ns.svc``)."""
    return [service, f"{service}.{namespace}", f"{service}.{namespace}.svc",
            f"{service}.{namespace}.svc.cluster.local"]


def _pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _builder(subject: str, issuer: x509.Name | None, public: ec.EllipticCurvePublicKey,
             now: datetime.datetime, days: int) -> x509.CertificateBuilder:
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)])
    return (x509.CertificateBuilder().subject_name(name).issuer_name(issuer or name)
            .public_key(public).serial_number(int.from_bytes(secrets.token_bytes(16)) >> 1)
            .not_valid_before(now - datetime.timedelta(minutes=5))  # clocks differ a little
            .not_valid_after(now + datetime.timedelta(days=days)))


def make_ca(now: datetime.datetime, days: int = CA_DAYS) -> tuple[bytes, bytes]:
    """A new CA: (certificate PEM, key PEM)."""
    key = ec.generate_private_key(ec.SECP256R1())
    stamp = now.strftime("%Y%m%d%H%M%S")
    cert = (_builder(f"controlplane webhook CA {stamp}", None, key.public_key(), now, days)
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(
                digital_signature=True, key_cert_sign=True, crl_sign=True,
                content_commitment=False, key_encipherment=False, data_encipherment=False,
                key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()),
                           critical=False)
            .sign(key, hashes.SHA256()))
    return _pem(cert), _key_pem(key)


def issue(ca_pem: bytes, ca_key_pem: bytes, names: Sequence[str], now: datetime.datetime,
          days: int = LEAF_DAYS) -> tuple[bytes, bytes]:
    """A serving certificate for ``names`` signed by the CA: (certificate, key) PEM."""
    ca = x509.load_pem_x509_certificate(ca_pem)
    ca_key = serialization.load_pem_private_key(ca_key_pem, password=None)
    if not isinstance(ca_key, ec.EllipticCurvePrivateKey):
        raise CertificateError("the webhook CA key is not an ECDSA key; delete the Secret "
                               "so that a new CA is made")
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (_builder(names[0], ca.subject, key.public_key(), now, days)
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(n) for n in names]),
                           critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]),
                           critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(
                ca_key.public_key()), critical=False)
            .sign(ca_key, hashes.SHA256()))
    return _pem(cert), _key_pem(key)


def from_mesh_ca(ca: CertificateAuthority, names: Sequence[str], now: datetime.datetime,
                 days: int = LEAF_DAYS) -> ServingCert:
    """A serving certificate issued by the mesh CA; ``caBundle`` is its trust bundle."""
    issued = ca.issue_server(list(names), [], now, datetime.timedelta(days=days))
    return ServingCert(issued.cert_pem, issued.key_pem, ca.bundle_pem, None)


def issued_by(current: ServingCert, ca: CertificateAuthority) -> bool:
    """Whether ``current`` is the mesh CA's (its signer and its bundle as they are now)."""
    if current.ca_key_pem is not None or current.ca_pem != ca.bundle_pem:
        return False
    try:
        current.certificate.verify_directly_issued_by(ca.signer_cert)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True


def self_made(names: Sequence[str], now: datetime.datetime,
              ca: CertificateAuthority | None = None) -> ServingCert:
    """A serving certificate from the mesh CA when given; else a new CA of its own and a
    serving certificate it signed."""
    if ca is not None:
        return from_mesh_ca(ca, names, now)
    ca_pem, ca_key_pem = make_ca(now)
    cert_pem, key_pem = issue(ca_pem, ca_key_pem, names, now)
    return ServingCert(cert_pem, key_pem, ca_pem, ca_key_pem)


def _left(cert: x509.Certificate, now: datetime.datetime) -> float:
    """The fraction of its validity a certificate has left (negative: expired)."""
    total = (cert.not_valid_after_utc - cert.not_valid_before_utc).total_seconds()
    return (cert.not_valid_after_utc - now).total_seconds() / max(total, 1.0)


def _own_ca(current: ServingCert) -> x509.Certificate:
    """The CA that signs (the first of the bundle)."""
    return x509.load_pem_x509_certificates(current.ca_pem)[0]


def needs_renewal(current: ServingCert, names: Sequence[str], now: datetime.datetime,
                  ca: CertificateAuthority | None = None) -> bool:
    """A third of its life left, not for these names, not from the mesh CA as it is now
    (``ca``: rotated, pruned, or a self-made one from before), or (self-made) its CA near
    its end."""
    if _left(current.certificate, now) < 1 / 3 or not set(names) <= current.names():
        return True
    if ca is not None:
        return not issued_by(current, ca)
    return current.ca_key_pem is not None and _left(_own_ca(current), now) < 1 / 3


def renewed(current: ServingCert, names: Sequence[str], now: datetime.datetime,
            ca: CertificateAuthority | None = None) -> ServingCert:
    """A new serving certificate: from the mesh CA when given; else from the same CA, or,
    when the CA nears its end, from a new CA, with the old one still in the bundle while it
    is valid."""
    if ca is not None:
        return from_mesh_ca(ca, names, now)
    if current.ca_key_pem is None:
        raise CertificateError("the webhook certificate was given (files) and is due for "
                               "renewal; renew it where it comes from (cert-manager renews "
                               "its own)")
    ca_pem, ca_key_pem, bundle = current.ca_pem, current.ca_key_pem, current.ca_pem
    old_ca = _own_ca(current)
    if _left(old_ca, now) < 1 / 3:
        ca_pem, ca_key_pem = make_ca(now)
        bundle = ca_pem + (_pem(old_ca) if old_ca.not_valid_after_utc > now else b"")
    cert_pem, key_pem = issue(ca_pem, ca_key_pem, names, now)
    return ServingCert(cert_pem, key_pem, bundle, ca_key_pem)


def from_files(cert: Path, key: Path, ca: Path | None = None) -> ServingCert:
    """The operator's certificate (``--webhook-cert``, ``--webhook-key``, ``--webhook-ca``)."""
    try:
        found = ServingCert(cert.read_bytes(), key.read_bytes(),
                            ca.read_bytes() if ca is not None else b"")
        found.ssl_context()  # refuse now a pair that does not match, not at a handshake
    except (OSError, ValueError, ssl.SSLError) as exc:
        raise CertificateError(
            f"cannot use the webhook certificate {cert} with key {key}: {exc}; give a PEM "
            "certificate and its PEM key (e.g. tls.crt and tls.key of a kubernetes.io/tls "
            "Secret)") from exc
    return found


class CertificateSource(Protocol):
    """Where the webhook's certificate comes from; asked again now and then, so that a
    renewed one (by us, another replica, or cert-manager) is picked up."""

    def ensure(self, names: Sequence[str], now: datetime.datetime) -> ServingCert: ...


class FileCertificates:
    """The operator's files, read again at every check (cert-manager rewrites them)."""

    def __init__(self, cert: Path, key: Path, ca: Path | None = None) -> None:
        self.cert, self.key, self.ca = cert, key, ca

    def ensure(self, names: Sequence[str], now: datetime.datetime) -> ServingCert:
        found = from_files(self.cert, self.key, self.ca)
        if _left(found.certificate, now) < 0:
            log.error("webhook.certificate_expired", file=str(self.cert), **found.describe(),
                      hint="the API server refuses it: renew it where it comes from")
        return found


# -- kept between runs: a Secret (Kubernetes) or a directory (mesh file mode)


def secret_data(cert: ServingCert) -> dict[str, str]:
    """The Secret's ``data``: base64 PEM under cert-manager's key names."""
    data = {CERT_KEY: cert.cert_pem, KEY_KEY: cert.key_pem, CA_KEY: cert.ca_pem}
    if cert.ca_key_pem is not None:
        data[CA_PRIVATE_KEY] = cert.ca_key_pem
    return {k: base64.b64encode(v).decode() for k, v in data.items()}


def from_secret_data(data: Mapping[str, str] | None, where: str) -> ServingCert:
    """The certificate a Secret holds; CertificateError when it holds none usable."""
    try:
        raw = {k: base64.b64decode(v) for k, v in (data or {}).items()}
        found = ServingCert(raw[CERT_KEY], raw[KEY_KEY], raw.get(CA_KEY, b""),
                            raw.get(CA_PRIVATE_KEY))
        found.certificate  # noqa: B018 (parses it)
        return found
    except (KeyError, ValueError, TypeError) as exc:
        raise CertificateError(f"{where} holds no usable certificate ({type(exc).__name__}: "
                               f"{exc}); delete it and the control plane makes a new one"
                               ) from exc


class DirectoryStore:
    """A made certificate kept in a directory (``tls.crt``, ``tls.key``, ``ca.crt``, and
    ``ca.key`` for a self-made CA; keys readable by the owner only). With ``ca`` (the mesh
    CA, asked at every check) the mesh CA issues it."""

    def __init__(self, path: Path,
                 ca: Callable[[], CertificateAuthority] | None = None) -> None:
        self.path = path
        self.ca = ca

    def load(self) -> ServingCert | None:
        if not (self.path / CERT_KEY).exists():
            return None
        data = {name: base64.b64encode((self.path / name).read_bytes()).decode()
                for name in (CERT_KEY, KEY_KEY, CA_KEY, CA_PRIVATE_KEY)
                if (self.path / name).exists()}
        return from_secret_data(data, f"the directory {self.path}")

    def save(self, cert: ServingCert) -> None:
        self.path.mkdir(parents=True, exist_ok=True, mode=0o700)
        if cert.ca_key_pem is None:  # a self-made CA's key no longer belongs here
            (self.path / CA_PRIVATE_KEY).unlink(missing_ok=True)
        for name, value in secret_data(cert).items():
            target = self.path / name
            temporary = target.with_suffix(".tmp")
            fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "wb") as handle:
                handle.write(base64.b64decode(value))
            temporary.replace(target)

    def ensure(self, names: Sequence[str], now: datetime.datetime) -> ServingCert:
        """The kept certificate, made or renewed first when needed."""
        current = self.load()
        ca = self.ca() if self.ca is not None else None
        if current is None or needs_renewal(current, names, now, ca):
            current = (self_made(names, now, ca)
                       if current is None or (current.ca_key_pem is None and ca is None)
                       else renewed(current, names, now, ca))
            self.save(current)
            log.info("webhook.certificate_made", directory=str(self.path),
                     **current.describe())
        return current
