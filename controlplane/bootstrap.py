"""The Envoy bootstrap that points a sidecar at this control plane.

Pure functions: options in, a plain dict (or YAML text) out, no I/O. The result is a
complete bootstrap, so ``envoy -c FILE`` needs nothing else: the node identity that
:mod:`controlplane.proxy` reads back, the admin listener, ADS for clusters and
listeners (routes, endpoints and secrets follow over the same stream), and the one
static cluster that reaches the xDS server over HTTP/2 (or, with the control plane's
trust bundle, TLS and a token file: :mod:`controlplane.bootstrap_xds`).

A captured sidecar (``capture``: iptables sends the pod's traffic to it) also gets two
static listeners in front of the loopback-only admin: Prometheus stats and a readiness
check, the only admin paths a scraper or the kubelet may reach from outside the pod.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass
from typing import Any

import yaml

from controlplane.bootstrap_checks import check
from controlplane.bootstrap_stats import stats_config
from controlplane.bootstrap_xds import (
    ads_grpc_service,
    is_ip,
    socket_address,
    xds_cluster,
)

ADMIN_CLUSTER = "admin_local"
"""Static cluster of Envoy's own admin, behind the stats and health listeners."""

CAPTURE_EGRESS_PORT = 15001
CAPTURE_INBOUND_PORT = 15006
CAPTURE_STATS_PORT = 15090
CAPTURE_HEALTH_PORT = 15021
CAPTURE_ADMIN_PORT = 15000
HEALTH_PATH = "/healthz/ready"
STATS_PATH = "/stats/prometheus"

_LABEL = r"[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?"
_HOSTNAME = re.compile(rf"(?=.{{1,253}}$){_LABEL}(?:\.{_LABEL})*\.?")


@dataclass(frozen=True)
class BootstrapOptions:
    """What ``controlplane bootstrap`` takes; field names follow its flags."""

    node_id: str
    """Envoy ``node.id``: unique per proxy."""
    service: str
    """Envoy ``node.cluster``: the service this sidecar belongs to."""
    namespace: str = "default"
    """The service's namespace, sent as ``node.metadata.namespace``."""
    xds_address: str = "127.0.0.1:18000"
    """HOST:PORT of the xDS server ([v6]:PORT for an IPv6 address)."""
    admin_port: int = 9901
    """Envoy's admin port (0 lets Envoy pick one)."""
    admin_address: str = "127.0.0.1"
    """Envoy's admin address; loopback by default, since the admin API is unauthenticated."""
    egress_port: int = 15001
    """Port of the egress HTTP listener the app sends its outbound calls to."""
    inbound_port: int | None = None
    """Port of the inbound listener in front of the app (with ``app_port``)."""
    app_port: int | None = None
    """Port the app itself listens on, on 127.0.0.1 (with ``inbound_port``)."""
    inbound_address: str = "0.0.0.0"
    """Address the inbound listener binds."""
    delta: bool = False
    """Incremental (delta) xDS instead of state-of-the-world."""
    zone: str | None = None
    """The proxy's zone (``node.locality.zone``): endpoints in it are preferred."""
    on_demand: bool = False
    """Start with only the sidecar's own config; fetch a service's routes and clusters
    the first time the app calls it (``node.metadata.on_demand``). Implies ``delta``:
    VHDS and on-demand CDS exist only in delta xDS."""
    capture: bool = False
    """The pod's traffic is captured by iptables (``controlplane capture``): the egress
    and inbound listeners take any destination (15001 and 15006 by default) and there is
    no ``app_port`` (``node.metadata.capture``)."""
    stats_port: int | None = None
    """A listener on 0.0.0.0 serving the admin's ``/stats/prometheus`` (and nothing else)."""
    health_port: int | None = None
    """A listener on 0.0.0.0 answering ``/healthz/ready`` from the admin's ``/ready``."""
    service_account: str | None = None
    """The pod's ServiceAccount (``node.metadata.service_account``), for identity."""
    instance_ip: str | None = None
    """The pod's IP (``node.metadata.instance_ip``); injection passes ``$(INSTANCE_IP)``."""
    xds_ca: str | None = None
    """The control plane's trust bundle (PEM): xDS over TLS, the bundle inline."""
    xds_ca_file: str | None = None
    """Where ``xds_ca`` was read from; only shown in the header comment."""
    token_file: str | None = None
    """Absolute path of the proxy's token, sent as ``authorization: Bearer`` and read
    again for every new xDS stream (needs ``xds_ca``: gRPC sends credentials over TLS
    only)."""
    gateway: str | None = None
    """An ingress gateway for the Gateway of this name in ``namespace`` (``node.metadata``
    kind gateway): it serves that Gateway's listeners, bound on ``inbound_address``; no
    egress or inbound listener of a sidecar."""

    @property
    def uses_delta(self) -> bool:
        return self.delta or self.on_demand


