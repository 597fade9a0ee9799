#!/usr/bin/env python3
"""Push convergence benchmark: how fast one endpoint change reaches every ADS stream.

Runs ``controlplane serve`` as a subprocess on a generated mesh of M services, opens S
simulated Envoy ADS streams (state-of-the-world, or incremental with ``--delta``) in this
process, changes one endpoint R times, and prints as JSON, per scenario: the time until
every stream holds the new EDS version, the server's CPU seconds and peak RSS, and the
bytes the server sent and serialized per push.

    .venv/bin/python bench/xds_push.py [--streams 10,100,1000] [--services 100,1000]
        [--changes 5] [--delta] [--out bench/results/xds_push.json]

See bench/README.md for what each figure means.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
from common import (  # bench/ is on sys.path as the script's folder
    BenchError,
    Deadline,
    Profiler,
    add_output_flags,
    metric,
    parse_metrics,
    results_path,
    write_results,
)
from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.core.v3 import base_pb2
from envoy.config.endpoint.v3 import endpoint_pb2
from envoy.service.discovery.v3 import discovery_pb2
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory
from google.protobuf.message import Message

# --- constants -------------------------------------------------------------------------

_TYPES = "type.googleapis.com/"
CDS = _TYPES + "envoy.config.cluster.v3.Cluster"
EDS = _TYPES + "envoy.config.endpoint.v3.ClusterLoadAssignment"
LDS = _TYPES + "envoy.config.listener.v3.Listener"
RDS = _TYPES + "envoy.config.route.v3.RouteConfiguration"
ROUTE_NAME = "egress"
_ADS = "/envoy.service.discovery.v3.AggregatedDiscoveryService/"
SOTW_METHOD = _ADS + "StreamAggregatedResources"
DELTA_METHOD = _ADS + "DeltaAggregatedResources"

SERVICE_PORT = 9080
ENDPOINT_BASE_PORT = 20000  # service i has endpoints on 20000+2i and 20001+2i
CHANGED_PORTS = (60000, ENDPOINT_BASE_PORT)  # svc-0000's first endpoint alternates
CHANGED_CLUSTER = f"outbound|{SERVICE_PORT}||svc-0000.default.svc.cluster.local"

MAX_GROUPS = 10  # distinct service identities (so snapshot groups) among the streams
STREAMS_PER_CHANNEL = 50
QUIET_S = 0.3  # no message for this long = the server has finished pushing
GRPC_OPTIONS = [
    ("grpc.max_receive_message_length", 256 * 1024 * 1024),
    ("grpc.max_send_message_length", 256 * 1024 * 1024),
    ("grpc.use_local_subchannel_pool", 1),  # one TCP connection per channel, not shared
]


# --- the mesh file ---------------------------------------------------------------------


def mesh_yaml(services: int, changed_port: int) -> str:
    """M http services ``svc-0000``...; svc-0000's first endpoint is on ``changed_port``."""
    lines = ["services:"]
    for i in range(services):
        first = changed_port if i == 0 else ENDPOINT_BASE_PORT + 2 * i
        second = ENDPOINT_BASE_PORT + 2 * i + 1
        lines += [
            f"  - name: svc-{i:04d}",
            f"    port: {SERVICE_PORT}",
            "    protocol: http",
            "    endpoints:",
            f"      - {{address: 127.0.0.1, port: {first}}}",
            f"      - {{address: 127.0.0.1, port: {second}}}",
        ]
    return "\n".join(lines) + "\n"


