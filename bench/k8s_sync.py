#!/usr/bin/env python3
"""Kubernetes source benchmark: initial sync of a large cluster, and how fast one
EndpointSlice change reaches every connected Envoy.

Runs the in-repo Kubernetes API server double (tests/kube/apiserver.py) in this process,
fills it with N Services and E endpoints (one EndpointSlice per Service), starts
``controlplane serve --source kubernetes`` on it as a subprocess, connects K real Envoys
(each the sidecar of a different Service, so K proxy groups), then changes one
EndpointSlice R times. Prints as JSON: the time to /readyz (initial list + first mesh +
first snapshot), to each Envoy being configured, the server's peak RSS and CPU, and per
change the time from the API write until the first and the last Envoy hold the new
endpoint (p50/p99/max over changes), with the server's pushes and rebuilds per change.

    .venv/bin/python bench/k8s_sync.py [--services 1000] [--endpoints 10000] [--envoys 3]
        [--changes 20] [--out bench/results/k8s_sync.json]

See bench/README.md for what each figure means. A benchmark prints figures; it asserts
no timings.
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import json
import math
import os
import signal
import statistics
import sys
import tempfile
import threading
import time
import urllib.parse
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # the API server double and the process helpers live in tests/
    sys.path.insert(0, str(ROOT))

from common import (  # noqa: E402 (bench/ is the script folder)
    BenchError,
    Deadline,
    Profiler,
    add_output_flags,
    finish,
    metric,
    parse_metrics,
)

from tests.kube.apiserver import ApiServerDouble  # noqa: E402
from tests.kube.objects import endpoint_slice, pod, service  # noqa: E402
from tests.support.procs import ControlPlane, Envoy  # noqa: E402

# --- constants -------------------------------------------------------------------------

NAMESPACE = "default"
SERVICE_PORT = 9080  # the Service port clients use
TARGET_PORT = 8080  # the endpoints' port, named "http" (the Service's targetPort)
PORT_NAME = "http"
CHANGE_STRIDE = 37  # change n edits svc (7 + 37 n) mod N: a different Service each time
DEBOUNCE_QUIET_S = 0.1  # CONTROLPLANE_DEBOUNCE_QUIET: in every change figure
POLL_S = 0.005  # Envoy admin poll interval during a change
STARTUP_POLL_S = 0.01  # /readyz, Envoy /ready and /debug/snapshots poll interval
CHANGE_TIMEOUT_S = 15.0  # one change must reach every Envoy within this
IDLE_WINDOW_S, IDLE_BUSY = 0.25, 0.1  # "idle": under 10 % of a CPU over 0.25 s


# --- the cluster -----------------------------------------------------------------------


def service_name(index: int) -> str:
    return f"svc-{index:04d}"


def cluster_name(index: int) -> str:
    """The Envoy cluster of a Service's port (Istio's naming, as the server builds it)."""
    return f"outbound|{SERVICE_PORT}||{service_name(index)}.{NAMESPACE}.svc.cluster.local"


def endpoint_address(k: int) -> str:
    """The k-th endpoint's address: 10.232.0.1 on, never loopback (the API refuses it);
    no traffic is ever sent to these addresses."""
    return f"10.{232 + k // 65024}.{(k // 254) % 256}.{k % 254 + 1}"


def changed_address(n: int) -> str:
    """The address change ``n`` puts in place of an endpoint (10.230.0.0/16: unused)."""
    return f"10.230.{(n // 254) % 256}.{n % 254 + 1}"


def pod_name(address: str) -> str:
    return "pod-" + address.replace(".", "-")


def slice_object(index: int, addresses: Sequence[str]) -> dict[str, Any]:
    """The Service's one EndpointSlice: every address ready, port ``http`` 8080, each
    endpoint naming its Pod (``targetRef``) as the EndpointSlice controller writes it."""
    name = service_name(index)
    builder = endpoint_slice(f"{name}-bench", service=name, namespace=NAMESPACE).port(
        TARGET_PORT, name=PORT_NAME)
    for address in addresses:
        builder.endpoint(address, pod=pod_name(address))
    return builder.build()


def populate(api: ApiServerDouble, services: int, endpoints: int) -> list[list[str]]:
    """Create N Services and one EndpointSlice each, E endpoints spread evenly, and a Pod
    per endpoint (the server reads Pods as metadata); returns each Service's addresses
    (what the bench changes later)."""
    addresses: list[list[str]] = []
    k = 0
    for i in range(services):
        count = endpoints // services + (1 if i < endpoints % services else 0)
        mine = [endpoint_address(k + j) for j in range(count)]
        k += count
        addresses.append(mine)
        api.create(service(service_name(i), NAMESPACE)
                   .port(SERVICE_PORT, name=PORT_NAME, target=PORT_NAME).build())
        for address in mine:
            api.create(pod(pod_name(address), NAMESPACE)
                       .labels(app=service_name(i), version="v1",
                               **{"pod-template-hash": "6d4cf56db6"}).build())
        api.create(slice_object(i, mine))
    return addresses


# --- processes and their admin APIs ----------------------------------------------------


class Admin:
    """GETs on one admin port over one kept-alive HTTP/1.1 connection (cheap to poll)."""

    def __init__(self, port: int, timeout: float = 2.0) -> None:
        self.port = port
        self.timeout = timeout
        self.conn: http.client.HTTPConnection | None = None

    def get(self, path: str) -> tuple[int, str]:
        """(status, body); OSError / HTTPException when the port does not answer."""
        for attempt in (1, 2):  # a kept-alive connection the peer closed: retry once
            if self.conn is None:
                self.conn = http.client.HTTPConnection("127.0.0.1", self.port,
                                                       timeout=self.timeout)
            try:
                self.conn.request("GET", path)
                response = self.conn.getresponse()
                return response.status, response.read().decode(errors="replace")
            except (OSError, http.client.HTTPException):
                self.close()
                if attempt == 2:
                    raise
        raise AssertionError("unreachable")

    def json(self, path: str) -> Any:
        status, body = self.get(path)
        if status != 200:
            raise BenchError(f"GET {path} on :{self.port} answered {status}: {body[:200]}")
        return json.loads(body)

    def close(self) -> None:
        if self.conn is not None:
            self.conn.close()
            self.conn = None


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process (all threads), from /proc/PID/stat."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat[stat.rindex(")") + 2:].split()  # fields from #3 (state) on
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def memory_mib(pid: int, key: str) -> float:
    """A Vm* line of /proc/PID/status (VmHWM = peak RSS, VmRSS = now), in MiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return round(int(line.split()[1]) / 1024, 1)
    raise BenchError(f"{key} not in /proc/{pid}/status")


