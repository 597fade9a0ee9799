"""SDS secrets and the Issuer: a proxy's two secrets hold its own certificate (only its
SPIFFE ID), the key of that certificate and the bundle; certificates are reissued well
before expiry and when the CA changes, and only identities still asked for are held."""

from __future__ import annotations

import datetime

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.verification import PolicyBuilder, Store
from hypothesis import given, settings
from hypothesis import strategies as st

from controlplane.security.ca import CertificateAuthority
from controlplane.security.identity import SpiffeId
from controlplane.security.sds import CERT_SECRET, ROOT_SECRET, Issuer, secret_messages

NOW = datetime.datetime(2026, 12, 1, 6, 0, tzinfo=datetime.UTC)
HOUR = datetime.timedelta(hours=1)
RATINGS = SpiffeId("cluster.local", "default", "ratings")
REVIEWS = SpiffeId("cluster.local", "default", "reviews")


@pytest.fixture(scope="module")
def ca() -> CertificateAuthority:
    return CertificateAuthority.create("cluster.local", NOW)


def test_the_two_secrets_are_the_proxys_own(ca: CertificateAuthority) -> None:
    issued = ca.issue_workload(RATINGS, NOW, HOUR)
    cert, root = secret_messages(issued, ca.bundle_pem)
    assert (cert.name, root.name) == (CERT_SECRET, ROOT_SECRET) == ("default", "ROOTCA")
    chain = x509.load_pem_x509_certificates(cert.tls_certificate.certificate_chain.inline_bytes)
    key = serialization.load_pem_private_key(cert.tls_certificate.private_key.inline_bytes,
                                             None)
    assert key.public_key() == chain[0].public_key()  # the key of this certificate
    trusted = x509.load_pem_x509_certificates(root.validation_context.trusted_ca.inline_bytes)
    verified = (PolicyBuilder().store(Store(trusted)).time(NOW).build_client_verifier()
                .verify(chain[0], chain[1:]))
    assert verified.subjects == [x509.UniformResourceIdentifier(RATINGS.uri)]
    assert not root.HasField("tls_certificate") and not cert.HasField("validation_context")


def test_a_certificate_is_kept_until_its_rotation_point(ca: CertificateAuthority) -> None:
    issuer = Issuer(lambda: ca, ttl=10 * HOUR, rotate_fraction=0.5)
    first = issuer.current(RATINGS, NOW)
    assert issuer.current(RATINGS, NOW + 4 * HOUR) is first
    assert issuer.next_due(NOW) == (RATINGS, NOW + 5 * HOUR)  # from issuance, not_before
    assert first.not_before == NOW - datetime.timedelta(minutes=5)  # is backdated
    assert issuer.current(RATINGS, NOW + 5 * HOUR - datetime.timedelta(seconds=1)) is first
    later = NOW + 5 * HOUR
    second = issuer.current(RATINGS, later)
    assert second.serial != first.serial and second.key_pem != first.key_pem
    assert second.not_after == later + 10 * HOUR
    assert first.not_after > later  # rotated well before the old one expired
    assert issuer.issued_count == 2


def test_next_due_is_the_earliest_and_a_new_ca_makes_all_due(ca: CertificateAuthority) -> None:
    current = [ca]
    issuer = Issuer(lambda: current[0], ttl=10 * HOUR)
    assert issuer.next_due(NOW) is None
    issuer.current(RATINGS, NOW + HOUR)
    issuer.current(REVIEWS, NOW)
    due = issuer.next_due(NOW)
    assert due is not None and due[0] == REVIEWS
    old = issuer.current(RATINGS, NOW + HOUR)
    current[0] = CertificateAuthority.create("cluster.local", NOW)  # rotated or replaced
    assert issuer.next_due(NOW + 2 * HOUR) == (RATINGS, NOW + 2 * HOUR)
    fresh = issuer.current(RATINGS, NOW + 2 * HOUR)
    assert fresh.serial != old.serial
    fresh.leaf.verify_directly_issued_by(current[0].signer_cert)


def test_a_certificate_of_seconds_is_not_due_at_once(ca: CertificateAuthority) -> None:
    """Its not_before is backdated 5 minutes (clock skew); its rotation point is not."""
    issuer = Issuer(lambda: ca, ttl=datetime.timedelta(seconds=4))
    first = issuer.current(RATINGS, NOW)
    assert issuer.next_due(NOW) == (RATINGS, NOW + datetime.timedelta(seconds=2))
    assert issuer.current(RATINGS, NOW + datetime.timedelta(seconds=1.9)) is first
    assert issuer.current(RATINGS, NOW + datetime.timedelta(seconds=2)) is not first


def test_forgotten_identities_are_not_held(ca: CertificateAuthority) -> None:
    issuer = Issuer(lambda: ca, ttl=HOUR)
    for n in range(50):
        issuer.current(SpiffeId("cluster.local", "default", f"sa-{n}"), NOW)
    assert len(issuer) == 50
    for n in range(50):
        issuer.forget(SpiffeId("cluster.local", "default", f"sa-{n}"))
    issuer.forget(RATINGS)  # unknown: nothing to do
    assert len(issuer) == 0 and issuer.next_due(NOW) is None
    assert len(issuer._due) <= 64 and not issuer._versions  # nothing kept for them


def test_bad_settings_are_refused_with_the_flag() -> None:
    with pytest.raises(ValueError, match="--workload-cert-ttl"):
        Issuer(lambda: CertificateAuthority.create("x", NOW), ttl=datetime.timedelta(0))
    with pytest.raises(ValueError, match="between 0 and 1"):
        Issuer(lambda: CertificateAuthority.create("x", NOW), rotate_fraction=1.0)


_CAS = [CertificateAuthority.create("cluster.local", NOW) for _ in range(2)]


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["issue", "forget", "switch"]),
                          st.integers(0, 5), st.integers(0, 600)), max_size=40))
def test_next_due_is_always_the_earliest_held(ops: list[tuple[str, int, int]]) -> None:
    """Against a plain model: the earliest rotation point of what is held, or now for
    anything issued by a CA that is no longer current."""
    current = [_CAS[0]]
    issuer = Issuer(lambda: current[0], ttl=datetime.timedelta(minutes=10))
    model: dict[SpiffeId, tuple[datetime.datetime, str]] = {}
    clock = NOW
    for op, who, seconds in ops:
        clock += datetime.timedelta(seconds=seconds)
        spiffe = SpiffeId("cluster.local", "default", f"sa-{who}")
        if op == "issue":
            issued = issuer.current(spiffe, clock)
            model[spiffe] = (issued.rotate_at(0.5), current[0].version)
        elif op == "forget":
            issuer.forget(spiffe)
            model.pop(spiffe, None)
        else:
            current[0] = _CAS[1] if current[0] is _CAS[0] else _CAS[0]
        due = issuer.next_due(clock)
        if not model:
            assert due is None
            continue
        assert due is not None
        stale = {s for s, (_, v) in model.items() if v != current[0].version}
        if stale:
            assert due[0] in stale and due[1] == clock
        else:
            assert due[1] == min(when for when, _ in model.values())
            assert model[due[0]][0] == due[1]
