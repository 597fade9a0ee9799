"""ServiceAccount tokens as kube-apiserver issues and reviews them: TokenRequest and
TokenReview in the real wire format.

Why: in a cluster a sidecar proves who it is with its projected ServiceAccount token, and
the control plane asks the API server (TokenReview) whether the token is valid, for which
audience, and for which pod. CI has no cluster, so the double issues and reviews tokens
with the rules a real server applies, the ones the control plane relies on:

- a token is a JWT (RS256, signed by a key of this double) with the claims of a bound
  token: ``iss``, ``sub`` (``system:serviceaccount:NS:SA``), ``aud`` (a list), ``exp``,
  ``iat``, ``nbf``, ``jti`` and ``kubernetes.io`` {namespace, serviceaccount {name, uid},
  pod {name, uid}};
- TokenRequest (``POST /api/v1/namespaces/NS/serviceaccounts/SA/token``): the
  ServiceAccount must exist (``default`` exists in every namespace, as its controller makes
  it), ``expirationSeconds`` defaults to 3600 and may not be under 10 minutes (the double's
  ``min_token_seconds`` lowers that for tests of rotation), no ``audiences`` means the API
  server's own, a ``boundObjectRef`` must name a Pod that exists, runs as that
  ServiceAccount and has that uid (when given);
- TokenReview (``POST /apis/authentication.k8s.io/v1/tokenreviews``, 201, nothing stored):
  ``authenticated`` with ``user`` {username, uid (the ServiceAccount's), groups, extra
  pod-name, pod-uid, credential-id} and ``audiences`` (the requested audiences the token
  has; none requested: the API server's), or not authenticated with the real ``error``
  when the token expired (after go-jose's one-minute leeway, ``token_leeway``), its pod
  or ServiceAccount is gone or was recreated (another uid), or no audience matches.

Not modelled: tokens bound to Secrets or Nodes (400), node claims in pod-bound tokens,
legacy Secret-based tokens, the ``warnafter`` extension of projected tokens.

Part of the API server double (tests/kube/apiserver.py).
"""

from __future__ import annotations

import copy
import datetime
import hashlib
import threading
import time
import uuid
from collections.abc import Callable
from typing import Any, Final

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from controlplane.sources.kubernetes.kinds import PODS, SERVICE_ACCOUNTS, TOKEN_REVIEWS
from tests.kube.constants import Obj
from tests.kube.errors import StatusError, _details, _error, _not_found, status_object
from tests.kube.storage import _Store

ISSUER: Final = "https://kubernetes.default.svc.cluster.local"
API_AUDIENCES: Final = (ISSUER,)  # --api-audiences defaults to the issuer
AUTHENTICATION_API: Final = "authentication.k8s.io/v1"
DEFAULT_SECONDS: Final = 3600
MIN_SECONDS: Final = 600
MAX_SECONDS: Final = 2**32
POD_NAME_EXTRA: Final = "authentication.kubernetes.io/pod-name"
POD_UID_EXTRA: Final = "authentication.kubernetes.io/pod-uid"
CREDENTIAL_ID_EXTRA: Final = "authentication.kubernetes.io/credential-id"
_INVALIDATED: Final = "service account token has been invalidated"


def _rfc3339(seconds: float) -> str:
    return datetime.datetime.fromtimestamp(int(seconds), datetime.UTC).strftime(
        "%Y-%m-%dT%H:%M:%SZ")


def _go_quoted(values: list[str]) -> str:
    """Go's ``%q`` of a []string: ``["a" "b"]``."""
    return "[" + " ".join(f'"{v}"' for v in values) + "]"


def _token_request_invalid(name: str, field: str, value: Any, detail: str) -> StatusError:
    message = f"{field}: Invalid value: {value}: {detail}"
    return _error(422, f'TokenRequest.authentication.k8s.io "{name}" is invalid: {message}',
                  "Invalid", {"name": name, "group": "authentication.k8s.io",
                              "kind": "TokenRequest",
                              "causes": [{"reason": "FieldValueInvalid",
                                          "message": f"Invalid value: {value}: {detail}",
                                          "field": field}]})