def server_pid(server: ControlPlane) -> int:
    if server.proc is None:
        raise BenchError("the server is not running")
    return server.proc.pid


def check_alive(server: ControlPlane, envoys: Sequence[Envoy] = ()) -> None:
    """BenchError with the log's tail if the server or an Envoy has exited."""
    if server.proc is not None and server.proc.poll() is not None:
        raise BenchError(f"the server exited with {server.proc.returncode}: "
                         f"{log_tail(server.log_path)}")
    for envoy in envoys:
        if envoy.proc is not None and envoy.proc.poll() is not None:
            raise BenchError(f"envoy {envoy.node_id} exited with {envoy.proc.returncode}: "
                             f"{log_tail(envoy.log_path)}")


def log_lines(path: Path) -> list[str]:
    """Non-empty lines of a log (the server runs at level warning: each is worth a look)."""
    if not path.exists():
        return []
    return [line for line in path.read_text(errors="replace").splitlines() if line.strip()]


def log_tail(path: Path, chars: int = 1500) -> str:
    return "\n".join(log_lines(path))[-chars:]


def wait_idle(pid: int, deadline: Deadline, timeout: float = 10.0) -> None:
    """Until the server uses under 10 % of a CPU over 0.25 s (it may still be reading
    ACKs or logging after the Envoys have the change)."""
    limit = time.monotonic() + deadline.left(timeout)
    while True:
        used = cpu_seconds(pid)
        time.sleep(IDLE_WINDOW_S)
        if cpu_seconds(pid) - used < IDLE_BUSY * IDLE_WINDOW_S:
            return
        if time.monotonic() > limit:
            raise BenchError(f"the server stayed busy for {timeout:.0f} s")


# --- phase 1: the server's initial sync ------------------------------------------------


