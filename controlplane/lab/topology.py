"""The lab's plan: which services and sidecars run, on which free ports.

The embedded mesh names the services and their endpoints; each endpoint becomes a demo
app behind its own sidecar (the endpoint's address is the sidecar's inbound listener).
Ports are picked free at start, and the mesh is written with them to the work directory.
"""

from __future__ import annotations

import random
import socket
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from controlplane.errors import MeshError
from controlplane.mesh.endpoints import Endpoint
from controlplane.mesh.gateways import gateway_account
from controlplane.mesh.loader import load_mesh_text, parse_mesh_yaml
from controlplane.mesh.model import Mesh
from controlplane.mesh.service import Service

CALLS = {"frontend": "reviews", "reviews": "ratings"}  # who each demo app calls downstream
LOADGEN_ACCOUNT = "loadgen"  # the traffic generator's sidecar's identity
NEEDS = ("a service `frontend` with at least one endpoint (the traffic generator calls it "
         "by Host `frontend`); every service with endpoints on a single port (each endpoint "
         "becomes a demo app behind its own sidecar). The demo apps of frontend and reviews "
         "call `reviews` and `ratings`")


class LabError(Exception):
    """An expected failure of the lab (a mesh it cannot run, a port taken): one line that
    says what to do, never a traceback."""


def check_template(text: str, origin: str) -> tuple[Mesh, list[str]]:
    """The mesh, and notes on what will not answer; LabError when the lab cannot run it."""
    try:
        mesh = load_mesh_text(text, origin=origin)
    except MeshError as exc:
        raise LabError(str(exc)) from exc
    names = {s.name: s for s in mesh.services}
    frontend = names.get("frontend")
    if frontend is None or not frontend.endpoints:
        what = "has no service `frontend`" if frontend is None else "`frontend` has no endpoint"
        raise LabError(f"{origin}: {what}; the lab needs {NEEDS}")
    for service in mesh.services:
        if any(e.port is None for e in service.endpoints):
            raise LabError(f"{origin}: {service.key} has several ports; the lab needs {NEEDS}")
    notes = [f"{caller}'s demo app calls `{callee}`, which this mesh lacks: {caller} will "
             f"answer 502" for caller, callee in CALLS.items()
             if caller in names and callee not in names]
    return mesh, notes


