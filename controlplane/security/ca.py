"""The mesh CA: a signing certificate and key, a trust bundle of one or more roots, and the
certificates it issues (workloads' SPIFFE certificates, the control plane's own serving
certificates).

Pure: the clock is a parameter and nothing here touches a file or the network
(``castore`` keeps a CA). Keys are ECDSA P-256 and never appear in a ``repr``, a log line
or an error message: only fingerprints and dates describe a CA.
"""

from __future__ import annotations

import datetime
import hashlib
import ipaddress
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Final

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from controlplane.security.identity import SpiffeId, trust_domain_problem

ROOT_DAYS: Final = 3650
CLOCK_SKEW: Final = datetime.timedelta(minutes=5)  # a peer's clock may be a little behind
CURVE: Final = ec.SECP256R1


class CaProblem(ValueError):
    """A certificate or key that cannot serve as the CA; the message says what to give."""


@dataclass(frozen=True, slots=True)
class Issued:
    """A certificate the CA issued: ``cert_pem`` is the leaf followed by the chain up to,
    not including, the root (so a peer that trusts the bundle can verify it)."""

    cert_pem: bytes
    key_pem: bytes = field(repr=False)
    not_before: datetime.datetime
    not_after: datetime.datetime
    serial: int
    issued_at: datetime.datetime | None = None  # not_before is backdated (CLOCK_SKEW)

    @property
    def leaf(self) -> x509.Certificate:
        return x509.load_pem_x509_certificates(self.cert_pem)[0]

    def rotate_at(self, fraction: float) -> datetime.datetime:
        """When ``fraction`` of its lifetime has passed, counted from issuance (not from
        the backdated not_before: a certificate of a few seconds would be due at once)."""
        start = self.issued_at or self.not_before
        return start + (self.not_after - start) * fraction


def _pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def fingerprint(cert: x509.Certificate) -> str:
    """A short SHA-256 fingerprint for logs and ``ca show``."""
    return cert.fingerprint(hashes.SHA256()).hex()[:16]


def _key_id(public: ec.EllipticCurvePublicKey) -> str:
    der = public.public_bytes(serialization.Encoding.DER,
                              serialization.PublicFormat.SubjectPublicKeyInfo)
    return hashlib.sha256(der).hexdigest()[:16]


def _is_ca(cert: x509.Certificate) -> bool:
    try:
        return cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    except x509.ExtensionNotFound:
        return False


def _self_signed(cert: x509.Certificate) -> bool:
    if cert.issuer != cert.subject:
        return False
    try:
        cert.verify_directly_issued_by(cert)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True


def _load_certs(pem: bytes, what: str) -> list[x509.Certificate]:
    try:
        certs = x509.load_pem_x509_certificates(pem)
    except ValueError as exc:
        raise CaProblem(f"{what} holds no PEM certificate ({exc}); give the CA's "
                        "certificate in PEM (-----BEGIN CERTIFICATE-----)") from None
    return certs


def _load_key(pem: bytes) -> ec.EllipticCurvePrivateKey:
    try:
        key = serialization.load_pem_private_key(pem, password=None)
    except (ValueError, TypeError) as exc:
        # The library's message names the format only; the key's bytes never reach it.
        raise CaProblem(f"the CA key is not an unencrypted PEM private key "
                        f"({type(exc).__name__}); give the key in PEM without a passphrase"
                        ) from None
    if not isinstance(key, ec.EllipticCurvePrivateKey) or not isinstance(key.curve, CURVE):
        raise CaProblem("the CA key must be ECDSA P-256 (cert-manager: privateKey.algorithm "
                        "ECDSA, size 256); workload certificates and proxy tokens (ES256) "
                        "are signed with it")
    return key


