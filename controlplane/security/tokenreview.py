"""Kubernetes: a sidecar's projected ServiceAccount token, checked with TokenReview.

The injected pod mounts a token for audience ``controlplane``, bound to the pod; Envoy
sends it on every xDS stream. The API server says whether it is valid, whose it is
(``system:serviceaccount:<ns>:<sa>``) and which pod it is bound to
(``user.extra["authentication.kubernetes.io/pod-name"]``). A token whose pod was deleted
or whose expiry passed is not authenticated, so identity lasts as long as the pod.

Answers are kept by the token's hash for at most ``ttl`` seconds and never past the
token's own expiry, in a bounded map: a reconnect storm costs one review per token, and a
client sending invented tokens makes nothing stay (failures are not kept). Reviews run in
threads (the official client blocks), at most ``concurrency`` at once.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import datetime
import hashlib
import json
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

from controlplane.security.authn import AuthError, Caller, missing
from controlplane.security.identity import DEFAULT_TRUST_DOMAIN, SpiffeId

POD_NAME = "authentication.kubernetes.io/pod-name"
_PREFIX = "system:serviceaccount:"
_HINT = ("the sidecar must send its projected ServiceAccount token (audience "
         "controlplane, mounted at /var/run/secrets/controlplane/token; injection does)")


def _utcnow() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


def token_expiry(token: str) -> datetime.datetime | None:
    """The ``exp`` claim of a JWT, read without checking it (TokenReview checks it): only
    to keep a review no longer than the token lives. None when it cannot be read."""
    parts = token.split(".")
    if len(parts) != 3:
        return None
    try:
        payload = parts[1] + "=" * (-len(parts[1]) % 4)
        claims = json.loads(base64.urlsafe_b64decode(payload))
        exp = claims.get("exp") if isinstance(claims, dict) else None
        if isinstance(exp, int | float) and not isinstance(exp, bool):
            return datetime.datetime.fromtimestamp(float(exp), datetime.UTC)
    except (ValueError, binascii.Error, OverflowError, OSError):
        return None
    return None


def caller_of(status: Any, audience: str, trust_domain: str) -> Caller:
    """The Caller a TokenReview status proves, or AuthError saying what is wrong."""
    if status is None or not status.authenticated:
        why = (status.error if status is not None else None) or "not authenticated"
        raise AuthError("UNAUTHENTICATED",
                        f"the API server did not accept the token ({str(why)[:200]}): it is "
                        f"expired, its pod is gone, or it is no token; {_HINT}")
    audiences = list(status.audiences or [])
    if audiences and audience not in audiences:
        raise AuthError("UNAUTHENTICATED",
                        f"the token is not for audience {audience!r} (it is for "
                        f"{audiences[:3]}); {_HINT}")
    user = status.user
    username = str(getattr(user, "username", "") or "")
    if not username.startswith(_PREFIX) or username.count(":") != 3:
        raise AuthError("PERMISSION_DENIED",
                        f"the token is {username[:100]!r}'s, not a ServiceAccount's; {_HINT}")
    namespace, _, account = username[len(_PREFIX):].partition(":")
    extra = dict(getattr(user, "extra", None) or {})
    pods = list(extra.get(POD_NAME) or [])
    if len(pods) != 1 or not pods[0]:
        raise AuthError("PERMISSION_DENIED",
                        "the token is not bound to a pod: use the pod's projected token "
                        f"(serviceAccountToken volume), not a Secret's token; {_HINT}")
    try:
        identity = SpiffeId(trust_domain, namespace, account)
    except ValueError as exc:
        raise AuthError("PERMISSION_DENIED", f"the token's ServiceAccount: {exc}") from None
    return Caller(identity=identity, pod=str(pods[0]))


class TokenReviewAuthenticator:
    """Authenticator for ``serve --source kubernetes``."""

    def __init__(self, api_client: Any, audience: str,
                 trust_domain: str = DEFAULT_TRUST_DOMAIN, ttl: float = 60.0,
                 max_entries: int = 10_000, concurrency: int = 8,
                 clock: Callable[[], datetime.datetime] = _utcnow) -> None:
        from kubernetes import client  # the official client; imported where it is used

        self._api = client.AuthenticationV1Api(api_client)
        self._client = client
        self.audience = audience
        self.trust_domain = trust_domain
        self.ttl = datetime.timedelta(seconds=min(ttl, 60.0))
        self.max_entries = max_entries
        self._clock = clock
        self._cache: OrderedDict[bytes, tuple[Caller, datetime.datetime]] = OrderedDict()
        self._slots = asyncio.Semaphore(concurrency)
        self.reviews = 0  # TokenReviews sent (for tests and the bench)

    def __len__(self) -> int:
        return len(self._cache)

    async def authenticate(self, token: str | None) -> Caller:
        if not token:
            raise missing()
        key = hashlib.sha256(token.encode()).digest()
        now = self._clock()
        kept = self._cache.get(key)
        if kept is not None:
            if now < kept[1]:
                self._cache.move_to_end(key)
                return kept[0]
            del self._cache[key]
        async with self._slots:
            status = await asyncio.to_thread(self._review, token)
        found = caller_of(status, self.audience, self.trust_domain)
        expires = token_expiry(token)
        until = now + self.ttl
        if expires is not None:
            until = min(until, expires)
        found = Caller(found.identity, found.pod, None, expires)
        if until > now:
            self._cache[key] = (found, until)
            while len(self._cache) > self.max_entries:
                self._cache.popitem(last=False)
        return found

    def _review(self, token: str) -> Any:
        client = self._client
        body = client.V1TokenReview(
            api_version="authentication.k8s.io/v1", kind="TokenReview",
            spec=client.V1TokenReviewSpec(token=token, audiences=[self.audience]))
        self.reviews += 1
        try:
            return self._api.create_token_review(body, _request_timeout=10).status
        except client.ApiException as exc:
            hint = ("give the control plane's ServiceAccount `create` on tokenreviews "
                    "(authentication.k8s.io; deploy/kubernetes has it)"
                    if exc.status == 403 else "retry; the sidecar reconnects by itself")
            raise AuthError("UNAVAILABLE", f"TokenReview failed ({exc.status} "
                            f"{str(exc.reason)[:100]}): {hint}") from None
        except Exception as exc:  # network: the API server is unreachable now
            raise AuthError("UNAVAILABLE", f"TokenReview failed ({type(exc).__name__}): "
                            "the API server is unreachable; the sidecar retries") from None