def parse_host_port(value: str, flag: str = "--xds-address") -> tuple[str, int]:
    """Split HOST:PORT (or [IPv6]:PORT); ValueError naming ``flag`` when malformed."""
    hint = f"{flag} must be HOST:PORT (e.g. 127.0.0.1:18000 or [::1]:18000), got {value!r}"
    if value.startswith("["):
        host, sep, port_text = value[1:].partition("]:")
        if not sep or not is_ip(host) or ipaddress.ip_address(host).version != 6:
            raise ValueError(hint)
    else:
        host, sep, port_text = value.rpartition(":")
        if not sep or not host or ":" in host:
            raise ValueError(hint)
        if not is_ip(host) and not _HOSTNAME.fullmatch(host):
            raise ValueError(f"{hint}: {host!r} is neither an IP address nor a host name")
    if not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise ValueError(f"{hint}: the port must be a number from 1 to 65535")
    return host, int(port_text)


def build_bootstrap(options: BootstrapOptions) -> dict[str, Any]:
    """The bootstrap as a plain dict (the shape of Envoy's v3 Bootstrap in YAML/JSON)."""
    check(options)
    host, port = parse_host_port(options.xds_address)
    return {
        "node": {
            "id": options.node_id,
            "cluster": options.service,
            "metadata": _metadata(options),
            **({"locality": {"zone": options.zone}} if options.zone else {}),
        },
        "admin": {
            "address": socket_address(options.admin_address, options.admin_port),
        },
        "stats_config": stats_config(options.service, options.namespace),
        "deferred_stat_options": {"enable_deferred_creation_stats": True},
        "dynamic_resources": {
            "ads_config": {
                "api_type": "DELTA_GRPC" if options.uses_delta else "GRPC",
                "transport_api_version": "V3",
                "grpc_services": [ads_grpc_service(host, port, options.xds_ca,
                                                   options.token_file)],
                # The server keeps the node of a stream's first request (stream.py).
                "set_node_on_first_message_only": True,
            },
            "cds_config": _ads_source(options),
            "lds_config": _ads_source(options),
        },
        **_static_resources(options, host, port),
    }


def capture_options(node_id: str, service: str, **fields: Any) -> BootstrapOptions:
    """Options of a captured sidecar with the well-known ports (admin 15000, stats 15090,
    health 15021, egress 15001, inbound 15006) unless ``fields`` says otherwise."""
    defaults: dict[str, Any] = {
        "admin_port": CAPTURE_ADMIN_PORT, "egress_port": CAPTURE_EGRESS_PORT,
        "inbound_port": CAPTURE_INBOUND_PORT, "stats_port": CAPTURE_STATS_PORT,
        "health_port": CAPTURE_HEALTH_PORT,
    }
    return BootstrapOptions(node_id=node_id, service=service, capture=True,
                            **{**defaults, **fields})


def render_bootstrap(options: BootstrapOptions) -> str:
    """The bootstrap as YAML, headed by a comment with the command that reproduces it."""
    body = yaml.dump(build_bootstrap(options), Dumper=_Dumper, sort_keys=False,
                     default_flow_style=False)
    return f"# Envoy bootstrap generated by: {command_line(options)}\n{body}"


class _Dumper(yaml.SafeDumper):
    """Multi-line strings (a PEM bundle) as literal blocks, readable as they are."""


def _str(dumper: yaml.SafeDumper, value: str) -> yaml.Node:
    style = "|" if "\n" in value else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_Dumper.add_representer(str, _str)


def command_line(options: BootstrapOptions) -> str:
    """The ``controlplane bootstrap`` invocation for ``options`` (defaults left out)."""
    defaults = BootstrapOptions(node_id="", service="")
    parts = ["controlplane bootstrap", f"--node-id {options.node_id}",
             f"--service {options.service}"]
    for name in ("namespace", "xds_address", "admin_port", "admin_address", "egress_port",
                 "inbound_port", "app_port", "inbound_address", "stats_port", "health_port"):
        value = getattr(options, name)
        if value is not None and value != getattr(defaults, name):
            parts.append(f"--{name.replace('_', '-')} {value}")
    if options.delta:
        parts.append("--delta")
    if options.zone:
        parts.append(f"--zone {options.zone}")
    if options.on_demand:
        parts.append("--on-demand")
    if options.service_account:
        parts.append(f"--service-account {options.service_account}")
    if options.instance_ip:
        parts.append(f"--instance-ip {options.instance_ip}")
    if options.capture:
        parts.append("--capture")
    if options.gateway is not None:
        parts.append(f"--gateway {options.gateway}")
    if options.xds_ca is not None:
        parts.append(f"--xds-ca {options.xds_ca_file or '(inline bundle)'}")
    if options.token_file:
        parts.append(f"--token-file {options.token_file}")
    return " ".join(parts)


