"""Authenticating a proxy's xDS stream: who it is (from its credential), and whether the
node it claims to be is one that credential may speak for.

The server reads ``authorization: Bearer <token>`` (``bearer``), asks its
``Authenticator`` for the ``Caller`` (file mode: ``LocalTokens``, our ES256 tokens;
Kubernetes: ``tokenreview.TokenReviewAuthenticator``), then ``check_node`` on the first
request. Identity is always taken from the credential, never from the node.
"""

from __future__ import annotations

import datetime
from collections.abc import Callable
from typing import Protocol

from controlplane.security import tokens
from controlplane.security.ca import CertificateAuthority
from controlplane.security.caller import AuthError, Caller, Status

__all__ = ["AuthError", "Authenticator", "Caller", "LocalTokens", "Status", "bearer",
           "check_node"]

_BEARER = "bearer "


def _utcnow() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


def bearer(authorization: str | None) -> str | None:
    """The token of an ``authorization`` metadata value (``Bearer <token>``), or None."""
    if not authorization:
        return None
    if authorization[:len(_BEARER)].lower() != _BEARER:
        return None
    return authorization[len(_BEARER):].strip() or None


def missing() -> AuthError:
    return AuthError("UNAUTHENTICATED",
                     "no credential: a secured control plane needs `authorization: Bearer "
                     "<token>` on the xDS stream; make the bootstrap with `controlplane "
                     "bootstrap --xds-ca FILE --token-file FILE` (Kubernetes: the injected "
                     "projected token), or run the server with --authentication none for "
                     "development")


class Authenticator(Protocol):
    """Turns a stream's bearer token into a Caller, or raises AuthError."""

    async def authenticate(self, token: str | None) -> Caller: ...


class LocalTokens:
    """File mode: tokens minted by ``controlplane bootstrap`` with the CA's key. Verifying
    is an ES256 signature check (~0.1 ms): done inline, no thread."""

    def __init__(self, ca_provider: Callable[[], CertificateAuthority],
                 trust_domain: str | None = None,
                 clock: Callable[[], datetime.datetime] = _utcnow) -> None:
        self._ca_provider = ca_provider
        self._trust_domain = trust_domain
        self._clock = clock

    async def authenticate(self, token: str | None) -> Caller:
        if not token:
            raise missing()
        return tokens.verify(self._ca_provider(), token, self._clock(), self._trust_domain)


def check_node(caller: Caller, node_id: str, namespace: str) -> None:
    """PERMISSION_DENIED unless ``caller`` may speak for this node: a pod-bound credential
    only for node id ``<pod>.<its namespace>``, a node-bound token only for its node id,
    and the node's namespace (metadata) must be the identity's."""
    own = caller.identity.namespace
    if caller.pod is not None and node_id != f"{caller.pod}.{own}":
        raise AuthError("PERMISSION_DENIED",
                        f"node id {node_id[:253]!r} is not the credential's pod: the sidecar "
                        f"of pod {caller.pod!r} in namespace {own!r} must use node id "
                        f"{caller.pod}.{own} (injection sets it; check --node-id)")
    if caller.node_id is not None and node_id != caller.node_id:
        raise AuthError("PERMISSION_DENIED",
                        f"node id {node_id[:253]!r} is not the one the token is bound to "
                        f"({caller.node_id!r}); mint the token for this node: controlplane "
                        "bootstrap --node-id NODE --ca-dir DIR --token-file FILE")
    if namespace != own:
        raise AuthError("PERMISSION_DENIED",
                        f"node metadata namespace {namespace[:63]!r} is not the credential's "
                        f"namespace {own!r} ({caller.identity}); set the bootstrap's "
                        f"namespace to {own!r}")
