"""Property-based tests: anything the mesh model accepts, a real Envoy accepts; and the
loader turns any input at all into a Mesh or a MeshError, never another exception.

Meshes are generated from the model's own shape, with its edge values (the longest
duration, uint32's maximum, 0% and 100%, IPv6, DNS-named endpoints, every token
character in a header name...), translated for a generated proxy, and handed in batches
to ``envoy --mode validate`` (tests/support/envoy_validate.py): one Envoy run checks a
whole list of meshes, so the property costs a few seconds, not minutes.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import string
from collections.abc import Callable
from typing import Any

import yaml
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from controlplane.errors import MeshError
from controlplane.mesh.duration import MAX_DURATION
from controlplane.mesh.incremental import MeshLoader
from controlplane.mesh.limits import UINT32_MAX
from controlplane.mesh.loader import load_mesh_bytes, load_mesh_data, load_mesh_text
from controlplane.mesh.model import Mesh
from controlplane.proxy import ProxyIdentity
from controlplane.translator import Resources, translate
from tests.support.envoy_validate import rejected

_MAX_MICROS = int(MAX_DURATION.total_seconds()) * 1_000_000
_TOKEN = string.ascii_lowercase + string.digits + "!#$%&'*+-.^_`|~"
_RETRY_ON = ["5xx", "gateway-error", "reset", "connect-failure", "retriable-4xx",
             "refused-stream", "retriable-status-codes", "cancelled", "deadline-exceeded",
             "internal", "resource-exhausted", "unavailable"]

def bounded(examples: int, shrink: bool = True) -> settings:
    """A fixed example count, no per-example deadline (Envoy runs take what they take on
    a shared machine), failures printed with the blob to reproduce them. Envoy-backed
    properties do not shrink (each step is an Envoy run): the batch bisection already
    names the one mesh Envoy refuses, with Envoy's own error."""
    phases = [p for p in Phase if shrink or p not in (Phase.shrink, Phase.explain)]
    return settings(max_examples=examples, deadline=None, print_blob=True, phases=phases,
                    database=None, suppress_health_check=list(HealthCheck))


def dns_label(max_size: int = 12) -> st.SearchStrategy[str]:
    inner = st.text(string.ascii_lowercase + string.digits + "-", max_size=max_size)
    edge = st.sampled_from(["a", "z" * 63, "a-0", "0a"])
    return st.one_of(edge, st.builds(lambda a, b, c: a + b + c,
                                     st.sampled_from(string.ascii_lowercase), inner,
                                     st.sampled_from(string.ascii_lowercase + string.digits)))


def durations() -> st.SearchStrategy[str]:
    micros = st.one_of(st.integers(1, _MAX_MICROS), st.sampled_from([1, 1000, _MAX_MICROS]))
    return micros.map(lambda us: f"{us}us")


uint32 = st.one_of(st.integers(1, UINT32_MAX), st.just(UINT32_MAX), st.just(1))
percent = st.one_of(st.sampled_from([0, 100, 0.0001]), st.floats(0, 100, allow_nan=False))
label_chars = string.ascii_letters + string.digits + "-_."
zone = st.one_of(
    st.just("v" * 63), st.just("z"),
    st.builds(lambda a, b, c: a + b + c, st.sampled_from(string.ascii_letters),
              st.text(label_chars, max_size=8), st.sampled_from(string.digits)),
)
label_value = st.one_of(st.just(""), zone)
label_key = st.one_of(
    st.sampled_from(["version", "app.kubernetes.io/name", "k" * 63, "a.b-c_d"]),
    st.builds(lambda a, b: a + b, st.sampled_from(string.ascii_lowercase),
              st.text(string.ascii_lowercase + string.digits, max_size=6)),
)
labels = st.dictionaries(label_key, label_value, min_size=1, max_size=3)
header_name = st.text(_TOKEN, min_size=1, max_size=20)
_header_char = st.characters(blacklist_characters="\x00\r\n", blacklist_categories=["Cs"])
header_value = st.text(_header_char, max_size=30)
hostname = st.lists(dns_label(8), min_size=1, max_size=3).map(".".join)