def write_atomically(path: Path, text: str) -> None:
    """Write a temporary file beside ``path``, then rename it over ``path``."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


# --- the server process ----------------------------------------------------------------


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class ServerProcess:
    """``controlplane serve`` on free 127.0.0.1 ports, ended by its own PID."""

    def __init__(self, mesh: Path, workdir: Path, poll_interval: float) -> None:
        self.mesh = mesh
        self.workdir = workdir
        self.poll_interval = poll_interval
        self.xds_port = free_port()
        self.admin_port = free_port()
        self.log_path = workdir / "server.log"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def start(self) -> None:
        env = {**os.environ, "CONTROLPLANE_POLL_INTERVAL": str(self.poll_interval)}
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "controlplane", "serve",
                 "--source", f"file:{self.mesh}",
                 "--xds-address", f"127.0.0.1:{self.xds_port}",
                 "--admin-address", f"127.0.0.1:{self.admin_port}",
                 "--snapshot-keep", "0", "--log-level", "warning"],
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                cwd=self.workdir, env=env)

    def wait_ready(self, timeout: float) -> float:
        """Block until ``GET /readyz`` is 200; the seconds it took."""
        started = time.perf_counter()
        while time.perf_counter() - started < timeout:
            self.check_alive()
            with contextlib.suppress(OSError):
                if self.get("/readyz", timeout=1.0)[0] == 200:
                    return time.perf_counter() - started
            time.sleep(0.05)
        raise BenchError(f"server not ready after {timeout:.0f} s")

    def check_alive(self) -> None:
        if self.proc is not None and self.proc.poll() is not None:
            raise BenchError(f"server exited with {self.proc.returncode}: {self.log_tail()}")

    def get(self, path: str, timeout: float = 10.0) -> tuple[int, str]:
        url = f"http://127.0.0.1:{self.admin_port}{path}"
        try:
            with urllib.request.urlopen(url, timeout=timeout) as response:
                return int(response.status), response.read().decode()
        except urllib.error.HTTPError as exc:
            return int(exc.code), exc.read().decode(errors="replace")

    async def metrics(self) -> dict[str, float]:
        status, body = await asyncio.to_thread(self.get, "/metrics")
        if status != 200:
            raise BenchError(f"GET /metrics answered {status}")
        return parse_metrics(body)

    def cpu_seconds(self) -> float:
        """utime + stime of the whole process (all threads), from /proc/PID/stat."""
        stat = Path(f"/proc/{self.pid}/stat").read_text()
        fields = stat[stat.rindex(")") + 2:].split()  # fields from #3 (state) on
        ticks = int(fields[11]) + int(fields[12])  # #14 utime, #15 stime
        return ticks / os.sysconf("SC_CLK_TCK")

    async def idle(self, timeout: float, window: float = 0.25, busy: float = 0.1) -> None:
        """Wait until the server uses less than ``busy`` of a CPU over ``window`` seconds:
        it may still be reading ACKs after the last stream got its push."""
        limit = time.perf_counter() + timeout
        while True:
            used = self.cpu_seconds()
            await asyncio.sleep(window)
            if self.cpu_seconds() - used < busy * window:
                return
            if time.perf_counter() > limit:
                raise BenchError(f"the server stayed busy for {timeout:.0f} s")

    def memory_mib(self, key: str) -> float:
        """A Vm* line of /proc/PID/status (VmHWM = peak RSS, VmRSS = now), in MiB."""
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024
        raise BenchError(f"{key} not in /proc/{self.pid}/status")

    def stop(self) -> None:
        """SIGTERM our server by its PID; SIGKILL it if it does not exit within 5 s."""
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.terminate()
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

    def log_problems(self) -> list[str]:
        """Lines of the server log (run at level warning): every one is worth a look."""
        if not self.log_path.exists():
            return []
        return [line for line in self.log_path.read_text(errors="replace").splitlines()
                if line.strip()]

    def log_tail(self, chars: int = 2000) -> str:
        return "\n".join(self.log_problems())[-chars:]


# --- simulated proxies -----------------------------------------------------------------


def _header_class() -> type[Message]:
    """A message with only the scalar header fields that DiscoveryResponse (version_info=1,
    type_url=4, nonce=5) and DeltaDiscoveryResponse (system_version_info=1, type_url=4,
    nonce=5) share. Parsing with it skips the resources, which are kept as unknown bytes:
    a stream learns the version of a response without decoding M resources."""
    proto = descriptor_pb2.FileDescriptorProto(
        name="bench/xds_push_header.proto", package="bench", syntax="proto3")
    message = proto.message_type.add(name="ResponseHeader")
    for name, number in (("version", 1), ("type_url", 4), ("nonce", 5)):
        message.field.add(name=name, number=number,
                          type=descriptor_pb2.FieldDescriptorProto.TYPE_STRING,
                          label=descriptor_pb2.FieldDescriptorProto.LABEL_OPTIONAL)
    pool = descriptor_pool.DescriptorPool()
    pool.Add(proto)
    cls: type[Message] = message_factory.GetMessageClass(
        pool.FindMessageTypeByName("bench.ResponseHeader"))
    return cls


ResponseHeader = _header_class()


def _raw(data: bytes) -> bytes:
    return data


def _ports(assignment: endpoint_pb2.ClusterLoadAssignment) -> list[int]:
    return sorted(lb.endpoint.address.socket_address.port_value
                  for locality in assignment.endpoints for lb in locality.lb_endpoints)


class Mark:
    """Waits until every stream has passed a point, recording when each did."""

    def __init__(self, fleet: Fleet) -> None:
        self.fleet = fleet
        self.times: dict[int, float] = {}
        self.versions: dict[int, str] = {}
        self.done = asyncio.Event()
        self.check()

    def hit(self, index: int, at: float, version: str = "") -> None:
        if index not in self.times:
            self.times[index] = at
            self.versions[index] = version
            self.check()

    def check(self) -> None:
        if len(self.times.keys() | self.fleet.errors.keys()) >= len(self.fleet.proxies):
            self.done.set()


class Proxy:
    """One simulated Envoy on one ADS stream: subscribes to CDS, EDS, LDS and RDS like
    Envoy does, ACKs every response, and remembers its latest EDS version."""

    method = ""

    def __init__(self, index: int, service: str, channel: grpc.aio.Channel,
                 fleet: Fleet, verify: bool) -> None:
        self.index = index
        self.node = base_pb2.Node(id=f"bench-{index:05d}", cluster=service)
        self.fleet = fleet
        self.call: Any = channel.stream_stream(
            self.method, request_serializer=self._serialize, response_deserializer=_raw)()
        self.clusters: list[str] = []
        self.requested: set[str] = set()
        self.eds_version = ""
        self.eds_at = 0.0
        self.eds_responses = 0
        self.verify = verify  # decode svc-0000's endpoints from every EDS response
        self.changed_ports: list[int] | None = None

    @staticmethod
    def _serialize(message: Message) -> bytes:
        return bytes(message.SerializeToString())

    async def run(self) -> None:
        """Read and answer until cancelled; an error ends the stream and is recorded."""
        try:
            await self.start()
            while True:
                raw = await self.call.read()
                if raw is grpc.aio.EOF:
                    raise BenchError("the server ended the stream")
                now = time.perf_counter()
                self.fleet.last_message_at = now
                header: Any = ResponseHeader.FromString(raw)
                await self.on_response(header.type_url, header.version, header.nonce, raw, now)
        except asyncio.CancelledError:
            raise
        except grpc.aio.AioRpcError as exc:
            self.fleet.failed(self, f"{exc.code().name}: {exc.details()}")
        except Exception as exc:
            self.fleet.failed(self, f"{type(exc).__name__}: {exc}")

    async def start(self) -> None:
        raise NotImplementedError

    async def on_response(self, type_url: str, version: str, nonce: str, raw: bytes,
                          now: float) -> None:
        raise NotImplementedError

    def got_endpoints(self, version: str, now: float) -> None:
        self.eds_version, self.eds_at = version, now
        self.eds_responses += 1
        self.fleet.eds_received(self, version, now)

    async def close(self) -> None:
        with contextlib.suppress(Exception):
            self.call.cancel()


class SotwProxy(Proxy):
    """State of the world: every response is the full set; ACK = version + nonce."""

    method = SOTW_METHOD

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.last: dict[str, tuple[str, str]] = {}  # type -> (version, nonce) received

    async def send(self, type_url: str, names: Sequence[str] = (), node: bool = False) -> None:
        version, nonce = self.last.get(type_url, ("", ""))
        await self.call.write(discovery_pb2.DiscoveryRequest(
            node=self.node if node else None, type_url=type_url, resource_names=names,
            version_info=version, response_nonce=nonce))

    async def start(self) -> None:
        await self.send(CDS, node=True)

    async def on_response(self, type_url: str, version: str, nonce: str, raw: bytes,
                          now: float) -> None:
        self.last[type_url] = (version, nonce)
        if type_url == CDS:
            await self.send(CDS)
            clusters = self.fleet.cluster_names(version, raw)
            if clusters != self.clusters:  # like Envoy: EDS for the clusters now known
                self.clusters = clusters
                await self.send(EDS, clusters)
        elif type_url == EDS:
            if self.verify:
                self.changed_ports = self._changed_ports(raw)
            self.got_endpoints(version, now)
            await self.send(EDS, self.clusters)
            self.fleet.eds_acked.hit(self.index, now)
            if LDS not in self.requested:
                self.requested.add(LDS)
                await self.send(LDS)
        elif type_url == LDS:
            await self.send(LDS)
            if RDS not in self.requested:
                self.requested.add(RDS)
                await self.send(RDS, [ROUTE_NAME])
        elif type_url == RDS:
            await self.send(RDS, [ROUTE_NAME])
            self.fleet.configured.hit(self.index, now)

    @staticmethod
    def _changed_ports(raw: bytes) -> list[int] | None:
        for packed in discovery_pb2.DiscoveryResponse.FromString(raw).resources:
            assignment = endpoint_pb2.ClusterLoadAssignment.FromString(packed.value)
            if assignment.cluster_name == CHANGED_CLUSTER:
                return _ports(assignment)
        return None


class DeltaProxy(Proxy):
    """Incremental: subscribe by name (or wildcard), ACK = the response's nonce."""

    method = DELTA_METHOD

    async def send(self, type_url: str, subscribe: Sequence[str] = (),
                   unsubscribe: Sequence[str] = (), nonce: str = "", node: bool = False) -> None:
        await self.call.write(discovery_pb2.DeltaDiscoveryRequest(
            node=self.node if node else None, type_url=type_url,
            resource_names_subscribe=subscribe, resource_names_unsubscribe=unsubscribe,
            response_nonce=nonce))

    async def start(self) -> None:
        await self.send(CDS, node=True)  # no names on the first request: wildcard

    async def on_response(self, type_url: str, version: str, nonce: str, raw: bytes,
                          now: float) -> None:
        if type_url == CDS:
            response = discovery_pb2.DeltaDiscoveryResponse.FromString(raw)
            await self.send(CDS, nonce=nonce)
            known = set(self.clusters)
            added = sorted({r.name for r in response.resources} - known)
            removed = sorted(known & set(response.removed_resources))
            self.clusters = sorted((known | set(added)) - set(removed))
            if added or removed:
                await self.send(EDS, subscribe=added, unsubscribe=removed)
        elif type_url == EDS:
            if self.verify:
                self.changed_ports = self._changed_ports(raw) or self.changed_ports
            self.got_endpoints(version, now)
            await self.send(EDS, nonce=nonce)
            self.fleet.eds_acked.hit(self.index, now)
            if LDS not in self.requested:
                self.requested.add(LDS)
                await self.send(LDS)
        elif type_url == LDS:
            await self.send(LDS, nonce=nonce)
            if RDS not in self.requested:
                self.requested.add(RDS)
                await self.send(RDS, subscribe=[ROUTE_NAME])
        elif type_url == RDS:
            await self.send(RDS, nonce=nonce)
            self.fleet.configured.hit(self.index, now)

    @staticmethod
    def _changed_ports(raw: bytes) -> list[int] | None:
        for res in discovery_pb2.DeltaDiscoveryResponse.FromString(raw).resources:
            if res.name == CHANGED_CLUSTER:
                return _ports(endpoint_pb2.ClusterLoadAssignment.FromString(res.resource.value))
        return None


