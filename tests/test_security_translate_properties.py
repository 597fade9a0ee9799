"""Property: any security the mesh model accepts (modes at every level, rules with any
principals, accounts, namespaces, methods, paths, ports and headers), translated for an
explicit or a captured sidecar, with or without a mesh identity, is config a real Envoy
accepts (``envoy --mode validate`` on the static bootstrap of
tests/test_security_translate.py)."""

from __future__ import annotations

import string
from pathlib import Path
from typing import Any

from hypothesis import given
from hypothesis import strategies as st

from controlplane.mesh import load_mesh_data
from controlplane.mesh.security import MeshIdentity
from controlplane.proxy import ProxyIdentity
from controlplane.translator import translate
from tests.test_mesh_properties import bounded, dns_label
from tests.test_security_translate import envoy_rejects, static_bootstrap

_TOKEN = string.ascii_lowercase + string.digits + "!#$%&'*+-.^_`|~"
_TEXT = st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00\r\n")
MODES = st.sampled_from(["strict", "permissive", "disable"])


def _principal() -> st.SearchStrategy[str]:
    path = st.text(st.characters(blacklist_categories=("Cs", "Zs", "Cc"),
                                 blacklist_characters="*"), min_size=1, max_size=40)
    return st.one_of(st.just("*"), st.builds(lambda p, star: f"spiffe://{p}{star}", path,
                                             st.sampled_from(["", "*"])))


def _header() -> st.SearchStrategy[dict[str, Any]]:
    name = st.text(_TOKEN, min_size=1, max_size=20)
    value = st.text(_TEXT, max_size=30)
    return st.one_of(st.builds(lambda n, v: {"name": n, "exact": v}, name, value),
                     st.builds(lambda n, v: {"name": n, "prefix": v or "x"}, name, value),
                     st.builds(lambda n: {"name": n, "present": True}, name))


def _path() -> st.SearchStrategy[dict[str, str]]:
    text = st.text(st.characters(blacklist_categories=("Cs", "Cc"),
                                 blacklist_characters=" \t?#"), max_size=20)
    return st.builds(lambda kind, p: {kind: "/" + p}, st.sampled_from(["prefix", "exact"]),
                     text)


def _maybe(strategy: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    return st.one_of(st.none(), st.lists(strategy, min_size=1, max_size=3))


@st.composite
def rules(draw: st.DrawFn, ports: list[int]) -> dict[str, Any]:
    source = st.fixed_dictionaries({}, optional={
        "principals": st.lists(_principal(), min_size=1, max_size=3),
        "service_accounts": st.lists(st.builds(lambda n, a: f"{n}/{a}", dns_label(),
                                               dns_label()), min_size=1, max_size=2),
        "namespaces": st.lists(dns_label(), min_size=1, max_size=2)})
    operation = st.fixed_dictionaries({}, optional={
        "methods": st.lists(st.sampled_from(["GET", "POST", "DELETE", "PURGE", "X-Y_1"]),
                            min_size=1, max_size=3),
        "paths": st.lists(_path(), min_size=1, max_size=2),
        "ports": st.lists(st.sampled_from(ports), min_size=1, max_size=2),
        "headers": st.lists(_header(), min_size=1, max_size=3)})
    rule: dict[str, Any] = {"name": draw(dns_label()),
                            "action": draw(st.sampled_from(["allow", "deny"]))}
    for key, found in (("from", draw(_maybe(source))), ("to", draw(_maybe(operation)))):
        if found is not None:
            rule[key] = found
    return rule


def _unique(items: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The rules with the first of each name (names are unique in a block)."""
    kept: dict[str, dict[str, Any]] = {}
    for rule in items:
        kept.setdefault(rule["name"], rule)
    return list(kept.values())


@st.composite
def cases(draw: st.DrawFn) -> tuple[dict[str, Any], ProxyIdentity, bool]:
    tcp = draw(st.booleans())
    ports = [9080, 15006]
    service: dict[str, Any] = {
        "name": "svc", "port": 9080, "protocol": "tcp" if tcp else draw(
            st.sampled_from(["http", "grpc"])),
        "endpoints": [{"address": "10.0.0.5", "port": 15006,
                       **({"service_account": "svc"} if draw(st.booleans()) else {})}],
        "security": {"authorization": _unique(draw(st.lists(rules(ports), max_size=4)))},
    }
    mode = draw(st.one_of(st.none(), MODES))
    if mode is not None:
        service["security"]["mtls"] = {"mode": mode}
    mesh: dict[str, Any] = {
        "security": {"mtls": {"mode": draw(MODES)},
                     "authorization": _unique(draw(st.lists(rules(ports), max_size=2))),
                     "namespaces": {"default": {"mtls": {"mode": draw(MODES)}}}},
        "services": [service, {"name": "caller", "port": 80, "service_accounts": ["c"],
                               "endpoints": [{"address": "10.0.0.9", "port": 80}]}],
    }
    if draw(st.booleans()):
        proxy = ProxyIdentity(node_id="svc-1", service="svc", capture=True)
    else:
        proxy = ProxyIdentity(node_id="svc-1", service="svc", inbound_port=15006,
                              app_port=9081, inbound_address="127.0.0.1")
    return mesh, proxy, draw(st.booleans())


@bounded(10, shrink=False)
@given(case=cases())
def test_any_security_the_model_accepts_a_real_envoy_accepts(
        case: tuple[dict[str, Any], ProxyIdentity, bool], tmp_path_factory: Any) -> None:
    data, proxy, identity = case
    mesh = load_mesh_data(data)
    if identity:
        mesh = mesh.model_copy(update={"identity": MeshIdentity(trust_domain="example.org")})
    workdir = Path(tmp_path_factory.mktemp("security-property"))
    error = envoy_rejects(static_bootstrap(translate(mesh, proxy)), workdir)
    assert error is None, (data, proxy, identity, error)