@st.composite
def endpoints(draw: st.DrawFn, named: list[str] | None, dns: bool) -> dict[str, Any]:
    if dns:
        endpoint: dict[str, Any] = {"address": draw(hostname), "address_type": "dns"}
    else:
        endpoint = {"address": str(draw(st.one_of(st.ip_addresses(v=4), st.ip_addresses(v=6))))}
    if named is None:
        endpoint["port"] = draw(st.integers(1, 65535))
    else:
        chosen = draw(st.lists(st.sampled_from(named), min_size=1, unique=True))
        endpoint["ports"] = {name: draw(st.integers(1, 65535)) for name in chosen}
    if draw(st.booleans()):
        endpoint["zone"] = draw(zone)
    if draw(st.booleans()):
        endpoint["labels"] = draw(labels)
    endpoint["ready"] = draw(st.booleans())
    if draw(st.booleans()):
        endpoint["serving"] = draw(st.booleans())
        endpoint["terminating"] = draw(st.booleans())
    return endpoint


@st.composite
def policies(draw: st.DrawFn, subsets: list[dict[str, str]]) -> dict[str, Any]:
    policy: dict[str, Any] = {}
    if draw(st.booleans()):
        policy["timeout"] = draw(durations())
    if draw(st.booleans()):
        retries: dict[str, Any] = {"attempts": draw(st.integers(0, 100)),
                                   "on": draw(st.lists(st.sampled_from(_RETRY_ON), unique=True))}
        if draw(st.booleans()):
            retries["per_try_timeout"] = draw(durations())
        retries["retriable_status_codes"] = draw(st.lists(st.integers(100, 599), max_size=3))
        if draw(st.booleans()):
            base = draw(st.integers(1, _MAX_MICROS))
            retries["backoff"] = {"base_interval": f"{base}us",
                                  "max_interval": f"{draw(st.integers(base, _MAX_MICROS))}us"}
        if draw(st.booleans()):
            retries["budget"] = {"percent": draw(percent), "min_concurrency": draw(uint32)}
        policy["retries"] = retries
    if draw(st.booleans()):
        policy["circuit_breaker"] = {k: draw(uint32) for k in (
            "max_connections", "max_pending_requests", "max_requests", "max_retries")
            if draw(st.booleans())}
    if draw(st.booleans()):
        policy["outlier_detection"] = {
            "consecutive_5xx": draw(uint32), "consecutive_gateway_errors": draw(uint32),
            "interval": draw(durations()), "base_ejection_time": draw(durations()),
            "max_ejection_percent": draw(percent)}
    lb = draw(st.sampled_from(["round_robin", "least_request", "random", "ring_hash", "maglev"]))
    if lb in ("ring_hash", "maglev"):
        hash_on = draw(st.sampled_from(["header", "cookie", "source_ip"]))
        on: dict[str, Any] = {"source_ip": True} if hash_on == "source_ip" else {
            hash_on: draw(header_name)}
        if hash_on == "cookie" and draw(st.booleans()):
            on["cookie_ttl"] = draw(durations())
        policy["load_balancer"] = {"policy": lb, "hash": on}
    else:
        policy["load_balancer"] = {"policy": lb}
    if subsets and bool(draw(st.booleans())):
        split: list[dict[str, Any]] = [{"labels": s, "weight": draw(st.integers(0, 10000))}
                                       for s in subsets]
        if sum(leg["weight"] for leg in split) == 0:
            split[0]["weight"] = 10000
        policy["split"] = split
    if subsets and bool(draw(st.booleans())):
        match: dict[str, Any] = {"labels": draw(st.sampled_from(subsets))}
        if draw(st.booleans()):
            match["headers"] = draw(st.dictionaries(header_name, header_value, min_size=1,
                                                    max_size=3))
        path = st.text(string.ascii_letters + string.digits + "/-._~%", max_size=20)
        kind = draw(st.sampled_from(["prefix", "exact"]))
        if "headers" not in match or draw(st.booleans()):
            match["path"] = {kind: "/" + draw(path)}
        policy["match"] = [match]
    if draw(st.booleans()):
        fault: dict[str, Any] = {}
        if draw(st.booleans()):
            fault["delay"] = {"percent": draw(percent), "duration": draw(durations())}
        if not fault or draw(st.booleans()):
            fault["abort"] = {"percent": draw(percent), "status": draw(st.integers(200, 599))}
        policy["fault"] = fault
    if draw(st.booleans()):
        rate = draw(st.one_of(st.integers(1, 10**9), st.sampled_from([1, 12345677, 10**9])))
        limit: dict[str, Any] = {"requests_per_second": rate / 1000}
        if draw(st.booleans()):
            limit["burst"] = draw(st.integers(1, 10**9))
        policy["rate_limit"] = limit
    if draw(st.booleans()):
        policy["fallback"] = {"status": draw(st.integers(200, 599)),
                              "body": draw(st.text(max_size=40).filter(_utf8)),
                              "content_type": draw(st.text(_header_char, min_size=1, max_size=30))}
    return policy


