"""The mesh file's ``security`` blocks: parsing, errors by path, the effective mode and
rules of a service (Istio's precedence), what validate warns about, and how a change
of security reaches the assembled snapshots (only a function of the mesh, never of a
proxy's identity)."""

from __future__ import annotations

from pathlib import Path

import pytest

from controlplane import resource
from controlplane.assembly import MeshBuild
from controlplane.errors import MeshError
from controlplane.mesh import MeshLoader, load_mesh_file, load_mesh_text
from controlplane.mesh.model import Mesh
from controlplane.mesh.security import MeshIdentity, effective, security_warnings
from controlplane.proxy import ProxyIdentity
from controlplane.translator import translate

SECURE = """
security:
  mtls: {mode: disable}
  authorization:
    - {name: no-debug, action: deny, to: [{paths: [{prefix: /debug}]}]}
  namespaces:
    prod:
      mtls: {mode: strict}
      authorization: [{name: prod-only, from: [{namespaces: [prod]}]}]
services:
  - name: ratings
    namespace: prod
    port: 9080
    service_accounts: [ratings]
    endpoints:
      - {address: 10.0.0.5, port: 9080, service_account: ratings-v2}
    security:
      mtls: {mode: permissive}
      authorization:
        - name: allow-reviews
          action: allow
          from:
            - principals: ["spiffe://cluster.local/ns/default/sa/reviews", "spiffe://x/*", "*"]
              service_accounts: ["default/reviews"]
              namespaces: ["default"]
          to:
            - methods: [GET]
              paths: [{prefix: /ratings}]
              ports: [9080]
              headers: [{name: x-user, exact: admin}, {name: x-id, present: true}]
  - name: details
    namespace: prod
    port: 9080
    endpoints: [{address: 10.0.0.6, port: 9080}]
  - name: legacy
    port: 8080
    endpoints: [{address: 10.0.0.7, port: 8080}]
"""


def problems(text: str) -> list[str]:
    with pytest.raises(MeshError) as caught:
        load_mesh_text(text)
    return caught.value.problems


def test_a_secure_mesh_parses_and_keeps_the_files_keys() -> None:
    mesh = load_mesh_text(SECURE)
    ratings = mesh.services[0]
    assert ratings.service_accounts == ["ratings"]
    assert ratings.endpoints[0].service_account == "ratings-v2"
    dumped = ratings.model_dump()["security"]["authorization"][0]
    assert "from" in dumped and "from_" not in dumped  # dumps read like the file
    assert mesh.identity is None


def test_effective_mode_is_the_services_else_the_namespaces_else_the_meshs() -> None:
    mesh = load_mesh_text(SECURE)
    ratings, details, legacy = mesh.services
    assert effective(mesh, ratings).mode == "permissive"  # its own
    assert effective(mesh, details).mode == "strict"  # namespace prod
    assert effective(mesh, legacy).mode == "disable"  # the mesh's
    assert effective(load_mesh_text("services: [{name: a, port: 80}]"),
                     load_mesh_text("services: [{name: a, port: 80}]").services[0]
                     ).mode == "permissive"  # nobody says: permissive


def test_rules_of_every_level_apply_each_named_by_its_scope() -> None:
    mesh = load_mesh_text(SECURE)
    ratings, details, legacy = mesh.services
    names = [r.policy_name for r in effective(mesh, ratings).rules]
    assert names == ["mesh:no-debug", "namespace/prod:prod-only", "ratings.prod:allow-reviews"]
    assert [r.policy_name for r in effective(mesh, details).rules] == [
        "mesh:no-debug", "namespace/prod:prod-only"]
    assert [r.policy_name for r in effective(mesh, legacy).rules] == ["mesh:no-debug"]