class CertificateAuthority:
    """A signing certificate with its key, and the trust bundle (every root a peer may
    chain to: the signer's root first while a rotation is in progress, old ones after)."""

    __slots__ = ("_key", "_keys", "bundle_pem", "chain", "key_id", "roots", "signer_cert",
                 "version")

    def __init__(self, signer_cert: x509.Certificate, key: ec.EllipticCurvePrivateKey,
                 chain: Sequence[x509.Certificate], roots: Sequence[x509.Certificate]) -> None:
        self.signer_cert = signer_cert
        self._key = key
        self.chain = tuple(chain)  # the signer and its intermediates, roots left out
        self.roots: tuple[x509.Certificate, ...] = tuple(roots)
        self.bundle_pem: bytes = b"".join(_pem(c) for c in self.roots)
        digest = hashlib.sha256(signer_cert.fingerprint(hashes.SHA256()) + self.bundle_pem)
        self.version: str = digest.hexdigest()[:16]
        """Changes when the signer or the bundle does: what was issued before is stale."""
        self.key_id: str = _key_id(key.public_key())
        self._keys = {self.key_id: key.public_key()}
        for root in self.roots:
            public = root.public_key()
            if isinstance(public, ec.EllipticCurvePublicKey):
                self._keys.setdefault(_key_id(public), public)

    def __repr__(self) -> str:
        return f"CertificateAuthority({self.describe()!r})"

    @classmethod
    def create(cls, trust_domain: str, now: datetime.datetime,
               days: int = ROOT_DAYS) -> CertificateAuthority:
        """A new self-signed root (P-256) that signs directly."""
        problem = trust_domain_problem(trust_domain)
        if problem is not None:
            raise CaProblem(problem)
        key = ec.generate_private_key(CURVE())
        name = x509.Name([
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "controlplane"),
            x509.NameAttribute(NameOID.COMMON_NAME,
                               f"controlplane root CA {trust_domain} "
                               f"{now.strftime('%Y%m%d%H%M%S')}")])
        cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
                .public_key(key.public_key()).serial_number(x509.random_serial_number())
                .not_valid_before(now - CLOCK_SKEW)
                .not_valid_after(now + datetime.timedelta(days=days))
                .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
                .add_extension(x509.KeyUsage(
                    digital_signature=True, key_cert_sign=True, crl_sign=True,
                    content_commitment=False, key_encipherment=False, data_encipherment=False,
                    key_agreement=False, encipher_only=False, decipher_only=False),
                    critical=True)
                .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()),
                               critical=False)
                .sign(key, hashes.SHA256()))
        return cls(cert, key, [], [cert])

    @classmethod
    def from_pem(cls, cert_pem: bytes, key_pem: bytes,
                 bundle_pem: bytes | None = None) -> CertificateAuthority:
        """A CA from PEM: ``cert_pem`` is the signing certificate (then, optionally, its
        intermediates: cert-manager's ``tls.crt``), ``bundle_pem`` the roots (default: the
        self-signed certificates of ``cert_pem``). CaProblem when they do not fit."""
        certs = _load_certs(cert_pem, "the CA certificate")
        signer = certs[0]
        key = _load_key(key_pem)
        if _key_id(key.public_key()) != _key_id_of(signer):
            raise CaProblem(f"the CA key does not belong to the CA certificate "
                            f"{signer.subject.rfc4514_string()} (sha256 "
                            f"{fingerprint(signer)}); give the key made with it")
        if not _is_ca(signer):
            raise CaProblem(f"the certificate {signer.subject.rfc4514_string()} is not a CA "
                            "(basicConstraints CA:TRUE); give a CA certificate (cert-manager:"
                            " a Certificate with isCA: true)")
        if bundle_pem:
            roots = _load_certs(bundle_pem, "the trust bundle")
        else:
            roots = [c for c in certs if _self_signed(c)]
            if not roots:
                raise CaProblem(f"the CA certificate {signer.subject.rfc4514_string()} is not"
                                " self-signed and no trust bundle was given; give the roots "
                                "(ca.crt, --ca-bundle)")
        if signer in roots:
            # A root that signs directly; what follows it are cross-signed copies (from a
            # rotation), sent along while the root that signed them is still trusted.
            chain = [c for c in certs[1:] if c not in roots and _chains_to([c], roots)]
        else:
            chain = [c for c in certs if c not in roots]
        if not _chains_to(chain or [signer], roots):
            raise CaProblem(f"the CA certificate {signer.subject.rfc4514_string()} does not "
                            "chain to any root of the trust bundle; put its root in the "
                            "bundle (ca.crt, --ca-bundle)")
        return cls(signer, key, chain, roots)

    # -- what peers trust

    def public_keys(self) -> dict[str, ec.EllipticCurvePublicKey]:
        """Token verification keys by key id: the signer's and every EC root's (a token
        minted before a rotation stays valid while its root is in the bundle)."""
        return dict(self._keys)

    def signed_under(self, root: x509.Certificate) -> bool:
        """Whether the signer is ``root`` or chains to it through its own intermediates
        (what a prune keeps; a cross-signed copy of a root does not count)."""
        if self.signer_cert in self.roots:
            return root == self.signer_cert
        return _chains_to(self.chain or [self.signer_cert], [root])

    def cross_sign(self, root: x509.Certificate, now: datetime.datetime) -> x509.Certificate:
        """``root`` (a new root) signed by this CA: sent in chains during a rotation, so a
        peer that trusts only the old root still verifies what the new one issues."""
        not_after = min(root.not_valid_after_utc, self.signer_cert.not_valid_after_utc)
        builder = (x509.CertificateBuilder().subject_name(root.subject)
                   .issuer_name(self.signer_cert.subject).public_key(root.public_key())
                   .serial_number(x509.random_serial_number())
                   .not_valid_before(now - CLOCK_SKEW).not_valid_after(not_after)
                   .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(
                       self._key.public_key()), critical=False))
        for extension in root.extensions:
            if not isinstance(extension.value, x509.AuthorityKeyIdentifier):
                builder = builder.add_extension(extension.value, extension.critical)
        return builder.sign(self._key, hashes.SHA256())

    def describe(self) -> dict[str, Any]:
        """For logs and ``ca show``: names, fingerprints and dates; never the key."""
        def one(cert: x509.Certificate) -> dict[str, str]:
            return {"subject": cert.subject.rfc4514_string(), "sha256": fingerprint(cert),
                    "not_before": cert.not_valid_before_utc.isoformat(),
                    "not_after": cert.not_valid_after_utc.isoformat()}
        return {"signer": one(self.signer_cert), "roots": [one(r) for r in self.roots]}

    # -- what it signs (only this module holds the key)

    def signing_key(self) -> ec.EllipticCurvePrivateKey:
        """The signing key: for ``tokens.mint`` (and tests). Never log it."""
        return self._key

    def issue_workload(self, spiffe: SpiffeId, now: datetime.datetime,
                       ttl: datetime.timedelta) -> Issued:
        """A workload certificate (an X.509-SVID): its only name the SPIFFE URI, usable to
        serve and to call (mTLS both ways), valid from a little before ``now``."""
        key = ec.generate_private_key(CURVE())
        builder = (self._leaf(key, x509.Name([]), now, ttl)
                   .add_extension(x509.SubjectAlternativeName(
                       [x509.UniformResourceIdentifier(spiffe.uri)]), critical=True)
                   .add_extension(x509.KeyUsage(
                       digital_signature=True, key_encipherment=True, key_cert_sign=False,
                       crl_sign=False, content_commitment=False, data_encipherment=False,
                       key_agreement=False, encipher_only=False, decipher_only=False),
                       critical=True)
                   .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH,
                                                         ExtendedKeyUsageOID.CLIENT_AUTH]),
                                  critical=False))
        return self._sign(builder, key, now)

    def issue_server(self, dns_names: Sequence[str], ips: Sequence[str],
                     now: datetime.datetime, ttl: datetime.timedelta) -> Issued:
        """A serving certificate (xDS over TLS, the injection webhook) for these names."""
        if not dns_names and not ips:
            raise CaProblem("a serving certificate needs at least one DNS name or IP")
        names: list[x509.GeneralName] = [x509.DNSName(n) for n in dns_names]
        names += [x509.IPAddress(ipaddress.ip_address(ip)) for ip in ips]
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME,
                                                (list(dns_names) or list(ips))[0])])
        key = ec.generate_private_key(CURVE())
        builder = (self._leaf(key, subject, now, ttl)
                   .add_extension(x509.SubjectAlternativeName(names), critical=False)
                   .add_extension(x509.KeyUsage(
                       digital_signature=True, key_encipherment=True, key_cert_sign=False,
                       crl_sign=False, content_commitment=False, data_encipherment=False,
                       key_agreement=False, encipher_only=False, decipher_only=False),
                       critical=True)
                   .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]),
                                  critical=False))
        return self._sign(builder, key, now)

    def _leaf(self, key: ec.EllipticCurvePrivateKey, subject: x509.Name,
              now: datetime.datetime, ttl: datetime.timedelta) -> x509.CertificateBuilder:
        not_after = min(now + ttl, self.signer_cert.not_valid_after_utc)
        return (x509.CertificateBuilder().subject_name(subject)
                .issuer_name(self.signer_cert.subject).public_key(key.public_key())
                .serial_number(x509.random_serial_number())
                .not_valid_before(now - CLOCK_SKEW).not_valid_after(not_after)
                .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
                .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(
                    self._key.public_key()), critical=False)
                .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()),
                               critical=False))

    def _sign(self, builder: x509.CertificateBuilder, key: ec.EllipticCurvePrivateKey,
              now: datetime.datetime) -> Issued:
        cert = builder.sign(self._key, hashes.SHA256())
        chain = b"".join(_pem(c) for c in self.chain)
        return Issued(_pem(cert) + chain, _key_pem(key), cert.not_valid_before_utc,
                      cert.not_valid_after_utc, cert.serial_number, issued_at=now)


def _key_id_of(cert: x509.Certificate) -> str:
    public = cert.public_key()
    if not isinstance(public, ec.EllipticCurvePublicKey):
        raise CaProblem(f"the CA certificate {cert.subject.rfc4514_string()} has no ECDSA "
                        "key; give a P-256 CA (cert-manager: privateKey.algorithm ECDSA)")
    return _key_id(public)


def _chains_to(chain: Sequence[x509.Certificate], roots: Sequence[x509.Certificate]) -> bool:
    """The last certificate of ``chain`` is one of ``roots`` or signed by one of them."""
    top = chain[-1]
    for root in roots:
        if top == root:
            return True
        try:
            top.verify_directly_issued_by(root)
            return True
        except (ValueError, TypeError, InvalidSignature):
            continue
    return False