class StartupWatch(threading.Thread):
    """Polls the server's /readyz from the moment its process exists: when the admin
    port first answers, when /readyz turns 200, and the server's CPU and RSS then."""

    def __init__(self, server: ControlPlane, started: float, stop: threading.Event,
                 timeout: float) -> None:
        super().__init__(name="startup-watch", daemon=True)
        self.server, self.started, self.stop_event = server, started, stop
        self.timeout = timeout
        self.admin_up_s: float | None = None
        self.ready_s: float | None = None
        self.at_ready: dict[str, float] = {}
        self.error: str | None = None

    def run(self) -> None:
        limit = self.started + self.timeout
        while self.server.proc is None:  # set by ControlPlane.start() right after Popen
            if self.stop_event.wait(0.001) or time.perf_counter() > limit:
                return
        pid = self.server.proc.pid
        admin = Admin(self.server.admin_port, timeout=1.0)  # admin_port is set before Popen
        try:
            while not self.stop_event.is_set() and time.perf_counter() < limit:
                try:
                    status, _ = admin.get("/readyz")
                except (OSError, http.client.HTTPException):
                    status = 0
                now = time.perf_counter()
                if status and self.admin_up_s is None:
                    self.admin_up_s = now - self.started
                if status == 200:
                    self.ready_s = now - self.started
                    self.at_ready = {"cpu_s": cpu_seconds(pid),
                                     "rss_mib": memory_mib(pid, "VmRSS"),
                                     "peak_rss_mib": memory_mib(pid, "VmHWM")}
                    return
                if self.server.proc is not None and self.server.proc.poll() is not None:
                    return
                time.sleep(STARTUP_POLL_S)
        except (OSError, BenchError) as exc:
            self.error = f"{type(exc).__name__}: {exc}"
        finally:
            admin.close()


def make_server(kubeconfig: Path, workdir: Path) -> ControlPlane:
    """``controlplane serve --source kubernetes`` on free ports, not started yet."""
    return ControlPlane(
        "kubernetes", workdir,
        env={"CONTROLPLANE_DEBOUNCE_QUIET": str(DEBOUNCE_QUIET_S)},
        extra=["--kubeconfig", str(kubeconfig), "--snapshot-keep", "0",
               "--log-level", "warning"])


def start_server(server: ControlPlane, deadline: Deadline, result: dict[str, Any]) -> None:
    """Start the server and wait for /readyz = 200, timing it from process start."""
    stop = threading.Event()
    started = time.perf_counter()
    watch = StartupWatch(server, started, stop, deadline.left(120.0))
    watch.start()
    try:
        try:
            server.start(wait_ready=False)  # Popen, then waits for /healthz
        except (AssertionError, RuntimeError) as exc:
            raise BenchError(f"the server did not start: {exc}") from None
        watch.join(deadline.left(120.0))
    finally:
        stop.set()
        watch.join(5)
    check_alive(server)
    if watch.ready_s is None:
        raise BenchError(f"/readyz never answered 200 ({watch.error or 'timed out'}); "
                         f"server log: {log_tail(server.log_path)}")
    result["server_admin_up_s"] = round(watch.admin_up_s or 0.0, 3)
    result["server_ready_s"] = round(watch.ready_s, 3)
    result["server_cpu_at_ready_s"] = round(watch.at_ready["cpu_s"], 2)
    result["server_rss_at_ready_mib"] = watch.at_ready["rss_mib"]
    result["server_peak_rss_at_ready_mib"] = watch.at_ready["peak_rss_mib"]
    result["_server_started"] = started


# --- phase 2: Envoys connect -----------------------------------------------------------


class EnvoyKeeper(threading.Thread):
    """Starts one Envoy (``Envoy.start()``, which waits for its /ready) and then lives as
    long as it. Seen here: an Envoy gets SIGTERM as soon as the *thread* that spawned it
    ends, as with a parent-death signal (which Linux ties to the spawning thread), so the
    starter must outlive it. The run stops the Envoy by its handle, then ``release``s
    the keeper."""

    def __init__(self, envoy: Envoy, release: threading.Event) -> None:
        super().__init__(name=f"keep-{envoy.node_id}", daemon=True)
        self.envoy, self.release = envoy, release
        self.started = threading.Event()  # start() returned (or failed)
        self.error: str | None = None

    def run(self) -> None:
        try:
            self.envoy.start()  # polls /ready at 0.1 s steps: the bench polls finer
        except Exception as exc:  # AssertionError (timed out) or RuntimeError (exited)
            self.error = f"{type(exc).__name__}: {exc}"
        finally:
            self.started.set()
        self.release.wait()


