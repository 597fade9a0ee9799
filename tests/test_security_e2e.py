"""Zero trust through real Envoy (issue 11, "How it is shown"): mesh mTLS between
sidecars in strict and permissive mode, the caller's SPIFFE ID as the app sees it, and
authorization (HTTP 200 vs 403 naming the rule, a TCP deny closing the connection), over
SotW and delta.

Every sidecar is a real Envoy whose xDS stream is TLS to ``controlplane serve --ca-dir``
and authenticated by a token minted for its identity (tests/support/secure.py); its own
certificate and the mesh roots arrive over SDS on that stream. Sidecars run on
127.0.0.1: a service's endpoint is its sidecar's inbound port, in front of the app.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from tests.support.procs import ControlPlane, Envoy, wait_for
from tests.support.secure import (
    Answer,
    SecureMesh,
    call,
    own_serials,
    spiffe,
    stats_matching,
    tcp_exchange,
)

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(120)]
MODES = pytest.mark.parametrize("delta", [False, True], ids=["sotw", "delta"])


@pytest.fixture
def mesh(tmp_path: Path) -> Iterator[SecureMesh]:
    secured = SecureMesh(tmp_path)
    yield secured
    secured.close()


def service(name: str, sidecar: Envoy | None, *, protocol: str = "http", port: int = 9080,
            accounts: list[str] | None = None, security: dict[str, Any] | None = None
            ) -> dict[str, Any]:
    """A mesh service whose one endpoint is ``sidecar``'s inbound port (none yet: no
    endpoint), running as ServiceAccount ``name`` unless ``accounts`` says otherwise."""
    accounts = accounts if accounts is not None else [name]
    found: dict[str, Any] = {"name": name, "port": port, "protocol": protocol,
                             "service_accounts": accounts, "endpoints": []}
    if sidecar is not None:
        assert sidecar.inbound_port is not None
        found["endpoints"] = [{"address": "127.0.0.1", "port": sidecar.inbound_port,
                               "service_account": accounts[0]}]
    if security is not None:
        found["security"] = security
    return found


def through(envoy: Envoy, host: str, path: str = "/", **kwargs: Any) -> Answer:
    """A call from ``envoy``'s app: through its egress listener."""
    return call(envoy.egress_port, host, path, **kwargs)


def ok(answer: Answer) -> Answer | None:
    return answer if answer.status == 200 else None


def secured_call(envoy: Envoy, host: str) -> Answer:
    """Wait until a call from ``envoy`` to ``host`` succeeds (the sidecars have their
    certificates and the peer's endpoint); the answer."""
    found: Answer = wait_for(lambda: ok(through(envoy, host)), timeout=30,
                             what=f"{envoy.node_id} -> {host} to answer 200")
    return found


def mtls_call(envoy: Envoy, host: str, caller: str) -> Answer:
    """Wait until a call from ``envoy`` to ``host`` is answered over mTLS as ``caller``
    (a SPIFFE ID). Under a permissive mesh a call may be answered in plaintext while the
    caller's sidecar has the peer's endpoint but not yet its mTLS cluster."""
    def answered() -> Answer | None:
        answer = through(envoy, host)
        return answer if answer.status == 200 and f"URI={caller}" in answer.xfcc else None
    found: Answer = wait_for(answered, timeout=30, what=f"{envoy.node_id} -> {host} over mTLS")
    return found


