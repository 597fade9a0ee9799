"""The security core, pure: SPIFFE IDs, the CA, and the certificates it issues, verified as a
TLS peer would (cryptography's X.509 path validation, RFC 5280 / CA/B profile)."""

from __future__ import annotations

import datetime
import string

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID
from cryptography.x509.verification import PolicyBuilder, Store, VerificationError
from hypothesis import given
from hypothesis import strategies as st

from controlplane.security.ca import CaProblem, CertificateAuthority, Issued
from controlplane.security.identity import DEFAULT_TRUST_DOMAIN, SpiffeId

NOW = datetime.datetime(2026, 12, 1, 6, 0, tzinfo=datetime.UTC)
HOUR = datetime.timedelta(hours=1)
REVIEWS = SpiffeId(DEFAULT_TRUST_DOMAIN, "default", "reviews")

# --- SPIFFE IDs -----------------------------------------------------------------------------

_alnum = string.ascii_lowercase + string.digits
labels = st.builds(lambda a, mid, b: a + mid + b if mid or b else a,
                   st.sampled_from(_alnum), st.text(_alnum + "-", max_size=20),
                   st.sampled_from(_alnum))
subdomains = st.lists(labels, min_size=1, max_size=4).map(".".join)
domains = st.lists(st.text(_alnum + "-_", min_size=1, max_size=12), min_size=1,
                   max_size=4).map(".".join)


@given(domains, labels, subdomains)
def test_a_spiffe_id_formats_and_parses_back(domain: str, namespace: str, sa: str) -> None:
    spiffe = SpiffeId(domain, namespace, sa)
    assert str(spiffe) == spiffe.uri == f"spiffe://{domain}/ns/{namespace}/sa/{sa}"
    assert SpiffeId.parse(spiffe.uri) == spiffe


@given(st.text(max_size=80))
def test_anything_parsed_formats_back_to_itself(text: str) -> None:
    """Whatever is accepted is canonical: no second spelling of one identity."""
    try:
        parsed = SpiffeId.parse(text)
    except ValueError as exc:
        assert "SPIFFE ID" in str(exc)
        return
    assert parsed.uri == text


@given(labels, subdomains, st.sampled_from(["/", "?", "#", "A", " ", "%2F", ":", "@", ".."]))
def test_a_stray_character_anywhere_is_refused(namespace: str, sa: str, bad: str) -> None:
    for uri in (f"spiffe://cluster.local/ns/{namespace}{bad}/sa/{sa}",
                f"spiffe://cluster.local/ns/{namespace}/sa/{sa}{bad}",
                f"spiffe://cluster{bad}local/ns/{namespace}/sa/{sa}"):
        with pytest.raises(ValueError, match="SPIFFE ID"):
            SpiffeId.parse(uri)


@pytest.mark.parametrize(("uri", "says"), [
    ("http://cluster.local/ns/a/sa/b", "must start with 'spiffe://'"),
    ("spiffe://cluster.local", "has no path"),
    ("spiffe://cluster.local/ns/a/sa", "the path must be /ns/<namespace>/sa/<serviceaccount>"),
    ("spiffe://cluster.local/ns/a/sa/b/c", "the path must be"),
    ("spiffe://cluster.local/sa/b/ns/a", "the path must be"),
    ("spiffe://Cluster.local/ns/a/sa/b", "trust domain 'Cluster.local'"),
    ("spiffe://cluster.local:443/ns/a/sa/b", "trust domain"),
    ("spiffe://cluster.local/ns/A/sa/b", "namespace 'A' must be a DNS label"),
    ("spiffe://cluster.local/ns/a/sa/b..c", "service account 'b..c'"),
    ("spiffe://cluster.local/ns/a/sa/b?x=1", "no query or fragment"),
    ("spiffe:///ns/a/sa/b", "trust domain ''"),
    ("spiffe://cluster.local/ns/" + "a" * 64 + "/sa/b", "at most 63"),
    ("spiffe://x/ns/a/sa/" + "b" * 3000, "longer than 2048"),
])
def test_a_bad_spiffe_id_says_what_is_wrong(uri: str, says: str) -> None:
    with pytest.raises(ValueError, match="SPIFFE ID") as caught:
        SpiffeId.parse(uri)
    assert says in str(caught.value)