class Poller(threading.Thread):
    """Calls ``probe`` every 10 ms until it returns True (``done``), ``stop`` is set or
    it raises something other than a refused or dropped connection (``error``). One per
    target: an Envoy whose main thread is busy holds its admin answer back, and must not
    hold back the polls of the others."""

    def __init__(self, name: str, probe: Callable[[], bool], stop: threading.Event) -> None:
        super().__init__(name=name, daemon=True)
        self.probe, self.stop_event = probe, stop
        self.done = threading.Event()
        self.error: str | None = None

    def run(self) -> None:
        while not self.stop_event.is_set():
            try:
                if self.probe():
                    self.done.set()
                    return
            except (OSError, http.client.HTTPException):
                pass  # not listening yet
            except Exception as exc:
                self.error = f"{self.name}: {type(exc).__name__}: {exc}"
                self.done.set()
                return
            self.stop_event.wait(STARTUP_POLL_S)


def connect_envoys(server: ControlPlane, made: Sequence[Envoy], deadline: Deadline,
                   result: dict[str, Any], keepers: list[EnvoyKeeper],
                   release: threading.Event) -> None:
    """Start the Envoys at once (sidecars of svc-0000, svc-0001, ...); time each until its
    stream shows in the server's /debug/proxies and until its /ready is 200 (initial CDS,
    EDS, LDS, RDS applied), and the server until every group's snapshot shows in
    /debug/snapshots."""
    count = len(made)
    spawned = time.perf_counter()
    for envoy in made:
        keeper = EnvoyKeeper(envoy, release)
        keepers.append(keeper)  # the caller stops the Envoy, whatever happens
        keeper.start()
    ready: dict[int, float] = {}  # its /ready is 200: initial xDS applied
    streams: dict[str, float] = {}  # its ADS stream shows in the server's /debug/proxies
    groups: dict[int, float] = {}  # how many groups /debug/snapshots shows -> when
    stop = threading.Event()

    def watch_envoy(k: int) -> Callable[[], bool]:
        admin = Admin(made[k].admin_port, timeout=1.0)

        def probe() -> bool:
            if made[k].proc is None:
                return False
            status = admin.get("/ready")[0]  # answered when Envoy's main thread is free
            if status == 200:
                ready[k] = time.perf_counter() - spawned
                admin.close()
            return status == 200
        return probe

    server_admin = Admin(server.admin_port)

    def watch_server() -> bool:
        if len(streams) < count:
            proxies = server_admin.json("/debug/proxies")
            now = time.perf_counter() - spawned
            for proxy in proxies:
                streams.setdefault(str(proxy.get("node_id")), now)
        shown = len(server_admin.json("/debug/snapshots"))
        groups.setdefault(shown, time.perf_counter() - spawned)
        done = len(streams) >= count and shown >= count
        if done:
            server_admin.close()
        return done

    pollers = [Poller(f"ready-{e.node_id}", watch_envoy(k), stop) for k, e in enumerate(made)]
    pollers.append(Poller("server-groups", watch_server, stop))
    for poller in pollers:
        poller.start()

    def errors() -> dict[str, str]:
        return {k.envoy.node_id: k.error for k in keepers if k.error}

    try:
        while not all(p.done.is_set() for p in pollers):
            deadline.check(f"waiting for {count} Envoys to be configured "
                           f"({len(ready)} are; errors: {errors() or 'none'})")
            if errors():
                raise BenchError(f"Envoys failed to start: {errors()}")
            check_alive(server)
            time.sleep(STARTUP_POLL_S)
        for keeper in keepers:  # Envoy.start() returns within 0.1 s of /ready
            keeper.started.wait(deadline.left(20.0))
    finally:
        stop.set()
        for poller in pollers:
            poller.join(2)
    if errors():
        raise BenchError(f"Envoys failed to start: {errors()}")
    failed = [p.error for p in pollers if p.error]
    if failed:
        raise BenchError(f"polling failed: {failed}")
    since_start = spawned - result.pop("_server_started")
    groups_first = min(t for n, t in groups.items() if n >= 1)
    groups_all = min(t for n, t in groups.items() if n >= count)
    result["envoy_stream_seen_s"] = [round(streams.get(e.node_id, math.nan), 3) for e in made]
    result["envoy_configured_s"] = [round(ready[k], 3) for k in range(count)]
    result["envoy_configured_all_s"] = round(max(ready.values()), 3)
    result["group_snapshot_first_s"] = round(groups_first, 3)
    result["group_snapshot_all_s"] = round(groups_all, 3)
    result["envoys_spawned_since_server_start_s"] = round(since_start, 3)
    result["group_snapshot_first_since_server_start_s"] = round(since_start + groups_first, 3)
    counters = [envoy_stats(envoy, r"^cluster_manager\.(active_clusters|warming_clusters|"
                                   r"cds\.update_success|cds\.update_rejected)$")
                for envoy in made]
    result["envoy_active_clusters"] = [c.get("cluster_manager.active_clusters")
                                       for c in counters]
    result["envoy_warming_clusters"] = [c.get("cluster_manager.warming_clusters")
                                        for c in counters]
    result["envoy_cds_rejected"] = sum(c.get("cluster_manager.cds.update_rejected", 0)
                                       for c in counters)
    pid = server_pid(server)
    result["server_cpu_after_envoys_s"] = round(cpu_seconds(pid), 2)
    result["server_peak_rss_after_envoys_mib"] = memory_mib(pid, "VmHWM")


