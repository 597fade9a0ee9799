"""Who may open a stream, and as which workload.

At stream start the credential in ``authorization: Bearer <token>`` is authenticated
(``Authenticator``: TokenReview in Kubernetes, the CA's own tokens in file mode); at the
first request the node is checked against it (a pod's credential serves only node id
``<pod>.<namespace>``) and the workload identity is taken from the credential, never from
what the node claims. A refusal keeps nothing: the stream has not joined a group, made a
snapshot or been named in a metric label.

Without an authenticator (``--authentication none``, for development) the identity is the
node's own claim: metadata ``service_account`` (default ``default``) in its namespace.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from envoy.config.core.v3 import base_pb2

from controlplane.proxy import ProxyIdentity
from controlplane.security.authn import Authenticator, AuthError, Caller, check_node
from controlplane.security.identity import SpiffeId

DEFAULT_SERVICE_ACCOUNT = "default"
_SCHEME = "bearer "
MAX_TOKEN_BYTES = 16 * 1024  # a projected ServiceAccount token is about 1 KB


class NodeProblem(Exception):
    """The node's own claim cannot be an identity (unauthenticated mode): INVALID_ARGUMENT."""


def bearer(metadata: Sequence[tuple[str, str | bytes]] | None) -> str | None:
    """The token of ``authorization: Bearer <token>``; None when there is none. A value
    of another scheme is refused: it is a credential this server cannot read."""
    for key, value in metadata or ():
        if key.lower() != "authorization":
            continue
        text = value.decode("latin-1") if isinstance(value, bytes) else value
        if not text[:len(_SCHEME)].lower() == _SCHEME or not text[len(_SCHEME):].strip():
            raise AuthError("UNAUTHENTICATED",
                            "the authorization metadata must be 'Bearer <token>': give the "
                            "sidecar its token file (controlplane bootstrap --token-file)")
        token = text[len(_SCHEME):].strip()
        if len(token) > MAX_TOKEN_BYTES:
            raise AuthError("UNAUTHENTICATED",
                            f"the bearer token is longer than {MAX_TOKEN_BYTES} bytes; give "
                            "the sidecar its ServiceAccount token or a controlplane token")
        return token
    return None


class Admission:
    """Authenticates streams and names their workload, for one trust domain."""

    def __init__(self, authenticator: Authenticator | None, trust_domain: str) -> None:
        self.authenticator = authenticator
        self.trust_domain = trust_domain

    async def authenticate(self, metadata: Sequence[tuple[str, str | bytes]] | None
                           ) -> Caller | None:
        """The caller its credential proves (None: unauthenticated mode); AuthError else."""
        if self.authenticator is None:
            return None
        return await self.authenticator.authenticate(bearer(metadata))

    def admit(self, caller: Caller | None, proxy: ProxyIdentity,
              node: base_pb2.Node | None) -> ProxyIdentity:
        """``proxy`` with its workload identity; AuthError when its node is not the
        caller's, NodeProblem when an unauthenticated node claims no valid identity."""
        if caller is None:
            spiffe = self._claimed(proxy, node)
        else:
            check_node(caller, proxy.node_id, proxy.namespace)
            spiffe = caller.identity
        return dataclasses.replace(proxy, workload=spiffe.uri)

    def _claimed(self, proxy: ProxyIdentity, node: base_pb2.Node | None) -> SpiffeId:
        account = DEFAULT_SERVICE_ACCOUNT
        if node is not None:
            value = node.metadata.fields.get("service_account")
            if value is not None and value.WhichOneof("kind") == "string_value" \
                    and value.string_value:
                account = value.string_value
        try:
            return SpiffeId(self.trust_domain, proxy.namespace, account)
        except ValueError as exc:
            raise NodeProblem(f"node metadata service_account / namespace: {exc}; set them "
                              "in the bootstrap (controlplane bootstrap --service-account)"
                              ) from None