@MODES
def test_strict_refuses_plaintext_and_sidecars_speak_mtls(mesh: SecureMesh,
                                                          delta: bool) -> None:
    app = mesh.http_app("ratings-app")
    server = mesh.serve({"security": {"mtls": {"mode": "strict"}},
                         "services": [service("ratings", None)]})
    ratings = mesh.sidecar("ratings-1.default", "ratings", "ratings", delta, app_port=app.port)
    frontend = mesh.sidecar("frontend-1.default", "frontend", "frontend", delta)
    mesh.update({"security": {"mtls": {"mode": "strict"}},
                 "services": [service("ratings", ratings)]})

    answer = secured_call(frontend, "ratings")
    assert answer.json()["backend"] == "ratings-app"
    # The app behind the server-side sidecar sees who called: the caller's SPIFFE ID
    # from its verified client certificate, and its own sidecar's as By=.
    assert f"URI={spiffe('frontend')}" in answer.xfcc, answer.xfcc
    assert f"By={spiffe('ratings')}" in answer.xfcc, answer.xfcc

    # A plaintext client at the strict inbound port is refused: no chain takes it, the
    # connection closes, and the app never sees the request.
    hits = app.hits
    plain = call(ratings.inbound_port or 0, "ratings")
    assert plain.status == 0, plain
    assert app.hits == hits

    # Each sidecar holds its own identity's certificate (from SDS), and only that one.
    assert own_serials(frontend, spiffe("frontend"))
    assert own_serials(ratings, spiffe("ratings"))
    assert not own_serials(frontend, spiffe("ratings"))
    assert not own_serials(ratings, spiffe("frontend"))
    proxies = {p["node_id"]: p for p in server.json("/debug/proxies")}
    assert {"ratings-1.default", "frontend-1.default"} <= set(proxies)


@MODES
def test_permissive_takes_mtls_and_plaintext_on_one_port(mesh: SecureMesh,
                                                         delta: bool) -> None:
    """No security block at all: permissive is the default, and a sidecar still calls
    a destination that has one with mTLS (auto-mTLS)."""
    app = mesh.http_app("ratings-app")
    mesh.serve({"services": [service("ratings", None)]})
    ratings = mesh.sidecar("ratings-1.default", "ratings", "ratings", delta, app_port=app.port)
    frontend = mesh.sidecar("frontend-1.default", "frontend", "frontend", delta)
    mesh.update({"services": [service("ratings", ratings)]})

    answer = secured_call(frontend, "ratings")
    assert f"URI={spiffe('frontend')}" in answer.xfcc, answer.xfcc

    # Plaintext to the same inbound port is accepted, with no caller identity; a client
    # claiming one in a header of its own has it removed (SANITIZE_SET).
    forged = f"By={spiffe('ratings')};URI={spiffe('admin')}"
    plain = call(ratings.inbound_port or 0, "ratings",
                 headers={"x-forwarded-client-cert": forged})
    assert plain.status == 200, plain
    assert plain.json()["backend"] == "ratings-app"
    assert "spiffe://" not in plain.xfcc, plain.xfcc


def test_a_peer_with_the_wrong_identity_is_not_trusted(mesh: SecureMesh) -> None:
    """The mesh says ratings runs as ServiceAccount ratings; the sidecar at its endpoint
    holds a valid mesh certificate, but for another identity: the caller's sidecar
    refuses it (the SAN check), the app behind it never sees the call."""
    app = mesh.http_app("ratings-app")
    mesh.serve({"services": [service("ratings", None)]})
    impostor = mesh.sidecar("ratings-1.default", "ratings", "details", False,
                            app_port=app.port)
    frontend = mesh.sidecar("frontend-1.default", "frontend", "frontend", False)
    mesh.update({"services": [service("ratings", impostor)]})  # says: runs as ratings
    wait_for(lambda: own_serials(frontend, spiffe("frontend")), what="frontend's certificate")
    wait_for(lambda: own_serials(impostor, spiffe("details")), what="the impostor's certificate")
    cluster = "outbound|9080||ratings.default.svc.cluster.local"
    wait_for(lambda: frontend.stat(f"cluster.{cluster}.membership_total") == 1,
             what="frontend to know ratings' endpoint")
    answers = [through(frontend, "ratings") for _ in range(3)]
    assert all(a.status == 503 for a in answers), answers
    assert app.hits == 0
    assert frontend.stat(f"cluster.{cluster}.ssl.fail_verify_san") >= 1


AUTHZ = {"authorization": [
    {"name": "no-admin", "action": "deny", "to": [{"paths": [{"prefix": "/admin"}]}]},
    {"name": "allow-reviews", "action": "allow",
     "from": [{"principals": [spiffe("reviews")]}]},
]}


