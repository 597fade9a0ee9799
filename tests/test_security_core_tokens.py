"""File-mode proxy tokens and the node check: a token proves an identity only when our CA
(or a root still in its bundle) signed it, for our audience, within its lifetime; a
credential speaks only for its own node. Every refusal says what to do and never repeats
the token."""

from __future__ import annotations

import asyncio
import datetime

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from hypothesis import given
from hypothesis import strategies as st

from controlplane.security import tokens
from controlplane.security.authn import (
    AuthError,
    Caller,
    LocalTokens,
    bearer,
    check_node,
)
from controlplane.security.ca import CertificateAuthority
from controlplane.security.identity import SpiffeId

NOW = datetime.datetime(2026, 12, 1, 6, 0, tzinfo=datetime.UTC)
DAY = datetime.timedelta(days=1)
RATINGS = SpiffeId("cluster.local", "default", "ratings")


@pytest.fixture(scope="module")
def ca() -> CertificateAuthority:
    return CertificateAuthority.create("cluster.local", NOW)


def refused(ca: CertificateAuthority, token: str, at: datetime.datetime = NOW,
            trust_domain: str | None = None) -> str:
    with pytest.raises(AuthError) as caught:
        tokens.verify(ca, token, at, trust_domain)
    assert caught.value.status == "UNAUTHENTICATED"
    message = str(caught.value)
    assert all(part not in message for part in token.split(".") if len(part) > 8)
    assert "controlplane bootstrap" in message  # says what to do
    return message


def test_a_minted_token_proves_its_identity_and_node(ca: CertificateAuthority) -> None:
    token = tokens.mint(ca, RATINGS, "ratings-1.default", NOW, DAY)
    caller = tokens.verify(ca, token, NOW + DAY / 2)
    assert caller == Caller(RATINGS, pod=None, node_id="ratings-1.default",
                            expires=NOW + DAY)
    claims = jwt.decode(token, options={"verify_signature": False})
    assert claims["aud"] == tokens.AUDIENCE == "controlplane"
    assert claims["iss"] == "controlplane" and claims["sub"] == RATINGS.uri
    assert jwt.get_unverified_header(token)["alg"] == "ES256"
    unbound = tokens.verify(ca, tokens.mint(ca, RATINGS, None, NOW, DAY), NOW)
    assert unbound.node_id is None


def test_an_expired_or_future_token_is_refused(ca: CertificateAuthority) -> None:
    token = tokens.mint(ca, RATINGS, None, NOW, DAY)
    assert "expired at 2026-12-02T06:00:00+00:00" in refused(ca, token, NOW + DAY)
    tokens.verify(ca, token, NOW - datetime.timedelta(minutes=4))  # clocks differ a little
    assert "issued in the future" in refused(ca, token, NOW - datetime.timedelta(hours=1))


def test_another_ca_or_a_forged_token_is_refused(ca: CertificateAuthority) -> None:
    other = CertificateAuthority.create("cluster.local", NOW)
    assert "not signed by this control plane's CA" in refused(
        ca, tokens.mint(other, RATINGS, None, NOW, DAY))
    token = tokens.mint(ca, RATINGS, None, NOW, DAY)
    head, _, signature = token.split(".")
    forged_body = jwt.utils.base64url_encode(
        b'{"iss":"controlplane","aud":"controlplane","sub":"spiffe://cluster.local/ns/'
        b'kube-system/sa/admin","iat":1796104800,"exp":1896104800}').decode()
    assert "bad signature" in refused(ca, f"{head}.{forged_body}.{signature}")


def test_algorithm_confusion_is_refused(ca: CertificateAuthority) -> None:
    """HS256 keyed with the CA's public key, or alg none: classic JWT forgeries."""
    public = ca.signer_cert.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    claims = {"iss": "controlplane", "aud": "controlplane", "sub": RATINGS.uri,
              "iat": int(NOW.timestamp()), "exp": int((NOW + DAY).timestamp())}
    import base64
    import hashlib
    import hmac
    import json

    def b64(data: bytes) -> str:
        return base64.urlsafe_b64encode(data).rstrip(b"=").decode()
    head = b64(json.dumps({"alg": "HS256", "kid": ca.key_id}).encode())
    body = b64(json.dumps(claims).encode())
    mac = b64(hmac.new(public, f"{head}.{body}".encode(), hashlib.sha256).digest())
    assert "not ES256" in refused(ca, f"{head}.{body}.{mac}")
    none = b64(json.dumps({"alg": "none", "kid": ca.key_id}).encode())
    assert "not ES256" in refused(ca, f"{none}.{body}.")