def test_a_spiffe_id_cannot_be_made_invalid() -> None:
    with pytest.raises(ValueError, match="namespace 'a/b'"):
        SpiffeId("cluster.local", "a/b", "c")
    assert SpiffeId.from_service_account("td", "prod/ratings") == SpiffeId("td", "prod",
                                                                            "ratings")
    with pytest.raises(ValueError, match="namespace/name"):
        SpiffeId.from_service_account("td", "ratings")


# --- the CA and what it issues ----------------------------------------------------------------


def verify_client(ca: CertificateAuthority, issued: Issued,
                  at: datetime.datetime) -> list[x509.GeneralName]:
    """What a TLS server checking this client certificate against the bundle sees."""
    certs = x509.load_pem_x509_certificates(issued.cert_pem)
    verifier = PolicyBuilder().store(Store(list(ca.roots))).time(at).build_client_verifier()
    return list(verifier.verify(certs[0], certs[1:]).subjects or [])


@pytest.fixture(scope="module")
def ca() -> CertificateAuthority:
    return CertificateAuthority.create(DEFAULT_TRUST_DOMAIN, NOW)


def test_a_workload_certificate_is_a_spiffe_svid(ca: CertificateAuthority) -> None:
    issued = ca.issue_workload(REVIEWS, NOW, 24 * HOUR)
    leaf = issued.leaf
    assert isinstance(leaf.public_key(), ec.EllipticCurvePublicKey)
    assert isinstance(leaf.public_key().curve, ec.SECP256R1)  # type: ignore[union-attr]
    assert leaf.signature_algorithm_oid.dotted_string == "1.2.840.10045.4.3.2"
    san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    assert list(san.value) == [x509.UniformResourceIdentifier(REVIEWS.uri)]  # only this
    assert san.critical and leaf.subject == x509.Name([])
    assert leaf.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is False
    usage = leaf.extensions.get_extension_for_class(x509.KeyUsage).value
    assert usage.digital_signature and usage.key_encipherment and not usage.key_cert_sign
    assert set(leaf.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value) == {
        ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH}
    assert issued.not_before == NOW - datetime.timedelta(minutes=5)
    assert issued.not_after == NOW + 24 * HOUR
    assert issued.serial == leaf.serial_number
    assert verify_client(ca, issued, NOW) == [x509.UniformResourceIdentifier(REVIEWS.uri)]
    server = PolicyBuilder().store(Store(list(ca.roots))).time(NOW).build_server_verifier(
        x509.DNSName("ratings.default.svc"))
    with pytest.raises(VerificationError):  # an SVID names no host: only the URI counts
        server.verify(leaf, [])


def test_serials_are_random_and_keys_fresh(ca: CertificateAuthority) -> None:
    issued = [ca.issue_workload(REVIEWS, NOW, HOUR) for _ in range(20)]
    assert len({i.serial for i in issued}) == 20
    assert len({i.key_pem for i in issued}) == 20
    assert all(i.serial.bit_length() > 100 for i in issued)


def test_a_certificate_is_refused_outside_its_lifetime(ca: CertificateAuthority) -> None:
    issued = ca.issue_workload(REVIEWS, NOW, HOUR)
    verify_client(ca, issued, NOW - datetime.timedelta(minutes=4))  # a peer's clock behind
    with pytest.raises(VerificationError):
        verify_client(ca, issued, NOW + 2 * HOUR)
    with pytest.raises(VerificationError):
        verify_client(ca, issued, NOW - HOUR)


def test_another_ca_does_not_verify_it(ca: CertificateAuthority) -> None:
    other = CertificateAuthority.create(DEFAULT_TRUST_DOMAIN, NOW)
    with pytest.raises(VerificationError):
        verify_client(other, ca.issue_workload(REVIEWS, NOW, HOUR), NOW)


def test_a_serving_certificate_verifies_for_its_names(ca: CertificateAuthority) -> None:
    issued = ca.issue_server(["controlplane.controlplane-system.svc", "localhost"],
                             ["127.0.0.1"], NOW, 24 * HOUR)
    builder = PolicyBuilder().store(Store(list(ca.roots))).time(NOW)
    for name in (x509.DNSName("controlplane.controlplane-system.svc"),
                 x509.DNSName("localhost")):
        builder.build_server_verifier(name).verify(issued.leaf, [])
    import ipaddress
    builder.build_server_verifier(x509.IPAddress(ipaddress.ip_address("127.0.0.1"))).verify(
        issued.leaf, [])
    with pytest.raises(VerificationError):
        builder.build_server_verifier(x509.DNSName("evil.example")).verify(issued.leaf, [])
    with pytest.raises(CaProblem, match="at least one"):
        ca.issue_server([], [], NOW, HOUR)