class TokenAuthority:
    """The API server's ServiceAccount token issuer and authenticator."""

    def __init__(self, store: _Store, *, min_seconds: int = MIN_SECONDS,
                 leeway: float = 60.0, now: Callable[[], float] = time.time) -> None:
        self._store = store
        self.min_seconds = min_seconds
        self.leeway = leeway  # go-jose's DefaultLeeway: exp and nbf are checked with it
        self.now = now  # a test may move the clock
        self._key: rsa.RSAPrivateKey | None = None
        self._key_lock = threading.Lock()

    @property
    def key(self) -> rsa.RSAPrivateKey:
        """Made on first use: a double that issues no token pays nothing for it."""
        with self._key_lock:
            if self._key is None:
                self._key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
            return self._key

    # -- TokenRequest

    def _service_account(self, namespace: str, name: str) -> Obj:
        """The stored ServiceAccount; ``default`` is made on first use, as the
        ServiceAccount controller makes one in every namespace (namespaces are implicit)."""
        with self._store.lock:
            found = self._store.objects[SERVICE_ACCOUNTS].get((namespace, name))
            if found is None and name == "default":
                return self._store.create({"apiVersion": "v1", "kind": "ServiceAccount",
                                           "metadata": {"name": name,
                                                        "namespace": namespace}})[0]
            if found is None:
                raise _not_found(SERVICE_ACCOUNTS, name)
            return copy.deepcopy(found)

    def request(self, namespace: str, name: str, body: Any) -> Obj:
        """The TokenRequest response (status.token, status.expirationTimestamp) for
        ``body``, a TokenRequest; raises StatusError as the real server would."""
        if not isinstance(body, dict):
            raise _error(400, "the object provided is unrecognized (must be a JSON object)")
        if body.get("apiVersion", AUTHENTICATION_API) != AUTHENTICATION_API or body.get(
                "kind", "TokenRequest") != "TokenRequest":
            raise _error(400, f"the object provided is unrecognized (apiVersion "
                         f"{body.get('apiVersion')!r}, kind {body.get('kind')!r}: want "
                         f"{AUTHENTICATION_API} TokenRequest)")
        spec = dict(body.get("spec") or {})
        seconds = spec.get("expirationSeconds")
        seconds = DEFAULT_SECONDS if seconds is None else seconds
        if not isinstance(seconds, int):
            raise _error(400, f"json: cannot unmarshal {type(seconds).__name__} into Go "
                         "struct field TokenRequestSpec.spec.expirationSeconds of type int64")
        if seconds < self.min_seconds:
            raise _token_request_invalid(name, "spec.expirationSeconds", seconds,
                                         "may not specify a duration less than 10 minutes")
        if seconds > MAX_SECONDS:
            raise _token_request_invalid(name, "spec.expirationSeconds", seconds,
                                         "may not specify a duration larger than 2^32 seconds")
        audiences = [str(a) for a in spec.get("audiences") or []] or list(API_AUDIENCES)
        with self._store.lock:
            account = self._service_account(namespace, name)
            pod = self._bound_pod(namespace, name, spec.get("boundObjectRef"))
        issued = int(self.now())  # a JWT's NumericDate: whole seconds
        expires = issued + seconds
        claims: Obj = {
            "aud": audiences, "exp": expires, "iat": issued, "nbf": issued,
            "iss": ISSUER, "jti": str(uuid.uuid4()),
            "sub": f"system:serviceaccount:{namespace}:{name}",
            "kubernetes.io": {
                "namespace": namespace,
                "serviceaccount": {"name": name, "uid": account["metadata"]["uid"]},
            },
        }
        if pod is not None:
            claims["kubernetes.io"]["pod"] = {"name": pod["metadata"]["name"],
                                              "uid": pod["metadata"]["uid"]}
            spec["boundObjectRef"] = {"kind": "Pod", "apiVersion": "v1",
                                      "name": pod["metadata"]["name"],
                                      "uid": pod["metadata"]["uid"]}
        token = jwt.encode(claims, self.key, algorithm="RS256",
                           headers={"kid": self._kid()})
        spec["audiences"], spec["expirationSeconds"] = audiences, seconds
        return {"kind": "TokenRequest", "apiVersion": AUTHENTICATION_API,
                "metadata": {"name": name, "namespace": namespace,
                             "creationTimestamp": _rfc3339(issued)},
                "spec": spec,
                "status": {"token": token, "expirationTimestamp": _rfc3339(expires)}}

    def _bound_pod(self, namespace: str, account: str, ref: Any) -> Obj | None:
        if ref is None:
            return None
        if not isinstance(ref, dict):
            raise _error(400, "the object provided is unrecognized (boundObjectRef must be "
                         "an object)")
        kind = ref.get("kind")
        if kind != "Pod" or ref.get("apiVersion", "v1") != "v1":
            raise _error(400, f"cannot bind token to object of type "
                         f"{ref.get('apiVersion')}, Kind={kind} (the API server double "
                         "binds tokens to Pods only)")
        name = str(ref.get("name") or "")
        pod = self._store.objects[PODS].get((namespace, name))
        if pod is None:
            raise _not_found(PODS, name)
        uid = ref.get("uid")
        if uid and uid != pod["metadata"]["uid"]:
            raise _error(409, f'Operation cannot be fulfilled on Pod "{name}": the UID in '
                         f"the bound object reference ({uid}) does not match the UID in "
                         "record. The object might have been deleted and then recreated",
                         "Conflict", {"name": name, "kind": "Pod"})
        running_as = pod.get("spec", {}).get("serviceAccountName") or "default"
        if running_as != account:
            raise _error(400, f'cannot bind token for serviceaccount "{account}" to pod '
                         "running with different serviceaccount name.")
        return copy.deepcopy(pod)

    def _kid(self) -> str:
        """The key id: the real server's is a hash of the public key; so is this."""
        public = self.key.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
        return hashlib.sha256(public).hexdigest()[:43]

    # -- TokenReview

    def review(self, body: Any) -> Obj:
        """The TokenReview response for ``body``, a TokenReview."""
        if not isinstance(body, dict):
            raise _error(400, "the object provided is unrecognized (must be a JSON object)")
        if body.get("apiVersion", AUTHENTICATION_API) != AUTHENTICATION_API or body.get(
                "kind", TOKEN_REVIEWS.kind) != TOKEN_REVIEWS.kind:
            raise _error(400, f"the object provided is unrecognized (apiVersion "
                         f"{body.get('apiVersion')!r}, kind {body.get('kind')!r}: want "
                         f"{AUTHENTICATION_API} TokenReview)")
        spec = body.get("spec") or {}
        token = spec.get("token")
        if not token:
            raise StatusError(status_object(
                422, 'TokenReview.authentication.k8s.io "" is invalid: spec.token: '
                "Required value", "Invalid",
                {**_details(TOKEN_REVIEWS, ""), "causes": [
                    {"reason": "FieldValueRequired", "message": "Required value",
                     "field": "spec.token"}]}))
        requested = [str(a) for a in spec.get("audiences") or []]
        status = self.authenticate(str(token), requested or list(API_AUDIENCES))
        return {"kind": TOKEN_REVIEWS.kind, "apiVersion": AUTHENTICATION_API,
                "metadata": {"creationTimestamp": None},
                "spec": {"token": token, **({"audiences": requested} if requested else {})},
                "status": status}

    def authenticate(self, token: str, audiences: list[str]) -> Obj:
        """A TokenReview's status for ``token`` and the wanted ``audiences``."""
        try:
            claims = self._claims(token)
        except _NotOurs:
            return {"authenticated": False, "user": {}, "error": "invalid bearer token"}
        except _Invalid as exc:
            return {"authenticated": False, "user": {},
                    "error": f"[invalid bearer token, {exc}]"}
        token_audiences = [str(a) for a in claims.get("aud") or []]
        matched = [a for a in token_audiences if a in audiences]
        if not matched:
            return {"authenticated": False, "user": {}, "error": (
                f"[invalid bearer token, token audiences {_go_quoted(token_audiences)} is "
                f"invalid for the target audiences {_go_quoted(audiences)}]")}
        private = claims.get("kubernetes.io") or {}
        namespace = str(private.get("namespace", ""))
        account_ref = private.get("serviceaccount") or {}
        pod_ref = private.get("pod")
        with self._store.lock:
            account = self._store.objects[SERVICE_ACCOUNTS].get(
                (namespace, str(account_ref.get("name", ""))))
            pod = (self._store.objects[PODS].get((namespace, str(pod_ref.get("name", ""))))
                   if pod_ref else None)
        if account is None or account["metadata"]["uid"] != account_ref.get("uid") or (
                pod_ref and (pod is None or pod["metadata"]["uid"] != pod_ref.get("uid"))):
            return {"authenticated": False, "user": {},
                    "error": f"[invalid bearer token, {_INVALIDATED}]"}
        extra: dict[str, list[str]] = {CREDENTIAL_ID_EXTRA: [f"JTI={claims.get('jti')}"]}
        if pod_ref:
            extra[POD_NAME_EXTRA] = [str(pod_ref["name"])]
            extra[POD_UID_EXTRA] = [str(pod_ref["uid"])]
        return {"authenticated": True,
                "user": {"username": claims["sub"], "uid": account_ref["uid"],
                         "groups": ["system:serviceaccounts",
                                    f"system:serviceaccounts:{namespace}",
                                    "system:authenticated"],
                         "extra": extra},
                "audiences": matched}

    def _claims(self, token: str) -> Obj:
        try:
            unverified = jwt.decode(token, options={"verify_signature": False})
        except jwt.PyJWTError:
            raise _NotOurs() from None
        if unverified.get("iss") != ISSUER:
            raise _NotOurs()  # another issuer's JWT: not this authenticator's to judge
        try:
            claims: Obj = jwt.decode(token, self.key.public_key(), algorithms=["RS256"],
                                     options={"verify_aud": False, "verify_exp": False,
                                              "verify_nbf": False, "verify_iat": False})
        except jwt.PyJWTError:
            raise _Invalid("square/go-jose: error in cryptographic primitive") from None
        now = self.now()
        if now > float(claims.get("exp", 0)) + self.leeway:
            raise _Invalid("service account token has expired")
        if now < float(claims.get("nbf", 0)) - self.leeway:
            raise _Invalid("service account token is not valid yet")
        return claims

    def username(self, token: str) -> str | None:
        """Who a bearer token authenticates as against the API server itself (its own
        audiences), or None."""
        status = self.authenticate(token, list(API_AUDIENCES))
        return str(status["user"]["username"]) if status["authenticated"] else None


class _NotOurs(Exception):
    """Not a JWT of this issuer."""


class _Invalid(Exception):
    """This issuer's token, but not valid (the message is the real server's)."""