class Fleet:
    """S simulated proxies over a few channels, and the marks the scenario waits on."""

    def __init__(self, address: str, streams: int, delta: bool) -> None:
        self.address = address
        self.delta = delta
        self.groups = min(MAX_GROUPS, streams)
        self.channels = [grpc.aio.insecure_channel(address, options=GRPC_OPTIONS)
                         for _ in range(math.ceil(streams / STREAMS_PER_CHANNEL))]
        kind = DeltaProxy if delta else SotwProxy
        self.proxies: list[Proxy] = [
            kind(i, f"svc-{i % self.groups:04d}", self.channels[i // STREAMS_PER_CHANNEL],
                 self, verify=i == 0)
            for i in range(streams)]
        self.errors: dict[int, str] = {}
        self.eds_acked = Mark(self)
        self.configured = Mark(self)  # CDS, EDS, LDS and RDS all ACKed
        self.change: Mark | None = None
        self.baseline = ""
        self.last_message_at = time.perf_counter()
        self._cds_names: dict[str, list[str]] = {}
        self._tasks: list[asyncio.Task[None]] = []

    def open(self) -> None:
        self._tasks = [asyncio.create_task(p.run(), name=f"proxy-{p.index}")
                       for p in self.proxies]

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        for proxy in self.proxies:
            await proxy.close()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for channel in self.channels:
            await channel.close()

    def cluster_names(self, version: str, raw: bytes) -> list[str]:
        """The cluster names of a SotW CDS response. A CDS version is a hash of the
        clusters, so streams share the decoding instead of each unpacking M clusters."""
        names = self._cds_names.get(version)
        if names is None:
            response = discovery_pb2.DiscoveryResponse.FromString(raw)
            names = sorted(cluster_pb2.Cluster.FromString(a.value).name
                           for a in response.resources)
            self._cds_names[version] = names
        return names

    def failed(self, proxy: Proxy, error: str) -> None:
        self.errors[proxy.index] = error
        for mark in (self.eds_acked, self.configured, self.change):
            if mark is not None:
                mark.check()

    def eds_received(self, proxy: Proxy, version: str, now: float) -> None:
        if self.change is not None and version != self.baseline:
            self.change.hit(proxy.index, now, version)

    def common_eds_version(self) -> str:
        versions = {p.eds_version for p in self.proxies if p.index not in self.errors}
        if len(versions) != 1:
            raise BenchError(f"streams disagree on the EDS version: {len(versions)} versions")
        return versions.pop()

    def begin_change(self) -> Mark:
        self.baseline = self.common_eds_version()
        self.change = Mark(self)
        return self.change

    def end_change(self) -> None:
        self.change = None

    async def quiet(self, seconds: float, timeout: float) -> None:
        """Wait until no stream has received anything for ``seconds``."""
        limit = time.perf_counter() + timeout
        while time.perf_counter() - self.last_message_at < seconds:
            if time.perf_counter() > limit:
                raise BenchError(f"the server kept pushing for {timeout:.0f} s")
            await asyncio.sleep(0.05)


# --- one scenario ----------------------------------------------------------------------


@dataclass
class Options:
    changes: int
    delta: bool
    deadline_s: float
    poll_interval_s: float
    profile_dir: Path | None


def percentile(values: Sequence[float], pct: float) -> float:
    """Nearest-rank percentile."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(pct / 100 * len(ordered)) - 1)]


def _round_s(seconds: float) -> float:
    """Seconds, rounded to 0.1 ms."""
    return round(seconds, 4)


async def run_scenario(streams: int, services: int, opts: Options) -> dict[str, Any]:
    """Start a server, converge S streams, apply R endpoint changes, measure; always
    ends the server (by its PID) before returning or raising."""
    result: dict[str, Any] = {
        "protocol": "delta" if opts.delta else "sotw",
        "streams": streams, "services": services,
        "groups": min(MAX_GROUPS, streams),
        "channels": math.ceil(streams / STREAMS_PER_CHANNEL),
        "changes": opts.changes,
        "file_poll_interval_s": opts.poll_interval_s,
        "host_cpus": os.cpu_count(),
    }
    deadline = Deadline(opts.deadline_s)
    with tempfile.TemporaryDirectory(prefix="xds-push-") as tmp:
        mesh = Path(tmp) / "mesh.yaml"
        write_atomically(mesh, mesh_yaml(services, CHANGED_PORTS[-1]))
        server = ServerProcess(mesh, Path(tmp), opts.poll_interval_s)
        try:
            server.start()
            result["server_ready_s"] = _round_s(
                await asyncio.to_thread(server.wait_ready, min(60.0, deadline.left())))
            await _measure(server, mesh, streams, services, opts, deadline, result)
        except BenchError as exc:
            result["error"] = str(exc)
        finally:
            with contextlib.suppress(OSError, BenchError):
                result["server_peak_rss_mib"] = round(server.memory_mib("VmHWM"), 1)
                result["server_rss_end_mib"] = round(server.memory_mib("VmRSS"), 1)
            server.stop()
            problems = server.log_problems()
            result["server_log_lines"] = len(problems)
            result["server_log_sample"] = [line[:300] for line in problems[:3]]
    return result


async def _measure(server: ServerProcess, mesh: Path, streams: int, services: int,
                   opts: Options, deadline: Deadline, result: dict[str, Any]) -> None:
    fleet = Fleet(f"127.0.0.1:{server.xds_port}", streams, opts.delta)
    cpu_start = server.cpu_seconds()
    try:
        # Phase 1: initial convergence.
        started = time.perf_counter()
        fleet.open()
        await deadline.wait("every stream to ACK EDS", fleet.eds_acked.done.wait(),
                            lambda: f"{len(fleet.eds_acked.times)}/{streams} did")
        _check_streams(fleet)
        result["initial_eds_acked_all_s"] = _round_s(max(fleet.eds_acked.times.values()) - started)
        await deadline.wait("every stream to ACK LDS and RDS", fleet.configured.done.wait(),
                            lambda: f"{len(fleet.configured.times)}/{streams} did")
        _check_streams(fleet)
        result["initial_configured_all_s"] = _round_s(
            max(fleet.configured.times.values()) - started)
        await fleet.quiet(QUIET_S, deadline.left())
        await server.idle(deadline.left())
        result["server_cpu_initial_s"] = round(server.cpu_seconds() - cpu_start, 2)
        result["server_rss_after_initial_mib"] = round(server.memory_mib("VmRSS"), 1)

        # Phase 2: R changes of one endpoint, one at a time.
        before = await server.metrics()
        cpu_before, bench_cpu_before = server.cpu_seconds(), time.process_time()
        profiler = (Profiler(server.pid, opts.profile_dir / _profile_name(result))
                    if opts.profile_dir else None)
        try:
            rounds = [await _one_change(fleet, server, mesh, services, n, deadline)
                      for n in range(opts.changes)]
        finally:
            if profiler is not None:
                profiler.stop()
                result["profile"] = str(profiler.output)
        cpu_after, bench_cpu_after = server.cpu_seconds(), time.process_time()
        after = await server.metrics()
    finally:
        await fleet.close()

    alls = [r["all"] for r in rounds]
    result.update({
        "converge_all_s_median": _round_s(statistics.median(alls)),
        "converge_first_s_median": _round_s(statistics.median(r["first"] for r in rounds)),
        "converge_p50_s_median": _round_s(statistics.median(r["p50"] for r in rounds)),
        "converge_p99_s_median": _round_s(statistics.median(r["p99"] for r in rounds)),
        "converge_all_s_min": _round_s(min(alls)),
        "converge_all_s_max": _round_s(max(alls)),
        "converge_all_s_each": [_round_s(a) for a in alls],
        "eds_responses_per_stream_per_change": round(
            statistics.mean(r["eds_per_stream"] for r in rounds), 2),
        "new_port_seen": all(r["port_seen"] for r in rounds),
        "server_cpu_s": round(cpu_after - cpu_before, 3),
        "server_cpu_s_per_change": round((cpu_after - cpu_before) / opts.changes, 3),
        "bench_cpu_s": round(bench_cpu_after - bench_cpu_before, 3),
    })
    result.update(_metric_figures(before, after, opts.changes))


async def _one_change(fleet: Fleet, server: ServerProcess, mesh: Path, services: int,
                      n: int, deadline: Deadline) -> dict[str, Any]:
    """Move svc-0000's first endpoint; time until every stream has a new EDS version."""
    port = CHANGED_PORTS[n % 2]
    counts = {p.index: p.eds_responses for p in fleet.proxies}
    mark = fleet.begin_change()
    write_atomically(mesh, mesh_yaml(services, port))
    t0 = time.perf_counter()
    try:
        await deadline.wait(f"change {n + 1} to reach every stream", mark.done.wait(),
                            lambda: f"{len(mark.times)}/{len(fleet.proxies)} streams have it")
    finally:
        fleet.end_change()
    _check_streams(fleet)
    server.check_alive()
    if len(set(mark.versions.values())) != 1:
        raise BenchError(f"change {n + 1}: streams got different new EDS versions")
    await fleet.quiet(QUIET_S, deadline.left())
    await server.idle(deadline.left())
    latencies = [at - t0 for at in mark.times.values()]
    verified = fleet.proxies[0].changed_ports
    return {
        "all": max(latencies), "first": min(latencies), "p50": percentile(latencies, 50),
        "p99": percentile(latencies, 99),
        "eds_per_stream": statistics.mean(
            p.eds_responses - counts[p.index] for p in fleet.proxies),
        "port_seen": verified is not None and port in verified,
    }


def _check_streams(fleet: Fleet) -> None:
    if fleet.errors:
        index, error = next(iter(fleet.errors.items()))
        raise BenchError(f"{len(fleet.errors)} stream(s) failed; stream {index}: {error}")


def _metric_figures(before: dict[str, float], after: dict[str, float],
                    changes: int) -> dict[str, Any]:
    """Server counters over the change phase, per push and per change."""
    def delta(name: str, labels: str = "") -> float:
        return metric(after, name, labels) - metric(before, name, labels)

    pushes = delta("controlplane_xds_pushes_total")
    push_bytes = delta("controlplane_xds_push_bytes_total")
    eds_pushes = delta("controlplane_xds_pushes_total", 'type="eds"')
    builds = delta("controlplane_snapshot_build_seconds_count")
    return {
        "pushes_per_change": round(pushes / changes, 1),
        "eds_pushes_per_change": round(eds_pushes / changes, 1),
        "push_bytes_per_push": round(push_bytes / pushes) if pushes else 0,
        "push_bytes_per_change": round(push_bytes / changes),
        "encoded_bytes_per_change": round(delta("controlplane_encoded_bytes_total") / changes),
        "snapshot_builds_per_change": round(builds / changes, 1),
        "snapshot_build_s_per_change": round(
            delta("controlplane_snapshot_build_seconds_sum") / changes, 4),
        "nacks": delta("controlplane_xds_nacks_total"),
        # Every build serializes every resource of its group to hash it; the counter
        # above counts only resources whose bytes changed. This is the whole config.
        "config_bytes_all_groups": round(metric(after, "controlplane_config_bytes")),
    }


def _profile_name(result: dict[str, Any]) -> str:
    return f"xds_push-{result['protocol']}-S{result['streams']}-M{result['services']}.txt"


# --- command line ----------------------------------------------------------------------


def _counts(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: give numbers separated by commas") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: give positive numbers")
    return values


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Push convergence of one endpoint change over S ADS streams and M "
                    "services (prints JSON).")
    parser.add_argument("--streams", type=_counts, default=[10, 100, 1000],
                        help="simulated ADS streams S (default 10,100,1000)")
    parser.add_argument("--services", type=_counts, default=[100, 1000],
                        help="services in the mesh M (default 100,1000)")
    parser.add_argument("--changes", type=int, default=5,
                        help="endpoint changes R per scenario; the median is reported")
    parser.add_argument("--delta", action="store_true",
                        help="incremental xDS (DeltaAggregatedResources) instead of SotW")
    add_output_flags(parser, "xds_push.json", "; xds_push_delta with --delta")
    parser.add_argument("--deadline", type=float, default=120.0,
                        help="seconds a scenario may take in all (default 120)")
    parser.add_argument("--poll-interval", type=float, default=0.05,
                        help="the server's file poll interval (CONTROLPLANE_POLL_INTERVAL)")
    parser.add_argument("--profile", type=Path, metavar="DIR",
                        help="record py-spy stacks of the server's change phase into DIR "
                             "(needs py-spy in the venv)")
    return parser