def test_nothing_outlives_the_signer(ca: CertificateAuthority) -> None:
    short = CertificateAuthority.create(DEFAULT_TRUST_DOMAIN, NOW, days=1)
    issued = short.issue_workload(REVIEWS, NOW, datetime.timedelta(days=30))
    assert issued.not_after == short.signer_cert.not_valid_after_utc


def test_a_ca_survives_pem_and_keeps_its_version(ca: CertificateAuthority) -> None:
    from cryptography.hazmat.primitives import serialization
    cert_pem = ca.signer_cert.public_bytes(serialization.Encoding.PEM)
    key_pem = ca.signing_key().private_bytes(serialization.Encoding.PEM,
                                             serialization.PrivateFormat.PKCS8,
                                             serialization.NoEncryption())
    again = CertificateAuthority.from_pem(cert_pem, key_pem)
    assert again.version == ca.version and again.bundle_pem == ca.bundle_pem == cert_pem
    verify_client(ca, again.issue_workload(REVIEWS, NOW, HOUR), NOW)
    # A bundle with an older root: both trusted, the version changes, the signer stays.
    old = CertificateAuthority.create(DEFAULT_TRUST_DOMAIN, NOW)
    both = CertificateAuthority.from_pem(cert_pem, key_pem, cert_pem + old.bundle_pem)
    assert both.roots == (ca.signer_cert, old.signer_cert)
    assert both.version != ca.version
    assert set(both.public_keys()) == {ca.key_id, old.key_id}
    verify_client(both, old.issue_workload(REVIEWS, NOW, HOUR), NOW)


def test_an_intermediate_signer_sends_its_chain() -> None:
    """A CA the user brings may be an intermediate under their root (cert-manager's
    ``tls.crt`` then holds it, ``ca.crt`` the root): issued chains carry it."""
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.x509.oid import NameOID
    root = CertificateAuthority.create("corp.example", NOW)
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "mesh intermediate")])
    inter = (x509.CertificateBuilder().subject_name(name)
             .issuer_name(root.signer_cert.subject).public_key(key.public_key())
             .serial_number(x509.random_serial_number())
             .not_valid_before(NOW - HOUR).not_valid_after(NOW + 1000 * HOUR)
             .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
             .add_extension(x509.KeyUsage(
                 digital_signature=True, key_cert_sign=True, crl_sign=True,
                 content_commitment=False, key_encipherment=False, data_encipherment=False,
                 key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
             .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()),
                            critical=False)
             .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(
                 root.signing_key().public_key()), critical=False)
             .sign(root.signing_key(), hashes.SHA256()))
    key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    inter_pem = inter.public_bytes(serialization.Encoding.PEM)
    ca = CertificateAuthority.from_pem(inter_pem, key_pem, root.bundle_pem)
    issued = ca.issue_workload(REVIEWS, NOW, HOUR)
    assert len(x509.load_pem_x509_certificates(issued.cert_pem)) == 2
    assert verify_client(ca, issued, NOW) == [x509.UniformResourceIdentifier(REVIEWS.uri)]
    with pytest.raises(CaProblem, match="not self-signed and no trust bundle"):
        CertificateAuthority.from_pem(inter_pem, key_pem)
    with pytest.raises(CaProblem, match="does not chain to any root"):
        CertificateAuthority.from_pem(inter_pem, key_pem,
                                      CertificateAuthority.create("x", NOW).bundle_pem)


def test_what_cannot_be_a_ca_is_refused_without_showing_a_key(
        ca: CertificateAuthority) -> None:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa
    cert_pem = ca.signer_cert.public_bytes(serialization.Encoding.PEM)
    other = CertificateAuthority.create(DEFAULT_TRUST_DOMAIN, NOW)
    other_key = other.signing_key().private_bytes(serialization.Encoding.PEM,
                                                 serialization.PrivateFormat.PKCS8,
                                                 serialization.NoEncryption())
    rsa_key = rsa.generate_private_key(65537, 2048).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption())
    leaf = ca.issue_workload(REVIEWS, NOW, HOUR)
    cases = [
        (cert_pem, other_key, "does not belong to the CA certificate"),
        (cert_pem, rsa_key, "must be ECDSA P-256"),
        (cert_pem, b"-----BEGIN PRIVATE KEY-----\nnonsense\n-----END PRIVATE KEY-----\n",
         "not an unencrypted PEM private key"),
        (b"junk", other_key, "holds no PEM certificate"),
        (leaf.cert_pem, leaf.key_pem, "is not a CA"),
    ]
    for cert, key, says in cases:
        with pytest.raises(CaProblem, match=says) as caught:
            CertificateAuthority.from_pem(cert, key)
        assert b"PRIVATE" not in str(caught.value).encode()
        assert key.split(b"\n")[1][:20].decode() not in str(caught.value)


