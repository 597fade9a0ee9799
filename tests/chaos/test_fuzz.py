"""Fuzzers over the two doors input comes in by: the mesh loader (any bytes, any YAML,
any value where a mesh field goes) and the Kubernetes converter (any JSON shaped like a
Service, EndpointSlice or TrafficPolicy). Each input gives a result or the project's own
error, never another exception; a loaded mesh translates or is rejected with a
TranslationError, never a crash."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from controlplane.errors import MeshError, TranslationError
from controlplane.mesh.incremental import MeshLoader
from controlplane.mesh.loader import load_mesh_data, load_mesh_file, load_mesh_text
from controlplane.mesh.model import Mesh
from controlplane.pipeline import check_mesh
from controlplane.sources.kubernetes.convert import Conversion, convert
from controlplane.sources.kubernetes.kinds import SERVICE_NAME_LABEL

pytestmark = pytest.mark.timeout(240)

FUZZ = settings(max_examples=150, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                       HealthCheck.function_scoped_fixture])

JUNK: st.SearchStrategy[Any] = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(
        st.text(max_size=8), inner, max_size=3),
    max_leaves=8)


def maybe(strategy: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """Mostly a plausible value, sometimes anything at all (junk in one field of a few
    keeps most examples valid enough to reach the translator)."""
    return st.tuples(st.sampled_from([False] * 15 + [True]), strategy, JUNK).map(
        lambda drawn: drawn[2] if drawn[0] else drawn[1])


def shaped(required: dict[str, Any], optional: dict[str, Any]) -> st.SearchStrategy[Any]:
    return st.fixed_dictionaries({k: maybe(v) for k, v in required.items()},
                                 optional={k: maybe(v) for k, v in optional.items()})


DURATION = st.one_of(
    st.sampled_from(["1s", "500ms", "2m", "1h", "250ms", "10s"]),
    st.sampled_from(["0s", "-1s", "1.5s", ".inf", "9999999999999h", "100000000h", "1e3s",
                     "", "10"]) | st.integers())
BIG_INT = st.one_of(st.integers(1, 100), st.integers(1, 65535),
                    st.integers(-1, 2**64) | st.sampled_from([0, 2**32 - 1, 2**32,
                                                             99999999999]))
NAME = st.one_of(st.sampled_from(["reviews", "ratings", "details", "a"]),
                 st.from_regex(r"[a-z][a-z0-9-]{0,8}[a-z0-9]", fullmatch=True),
                 st.sampled_from(["Bad_Name", "x" * 70, "", "a.b"]) | st.text(max_size=10))
HEADER = st.sampled_from(["x-user", "x-canary", "text/plain"]) | \
    st.sampled_from(["x-user\nx-evil", "text/plain\r\nx: 1", "", "é", "x" * 9000])
ADDRESS = st.one_of(st.sampled_from(["127.0.0.1", "10.0.0.1", "::1"]),
                    st.sampled_from(["10.1.2.3", "192.168.0.9"]),
                    st.sampled_from(["not-an-ip", "256.1.1.1", "localhost", "example.com",
                                     "", "1.2.3.4.5"]))
LABELS = st.dictionaries(NAME, NAME, max_size=2)

ENDPOINT = shaped({"address": ADDRESS, "port": st.integers(1, 65535) | BIG_INT},
                  {"zone": NAME, "labels": LABELS, "ready": st.booleans(),
                   "address_type": st.sampled_from(["ip"] * 6 + ["dns", "other"])})
SECTIONS: dict[str, Any] = {
    "timeout": DURATION,
    "retries": shaped({}, {"attempts": BIG_INT, "per_try_timeout": DURATION,
                           "on": st.lists(st.sampled_from(["5xx", "reset", "connect-failure",
                                                           "retriable-4xx", "bogus"]),
                                          max_size=3),
                           "backoff": shaped({"base_interval": DURATION},
                                             {"max_interval": DURATION})}),
    "circuit_breaker": shaped({}, {"max_connections": BIG_INT, "max_requests": BIG_INT}),
    "outlier_detection": shaped({}, {"consecutive_5xx": BIG_INT, "interval": DURATION,
                                     "base_ejection_time": DURATION}),
    "load_balancer": shaped({"policy": st.sampled_from(
        ["round_robin", "least_request", "random", "ring_hash", "maglev", "bogus"])},
        {"hash": shaped({}, {"header": HEADER, "cookie": NAME, "source_ip": st.booleans()})}),
    "split": st.lists(shaped({"weight": BIG_INT}, {"labels": LABELS, "service": NAME}),
                      max_size=3),
    "match": st.lists(shaped({}, {"headers": st.dictionaries(HEADER, HEADER, max_size=2),
                                  "path": shaped({}, {"prefix": NAME, "exact": NAME}),
                                  "service": NAME}), max_size=2),
    "fault": shaped({}, {"delay": shaped({"percent": BIG_INT, "duration": DURATION}, {}),
                         "abort": shaped({"percent": BIG_INT, "status": BIG_INT}, {})}),
    "rate_limit": shaped({"requests_per_second": st.floats() | BIG_INT |
                          st.sampled_from([12345.677, 1e30, 0.001])}, {"burst": BIG_INT}),
    "fallback": shaped({}, {"status": BIG_INT, "body": NAME, "content_type": HEADER,
                            "service": NAME}),
}
# One section at a time (each reaches the translator often), or several at once.
POLICY = st.one_of(*[shaped({}, {name: section}) for name, section in SECTIONS.items()],
                   shaped({}, SECTIONS))
PORT = st.one_of(st.integers(1, 65535), st.integers(1, 65535), BIG_INT)
SERVICE = st.one_of(*[shaped(
    {"name": NAME, "port": PORT, "policy": POLICY},
    {"namespace": NAME, "protocol": st.sampled_from(["http"] * 4 + ["grpc", "tcp", "x"]),
     "endpoints": st.lists(ENDPOINT, max_size=3)})] * 4,
    shaped({"name": NAME, "port": PORT},
           {"external_name": ADDRESS, "endpoints": st.lists(ENDPOINT, max_size=1)}))
MESH = shaped({"services": st.lists(SERVICE, max_size=3)}, {})


def _translate(mesh: Mesh) -> None:
    with contextlib.suppress(TranslationError):
        check_mesh(mesh)


@FUZZ
@given(MESH)
def test_any_mesh_shaped_data_loads_or_is_a_mesh_error(data: dict[str, Any]) -> None:
    try:
        mesh = load_mesh_data(data)
    except MeshError as exc:
        assert exc.problems and all(isinstance(p, str) and p for p in exc.problems)
        return
    _translate(mesh)


@FUZZ
@given(MESH)
def test_any_mesh_shaped_yaml_loads_or_is_a_mesh_error(data: dict[str, Any]) -> None:
    try:
        text = yaml.safe_dump(data, allow_unicode=True)
    except yaml.YAMLError:
        return
    try:
        mesh = load_mesh_text(text)
    except MeshError:
        return
    _translate(mesh)


@FUZZ
@given(st.text(max_size=300) | st.sampled_from(["[" * 5000, "{a: " * 3000, "&a [*a]",
                                                 "services: !!python/object:os.system x",
                                                 "a: &x 1\na: *x", "services: [\t]"]))
def test_any_text_loads_or_is_a_mesh_error(text: str) -> None:
    with contextlib.suppress(MeshError):
        load_mesh_text(text)


@FUZZ
@given(st.binary(max_size=300) | st.sampled_from([b"services: [{name: rev\xffiews}]\n",
                                                  b"\xef\xbb\xbfservices: []\n",
                                                  b"\xff\xfe\x00s", b"\x00" * 100]))
def test_any_file_bytes_load_or_are_a_mesh_error(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "mesh.yaml"
    path.write_bytes(content)
    with contextlib.suppress(MeshError):
        load_mesh_file(path)


@st.composite
def edited_files(draw: st.DrawFn) -> bytes:
    """A mesh file as a person edits it: dumped from mesh-shaped data, then maybe a line
    repeated (a duplicate key), dropped, cut short or given a stray byte."""
    try:
        text = yaml.safe_dump(draw(MESH), allow_unicode=True)
    except yaml.YAMLError:
        text = "services: []\n"
    lines = text.splitlines(keepends=True)
    edit = draw(st.sampled_from(["none", "repeat", "drop", "cut", "byte"]))
    at = draw(st.integers(0, max(0, len(lines) - 1)))
    if edit == "repeat" and lines:
        lines.insert(at, lines[at])
    elif edit == "drop" and lines:
        del lines[at]
    data = "".join(lines).encode()
    if edit == "cut":
        data = data[:draw(st.integers(0, len(data)))]
    elif edit == "byte":
        where = draw(st.integers(0, len(data)))
        data = data[:where] + draw(st.binary(min_size=1, max_size=2)) + data[where:]
    return data


@FUZZ
@given(st.lists(edited_files(), min_size=1, max_size=4))
def test_the_file_sources_incremental_loader_gives_a_mesh_or_a_mesh_error(
        saves: list[bytes]) -> None:
    """The loader the file source keeps between saves: each save of an edited file loads
    or is a MeshError, whatever the saves before it were."""
    loader = MeshLoader()
    for data in saves:
        try:
            mesh = loader.load(data, origin="fuzz.yaml")
        except MeshError:
            continue
        _translate(mesh)


OBJ_META = shaped({"name": NAME, "namespace": NAME},
                  {"labels": st.dictionaries(st.sampled_from([SERVICE_NAME_LABEL, "app"]),
                                             NAME, max_size=2),
                   "generation": BIG_INT, "creationTimestamp": NAME, "uid": NAME})
K8S_SERVICE = shaped({"metadata": OBJ_META, "spec": shaped({}, {
    "ports": st.lists(shaped({"port": BIG_INT}, {
        "name": NAME, "targetPort": BIG_INT | NAME, "appProtocol": NAME,
        "protocol": st.sampled_from(["TCP", "UDP", "SCTP", "x"])}), max_size=3),
    "type": st.sampled_from(["ClusterIP", "ExternalName", "NodePort", "x"]),
    "externalName": ADDRESS, "clusterIP": ADDRESS})}, {})
K8S_SLICE = shaped({"metadata": OBJ_META, "endpoints": st.lists(shaped(
    {"addresses": st.lists(ADDRESS, max_size=2)},
    {"conditions": shaped({}, {"ready": st.booleans() | st.none(),
                               "serving": st.booleans(), "terminating": st.booleans()}),
     "zone": NAME, "targetRef": shaped({"kind": NAME, "name": NAME}, {})}), max_size=3),
    "ports": st.lists(shaped({"port": BIG_INT}, {"name": NAME}), max_size=2)},
    {"addressType": st.sampled_from(["IPv4", "IPv6", "FQDN", "x"])})
K8S_POLICY = shaped({"metadata": OBJ_META, "spec": st.one_of(
    POLICY,
    shaped({"targetRef": shaped({"kind": st.sampled_from(["Service", "Pod"]), "name": NAME},
                                {})}, {"timeout": DURATION}))}, {})


@FUZZ
@given(st.lists(K8S_SERVICE | JUNK, max_size=3), st.lists(K8S_SLICE | JUNK, max_size=3),
       st.lists(K8S_POLICY | JUNK, max_size=3))
def test_any_kubernetes_objects_convert_to_a_result(services: list[Any], slices: list[Any],
                                                   policies: list[Any]) -> None:
    result = convert(services, slices, policies)
    assert isinstance(result, Conversion)
    assert isinstance(result.mesh, Mesh)
    _translate(result.mesh)


@FUZZ
@given(st.lists(NAME, min_size=1, max_size=3), st.data())
def test_policies_aimed_at_real_services_convert_to_a_result(names: list[str],
                                                             data: st.DataObject) -> None:
    """Policies whose target exists, so their spec is really read."""
    services = [{"metadata": {"name": n, "namespace": "default"},
                 "spec": {"ports": [{"name": "http", "port": 9080}]}} for n in names]
    slices = [{"metadata": {"name": f"{n}-a", "namespace": "default",
                            "labels": {SERVICE_NAME_LABEL: n}}, "addressType": "IPv4",
               "endpoints": [{"addresses": ["10.0.0.1"], "conditions": {"ready": True}}],
               "ports": [{"name": "http", "port": 8080}]} for n in names]
    policies = []
    for i, n in enumerate(names):
        spec = data.draw(POLICY)
        if isinstance(spec, dict):
            spec["targetRef"] = {"kind": "Service", "name": n}
        policies.append({"metadata": {"name": f"p{i}", "namespace": "default",
                                      "generation": 1,
                                      "creationTimestamp": "2026-01-01T00:00:00Z"},
                         "spec": spec})
    result = convert(services, slices, policies)
    assert isinstance(result.mesh, Mesh)
    for verdict in result.verdicts.values():
        assert verdict is not None
    _translate(result.mesh)