def _utf8(text: str) -> bool:
    try:
        text.encode()
    except UnicodeEncodeError:
        return False
    return True


@st.composite
def services(draw: st.DrawFn, name: str) -> dict[str, Any]:
    service: dict[str, Any] = {"name": name,
                               "namespace": draw(st.sampled_from(["default", "ns-1"]))}
    numbers = draw(st.lists(st.integers(1, 65535), min_size=1, max_size=3, unique=True))
    protocols = st.sampled_from(["http", "grpc", "tcp"])
    named: list[str] | None = None
    if len(numbers) > 1 or draw(st.booleans()):
        named = [f"p{i}" for i in range(len(numbers))]
        service["ports"] = [{"name": n, "port": p, "protocol": draw(protocols)}
                            for n, p in zip(named, numbers, strict=True)]
    else:
        service["port"], service["protocol"] = numbers[0], draw(protocols)
    if draw(st.integers(0, 5)) == 0:
        service["external_name"] = draw(hostname)
        opaque = [p["protocol"] for p in service.get("ports", [service])] == ["tcp"] * len(
            numbers)
        if opaque and draw(st.booleans()):  # the app's own TLS, routed by server name
            for port in service.get("ports", [service]):
                port["protocol"] = "tls"
        service["policy"] = draw(policies([]))
        if opaque:  # a byte stream has no requests: only the TCP fields are accepted
            service["policy"] = _tcp_fields(service["policy"])
        return service
    dns = draw(st.integers(0, 3)) == 0
    service["endpoints"] = draw(st.lists(endpoints(named, dns), max_size=3))
    found = [e["labels"] for e in service["endpoints"] if "labels" in e]
    subsets = [dict(s) for s in {tuple(sorted(x.items())) for x in found}]
    service["policy"] = draw(policies(sorted(subsets, key=str)))
    return service


def _tcp_fields(policy: dict[str, Any]) -> dict[str, Any]:
    """What an external service with only tcp/tls ports accepts (mesh/egress.py)."""
    kept = {k: v for k, v in policy.items()
            if k in ("connect_timeout", "idle_timeout", "circuit_breaker",
                     "outlier_detection", "load_balancer")}
    if "circuit_breaker" in kept:
        kept["circuit_breaker"] = {k: v for k, v in kept["circuit_breaker"].items()
                                   if k in ("max_connections", "max_pending_requests")}
    if kept.get("load_balancer", {}).get("hash", {}).keys() & {"header", "cookie"}:
        del kept["load_balancer"]
    return kept