def test_no_key_in_a_repr(ca: CertificateAuthority) -> None:
    issued = ca.issue_workload(REVIEWS, NOW, HOUR)
    body = issued.key_pem.decode().splitlines()[1]
    for text in (repr(issued), repr(ca), str(ca.describe())):
        assert "PRIVATE" not in text and body not in text
    assert ca.describe()["signer"]["subject"].startswith("CN=controlplane root CA")


def test_a_bad_trust_domain_is_refused() -> None:
    with pytest.raises(CaProblem, match="trust domain 'Bad Domain'"):
        CertificateAuthority.create("Bad Domain", NOW)


def test_two_workloads_complete_an_mtls_handshake_and_see_each_others_identity() -> None:
    """A real TLS 1.3 handshake (OpenSSL via ssl) both ways with two SVIDs: each side
    trusts only the bundle and reads the peer's SPIFFE URI; a stranger's is refused."""
    import socket
    import ssl
    import tempfile
    import threading
    from pathlib import Path

    ratings = SpiffeId(DEFAULT_TRUST_DOMAIN, "default", "ratings")
    now = datetime.datetime.now(datetime.UTC)  # OpenSSL checks against the real clock
    ca = CertificateAuthority.create(DEFAULT_TRUST_DOMAIN, now)

    def context(issued: Issued, side: ssl.Purpose, folder: Path) -> ssl.SSLContext:
        made = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER if side is ssl.Purpose.CLIENT_AUTH
                              else ssl.PROTOCOL_TLS_CLIENT)
        made.check_hostname = False  # SVIDs name no host: the URI SAN is checked below
        made.verify_mode = ssl.CERT_REQUIRED
        made.load_verify_locations(cadata=ca.bundle_pem.decode())
        (folder / "c.pem").write_bytes(issued.cert_pem)
        (folder / "k.pem").write_bytes(issued.key_pem)
        made.load_cert_chain(folder / "c.pem", folder / "k.pem")
        return made

    def uri_of(peer: dict[str, object] | None) -> list[str]:
        assert peer is not None
        return [v for k, v in peer.get("subjectAltName", ()) if k == "URI"]  # type: ignore[attr-defined]

    def handshake(client_cert: Issued) -> tuple[list[str], list[str]]:
        with tempfile.TemporaryDirectory() as one, tempfile.TemporaryDirectory() as two:
            server = context(ca.issue_workload(ratings, now, HOUR), ssl.Purpose.CLIENT_AUTH,
                             Path(one))
            client = context(client_cert, ssl.Purpose.SERVER_AUTH, Path(two))
        left, right = socket.socketpair()
        seen: dict[str, object] = {}

        def serve() -> None:
            try:
                with server.wrap_socket(left, server_side=True) as tls:
                    seen["peer"] = tls.getpeercert()
                    tls.sendall(tls.recv(1))  # an echo: both sides done before closing
            except ssl.SSLError as exc:
                seen["error"] = exc

        thread = threading.Thread(target=serve)
        thread.start()
        server_peer = None
        try:
            with client.wrap_socket(right) as tls:
                server_peer = tls.getpeercert()
                tls.sendall(b"x")
                echoed = tls.recv(1)
        except (ssl.SSLError, OSError) as exc:
            seen.setdefault("error", exc)
        finally:
            thread.join(10)
        if "error" in seen:
            raise ssl.SSLError(f"handshake refused: {seen['error']}")
        assert echoed == b"x"
        return uri_of(seen["peer"]), uri_of(server_peer)  # type: ignore[arg-type]

    assert handshake(ca.issue_workload(REVIEWS, now, HOUR)) == ([REVIEWS.uri], [ratings.uri])
    stranger = CertificateAuthority.create(DEFAULT_TRUST_DOMAIN, now)
    with pytest.raises(ssl.SSLError, match=r"certificate|unknown ca"):
        handshake(stranger.issue_workload(REVIEWS, now, HOUR))
