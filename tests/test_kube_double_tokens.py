"""The API server double issues and reviews ServiceAccount tokens as kube-apiserver does,
through the official client: TokenRequest bound to a Pod (audiences, expiry, the
ServiceAccount the pod runs as), TokenReview with the pod's name and uid in ``extra``, and
a token that is no longer valid once it expired or its pod is gone. RBAC as shipped: the
control plane may review tokens and never mint them."""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jwt
import jwt.utils
import pytest
from cryptography.hazmat.primitives.asymmetric import rsa
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from kubernetes import client
from kubernetes.client.exceptions import ApiException

from controlplane.sources.kubernetes import api_client
from tests.kube.apiserver import ADMIN_TOKEN, TOKEN, ApiServerDouble
from tests.kube.objects import pod, service_account
from tests.kube.tokens import API_AUDIENCES, ISSUER, POD_NAME_EXTRA, POD_UID_EXTRA

AUDIENCE = "controlplane"


@pytest.fixture
def api() -> Iterator[ApiServerDouble]:
    double = ApiServerDouble(crd_installed=False).start()
    yield double
    double.stop()
    assert not double.server_errors


@pytest.fixture
def admin(api: ApiServerDouble, tmp_path: Path) -> Iterator[client.ApiClient]:
    with api_client(api.kubeconfig(tmp_path / "admin", admin=True)) as found:
        yield found


@pytest.fixture
def server(api: ApiServerDouble, tmp_path: Path) -> Iterator[client.ApiClient]:
    """The control plane's own ServiceAccount: the shipped RBAC applies."""
    with api_client(api.kubeconfig(tmp_path / "server")) as found:
        yield found


def status(exc: ApiException) -> dict[str, Any]:
    body: dict[str, Any] = json.loads(exc.body)
    return body


def running_pod(api: ApiServerDouble, name: str, account: str,
                namespace: str = "default") -> dict[str, Any]:
    api.apply(service_account(account, namespace))
    return api.create(pod(name, namespace).service_account(account).build())


def request_token(admin: client.ApiClient, account: str, pod_name: str | None,
                  *, namespace: str = "default", audiences: list[str] | None = None,
                  seconds: int | None = 3600, uid: str | None = None,
                  ) -> client.AuthenticationV1TokenRequest:
    ref = (client.V1BoundObjectReference(api_version="v1", kind="Pod", name=pod_name, uid=uid)
           if pod_name else None)
    body = client.AuthenticationV1TokenRequest(spec=client.V1TokenRequestSpec(
        audiences=[AUDIENCE] if audiences is None else audiences,
        expiration_seconds=seconds, bound_object_ref=ref))
    return client.CoreV1Api(admin).create_namespaced_service_account_token(
        account, namespace, body)


def review(api_client_: client.ApiClient, token: str,
           audiences: list[str] | None = None) -> client.V1TokenReviewStatus:
    body = client.V1TokenReview(spec=client.V1TokenReviewSpec(
        token=token, audiences=[AUDIENCE] if audiences is None else audiences))
    reviewed = client.AuthenticationV1Api(api_client_).create_token_review(body)
    found: client.V1TokenReviewStatus = reviewed.status
    return found


def test_a_pod_bound_token_is_reviewed_with_its_pod(api: ApiServerDouble,
                                                    admin: client.ApiClient,
                                                    server: client.ApiClient) -> None:
    created = running_pod(api, "ratings-v1-abc", "ratings", namespace="shop")
    issued = request_token(admin, "ratings", "ratings-v1-abc", namespace="shop", seconds=900)
    assert issued.status.token and issued.status.expiration_timestamp
    assert issued.spec.bound_object_ref.uid == created["metadata"]["uid"]
    claims = jwt.decode(issued.status.token, options={"verify_signature": False})
    assert claims["iss"] == ISSUER and claims["aud"] == [AUDIENCE]
    assert claims["sub"] == "system:serviceaccount:shop:ratings"
    assert claims["exp"] - claims["iat"] == 900
    assert claims["kubernetes.io"]["pod"] == {"name": "ratings-v1-abc",
                                              "uid": created["metadata"]["uid"]}

    found = review(server, issued.status.token)  # as the control plane: RBAC allows it
    assert found.authenticated is True and not found.error
    assert found.audiences == [AUDIENCE]
    account_uid = api.get("serviceaccounts", "shop", "ratings")["metadata"]["uid"]
    assert found.user.username == "system:serviceaccount:shop:ratings"
    assert found.user.uid == account_uid
    assert found.user.groups == ["system:serviceaccounts", "system:serviceaccounts:shop",
                                 "system:authenticated"]
    assert found.user.extra[POD_NAME_EXTRA] == ["ratings-v1-abc"]
    assert found.user.extra[POD_UID_EXTRA] == [created["metadata"]["uid"]]


