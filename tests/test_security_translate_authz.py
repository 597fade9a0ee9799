"""Authorization as the translator makes it (Envoy's RBAC filters), in real Envoys: the
rig of tests/test_security_translate.py (static bootstraps holding exactly what
``translate`` gives each proxy, certificates from the mesh CA)."""

from __future__ import annotations

import http.client
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.procs import http_get, wait_for
from tests.test_security_translate import (
    TRUST,
    Rig,
    call,
    get_over,
    mesh_of,
    plaintext_get,
)


@pytest.fixture
def rig(tmp_path: Path) -> Iterator[Rig]:
    made = Rig(tmp_path)
    try:
        yield made
    finally:
        made.stop()


# -- authorization ----------------------------------------------------------------------

AUTHZ = {"mtls": {"mode": "strict"}, "authorization": [
    {"name": "allow-reviews", "from": [{"service_accounts": ["default/reviews"]}]},
    {"name": "deny-frontend", "action": "deny",
     "from": [{"principals": [f"spiffe://{TRUST}/ns/default/sa/frontend"]}]},
]}
DENY_STAT = "http.inbound.rbac.authz_deny.denied"
ALLOW_STAT = "http.inbound.rbac.authz_allow.denied"
RULE_STAT = "http.inbound.rbac.authz_deny.policy.ratings.default:deny-frontend.denied"


def test_http_authorization_allows_reviews_and_denies_frontend_with_a_clear_403(
        rig: Rig) -> None:
    """reviews -> ratings 200; frontend -> ratings 403 whose body names the service and
    the deny rule; a caller no allow rule names gets 403 "[none]". Each denial is
    counted in the sidecar's stats, by filter."""
    mesh = mesh_of(rig.ports, ratings=AUTHZ)
    ratings = rig.ratings(mesh)
    rig.caller(mesh, "reviews", rig.ports.reviews_out)
    rig.caller(mesh, "frontend", rig.ports.frontend_out)

    status, body = call(rig.ports.reviews_out)
    assert status == 200, body
    status, body = call(rig.ports.frontend_out)
    assert status == 403
    assert "ratings.default denied this request" in body
    assert "rbac_access_denied_matched_policy[ratings.default:deny-frontend]" in body
    status, body = get_over(rig.mtls("details", rig.ports.ratings_in))
    assert status == 403 and "rbac_access_denied_matched_policy[none]" in body, body
    assert wait_for(lambda: ratings.stat(DENY_STAT) == 1, what=DENY_STAT)
    assert wait_for(lambda: ratings.stat(ALLOW_STAT) == 1, what=ALLOW_STAT)
    assert ratings.stat(RULE_STAT) == 1  # per rule, too
    assert ratings.stat("http.inbound.rbac.authz_allow.policy.ratings.default:"
                        "allow-reviews.allowed") >= 1


def test_http_authorization_by_method_path_and_header(rig: Rig) -> None:
    """to: methods, paths (prefix and exact) and headers (ANDed), on plaintext too."""
    rules = {"authorization": [
        {"name": "reads", "to": [{"methods": ["GET"], "paths": [{"prefix": "/ratings"}],
                                  "headers": [{"name": "x-user", "exact": "admin"}]},
                                 {"paths": [{"exact": "/health"}]}]},
    ]}
    rig.ratings(mesh_of(rig.ports, ratings=rules))
    port = rig.ports.ratings_in
    assert plaintext_get(port, {"x-user": "admin"})[0] == 200
    assert plaintext_get(port, {"x-user": "guest"})[0] == 403
    assert plaintext_get(port)[0] == 403
    assert http_get(f"http://127.0.0.1:{port}/health")[0] == 200
    assert http_get(f"http://127.0.0.1:{port}/healthz")[0] == 403


def test_a_principal_rule_never_matches_a_plaintext_caller(rig: Rig) -> None:
    """permissive: a plaintext caller has no principal, so an allow rule naming callers
    does not let it in, while the same caller over mTLS is let in."""
    rules = {"authorization": [{"name": "only-reviews",
                                "from": [{"namespaces": ["default"]}]}]}
    rig.ratings(mesh_of(rig.ports, ratings=rules))
    assert plaintext_get(rig.ports.ratings_in)[0] == 403
    assert get_over(rig.mtls("reviews", rig.ports.ratings_in))[0] == 200


def test_tcp_deny_closes_the_connection(rig: Rig) -> None:
    """On a TCP port a deny rule closes the connection (network RBAC) at the caller's
    first byte, which never reaches the app; the rule's HTTP-only conditions are dropped
    there (the safe side). The allowed caller gets the app's banner and its echo.
    Envoy decides on the first byte: a server-first app's greeting (this one's banner)
    may reach a denied caller before the close. Denials are counted."""
    rules = {"mtls": {"mode": "strict"}, "authorization": [
        {"name": "deny-frontend", "action": "deny",
         "from": [{"service_accounts": ["default/frontend"]}],
         "to": [{"methods": ["POST"]}]},
    ]}
    sidecar = rig.ratings_tcp(mesh_of(rig.ports, tcp=rules))

    def exchange(account: str) -> bytes:
        """Send a line, then read until the echo or the end of the connection."""
        received = b""
        try:
            with rig.mtls(account, rig.ports.tcp_in) as sock:
                sock.sendall(b"ping\n")
                while b"ping" not in received and (chunk := sock.recv(100)):
                    received += chunk
        except OSError:
            pass  # a reset is a close all the same
        return received

    assert exchange("reviews") == b"ratings-tcp\nping\n"
    assert b"ping" not in exchange("frontend")
    assert wait_for(lambda: sidecar.stat("inbound_authz_deny.rbac.denied") == 1,
                    what="inbound_authz_deny.rbac.denied")


def test_without_identity_rules_apply_to_what_plaintext_shows(rig: Rig) -> None:
    """No CA (Mesh.identity None): no TLS anywhere; a rule on methods still holds, one
    on callers never matches."""
    rules = {"authorization": [{"name": "gets", "to": [{"methods": ["GET"]}]},
                               {"name": "reviews", "from": [{"namespaces": ["default"]}]}]}
    mesh = mesh_of(rig.ports, ratings=rules, identity=False)
    rig.ratings(mesh)
    port = rig.ports.ratings_in
    assert plaintext_get(port)[0] == 200
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        connection.request("DELETE", "/ratings/1")
        response = connection.getresponse()
        assert response.status == 403, response.read()
    finally:
        connection.close()