@st.composite
def meshes(draw: st.DrawFn) -> tuple[dict[str, Any], ProxyIdentity]:
    names = draw(st.lists(dns_label(), min_size=1, max_size=3, unique=True))
    mesh = {"services": [draw(services(name)) for name in names]}
    service = mesh["services"][0]
    if "external_name" not in service and draw(st.booleans()):
        _route_to_another_service(draw, mesh["services"], service)
    for index, each in enumerate(mesh["services"]):  # virtual IPs, one service each
        if "external_name" not in each and draw(st.booleans()):
            each["cluster_ips"] = [f"10.96.{index}.{draw(st.integers(1, 254))}",
                                   *([f"fd00::{index + 1:x}"] if draw(st.booleans()) else [])]
    mesh["outbound_traffic_policy"] = draw(st.sampled_from(["ALLOW_ANY", "REGISTRY_ONLY"]))
    inbound = draw(st.booleans())
    proxy = ProxyIdentity(
        node_id="proxy-1", service=service["name"], namespace=service["namespace"],
        egress_port=15001, inbound_port=15006 if inbound else None,
        app_port=draw(st.integers(1, 65535)) if inbound else None,
        zone=draw(st.sampled_from(["", "zone-a"])),
        capture=draw(st.booleans()),  # a captured sidecar: chains by address, port 15006
    )
    return mesh, proxy


def _route_to_another_service(
    draw: st.DrawFn, services: list[dict[str, Any]], service: dict[str, Any]
) -> None:
    """A twin of ``service`` (same ports, its own endpoints) that ``service`` splits,
    matches or falls back to: the cross-service forms, redirect included."""
    twin = {key: value for key, value in service.items() if key in ("namespace", "port",
                                                                   "protocol", "ports")}
    twin["name"] = "twin-" + service["name"][:50]
    named = [p["name"] for p in service["ports"]] if "ports" in service else None
    twin["endpoints"] = draw(st.lists(endpoints(named, False), max_size=2))
    if any(t["name"] == twin["name"] for t in services):
        return
    services.append(twin)
    policy = service["policy"]
    http = [p["protocol"] for p in service.get("ports", [service])]
    form = draw(st.sampled_from(["split", "match", "fallback"]))
    if form == "split":
        policy["split"] = [*policy.get("split", []),
                           {"service": twin["name"], "weight": draw(st.integers(1, 100))}]
    elif form == "match":
        policy["match"] = [{"headers": {"x-twin": draw(header_value)}, "service": twin["name"]}]
    elif any(protocol in ("http", "grpc") for protocol in http):
        policy["fallback"] = {"service": f"{twin['name']}.{twin['namespace']}",
                              "status": draw(st.integers(200, 599))}


def _translations(cases: list[tuple[dict[str, Any], ProxyIdentity]]) -> list[Resources]:
    return [translate(load_mesh_data(mesh), proxy) for mesh, proxy in cases]


@bounded(12, shrink=False)
@given(st.lists(meshes(), min_size=8, max_size=8))
def test_every_mesh_the_model_accepts_a_real_envoy_accepts(
    cases: list[tuple[dict[str, Any], ProxyIdentity]],
) -> None:
    translations = _translations(cases)
    refused = rejected(translations)
    assert not refused, [(cases[i][0], error) for i, error in refused.items()]


# --- the loader: any input in, a Mesh or a MeshError out ----------------------------------


def _load_or_error(data: bytes) -> Mesh | None:
    try:
        return load_mesh_bytes(data)
    except MeshError:
        return None


@bounded(300)
@given(st.binary(max_size=400))
def test_any_bytes_give_a_mesh_or_a_mesh_error(data: bytes) -> None:
    _load_or_error(data)
    _load_or_error(b"services:\n  - " + data)


@bounded(300)
@given(st.text(max_size=300))
def test_any_text_gives_a_mesh_or_a_mesh_error(text: str) -> None:
    with contextlib.suppress(MeshError):
        load_mesh_text(text)


_scalars = st.one_of(
    st.none(), st.booleans(), st.integers(), st.sampled_from([2**32, 2**64, -1, 0, 10**30]),
    st.floats(), st.text(max_size=20), st.sampled_from(["", "\n", "a\r\nb", "8760h", "1e30"]),
)
_values = st.recursive(_scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=8), inner, max_size=3)),
    max_leaves=10)