def _ephemeral_low() -> int:
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range", encoding="ascii") as handle:
            return int(handle.read().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768  # Linux's default


def _bindable(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


_HANDED: deque[int] = deque(maxlen=2048)  # ports this process handed out, newest last


def free_port(preferred: int = 0, shard: tuple[int, int] = (0, 1)) -> int:
    """``preferred`` when it is free on 127.0.0.1 (so the lab matches the compose file's
    ports), else a free port for a process to bind later.

    Picked at random below the kernel's ephemeral range (from 20000 up): every bind to
    port 0 on this machine draws from that range, so a port picked there could be taken
    by anyone before its process binds it; below it, only another picker can. A port
    this process handed out lately is not handed out again (two picks before either is
    bound would otherwise collide one time in a few thousand), and ``shard`` (index,
    count) keeps to one slice of the range, so parallel pickers (test workers) never
    meet."""
    if preferred and _bindable(preferred):
        return preferred
    low = _ephemeral_low()
    if low > 21000:
        index, count = shard
        width = (low - 20000) // max(count, 1)
        start = 20000 + width * (index % max(count, 1))
        for _ in range(64):
            port = random.randrange(start, start + width)
            if port not in _HANDED and _bindable(port):
                _HANDED.append(port)
                return port
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass(frozen=True)
class Instance:
    """One demo app and its sidecar."""

    service: str
    version: str
    node_id: str
    app_port: int
    inbound_port: int
    egress_port: int
    admin_port: int
    address: str = "127.0.0.1"
    """Where its app and sidecar admin are: loopback, or its pod's address (captured)."""
    service_account: str = ""
    """The identity its sidecar runs as (the mesh file's, else the service's name)."""


@dataclass(frozen=True)
class LabGateway:
    """The ingress gateway: a real Envoy on loopback serving the mesh's first Gateway."""

    name: str
    namespace: str
    port: int  # its first HTTP listener's port: the demo from outside
    instance: Instance  # the proxy (its admin and spare egress port; no app)


@dataclass(frozen=True)
class Plan:
    mesh_path: Path
    instances: tuple[Instance, ...]
    loadgen: Instance  # the traffic generator's sidecar (no app, no inbound)
    xds_port: int
    admin_port: int
    virtual_ips: dict[str, str] = field(default_factory=dict)
    """Captured: each service's virtual IP (its first cluster IP), by name."""
    service_ports: dict[str, int] = field(default_factory=dict)
    """Each service's port, by name: where callers connect (captured: by name)."""
    gateway: LabGateway | None = None
    """The ingress gateway, when the mesh has a Gateway with an HTTP listener."""


def plan_gateway(data: dict[str, Any], pick: Callable[[int], int]) -> LabGateway | None:
    """The first Gateway's listeners on ports of this machine (``pick``: the file's own
    where free), written into the lab's copy of the mesh; None without an HTTP one."""
    gateways = data.get("gateways") or []
    if not gateways:
        return None
    gateway = gateways[0]
    http: int | None = None
    for listener in gateway.get("listeners") or []:
        listener["port"] = pick(int(listener["port"]))
        if http is None and listener.get("protocol") == "HTTP":
            http = listener["port"]
    if http is None:
        return None
    name = str(gateway["name"])
    instance = Instance(service=name, version="v1", node_id=f"{name}-gateway", app_port=0,
                        inbound_port=0, egress_port=free_port(), admin_port=free_port(),
                        # the identity its Gateway's certificates are given to
                        service_account=gateway_account(
                            name, str(gateway.get("gatewayClassName") or "controlplane")))
    return LabGateway(name, str(gateway.get("namespace") or "default"), http, instance)


def embedded_mesh_text() -> str:
    return resources.files("controlplane").joinpath("data/lab-mesh.yaml").read_text("utf-8")


def plan(workdir: Path, template: str | None = None, prefer: bool = True) -> Plan:
    """Give every endpoint of the template free ports and write the mesh to ``workdir``.
    ``prefer``: the mesh file's own ports where free (as the compose lab uses them)."""
    def pick(port: int) -> int:
        return free_port(port if prefer else 0)

    text = template if template is not None else embedded_mesh_text()
    mesh, _ = check_template(text, "lab mesh")
    data = parse_mesh_yaml(text)
    instances: list[Instance] = []
    for service, raw in zip(mesh.services, data["services"], strict=True):
        for index, endpoint in enumerate(service.endpoints):
            version = endpoint.labels.get("version", f"v{index + 1}")
            assert endpoint.port is not None  # check_template refused several ports
            inbound = pick(endpoint.port)
            raw["endpoints"][index]["port"] = inbound
            raw["endpoints"][index]["address"] = "127.0.0.1"
            instances.append(Instance(
                service=service.name, version=version,
                node_id=f"{service.name}-{version}", app_port=pick(endpoint.port + 1),
                inbound_port=inbound, egress_port=free_port(), admin_port=free_port(),
                service_account=_account(service, endpoint, raw)))
    gateway = plan_gateway(data, pick)
    mesh_path = _write(workdir, data)
    loadgen = Instance("loadgen", "v1", "loadgen", 0, 0, free_port(), free_port(),
                       service_account=LOADGEN_ACCOUNT)
    return Plan(mesh_path, tuple(instances), loadgen, pick(18000), pick(19000),
                gateway=gateway)


VIRTUAL_NETWORK = "10.96.0"  # where the lab gives a virtual IP to a service without one
CAPTURE_PORTS = {"egress": 15001, "inbound": 15006, "admin": 15000}


def plan_captured(workdir: Path, address: Callable[[int], str], template: str | None = None,
                  prefer: bool = True) -> Plan:
    """The captured lab: each endpoint's app in a pod of its own at ``address(i)``
    (the traffic generator's pod last), on the endpoint's own port, behind a sidecar on
    the well-known capture ports; each service with a virtual IP (its ``cluster_ips``,
    or one the lab gives it in its copy of the mesh)."""
    text = template if template is not None else embedded_mesh_text()
    mesh, _ = check_template(text, "lab mesh")
    data = parse_mesh_yaml(text)
    taken = {ip for s in mesh.services for ip in s.cluster_ips or ()}
    spare = (f"{VIRTUAL_NETWORK}.{n}" for n in range(10, 255)
             if f"{VIRTUAL_NETWORK}.{n}" not in taken)
    virtual_ips: dict[str, str] = {}
    instances: list[Instance] = []
    for service, raw in zip(mesh.services, data["services"], strict=True):
        if not service.cluster_ips and service.external_name is None:
            raw["cluster_ips"] = [next(spare)]
        if raw.get("cluster_ips"):
            virtual_ips[service.name] = str(raw["cluster_ips"][0])
        for index, endpoint in enumerate(service.endpoints):
            version = endpoint.labels.get("version", f"v{index + 1}")
            assert endpoint.port is not None  # check_template refused several ports
            at = address(len(instances))
            raw["endpoints"][index]["address"] = at
            instances.append(Instance(
                service=service.name, version=version, node_id=f"{service.name}-{version}",
                app_port=endpoint.port, inbound_port=CAPTURE_PORTS["inbound"],
                egress_port=CAPTURE_PORTS["egress"], admin_port=CAPTURE_PORTS["admin"],
                address=at, service_account=_account(service, endpoint, raw)))
    gateway = plan_gateway(data, lambda port: free_port(port if prefer else 0))
    mesh_path = _write(workdir, data)
    loadgen = Instance("loadgen", "v1", "loadgen", 0, 0, CAPTURE_PORTS["egress"],
                       CAPTURE_PORTS["admin"], address(len(instances)),
                       service_account=LOADGEN_ACCOUNT)
    ports = {s.name: s.service_ports[0].port for s in mesh.services if s.service_ports}
    return Plan(mesh_path, tuple(instances), loadgen,
                free_port(18000 if prefer else 0), free_port(19000 if prefer else 0),
                virtual_ips, ports, gateway)


def _account(service: Service, endpoint: Endpoint, raw: dict[str, Any]) -> str:
    """The service account an endpoint's sidecar runs as: the endpoint's, else its
    service's first; else the service's name, written into the lab's copy of the mesh
    (``service_accounts``) so callers verify it and use mTLS to it."""
    if endpoint.service_account:
        return endpoint.service_account
    if service.service_accounts:
        return str(service.service_accounts[0])
    raw["service_accounts"] = [service.name]
    return service.name


def _write(workdir: Path, data: dict[str, Any]) -> Path:
    mesh_path = workdir / "mesh.yaml"
    header = "# The lab's live mesh: edit and save, the sidecars follow within a second.\n"
    mesh_path.write_text(header + yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
    return mesh_path