def envoy_stats(envoy: Envoy, regex: str) -> dict[str, int]:
    """Envoy stats whose names match ``regex``. ``usedonly`` makes Envoy skip the unused
    ones first: about 5 ms instead of 50 ms with 1000 clusters (~110,000 stats)."""
    status, body, _ = envoy.admin("/stats?usedonly&filter=" + urllib.parse.quote(regex))
    if status != 200:
        raise BenchError(f"envoy {envoy.node_id} /stats answered {status}")
    stats: dict[str, int] = {}
    for line in body.splitlines():
        name, _, value = line.partition(": ")
        with contextlib.suppress(ValueError):
            stats[name] = int(value)
    return stats


# --- phase 3: changes ------------------------------------------------------------------


def escaped(name: str) -> str:
    """A stat or cluster name as an RE2 regex matching only itself."""
    return "".join("\\" + c if c in "|." else c for c in name)


def eds_dump_path(index: int) -> str:
    """Envoy's admin view of one cluster's endpoints as it applies them. ``name_regex``
    makes Envoy dump only this cluster's ClusterLoadAssignment: ~1.5 ms of Envoy's main
    thread per poll with 1000 clusters, against ~100 ms for all of them."""
    return ("/config_dump?resource=dynamic_endpoint_configs&include_eds&name_regex="
            + urllib.parse.quote(escaped(cluster_name(index))))


def dumped_addresses(body: str) -> set[str]:
    """Every endpoint address in a dynamic_endpoint_configs dump."""
    found: set[str] = set()
    for config in json.loads(body).get("configs", []):
        for locality in config.get("endpoint_config", {}).get("endpoints", []):
            for lb in locality.get("lb_endpoints", []):
                found.add(lb["endpoint"]["address"]["socket_address"]["address"])
    return found


class ChangePoller(threading.Thread):
    """Polls one Envoy every 5 ms, from ``go`` on, until its cluster holds ``new`` and
    not ``old``; ``seen_at`` is then the perf_counter time of that answer."""

    def __init__(self, envoy: Envoy, index: int, new: str, old: str,
                 go: threading.Event, stop: threading.Event, limit: float) -> None:
        super().__init__(name=f"poll-{envoy.node_id}", daemon=True)
        self.envoy, self.new, self.old = envoy, new, old
        self.path = eds_dump_path(index)
        self.go, self.stop_event, self.limit = go, stop, limit
        self.admin = Admin(envoy.admin_port)
        self.seen_at: float | None = None
        self.polls = 0
        self.error: str | None = None
        # One answer before the change: the connection is open, the old state is there.
        status, body = self.admin.get(self.path)
        if status != 200 or old not in dumped_addresses(body):
            raise BenchError(f"envoy {envoy.node_id}: {old} is not in {cluster_name(index)} "
                             f"before the change ({status}: {body[:200]})")

    def run(self) -> None:
        try:
            self.go.wait()
            while not self.stop_event.is_set() and time.perf_counter() < self.limit:
                status, body = self.admin.get(self.path)
                now = time.perf_counter()
                self.polls += 1
                if status == 200:
                    addresses = dumped_addresses(body)
                    if self.new in addresses and self.old not in addresses:
                        self.seen_at = now
                        return
                time.sleep(POLL_S)
        except Exception as exc:
            self.error = f"{type(exc).__name__}: {exc}"
        finally:
            self.admin.close()


def eds_updates(envoys: Sequence[Envoy], index: int) -> list[int]:
    """Each Envoy's ``update_success`` of the cluster: +1 per EDS update it applied."""
    name = f"cluster.{cluster_name(index)}.update_success"
    return [envoy_stats(envoy, f"^{escaped(name)}$").get(name, 0) for envoy in envoys]