def test_wrong_audience_issuer_or_claims_are_refused(ca: CertificateAuthority) -> None:
    base = {"iss": "controlplane", "aud": "controlplane", "sub": RATINGS.uri,
            "iat": int(NOW.timestamp()), "exp": int((NOW + DAY).timestamp())}

    def signed(**changes: object) -> str:
        claims = {k: v for k, v in {**base, **changes}.items() if v is not None}
        return jwt.encode(claims, ca.signing_key(), algorithm="ES256",
                          headers={"kid": ca.key_id})
    assert "Audience" in refused(ca, signed(aud="https://kubernetes.default.svc"))
    assert "issuer" in refused(ca, signed(iss="someone")).lower()
    assert "exp" in refused(ca, signed(exp=None))
    assert "names no workload identity" in refused(ca, signed(sub="spiffe://x/ns/a"))
    assert "node claim" in refused(ca, signed(node=7))
    assert "trust domain 'cluster.local', this mesh's is 'prod.example'" in refused(
        ca, signed(), trust_domain="prod.example")


@given(st.text(max_size=300))
def test_junk_is_refused_never_crashes(text: str) -> None:
    ca = CertificateAuthority.create("cluster.local", NOW) if not _CA else _CA[0]
    _CA[:] = [ca]
    with pytest.raises(AuthError):
        tokens.verify(ca, text, NOW)


_CA: list[CertificateAuthority] = []


def test_a_token_from_before_a_root_rotation_stays_valid_while_its_root_is_trusted(
        ca: CertificateAuthority) -> None:
    token = tokens.mint(ca, RATINGS, None, NOW, DAY)
    new = CertificateAuthority.create("cluster.local", NOW)
    rotated = CertificateAuthority.from_pem(
        new.signer_cert.public_bytes(serialization.Encoding.PEM),
        new.signing_key().private_bytes(serialization.Encoding.PEM,
                                        serialization.PrivateFormat.PKCS8,
                                        serialization.NoEncryption()),
        new.bundle_pem + ca.bundle_pem)
    assert tokens.verify(rotated, token, NOW).identity == RATINGS
    assert tokens.verify(rotated, tokens.mint(rotated, RATINGS, None, NOW, DAY),
                         NOW).identity == RATINGS
    assert "not signed by" in refused(new, token)  # pruned: the old root is gone


def test_local_tokens_authenticate_at_the_edge(ca: CertificateAuthority) -> None:
    clock = [NOW]
    authenticator = LocalTokens(lambda: ca, "cluster.local", clock=lambda: clock[0])
    token = tokens.mint(ca, RATINGS, "r.default", NOW, DAY)
    assert asyncio.run(authenticator.authenticate(token)).identity == RATINGS
    for missing in (None, ""):
        with pytest.raises(AuthError, match="no credential") as caught:
            asyncio.run(authenticator.authenticate(missing))
        assert caught.value.status == "UNAUTHENTICATED"
        assert "--authentication none" in caught.value.message
    clock[0] = NOW + 2 * DAY
    with pytest.raises(AuthError, match="expired"):
        asyncio.run(authenticator.authenticate(token))


def test_bearer_reads_the_authorization_metadata() -> None:
    assert bearer("Bearer abc.def") == "abc.def"
    assert bearer("bearer  abc ") == "abc"
    assert bearer("Basic abc") is None
    assert bearer("Bearer ") is None
    assert bearer(None) is None and bearer("") is None


def test_a_credential_speaks_only_for_its_own_node() -> None:
    pod = Caller(RATINGS, pod="ratings-7f9", node_id=None, expires=None)
    check_node(pod, "ratings-7f9.default", "default")
    for node, namespace, says in [
            ("reviews-1.default", "default", "must use node id ratings-7f9.default"),
            ("ratings-7f9.prod", "prod", "must use node id ratings-7f9.default"),
            ("ratings-7f9.default", "prod", "namespace 'prod' is not the credential's")]:
        with pytest.raises(AuthError, match=says) as caught:
            check_node(pod, node, namespace)
        assert caught.value.status == "PERMISSION_DENIED"
    bound = Caller(RATINGS, pod=None, node_id="r.default", expires=None)
    check_node(bound, "r.default", "default")
    with pytest.raises(AuthError, match="bound to") as denied:
        check_node(bound, "other.default", "default")
    assert denied.value.status == "PERMISSION_DENIED"
    free = Caller(RATINGS)  # a token for an identity, any node of its namespace
    check_node(free, "anything.default", "default")
    with pytest.raises(AuthError, match="namespace 'kube-system'"):
        check_node(free, "anything.kube-system", "kube-system")