@pytest.mark.parametrize(("fragment", "expected"), [
    ("from: [{service_accounts: [reviews]}]",
     "services[0] (ratings.default).security.authorization[0].from[0].service_accounts[0]: "
     "'reviews' must be namespace/name"),
    ("from: [{principals: [reviews]}]",
     "authorization[0].from[0].principals[0]: principal 'reviews' must be a SPIFFE ID"),
    ("from: [{principals: ['spiffe://a/*/b']}]", "optionally ending in '*'"),
    ("to: [{methods: [get]}]", "to[0].methods[0]: method 'get' must be an upper-case"),
    ("to: [{headers: [{name: x-a, exact: b, prefix: c}]}]",
     "to[0].headers[0]: give exactly one of exact, prefix or present: true (found exact, "
     "prefix)"),
    ("to: [{headers: [{name: X-A, present: true}]}]", "must be lower-case"),
    ("to: [{ports: [9999]}]", "services[0] (ratings.default).security.authorization[0].to[0]"
     ".ports[0]: 9999 is not a port of this service (9080, 9081)"),
    ("action: permit", "authorization[0].action: Input should be 'allow' or 'deny'"),
    ("from: []", "authorization[0].from: List should have at least 1 item"),
])
def test_a_bad_rule_is_named_by_path(fragment: str, expected: str) -> None:
    text = f"""
services:
  - name: ratings
    port: 9080
    endpoints: [{{address: 10.0.0.5, port: 9081}}]
    security:
      authorization:
        - name: r
          {fragment}
"""
    found = problems(text)
    assert any(expected in p for p in found), found


def test_other_bad_security_is_named_by_path() -> None:
    found = problems("""
security:
  mtls: {mode: strictest}
  namespaces: {Prod: {}}
services:
  - name: ratings
    port: 9080
    service_accounts: [Ratings]
    endpoints: [{address: 10.0.0.5, port: 9080, service_account: "a b"}]
    security:
      authorization: [{name: a}, {name: a}, {name: Bad}]
""")
    text = "\n".join(found)
    assert "security.mtls.mode: Input should be 'strict', 'permissive' or 'disable'" in text
    assert "security.namespaces.Prod" in text
    assert "services[0] (ratings.default).service_accounts[0]: service account 'Ratings'" in text
    assert "endpoints[0].service_account: service account 'a b'" in text
    assert "rule name 'Bad' must be a DNS label" in text
    [repeated] = problems("""
services:
  - {name: ratings, port: 9080, security: {authorization: [{name: a}, {name: a}]}}
""")
    assert repeated == ("services[0] (ratings.default).security.authorization[1].name: 'a' "
                        "repeats authorization[0]; rule names are unique in a block (they "
                        "name the rule in 403s and stats)")


def test_a_mesh_file_cannot_set_the_identity() -> None:
    [problem] = problems("identity: {trust_domain: x}\nservices: []\n")
    assert problem.startswith("identity: set by the server")
    assert "--ca-dir" in problem and "--trust-domain" in problem


def test_the_incremental_loader_reads_the_security_block() -> None:
    loader = MeshLoader()
    first = loader.load(SECURE.encode())
    assert loader.parsed == 3  # the fast path, not the whole text again
    changed = loader.load(SECURE.replace("mode: disable", "mode: strict").encode())
    assert loader.parsed == 0  # services unchanged, reused
    assert changed.security.mtls is not None and changed.security.mtls.mode == "strict"
    assert first != changed and effective(changed, changed.services[2]).mode == "strict"


def test_equality_sees_security_and_identity() -> None:
    mesh = load_mesh_text(SECURE)
    assert mesh != mesh.model_copy(update={"identity": MeshIdentity()})
    assert mesh != load_mesh_text(SECURE.replace("prefix: /debug", "prefix: /admin"))


def test_validate_warns_about_rules_that_cannot_match_and_strict_without_sidecars() -> None:
    mesh = load_mesh_text(SECURE)
    warnings = security_warnings(mesh)
    assert any(w.startswith("security.namespaces.prod.authorization[0] (prod-only): names "
                            "callers") for w in warnings), warnings
    assert any(w.startswith("services[0] (ratings.prod).security.authorization[0]")
               for w in warnings), warnings
    # details is strict (namespace prod) and has no sidecar: callers would be refused.
    assert any(w.startswith("services[1] (details.prod): mtls mode strict, but no endpoint "
                            "has a sidecar") for w in warnings), warnings
    secured = mesh.model_copy(update={"identity": MeshIdentity()})
    assert not any("names callers" in w for w in security_warnings(secured))