def _metadata(options: BootstrapOptions) -> dict[str, Any]:
    """Node metadata, as :meth:`ProxyIdentity.from_node` reads it (ports as numbers)."""
    metadata: dict[str, Any] = {
        "namespace": options.namespace,
        "egress_port": options.egress_port,
    }
    if options.inbound_port is not None and options.app_port is not None:
        metadata["inbound_port"] = options.inbound_port
        metadata["app_port"] = options.app_port
        metadata["inbound_address"] = options.inbound_address
    if options.capture:
        metadata["capture"] = "true"
        metadata["inbound_port"] = options.inbound_port
    if options.on_demand:
        metadata["on_demand"] = True
    if options.service_account:
        metadata["service_account"] = options.service_account
    if options.instance_ip:
        metadata["instance_ip"] = options.instance_ip
    if options.gateway is not None:
        metadata["kind"] = "gateway"
        metadata["gateway"] = options.gateway
        metadata["inbound_address"] = options.inbound_address
    return metadata


def _ads_source(options: BootstrapOptions) -> dict[str, Any]:
    """Clusters and listeners over ADS. A captured sidecar waits for them however long it
    takes (Envoy's default gives up after 15 s and reports ready with no config): its
    readiness gates the app, whose every call the empty proxy would refuse."""
    source: dict[str, Any] = {"ads": {}, "resource_api_version": "V3"}
    if options.capture:
        source["initial_fetch_timeout"] = "0s"
    return source


def _static_resources(options: BootstrapOptions, host: str, port: int) -> dict[str, Any]:
    """``{"static_resources": ...}``, or nothing when a secured sidecar has none."""
    resources = _static(options, host, port)
    return {"static_resources": resources} if any(resources.values()) else {}


def _static(options: BootstrapOptions, host: str, port: int) -> dict[str, Any]:
    # A secured sidecar's Google gRPC client dials the server itself: no cluster.
    clusters = [] if options.xds_ca is not None else [xds_cluster(host, port)]
    listeners = []
    if options.stats_port is not None:
        listeners.append(_admin_listener("stats_prometheus", options.stats_port,
                                         STATS_PATH, STATS_PATH))
    if options.health_port is not None:
        listeners.append(_admin_listener("health_ready", options.health_port,
                                         HEALTH_PATH, "/ready"))
    if not listeners:
        return {"clusters": clusters}
    admin_host = options.admin_address
    if ipaddress.ip_address(admin_host).is_unspecified:
        admin_host = "127.0.0.1" if ipaddress.ip_address(admin_host).version == 4 else "::1"
    clusters.append({
        "name": ADMIN_CLUSTER,
        "type": "STATIC",
        "connect_timeout": "1s",
        "load_assignment": {
            "cluster_name": ADMIN_CLUSTER,
            "endpoints": [{"lb_endpoints": [{"endpoint": {
                "address": socket_address(admin_host, options.admin_port)}}]}],
        },
    })
    return {"listeners": listeners, "clusters": clusters}


def _admin_listener(name: str, port: int, path: str, admin_path: str) -> dict[str, Any]:
    """A listener exposing exactly one admin path (GET only): the admin API itself can
    change the proxy (``/quitquitquit``, ``/logging``) and so stays on loopback."""
    route: dict[str, Any] = {"cluster": ADMIN_CLUSTER, "timeout": "5s"}
    if admin_path != path:
        route["prefix_rewrite"] = admin_path
    return {
        "name": name,
        "address": socket_address("0.0.0.0", port),
        "filter_chains": [{"filters": [{
            "name": "envoy.filters.network.http_connection_manager",
            "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.filters.network"
                ".http_connection_manager.v3.HttpConnectionManager",
                "stat_prefix": name,
                "route_config": {
                    "name": name,
                    "virtual_hosts": [{
                        "name": name,
                        "domains": ["*"],
                        "routes": [{
                            "match": {"path": path, "headers": [{
                                "name": ":method",
                                "string_match": {"exact": "GET"}}]},
                            "route": route,
                        }],
                    }],
                },
                "http_filters": [{
                    "name": "envoy.filters.http.router",
                    "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters"
                                     ".http.router.v3.Router"},
                }],
            },
        }]}],
    }