def mangle(draw: st.DrawFn, mesh: dict[str, Any]) -> dict[str, Any]:
    """A copy of ``mesh`` with one value, anywhere in it, replaced by anything at all."""
    mesh = copy.deepcopy(mesh)
    node: Any = mesh
    while True:
        keys = list(node) if isinstance(node, dict) else list(range(len(node)))
        if not keys:
            break
        key = draw(st.sampled_from(keys))
        child = node[key]
        if isinstance(child, dict | list) and child and draw(st.integers(0, 3)) > 0:
            node = child
            continue
        node[key] = draw(_values)
        break
    return mesh


@st.composite
def mutated(draw: st.DrawFn) -> tuple[dict[str, Any], ProxyIdentity]:
    """A valid mesh with one value, anywhere in it, replaced by anything at all."""
    mesh, proxy = draw(meshes())
    return mangle(draw, mesh), proxy


@bounded(12, shrink=False)
@given(st.lists(mutated(), min_size=10, max_size=10))
def test_a_mangled_mesh_is_refused_cleanly_or_accepted_by_envoy(
    cases: list[tuple[dict[str, Any], ProxyIdentity]],
) -> None:
    """Through YAML, as a user would write it: a clean error, or a mesh Envoy accepts."""
    accepted: list[tuple[dict[str, Any], Resources]] = []
    for mesh, proxy in cases:
        try:
            text = yaml.safe_dump(mesh, allow_unicode=True)
        except yaml.YAMLError:
            continue
        try:
            loaded = load_mesh_text(text)
        except MeshError:
            continue
        accepted.append((mesh, translate(loaded, proxy)))
    refused = rejected([resources for _, resources in accepted])
    assert not refused, [(accepted[i][0], error) for i, error in refused.items()]


# --- the incremental loader: the same answer as a full load, always -----------------------


def _outcome(load: Callable[[], Mesh]) -> Mesh | list[str]:
    try:
        return load()
    except MeshError as error:
        return error.problems


@st.composite
def edits(draw: st.DrawFn) -> list[str]:
    """A mesh file, then the same file with one value changed (to anything), in block or
    flow style: what the incremental loader sees from an editor."""
    mesh, _ = draw(meshes())
    style: dict[str, Any] = draw(st.sampled_from([
        {"default_flow_style": None}, {"default_flow_style": False, "indent": 2},
        {"default_flow_style": False, "indent": 4}]))
    texts = []
    for version in (mesh, mangle(draw, mesh), mangle(draw, mesh)):
        try:
            texts.append(yaml.safe_dump(version, allow_unicode=True, **style))
        except yaml.YAMLError:
            continue
    return texts


@bounded(60)
@given(edits())
def test_the_incremental_loader_answers_as_a_full_load(texts: list[str]) -> None:
    """Each answer, mesh or problems, is the full load's, however the file changed."""
    loader = MeshLoader()
    for text in texts:
        incremental = _outcome(functools.partial(loader.load, text.encode()))
        assert incremental == _outcome(functools.partial(load_mesh_text, text))


@bounded(300)
@given(st.text(max_size=300))
def test_the_incremental_loader_survives_any_text(text: str) -> None:
    loader = MeshLoader()
    body = "services:\n" + text
    assert _outcome(functools.partial(loader.load, body.encode())) == _outcome(
        functools.partial(load_mesh_text, body))


def test_the_incremental_loader_follows_anchors_shared_between_services() -> None:
    """yaml.safe_dump writes an object used twice as an anchor and an alias, which no
    single service's text can resolve: the full load answers."""
    backoff = {"base_interval": "10ms", "max_interval": "50ms"}
    text = yaml.safe_dump({"services": [
        {"name": "a", "port": 80, "policy": {"retries": {"backoff": backoff}}},
        {"name": "b", "port": 80, "policy": {"retries": {"backoff": backoff}}}]})
    assert "*id001" in text
    loader = MeshLoader()
    assert loader.load(text.encode()) == load_mesh_text(text)
    assert loader.parsed == -1