def one_change(api: ApiServerDouble, server: ControlPlane, envoys: Sequence[Envoy],
               addresses: list[list[str]], n: int, deadline: Deadline) -> dict[str, Any]:
    """Replace the first endpoint of one Service's EndpointSlice; time until every
    Envoy holds the new address (and not the old one)."""
    services = len(addresses)
    index = (7 + CHANGE_STRIDE * n) % services
    old, new = addresses[index][0], changed_address(n)
    addresses[index][0] = new
    obj = slice_object(index, addresses[index])
    pid = server_pid(server)
    updates_before = eds_updates(envoys, index)
    go, stop = threading.Event(), threading.Event()
    budget = deadline.left(CHANGE_TIMEOUT_S)
    limit = time.perf_counter() + budget
    pollers = [ChangePoller(envoy, index, new, old, go, stop, limit) for envoy in envoys]
    for poller in pollers:
        poller.start()
    cpu_before = cpu_seconds(pid)
    try:
        t0 = time.perf_counter()
        api.apply(obj)
        applied = time.perf_counter()
        go.set()
        for poller in pollers:
            poller.join(max(0.0, limit - time.perf_counter()) + 1.0)
    finally:
        stop.set()
        go.set()
    missing = [p.envoy.node_id for p in pollers if p.seen_at is None]
    if missing:
        errors = {p.envoy.node_id: p.error for p in pollers if p.error}
        check_alive(server, envoys)
        raise BenchError(f"change {n + 1} ({service_name(index)}: {old} -> {new}) did not "
                         f"reach {missing} within {budget:.1f} s (the change timeout "
                         f"or what --deadline had left)"
                         + (f"; errors: {errors}" if errors else ""))
    wait_idle(pid, deadline)
    cpu = cpu_seconds(pid) - cpu_before
    updates = [a - b for a, b in zip(eds_updates(envoys, index), updates_before, strict=True)]
    times = [p.seen_at - t0 for p in pollers if p.seen_at is not None]
    return {"service": service_name(index), "all": max(times), "first": min(times),
            "apply": applied - t0, "cpu": cpu, "updates": updates,
            "polls": sum(p.polls for p in pollers)}


def change_phase(api: ApiServerDouble, server: ControlPlane, envoys: Sequence[Envoy],
                 addresses: list[list[str]], changes: int, deadline: Deadline,
                 result: dict[str, Any], profile_dir: Path | None) -> None:
    """R changes, one at a time, the server idle between them; figures into ``result``."""
    pid = server_pid(server)
    admin = Admin(server.admin_port)
    try:
        wait_idle(pid, deadline)
        result["server_rss_before_changes_mib"] = memory_mib(pid, "VmRSS")
        before = parse_metrics(admin.get("/metrics")[1])
        cpu_before = cpu_seconds(pid)
        profiler = (Profiler(pid, profile_dir / f"k8s_sync-changes-S{len(addresses)}.txt")
                    if profile_dir else None)
        rounds: list[dict[str, Any]] = []
        try:
            for n in range(changes):
                deadline.check(f"making change {n + 1} of {changes}")
                rounds.append(one_change(api, server, envoys, addresses, n, deadline))
                r = rounds[-1]
                print(f"  change {n + 1}/{changes} ({r['service']}): first Envoy "
                      f"{r['first'] * 1000:.0f} ms, last {r['all'] * 1000:.0f} ms",
                      file=sys.stderr, flush=True)
        finally:
            if profiler is not None:
                profiler.stop()
                result["profile_changes"] = str(profiler.output)
        cpu_after = cpu_seconds(pid)
        after = parse_metrics(admin.get("/metrics")[1])
    finally:
        admin.close()
    alls = [r["all"] for r in rounds]
    firsts = [r["first"] for r in rounds]

    def delta(name: str, labels: str = "") -> float:
        return metric(after, name, labels) - metric(before, name, labels)

    pushes = delta("controlplane_xds_pushes_total")
    builds = delta("controlplane_snapshot_build_seconds_count")
    result.update({
        "change_all_s_p50": _ms(percentile(alls, 50)),
        "change_all_s_p99": _ms(percentile(alls, 99)),
        "change_all_s_max": _ms(max(alls)),
        "change_all_s_min": _ms(min(alls)),
        "change_first_s_p50": _ms(percentile(firsts, 50)),
        "change_first_s_p99": _ms(percentile(firsts, 99)),
        "change_all_s_each": [_ms(a) for a in alls],
        "change_first_s_each": [_ms(a) for a in firsts],
        "api_apply_s_median": _ms(statistics.median(r["apply"] for r in rounds)),
        "eds_updates_per_envoy_per_change": round(statistics.mean(
            u for r in rounds for u in r["updates"]), 2),
        "envoy_polls_per_change": round(statistics.mean(r["polls"] for r in rounds), 1),
        "server_cpu_s": round(cpu_after - cpu_before, 3),
        "server_cpu_s_per_change": round((cpu_after - cpu_before) / changes, 3),
        "server_cpu_s_per_change_median": round(statistics.median(r["cpu"] for r in rounds),
                                                3),
        "pushes_per_change": round(pushes / changes, 2),
        "eds_pushes_per_change": round(
            delta("controlplane_xds_pushes_total", 'type="eds"') / changes, 2),
        "push_bytes_per_push": round(delta("controlplane_xds_push_bytes_total") / pushes)
        if pushes else 0,
        "k8s_events_per_change": round(delta("controlplane_kubernetes_events_total",
                                             'type="MODIFIED"') / changes, 2),
        "k8s_rebuilds_published": delta("controlplane_kubernetes_rebuilds_total",
                                        'result="published"'),
        "k8s_rebuilds_unchanged": delta("controlplane_kubernetes_rebuilds_total",
                                        'result="unchanged"'),
        "mesh_updates_accepted": delta("controlplane_mesh_updates_total", 'result="accepted"'),
        "snapshot_builds_per_change": round(builds / changes, 2),
        "snapshot_build_s_per_change": round(
            delta("controlplane_snapshot_build_seconds_sum") / changes, 4),
        "encoded_bytes_per_change": round(delta("controlplane_encoded_bytes_total") / changes),
        "nacks": delta("controlplane_xds_nacks_total"),
        "watch_restarts": delta("controlplane_kubernetes_watch_restarts_total"),
    })