@MODES
def test_authorization_allows_reviews_and_denies_frontend(mesh: SecureMesh,
                                                          delta: bool) -> None:
    app = mesh.http_app("ratings-app")
    mesh.serve({"services": [service("ratings", None, security=AUTHZ)]})
    ratings = mesh.sidecar("ratings-1.default", "ratings", "ratings", delta, app_port=app.port)
    reviews = mesh.sidecar("reviews-1.default", "reviews", "reviews", delta)
    frontend = mesh.sidecar("frontend-1.default", "frontend", "frontend", delta)
    mesh.update({"services": [service("ratings", ratings, security=AUTHZ)]})

    allowed = secured_call(reviews, "ratings")
    assert f"URI={spiffe('reviews')}" in allowed.xfcc

    hits = app.hits
    denied = through(frontend, "ratings", "/ratings/1")
    assert denied.status == 403, denied
    assert "ratings" in denied.body, denied.body  # which service's policy said no
    # Deny rules come first: even reviews may not reach /admin, and the body names the
    # rule that matched.
    admin = through(reviews, "ratings", "/admin/users")
    assert admin.status == 403, admin
    assert "no-admin" in admin.body, admin.body
    assert app.hits == hits  # neither denied request reached the app
    assert through(reviews, "ratings", "/ratings/1").status == 200

    denials = stats_matching(ratings, "rbac", "denied")
    assert sum(denials.values()) >= 2, denials


@MODES
def test_a_tcp_deny_closes_the_connection(mesh: SecureMesh, delta: bool) -> None:
    """A strict TCP service with a deny rule for frontend's identity: a client with
    frontend's mesh certificate is cut off before its bytes reach the app; one with
    reviews' certificate gets the echo; a plaintext client gets no chain at all."""
    app = mesh.tcp_app("store")
    security = {"mtls": {"mode": "strict"}, "authorization": [
        {"name": "deny-frontend", "action": "deny",
         "from": [{"principals": [spiffe("frontend")]}]}]}

    def store(sidecar: Envoy | None) -> dict[str, Any]:
        return service("store", sidecar, protocol="tcp", port=7000, security=security)

    mesh.serve({"services": [store(None)]})
    sidecar = mesh.sidecar("store-1.default", "store", "store", delta, app_port=app.port)
    mesh.update({"services": [store(sidecar)]})
    port = sidecar.inbound_port or 0
    wait_for(lambda: own_serials(sidecar, spiffe("store")), what="store's certificate")
    reviews, frontend = mesh.workload_files("reviews"), mesh.workload_files("frontend")

    allowed = wait_for(lambda: (o := tcp_exchange(port, reviews, ["hello"])).lines
                       == ["store", "hello"] and o, timeout=20,
                       what="reviews' mTLS connection echoed")
    assert not allowed.closed
    assert allowed.peer == [spiffe("store")]  # the server side proved its identity too

    denied = tcp_exchange(port, frontend, ["secret"])
    assert denied.closed, denied
    assert "secret" not in denied.lines, denied

    plain = tcp_exchange(port, None, ["hello"])
    assert plain.closed and "hello" not in plain.lines, plain

    denials = stats_matching(sidecar, "rbac", "denied")
    assert sum(denials.values()) >= 1, denials


def refusals(server: ControlPlane) -> list[dict[str, Any]]:
    return [line for line in server.logs() if line.get("event") == "xds.stream_refused"]