def test_audiences_are_checked_as_the_real_server_does(api: ApiServerDouble,
                                                       admin: client.ApiClient) -> None:
    running_pod(api, "p", "reviews")
    token = request_token(admin, "reviews", "p", audiences=[AUDIENCE, "vault"]).status.token
    assert review(admin, token, ["vault", "other"]).audiences == ["vault"]
    wrong = review(admin, token, ["other"])
    assert (wrong.authenticated is False and wrong.user is None) or not wrong.user.username
    assert wrong.error == ('[invalid bearer token, token audiences ["controlplane" "vault"] '
                           'is invalid for the target audiences ["other"]]')
    # No audience asked for: the API server's own, which this token does not have.
    assert review(admin, token, []).authenticated is False
    # No audience requested in the TokenRequest: the API server's, good for it only.
    own = request_token(admin, "reviews", "p", audiences=[]).status.token
    assert jwt.decode(own, options={"verify_signature": False})["aud"] == list(API_AUDIENCES)
    assert review(admin, own, []).audiences == list(API_AUDIENCES)
    assert review(admin, own).authenticated is False


def test_a_token_is_invalid_once_its_pod_is_gone_or_replaced(api: ApiServerDouble,
                                                             admin: client.ApiClient) -> None:
    running_pod(api, "p", "reviews")
    token = request_token(admin, "reviews", "p").status.token
    assert review(admin, token).authenticated is True
    api.delete("pods", "default", "p")
    gone = review(admin, token)
    assert gone.authenticated is False
    assert gone.error == "[invalid bearer token, service account token has been invalidated]"
    api.create(pod("p").service_account("reviews").build())  # same name, another uid
    assert review(admin, token).authenticated is False
    # So is a token whose ServiceAccount was deleted and recreated.
    fresh = request_token(admin, "reviews", "p").status.token
    api.delete("serviceaccounts", "default", "reviews")
    api.create(service_account("reviews"))
    assert review(admin, fresh).authenticated is False


def test_a_token_expires_after_its_lifetime_and_the_leeway(api: ApiServerDouble,
                                                           admin: client.ApiClient) -> None:
    running_pod(api, "p", "reviews")
    token = request_token(admin, "reviews", "p", seconds=600).status.token
    expiry = jwt.decode(token, options={"verify_signature": False})["exp"]
    api.tokens.now = lambda: expiry + 59  # go-jose's minute of leeway
    assert review(admin, token).authenticated is True
    api.tokens.now = lambda: expiry + 61
    expired = review(admin, token)
    assert expired.authenticated is False
    assert expired.error == "[invalid bearer token, service account token has expired]"


def test_short_lifetimes_for_tests_with_real_time(tmp_path: Path) -> None:
    with ApiServerDouble(crd_installed=False, min_token_seconds=1, token_leeway=0) as api:
        api.create(pod("p").build())  # runs as "default", made on first use
        token = api.pod_token("default", "p", expiration_seconds=3)
        assert api.review_token(token)["authenticated"] is True
        deadline = time.monotonic() + 10
        while api.review_token(token)["authenticated"] and time.monotonic() < deadline:
            time.sleep(0.2)
        assert api.review_token(token)["error"] == (
            "[invalid bearer token, service account token has expired]")


def test_token_requests_are_validated_like_the_real_server(api: ApiServerDouble,
                                                           admin: client.ApiClient) -> None:
    running_pod(api, "p", "reviews")
    with pytest.raises(ApiException) as short:
        request_token(admin, "reviews", "p", seconds=599)
    assert short.value.status == 422
    assert status(short.value)["message"] == (
        'TokenRequest.authentication.k8s.io "reviews" is invalid: spec.expirationSeconds: '
        "Invalid value: 599: may not specify a duration less than 10 minutes")
    with pytest.raises(ApiException) as missing:
        request_token(admin, "nobody", None)
    assert missing.value.status == 404
    assert status(missing.value)["message"] == 'serviceaccounts "nobody" not found'
    api.create(service_account("ratings"))
    with pytest.raises(ApiException) as other:
        request_token(admin, "ratings", "p")
    assert other.value.status == 400 and status(other.value)["message"] == (
        'cannot bind token for serviceaccount "ratings" to pod running with different '
        "serviceaccount name.")
    with pytest.raises(ApiException) as no_pod:
        request_token(admin, "reviews", "q")
    assert no_pod.value.status == 404
    with pytest.raises(ApiException) as stale:
        request_token(admin, "reviews", "p", uid="0000")
    assert stale.value.status == 409
    assert "does not match the UID in record" in status(stale.value)["message"]
    default = request_token(admin, "default", None, seconds=None)  # every namespace has it
    claims = jwt.decode(default.status.token, options={"verify_signature": False})
    assert claims["exp"] - claims["iat"] == 3600 and "pod" not in claims["kubernetes.io"]