# -- through the assembly ---------------------------------------------------------------

PROXY = ProxyIdentity(node_id="reviews-1", service="reviews")
RATINGS = "outbound|9080||ratings.prod.svc.cluster.local"


def _cluster(build: MeshBuild, name: str = RATINGS) -> bytes:
    found = build.snapshot(PROXY).get(resource.CLUSTER).resources[name]
    return found.message.SerializeToString(deterministic=True)


def _secure(mesh: Mesh) -> Mesh:
    return mesh.model_copy(update={"identity": MeshIdentity()})


def test_a_change_of_identity_or_mode_outside_the_service_reaches_its_clusters() -> None:
    """The service itself is unchanged, so only its security (mesh-wide / namespace
    blocks, the server's identity) can say its clusters must change: they do."""
    plain = load_mesh_text(SECURE)
    build = MeshBuild(plain)
    before = _cluster(build)
    assert b"tlsMode" not in before
    secured = MeshBuild(_secure(plain), build)
    assert RATINGS in {r for r in secured.snapshot(PROXY).get(resource.CLUSTER).resources}
    assert b"controlplane-mtls" in _cluster(secured) and "ratings.prod" in secured.changed
    disabled = _secure(load_mesh_text(SECURE.replace("mode: permissive", "mode: disable")))
    again = MeshBuild(disabled, secured)
    assert b"controlplane-mtls" not in _cluster(again)


def test_what_a_proxy_gets_does_not_depend_on_who_it_is() -> None:
    """Two sidecars of one service (two identities, two node ids) get the same bytes:
    the SDS names are fixed, so groups keep sharing snapshots."""
    mesh = _secure(load_mesh_text(SECURE))
    one = translate(mesh, ProxyIdentity(node_id="a", service="ratings", namespace="prod",
                                        inbound_port=15006, app_port=9081))
    two = translate(mesh, ProxyIdentity(node_id="b", service="ratings", namespace="prod",
                                        inbound_port=15006, app_port=9081))
    for type_url in one:
        assert [m.SerializeToString(deterministic=True) for m in one[type_url]] == [
            m.SerializeToString(deterministic=True) for m in two[type_url]]
    blob = b"".join(m.SerializeToString() for ms in one.values() for m in ms)
    assert b"ROOTCA" in blob and b"default" in blob
    assert b"sa/ratings-v2" in blob  # the destination's identities, to verify it


def test_the_secure_example_is_valid_and_warns_of_nothing_under_a_ca() -> None:
    mesh = load_mesh_file(Path(__file__).parent.parent / "examples" / "secure-mesh.yaml")
    assert security_warnings(mesh.model_copy(update={"identity": MeshIdentity()})) == []
    ratings = mesh.service("ratings")
    assert ratings is not None and effective(mesh, ratings).mode == "strict"


def test_a_mesh_wide_rule_reaches_every_sidecars_inbound_listener() -> None:
    """A rule of the mesh-wide block changes no service, yet every sidecar's inbound
    listener must follow it: the build's frame (all but the services) changed."""
    owner = ProxyIdentity(node_id="r-1", service="ratings", namespace="prod",
                          inbound_port=15006, app_port=9081)
    mesh = _secure(load_mesh_text(SECURE))

    def inbound(build: MeshBuild) -> bytes:
        found = build.snapshot(owner).get(resource.LISTENER).resources["inbound"]
        return found.message.SerializeToString(deterministic=True)

    first = MeshBuild(mesh)
    assert b"mesh:no-debug" in inbound(first)
    renamed = _secure(load_mesh_text(SECURE.replace("no-debug", "no-admin")))
    second = MeshBuild(renamed, first)
    assert b"mesh:no-admin" in inbound(second) and b"mesh:no-debug" not in inbound(second)