@MODES
def test_a_rotated_token_file_is_read_again_on_reconnect(mesh: SecureMesh, delta: bool) -> None:
    """Envoy reads its token file again for every new xDS stream: with an expired token
    in it, a reconnect is refused (UNAUTHENTICATED) and the sidecar keeps serving its
    last config; once the file holds a fresh token, the next reconnect is served. The
    server keeps its CA across the restart, so the certificates still chain."""
    app = mesh.http_app("ratings-app")
    mesh.server_extra = ["--shutdown-grace", "0.5"]  # the restart is not what is shown
    server = mesh.serve({"services": [service("ratings", None)]})
    ratings = mesh.sidecar("ratings-1.default", "ratings", "ratings", delta, app_port=app.port)
    frontend = mesh.sidecar("frontend-1.default", "frontend", "frontend", delta)
    mesh.update({"services": [service("ratings", ratings)]})
    assert mtls_call(frontend, "ratings", spiffe("frontend")).status == 200
    ca_before = (mesh.ca_dir / "ca.crt").read_bytes()

    server.stop()
    now = datetime.now(UTC)
    mesh.write_token("frontend-1.default", "frontend", now - timedelta(hours=2),
                     timedelta(hours=1))
    server.start()
    assert (mesh.ca_dir / "ca.crt").read_bytes() == ca_before  # the CA was kept
    refused_at = time.monotonic()
    wait_for(lambda: refusals(server), timeout=30,
             what="the expired token's stream to be refused")
    [first, *_] = refusals(server)
    assert first["status"] == "UNAUTHENTICATED", first
    assert "expired" in first["error"] and "mint a new one" in first["error"], first
    assert "frontend-1.default" not in {p["node_id"] for p in server.json("/debug/proxies")}
    assert through(frontend, "ratings").status == 200  # the last config still serves

    mesh.write_token("frontend-1.default", "frontend", datetime.now(UTC), timedelta(hours=1))
    wait_for(lambda: "frontend-1.default" in {p["node_id"]
                                              for p in server.json("/debug/proxies")},
             timeout=60,  # Envoy's reconnect backoff has grown through the restart
             what="frontend to reconnect with its fresh token")
    print(f"refused, then served again after {time.monotonic() - refused_at:.1f} s")
    assert mtls_call(frontend, "ratings", spiffe("frontend")).status == 200


def test_a_service_may_disable_mtls_under_a_strict_mesh(mesh: SecureMesh) -> None:
    """The service's mode overrides the mesh's: ratings says `disable`, so its inbound
    port takes plaintext, and the caller's sidecar (knowing it) calls it in plaintext:
    the app sees no caller identity."""
    app = mesh.http_app("ratings-app")
    disabled = {"mtls": {"mode": "disable"}}
    strict = {"mtls": {"mode": "strict"}}
    mesh.serve({"security": strict, "services": [service("ratings", None, security=disabled)]})
    ratings = mesh.sidecar("ratings-1.default", "ratings", "ratings", False, app_port=app.port)
    frontend = mesh.sidecar("frontend-1.default", "frontend", "frontend", False)
    mesh.update({"security": strict,
                 "services": [service("ratings", ratings, security=disabled)]})
    answer = secured_call(frontend, "ratings")
    assert "spiffe://" not in answer.xfcc, answer.xfcc
    # (frontend's sidecar has no mTLS to do: it never even asked for a certificate)
    assert not own_serials(frontend, spiffe("frontend"))
    plain = call(ratings.inbound_port or 0, "ratings")
    assert plain.status == 200, plain


def test_a_namespace_may_be_strict_in_a_permissive_mesh(mesh: SecureMesh) -> None:
    """`security.namespaces.prod.mtls: strict`: ratings in prod refuses plaintext while
    details in default (the mesh's permissive) takes it; a sidecar calls both, over
    mTLS, and ratings' app sees it by its SPIFFE ID."""
    ratings_app, details_app = mesh.http_app("ratings-app"), mesh.http_app("details-app")

    def layout(ratings: Envoy | None, details: Envoy | None) -> dict[str, Any]:
        return {"security": {"namespaces": {"prod": {"mtls": {"mode": "strict"}}}},
                "services": [{**service("ratings", ratings), "namespace": "prod"},
                             service("details", details)]}

    mesh.serve(layout(None, None))
    ratings = mesh.sidecar("ratings-1.prod", "ratings", "ratings", False,
                           app_port=ratings_app.port, extra=["--namespace", "prod"])
    details = mesh.sidecar("details-1.default", "details", "details", False,
                           app_port=details_app.port)
    frontend = mesh.sidecar("frontend-1.default", "frontend", "frontend", False)
    mesh.update(layout(ratings, details))

    called = secured_call(frontend, "ratings.prod")
    assert f"URI={spiffe('frontend')}" in called.xfcc, called.xfcc
    assert f"By={spiffe('ratings', 'prod')}" in called.xfcc, called.xfcc
    assert mtls_call(frontend, "details", spiffe("frontend")).status == 200
    assert call(ratings.inbound_port or 0, "ratings.prod").status == 0
    assert call(details.inbound_port or 0, "details").status == 200