def test_the_control_plane_reviews_tokens_but_never_mints_them(
        api: ApiServerDouble, server: client.ApiClient) -> None:
    running_pod(api, "p", "reviews")
    with pytest.raises(ApiException) as minted:
        request_token(server, "reviews", "p")
    assert minted.value.status == 403
    assert status(minted.value)["message"] == (
        'serviceaccounts "reviews" is forbidden: User "system:serviceaccount:'
        'controlplane-system:controlplane" cannot create resource "serviceaccounts/token" '
        'in API group "" in the namespace "default"')
    listing = urllib.request.Request(f"{api.url}/apis/authentication.k8s.io/v1/tokenreviews",
                                     headers={"Authorization": f"Bearer {TOKEN}"})
    with pytest.raises(urllib.error.HTTPError) as listed:
        urllib.request.urlopen(listing, timeout=10)
    listed.value.close()
    assert listed.value.code == 403  # authorization comes first, as in the real server
    listing.add_header("Authorization", f"Bearer {ADMIN_TOKEN}")
    with pytest.raises(urllib.error.HTTPError) as as_admin:
        urllib.request.urlopen(listing, timeout=10)
    as_admin.value.close()
    assert as_admin.value.code == 405  # create is TokenReview's only verb


def test_a_service_account_token_authenticates_to_the_api_server(
        api: ApiServerDouble, tmp_path: Path) -> None:
    """For the API server's audience a token is a credential there: the control plane's
    account gets its RBAC, any other account nothing."""
    api.apply(service_account("controlplane", "controlplane-system"))
    api.create(pod("cp", "controlplane-system").service_account("controlplane").build())
    running_pod(api, "p", "reviews")
    ours = api.pod_token("controlplane-system", "cp", audiences=API_AUDIENCES)
    theirs = api.pod_token("default", "p", audiences=API_AUDIENCES)
    for_us = api.pod_token("default", "p")  # audience "controlplane": not for the API
    config = json.loads(api.kubeconfig(tmp_path / "k").read_text())

    def as_token(token: str) -> client.ApiClient:
        config["users"][0]["user"]["token"] = token
        path = tmp_path / "token-kubeconfig"
        path.write_text(json.dumps(config))
        return api_client(path)

    with as_token(ours) as mine:
        assert client.CoreV1Api(mine).list_service_for_all_namespaces().items == []
    with as_token(theirs) as other, pytest.raises(ApiException) as forbidden:
        client.CoreV1Api(other).list_service_for_all_namespaces()
    assert forbidden.value.status == 403
    assert 'User "system:serviceaccount:default:reviews" cannot list' in \
        status(forbidden.value)["message"]
    with as_token(for_us) as wrong, pytest.raises(ApiException) as refused:
        client.CoreV1Api(wrong).list_service_for_all_namespaces()
    assert refused.value.status == 401


def test_forged_and_garbage_tokens_are_never_authenticated(api: ApiServerDouble,
                                                            admin: client.ApiClient) -> None:
    """Same claims signed by another key, a tampered payload, no JWT at all: none passes
    (a double that accepted them would let the server's tests pass for the wrong reason)."""
    running_pod(api, "p", "reviews")
    token = request_token(admin, "reviews", "p").status.token
    claims = jwt.decode(token, options={"verify_signature": False})
    other = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    forged = jwt.encode(claims, other, algorithm="RS256")
    header, _, signature = token.split(".")
    tampered_claims = {**claims, "sub": "system:serviceaccount:default:admin"}
    tampered = ".".join([header, jwt.utils.base64url_encode(
        json.dumps(tampered_claims).encode()).decode(), signature])
    unsigned = jwt.encode(claims, key="", algorithm="none")
    for bad in (forged, tampered, unsigned, "not-a-token", token + "x"):
        found = review(admin, bad)
        assert found.authenticated is False, bad
        assert found.error, bad
    assert review(admin, token).authenticated is True


UNSTARTED = ApiServerDouble(crd_installed=False)  # reviews need no HTTP: pure Python


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.text(min_size=1, max_size=300) | st.builds(
    lambda parts: ".".join(parts), st.lists(st.text(
        alphabet="ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_",
        max_size=60), min_size=3, max_size=3)))
def test_any_string_is_a_review_not_a_crash(text: str) -> None:
    status = UNSTARTED.review_token(text)
    assert status["authenticated"] is False and status["error"]