def percentile(values: Sequence[float], pct: float) -> float:
    """Nearest-rank percentile (with 20 values, p99 is the largest)."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(pct / 100 * len(ordered)) - 1)]


def _ms(seconds: float) -> float:
    """Seconds, rounded to 0.1 ms."""
    return round(seconds, 4)


# --- the run ---------------------------------------------------------------------------


@dataclass
class Options:
    services: int
    endpoints: int
    envoys: int
    changes: int
    deadline_s: float
    profile_dir: Path | None


def run(opts: Options, progress: Callable[[str], None]) -> dict[str, Any]:
    """Every phase, in order; always stops the Envoys, the server and the double (by
    their handles) before returning or raising, Ctrl-C included."""
    result: dict[str, Any] = {
        "services": opts.services, "endpoints": opts.endpoints,
        "endpoints_per_service": round(opts.endpoints / opts.services, 2),
        "envoys": opts.envoys, "changes": opts.changes,
        "debounce_quiet_s": DEBOUNCE_QUIET_S, "envoy_poll_interval_s": POLL_S,
        "host_cpus": os.cpu_count(),
    }
    deadline = Deadline(opts.deadline_s)
    api = ApiServerDouble()
    servers: list[ControlPlane] = []
    envoys: list[Envoy] = []
    keepers: list[EnvoyKeeper] = []
    release = threading.Event()
    with tempfile.TemporaryDirectory(prefix="k8s-sync-") as tmp:
        workdir = Path(tmp)
        try:
            api.start()
            started = time.perf_counter()
            addresses = populate(api, opts.services, opts.endpoints)
            result["populate_s"] = round(time.perf_counter() - started, 3)
            progress(f"API double: {opts.services} Services, {opts.endpoints} endpoints "
                     f"created in {result['populate_s']:.2f} s (bench-side)")
            kubeconfig = api.kubeconfig(workdir / "kubeconfig")
            lists_before = api.count("list")

            server = make_server(kubeconfig, workdir)
            servers.append(server)  # stopped below, whatever happens
            envoys = [Envoy(workdir, f"bench-{k}", service_name(k), server.xds_port)
                      for k in range(opts.envoys)]  # the bootstraps, written beforehand
            start_server(server, deadline, result)
            result["api_list_requests"] = api.count("list") - lists_before
            progress(f"server ready (listed, converted, first snapshot) in "
                     f"{result['server_ready_s']:.3f} s after process start (admin up at "
                     f"{result['server_admin_up_s']:.3f} s), CPU "
                     f"{result['server_cpu_at_ready_s']:.2f} s, peak RSS "
                     f"{result['server_peak_rss_at_ready_mib']:.0f} MiB")

            connect_envoys(server, envoys, deadline, result, keepers, release)
            progress(f"{opts.envoys} Envoys configured in {result['envoy_configured_s']} s "
                     f"(each, from spawn); groups' snapshots in /debug/snapshots after "
                     f"{result['group_snapshot_all_s']:.3f} s; server peak RSS "
                     f"{result['server_peak_rss_after_envoys_mib']:.0f} MiB")

            change_phase(api, server, envoys, addresses, opts.changes, deadline, result,
                         opts.profile_dir)
            pid = server_pid(server)
            result["server_peak_rss_mib"] = memory_mib(pid, "VmHWM")
            result["server_rss_end_mib"] = memory_mib(pid, "VmRSS")
            result["server_cpu_total_s"] = round(cpu_seconds(pid), 2)
            result["envoy_rss_mib"] = [memory_mib(e.proc.pid, "VmRSS") for e in envoys
                                       if e.proc is not None]
            result["api_double_errors"] = len(api.server_errors)
            progress(f"change -> every Envoy: p50 {result['change_all_s_p50'] * 1000:.0f} ms,"
                     f" p99 {result['change_all_s_p99'] * 1000:.0f} ms, max "
                     f"{result['change_all_s_max'] * 1000:.0f} ms (first Envoy p50 "
                     f"{result['change_first_s_p50'] * 1000:.0f} ms); "
                     f"{result['pushes_per_change']} pushes and "
                     f"{result['server_cpu_s_per_change']:.3f} s server CPU per change")
        except BenchError as exc:
            result["error"] = str(exc)
        except (OSError, http.client.HTTPException, RuntimeError, ValueError) as exc:
            result["error"] = f"{type(exc).__name__}: {exc}"  # a process or port went away
        finally:
            result.pop("_server_started", None)
            for keeper in keepers:  # each Envoy by its handle, once its start() is over
                keeper.started.wait(20)
                keeper.envoy.stop()
            release.set()
            for keeper in keepers:
                keeper.join(5)
            for server in servers:
                server.stop()
                problems = log_lines(server.log_path)
                result["server_log_lines"] = len(problems)
                result["server_log_sample"] = [line[:300] for line in problems[:3]]
            api.stop()
    return result


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Initial sync and EndpointSlice change propagation of the Kubernetes "
                    "source, with real Envoys (prints JSON).")
    parser.add_argument("--services", type=int, default=1000, help="Services N (1000)")
    parser.add_argument("--endpoints", type=int, default=10000,
                        help="endpoints E in all, spread over the Services (10000)")
    parser.add_argument("--envoys", type=int, default=3,
                        help="real Envoys K, each a sidecar of another Service (3)")
    parser.add_argument("--changes", type=int, default=20,
                        help="EndpointSlice changes R, one at a time (20)")
    add_output_flags(parser, "k8s_sync.json")
    parser.add_argument("--deadline", type=float, default=300.0,
                        help="seconds the whole run may take (300)")
    parser.add_argument("--profile", type=Path, metavar="DIR",
                        help="record py-spy stacks of the server during the change phase "
                             "into DIR (collapsed stacks)")
    return parser


def _interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt  # SIGTERM cleans up like Ctrl-C


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if min(args.services, args.envoys, args.changes) < 1 or args.endpoints < args.services:
        print("--services, --envoys and --changes must be at least 1, and --endpoints at "
              "least --services", file=sys.stderr)
        return 2
    if args.envoys > args.services or args.endpoints > 20 * 65024 or args.changes > 65024:
        print("at most one Envoy per Service, 1,300,480 endpoints and 65,024 changes",
              file=sys.stderr)
        return 2
    opts = Options(services=args.services, endpoints=args.endpoints, envoys=args.envoys,
                   changes=args.changes, deadline_s=args.deadline, profile_dir=args.profile)
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        result = run(opts, lambda line: print(line, file=sys.stderr, flush=True))
    except KeyboardInterrupt:  # run() has already stopped everything it started
        print("interrupted", file=sys.stderr)
        return 130
    if "error" in result:
        print(f"FAILED: {result['error']}", file=sys.stderr)
    return finish(result, args, "k8s_sync.json")


if __name__ == "__main__":
    sys.exit(main())