async def run_all(args: argparse.Namespace) -> list[dict[str, Any]]:
    opts = Options(changes=args.changes, delta=args.delta, deadline_s=args.deadline,
                   poll_interval_s=args.poll_interval, profile_dir=args.profile)
    results = []
    for services in args.services:
        for streams in args.streams:
            result = await run_scenario(streams, services, opts)
            results.append(result)
            print(_progress(result), file=sys.stderr, flush=True)
    return results


def _progress(r: dict[str, Any]) -> str:
    head = f"{r['protocol']} S={r['streams']} M={r['services']}:"
    if "error" in r:
        return f"{head} FAILED: {r['error']}"
    return (f"{head} initial {r['initial_configured_all_s']:.3f} s, change reaches all in "
            f"{r['converge_all_s_median']:.3f} s (median; p50 {r['converge_p50_s_median']:.3f}"
            f" s), server CPU {r['server_cpu_s_per_change']:.3f} s/change, peak RSS "
            f"{r['server_peak_rss_mib']:.0f} MiB, {r['push_bytes_per_push']} B/push, "
            f"{r['encoded_bytes_per_change']} B newly encoded/change"
            + (f", {r['server_log_lines']} server log lines" if r["server_log_lines"] else ""))


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.changes < 1:
        print("--changes must be at least 1", file=sys.stderr)
        return 2
    baseline = "xds_push_delta.json" if args.delta else "xds_push.json"
    out = results_path(baseline, args.out, args.update_baseline)
    try:
        results = asyncio.run(run_all(args))
    except KeyboardInterrupt:  # run_scenario has already stopped its server
        print("interrupted", file=sys.stderr)
        return 130
    text = json.dumps(results, indent=2)
    print(text)
    write_results(out, text, baseline)
    return 1 if any("error" in r for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
