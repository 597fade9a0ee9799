"""The mesh's telemetry block (levels, precedence, bounds) and what the translator and
the bootstrap make of it, without Envoy (test_telemetry_e2e.py runs the real thing)."""

from __future__ import annotations

import re

import pytest

from controlplane import resource
from controlplane.bootstrap import BootstrapOptions, build_bootstrap
from controlplane.bootstrap_stats import TAGS
from controlplane.errors import MeshError
from controlplane.mesh import load_mesh_text
from controlplane.mesh.telemetry import effective
from controlplane.proxy import ProxyIdentity
from controlplane.translator import translate
from controlplane.translator.telemetry import HTTP_KEYS, observed
from controlplane.translator.telemetry.access_log import log_format

MESH = """
telemetry:
  tracing: {address: "otel.observability:4317", sampling: 5}
  namespaces:
    shop: {access_log: {enabled: false}}
    quiet: {tracing: {enabled: false}}
services:
  - {name: reviews, namespace: shop, port: 9080}
  - name: ratings
    namespace: shop
    port: 9080
    telemetry: {access_log: {enabled: true}, tracing: {address: "10.0.0.9:4317"}}
  - {name: api, namespace: quiet, port: 80}
  - {name: web, port: 80}
"""


def test_each_field_takes_the_most_specific_level_that_sets_it() -> None:
    mesh = load_mesh_text(MESH)
    reviews, ratings, api, web = mesh.services
    assert effective(mesh, reviews).access_log is False  # its namespace's
    assert effective(mesh, reviews).tracing is mesh.telemetry.tracing  # the mesh's
    found = effective(mesh, ratings)  # its own, both fields
    assert found.access_log is True and found.tracing is not None
    assert (found.tracing.address, found.tracing.sampling) == ("10.0.0.9:4317", 100.0)
    assert effective(mesh, api).tracing is None  # turned off for its namespace
    assert effective(mesh, web) == (True, mesh.telemetry.tracing)
    # A sidecar the mesh does not know gets its namespace's (and the mesh's).
    assert effective(mesh, None, "shop").access_log is False
    # Defaults: access log on, tracing off.
    assert tuple(effective(load_mesh_text("services: []"), None, "x")) == (True, None)


@pytest.mark.parametrize(("block", "message"), [
    ("{tracing: {address: nohost}}", "telemetry.tracing.address: address 'nohost' must be "
                                     "HOST:PORT of an OpenTelemetry collector"),
    ("{tracing: {address: 'a.b:99999'}}", "telemetry.tracing.address"),
    ("{tracing: {address: 'a.b:4317', sampling: 101}}", "telemetry.tracing.sampling"),
    ("{tracing: {sampling: 5}}", "address: Field required (HOST:PORT of the OpenTelemetry "
                                 "collector), or enabled: false"),
    ("{namespaces: {Bad: {}}}", "namespace 'Bad' must be a DNS label"),
    ("{access_log: {enabled: maybe}}", "telemetry.access_log.enabled"),
    ("{logs: {}}", "telemetry.logs: unknown field"),
    (f"{{tracing: {{address: '{'a' * 300}:4317'}}}}", "longer than 260 characters"),
])
def test_bad_blocks_are_refused_by_path(block: str, message: str) -> None:
    with pytest.raises(MeshError) as caught:
        load_mesh_text(f"telemetry: {block}\nservices: []")
    assert message in str(caught.value)


def test_collector_addresses_may_be_names_or_ips() -> None:
    for address in ("otel:4317", "10.0.0.9:4317", "[fd00::9]:4317"):
        mesh = load_mesh_text(f"telemetry: {{tracing: {{address: '{address}'}}}}\n"
                              "services: []")
        assert mesh.telemetry.tracing is not None
    with pytest.raises(MeshError):
        load_mesh_text("telemetry: {tracing: {address: 'fd00::9:4317'}}\nservices: []")


def test_equal_meshes_need_equal_telemetry() -> None:
    assert load_mesh_text(MESH) == load_mesh_text(MESH)
    assert load_mesh_text(MESH) != load_mesh_text(MESH.replace("sampling: 5", "sampling: 6"))


def test_the_access_log_keys_are_the_documented_ones() -> None:
    assert list(log_format("outbound", http=True)) == list(HTTP_KEYS)
    tcp = log_format("inbound", http=False)
    assert set(tcp) == set(HTTP_KEYS) - {"method", "authority", "path", "protocol",
                                         "status", "request_id", "traceparent"}
    assert tcp["direction"] == "inbound" and tcp["source_service"] == "-"


def test_the_collector_cluster_comes_with_tracing_only() -> None:
    mesh = load_mesh_text(MESH)
    for service, collector in (("reviews", "opentelemetry|otel.observability:4317"),
                               ("ratings", "opentelemetry|10.0.0.9:4317")):
        proxy = ProxyIdentity(node_id=f"{service}-1", service=service, namespace="shop")
        clusters = {c.name for c in translate(mesh, proxy)[resource.CLUSTER]}
        assert collector in clusters
        assert observed(mesh, mesh.service(service, "shop"), proxy).service == \
            f"{service}.shop"
    proxy = ProxyIdentity(node_id="api-1", service="api", namespace="quiet")
    assert not any(c.name.startswith("opentelemetry|")
                   for c in translate(mesh, proxy)[resource.CLUSTER])
    # Without tracing the context names no service: captured listeners stay shared.
    assert observed(mesh, mesh.service("api", "quiet"), proxy).service == ""


def test_bootstrap_labels_metrics_by_source_and_destination() -> None:
    boot = build_bootstrap(BootstrapOptions(node_id="a-1", service="reviews",
                                            namespace="shop"))
    tags = boot["stats_config"]["stats_tags"]
    assert tags[:2] == [{"tag_name": "source_service", "fixed_value": "reviews"},
                        {"tag_name": "source_namespace", "fixed_value": "shop"}]
    # Envoy's fast default tags, with only the cluster name's replaced by ours.
    assert boot["stats_config"]["use_all_default_tags"] is True
    assert boot["stats_config"]["allow_default_tag_overrides"] is True
    assert boot["deferred_stat_options"] == {"enable_deferred_creation_stats": True}
    regexes = dict(TAGS)
    name = "cluster.outbound|9080|v1|ratings.prod.svc.cluster.local.upstream_rq_total"
    for tag, value in (("destination_service", "ratings"),
                       ("destination_namespace", "prod"),
                       ("envoy.cluster_name",
                        "outbound|9080|v1|ratings.prod.svc.cluster.local")):
        found = re.search(regexes[tag], name)
        assert found is not None and found.group(2) == value, tag
    assert re.search(regexes["envoy.cluster_name"],
                     "cluster.xds_cluster.upstream_rq_total").group(2) == "xds_cluster"
    assert re.search(regexes["destination_service"],
                     "cluster.inbound|9080||reviews.shop.svc.cluster.local.x") is None
