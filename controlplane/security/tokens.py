"""File-mode proxy credentials: ES256 JWTs signed by the mesh CA's key.

``controlplane bootstrap --ca-dir`` mints one per sidecar (bound to its node id); Envoy
sends it as ``authorization: Bearer <token>`` and the server verifies it against the CA's
keys (the signer's and every root's of the bundle, so a token minted before a root rotation
stays valid while the old root is trusted). Pure: the clock is a parameter, so PyJWT's own
time checks are off and done here against it. A token never appears in a message.
"""

from __future__ import annotations

import datetime
from typing import Any, Final

import jwt

from controlplane.security.ca import CertificateAuthority
from controlplane.security.caller import AuthError, Caller
from controlplane.security.identity import SpiffeId

AUDIENCE: Final = "controlplane"
ISSUER: Final = "controlplane"
ALGORITHM: Final = "ES256"
CLOCK_SKEW: Final = datetime.timedelta(minutes=5)  # iat a little ahead of our clock is fine
_REMINT: Final = "mint a new one: controlplane bootstrap --ca-dir DIR --token-file FILE"


def mint(ca: CertificateAuthority, spiffe: SpiffeId, node_id: str | None,
         now: datetime.datetime, ttl: datetime.timedelta) -> str:
    """A token for ``spiffe``, bound to ``node_id`` when given, valid ``ttl`` from ``now``."""
    claims: dict[str, Any] = {"iss": ISSUER, "aud": AUDIENCE, "sub": spiffe.uri,
                              "iat": int(now.timestamp()), "exp": int((now + ttl).timestamp())}
    if node_id is not None:
        claims["node"] = node_id
    return jwt.encode(claims, ca.signing_key(), algorithm=ALGORITHM,
                      headers={"kid": ca.key_id})


def _refuse(why: str) -> AuthError:
    return AuthError("UNAUTHENTICATED", f"the proxy's token {why}; {_REMINT}")


def verify(ca: CertificateAuthority, token: str, now: datetime.datetime,
           trust_domain: str | None = None) -> Caller:
    """The caller ``token`` proves; AuthError (UNAUTHENTICATED) saying why not."""
    try:
        header = jwt.get_unverified_header(token)
    except jwt.PyJWTError:
        raise _refuse("is not a JWT (expected the token `controlplane bootstrap` wrote)"
                      ) from None
    if header.get("alg") != ALGORITHM:
        raise _refuse(f"is signed with {str(header.get('alg'))[:20]!r}, not {ALGORITHM}: it is "
                      "no controlplane token (in file mode a Kubernetes token is not accepted)")
    key = ca.public_keys().get(str(header.get("kid", "")))
    if key is None:
        raise _refuse("was not signed by this control plane's CA (or by a root still in its "
                      "trust bundle)")
    try:
        claims = jwt.decode(token, key, algorithms=[ALGORITHM], audience=AUDIENCE,
                            issuer=ISSUER, options={
                                "verify_exp": False, "verify_iat": False,
                                "verify_nbf": False,
                                "require": ["iss", "aud", "sub", "iat", "exp"]})
    except jwt.InvalidSignatureError:
        raise _refuse("has a bad signature") from None
    except jwt.PyJWTError as exc:  # audience, issuer, a missing claim: PyJWT names which
        raise _refuse(f"is not valid ({exc})") from None
    try:
        expires = datetime.datetime.fromtimestamp(float(claims["exp"]), datetime.UTC)
        issued = datetime.datetime.fromtimestamp(float(claims["iat"]), datetime.UTC)
    except (TypeError, ValueError, OverflowError, OSError):
        raise _refuse("has a non-numeric iat or exp") from None
    if now >= expires:
        raise _refuse(f"expired at {expires.isoformat()}")
    if issued > now + CLOCK_SKEW:
        raise _refuse(f"was issued in the future ({issued.isoformat()}): check the clocks")
    try:
        identity = SpiffeId.parse(str(claims["sub"]))
    except ValueError as exc:
        raise _refuse(f"names no workload identity: {exc}") from None
    if trust_domain is not None and identity.trust_domain != trust_domain:
        raise _refuse(f"is for trust domain {identity.trust_domain!r}, this mesh's is "
                      f"{trust_domain!r}")
    node = claims.get("node")
    if node is not None and not isinstance(node, str):
        raise _refuse("has a node claim that is not a string")
    return Caller(identity, pod=None, node_id=node, expires=expires)
