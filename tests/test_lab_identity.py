"""The lab's identities: its CA, a token per sidecar, the service accounts it writes into
its mesh, and the caller's SPIFFE ID its apps read from x-forwarded-client-cert."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import pytest

from controlplane.lab.apps import caller_of
from controlplane.lab.identity import LabCa
from controlplane.lab.topology import plan, plan_captured
from controlplane.lab.traffic import record_callers
from controlplane.lab.view import render_callers
from controlplane.mesh.loader import load_mesh_file
from controlplane.security import tokens
from controlplane.security.castore import load_dir

REVIEWS = "spiffe://cluster.local/ns/default/sa/reviews"


@pytest.mark.parametrize(("xfcc", "caller"), [
    (f"By=spiffe://cluster.local/ns/default/sa/ratings;Hash=ab12;URI={REVIEWS}", REVIEWS),
    (f'Hash=ab12;URI="{REVIEWS}"', REVIEWS),
    (f"URI=spiffe://x/ns/a/sa/b,By=b;URI={REVIEWS}", REVIEWS),  # the last hop's
    ("", None),
    ("By=spiffe://cluster.local/ns/default/sa/ratings;Hash=ab12", None),
])
def test_the_app_reads_its_callers_identity(xfcc: str, caller: str | None) -> None:
    assert caller_of(xfcc) == caller


def test_the_traffic_generator_collects_every_hops_caller() -> None:
    callers: dict[str, str] = {}
    record_callers({"service": "frontend", "caller": "a", "version": "v1",
                    "reviews": {"service": "reviews", "caller": "b",
                                "ratings": {"service": "ratings", "caller": "c"}}}, callers)
    assert callers == {"frontend": "a", "reviews": "b", "ratings": "c"}
    record_callers({"service": "frontend", "reviews": {"error": "x"}}, callers)  # plaintext
    assert callers == {"frontend": "a", "reviews": "b", "ratings": "c"}
    assert render_callers(callers, ["frontend", "reviews", "ratings"]) == (
        "mTLS: frontend called by a, reviews called by b, ratings called by c")
    assert "plaintext" in render_callers({}, ["frontend"])


def test_every_sidecar_gets_a_node_bound_token_from_the_lab_ca(tmp_path: Path) -> None:
    ca = LabCa(tmp_path)
    identity = ca.identity("reviews-v1", "reviews")
    assert identity.token_file.stat().st_mode & 0o777 == 0o600
    # The server (serve --ca-dir) reads the very CA the lab made.
    served = load_dir(tmp_path / "ca", "cluster.local", datetime.now(UTC), create=False)
    assert identity.bundle_pem == served.bundle_pem.decode()
    caller = tokens.verify(served, identity.token_file.read_text(), datetime.now(UTC))
    assert str(caller.identity) == REVIEWS
    assert caller.node_id == "reviews-v1"


@pytest.mark.parametrize("captured", [False, True])
def test_the_plan_gives_each_sidecar_its_services_account(captured: bool,
                                                          tmp_path: Path) -> None:
    template = """
services:
  - name: frontend
    port: 9080
    endpoints: [{address: 127.0.0.1, port: 9170}]
  - name: reviews
    port: 9080
    service_accounts: [reviews-sa]
    endpoints: [{address: 127.0.0.1, port: 9180}]
  - name: ratings
    port: 9080
    endpoints: [{address: 127.0.0.1, port: 9190, service_account: ratings-1}]
"""
    layout = (plan_captured(tmp_path, lambda i: f"10.240.9.{i + 2}", template, prefer=False)
              if captured else plan(tmp_path, template, prefer=False))
    accounts = {i.service: i.service_account for i in layout.instances}
    assert accounts == {"frontend": "frontend", "reviews": "reviews-sa",
                        "ratings": "ratings-1"}
    assert layout.loadgen.service_account == "loadgen"
    # The lab's copy says who frontend runs as, so callers use mTLS to it and verify it.
    mesh = {s.name: s for s in load_mesh_file(layout.mesh_path).services}
    assert mesh["frontend"].service_accounts == ["frontend"]
    assert mesh["reviews"].service_accounts == ["reviews-sa"]
    assert mesh["ratings"].service_accounts is None
