#!/usr/bin/env python3
"""Sidecar memory benchmark: the RSS of real Envoy sidecars in a mesh of N services, when
they hold the whole mesh, when scoping gives each 10 services, and on demand.

What it simulates, on 127.0.0.1: for each N (default 10 and 1000) and each mode, the real
server (``controlplane serve``, a subprocess) on a generated mesh of N services, and K
real Envoys (``.venv/bin/envoy``, bootstrap from ``controlplane bootstrap``), the
sidecars of svc-0000...svc-000<K-1>. Sidecar k "calls" 10 services (svc k-1 ... k-10,
wrapping; 9 in a 10-service mesh), each backed by a real HTTP backend on 127.0.0.1; the
other services' endpoints point at ports nothing listens on. Modes:

- ``full``: no scoping, every sidecar gets every service;
- ``scoped``: a ``sidecars:`` entry per service gives its sidecar its 10 services;
- ``on-demand``: no scoping, ``controlplane bootstrap --on-demand`` (delta xDS, VHDS and
  on-demand CDS): the sidecar fetches a service's routes and cluster on first use;
- ``captured`` (issue 10): no scoping, each service with a cluster IP (10.96.x.y); each
  sidecar is ``controlplane bootstrap --capture`` in its own network-namespace pod after
  ``controlplane capture`` (tests/support/pods.py), the server on the pod network's
  gateway, the backends there too; the pod's app (curl) calls ``http://svc-NNNN:9080/``, a
  name its hosts file maps to the cluster IP, and iptables hands the call to the sidecar.
  Needs root and iptables: otherwise the case is skipped, the reason printed.

Per sidecar: VmRSS (/proc/PID/status) and Envoy's ``server.memory_allocated`` once the
config is loaded and Envoy is idle (RSS steady), then a real HTTP call through its egress
listener to each of its 10 services (the first answer's status is recorded: on demand,
the first call must already succeed), then the same figures again, and the active
clusters before and after. Targets (issue 9): scoped in the 1000-service mesh within
5 MB of the full 10-service mesh; on demand within a few MB of scoped after the calls.

    .venv/bin/python bench/envoy_memory.py [--services 10,1000] [--sidecars 3]
        [--modes full,scoped,on-demand,captured]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.parse
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # the process helpers (Envoy, Backend) live in tests/
    sys.path.insert(0, str(ROOT))

import captured  # noqa: E402
from common import (  # noqa: E402 (bench/ is the script folder)
    BenchError,
    Deadline,
    add_output_flags,
    results_path,
    write_results,
)
from meshgen import MeshSpec, cluster_name, mesh_yaml, service_name, write_atomically  # noqa: E402
from serverproc import ServerProcess  # noqa: E402

from tests.support import pods  # noqa: E402
from tests.support.procs import Backend, Envoy, admin_stat  # noqa: E402

MODES = ("full", "scoped", "on-demand", "captured")
CALLS = 10
SCOPED_MB = 5.0  # scoped at N=1000 vs full at N=10
ON_DEMAND_MB = 3.0  # "within a few MB" of scoped


class Sidecar(Protocol):
    """What the figures are read through: a local ``Envoy`` or a ``captured.PodSidecar``."""

    proc: subprocess.Popen[bytes] | None

    def admin(self, path: str) -> tuple[int, str, dict[str, str]]: ...

    def stat(self, name: str) -> int: ...

    def request(self, host: str) -> tuple[int, str, dict[str, str]]: ...


def called(index: int, services: int) -> list[int]:
    """The services sidecar ``index`` calls: the ones a scoped mesh gives it."""
    visible = MeshSpec(services=services, scoped=CALLS).reachable(index) or frozenset()
    return sorted(visible - {index})


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise BenchError(f"VmRSS not in /proc/{pid}/status")


def steady_rss(envoy: Sidecar, deadline: Deadline, window: float = 0.5, rounds: int = 4,
               cap: float = 20.0) -> float:
    """VmRSS once it has moved less than 0.25 MiB over ``rounds`` readings ``window`` apart
    (config applied, Envoy idle), or after ``cap`` seconds."""
    assert envoy.proc is not None
    readings = [rss_mib(envoy.proc.pid)]
    limit = time.monotonic() + min(cap, deadline.left())
    while time.monotonic() < limit:
        time.sleep(window)
        readings.append(rss_mib(envoy.proc.pid))
        last = readings[-rounds:]
        if len(last) == rounds and max(last) - min(last) < 0.25:
            break
    return round(readings[-1], 1)


def cluster_known(envoy: Sidecar, name: str) -> bool:
    """Whether the sidecar holds the cluster ``name`` (warming or active)."""
    query = urllib.parse.urlencode({"resource": "dynamic_active_clusters",
                                    "name_regex": "^" + re.escape(name) + "$"})
    status, body, _ = envoy.admin(f"/config_dump?{query}")
    return status == 200 and name in body


def counter(envoy: Sidecar, name: str) -> int:
    """One stat of the sidecar by its exact name (cluster names hold regex characters)."""
    return admin_stat(envoy.admin, name)


def call(envoy: Sidecar, target: int) -> tuple[int, str, float]:
    """One HTTP GET through the sidecar's egress listener (captured: from the pod's app,
    by name): status (0 when refused or reset), body, milliseconds."""
    started = time.perf_counter()
    try:
        status, body, _ = envoy.request(service_name(target))
    except OSError as exc:
        status, body = 0, str(exc)
    return status, body, (time.perf_counter() - started) * 1000


def measure_sidecar(envoy: Sidecar, index: int, services: int,
                    deadline: Deadline) -> dict[str, Any]:
    """RSS idle, the calls, RSS after; and what the sidecar held before each call."""
    figures: dict[str, Any] = {"sidecar": service_name(index)}
    figures["rss_idle_mib"] = steady_rss(envoy, deadline)
    figures["allocated_idle_mib"] = round(envoy.stat("server.memory_allocated") / 2**20, 1)
    figures["active_clusters_idle"] = envoy.stat("cluster_manager.active_clusters")
    targets = called(index, services)
    statuses, wrong, known_before, first_ms = [], [], [], []
    for target in targets:
        deadline.check(f"calling {service_name(target)} through {service_name(index)}")
        known_before.append(cluster_known(envoy, cluster_name(target)))
        status, body, took = call(envoy, target)
        statuses.append(status)
        first_ms.append(took)
        if status == 200 and body != service_name(target):
            wrong.append(f"{service_name(target)} answered by {body[:40]!r}")
    figures.update({
        "calls": len(targets), "first_call_statuses": statuses,
        "calls_ok": sum(s == 200 for s in statuses), "wrong_backend": wrong,
        "called_clusters_held_before_call": sum(known_before),
        "first_call_ms_median": round(statistics.median(first_ms), 1),
        "first_call_ms_max": round(max(first_ms), 1),
    })
    # The calls went through this sidecar's clusters (captured: iptables handed them over)
    figures["called_clusters_upstream_rq"] = sum(
        counter(envoy, f"cluster.{cluster_name(t)}.upstream_rq_total") for t in targets)
    figures["rss_after_calls_mib"] = steady_rss(envoy, deadline)
    figures["allocated_after_calls_mib"] = round(
        envoy.stat("server.memory_allocated") / 2**20, 1)
    figures["active_clusters_after_calls"] = envoy.stat("cluster_manager.active_clusters")
    return figures


def run_case(services: int, mode: str, sidecars: int, delta: bool,
             deadline: Deadline) -> dict[str, Any]:
    """One server and K sidecars for (N, mode); everything started is stopped here."""
    if mode == "captured":
        return run_captured_case(services, sidecars, deadline)
    case: dict[str, Any] = {"services": services, "mode": mode, "sidecars": sidecars}
    wanted = sorted({t for k in range(sidecars) for t in called(k, services)})
    backends = {t: Backend(service_name(t)) for t in wanted}
    envoys: list[Envoy] = []
    spec = MeshSpec(services=services, scoped=CALLS if mode == "scoped" else 0,
                    backends=tuple((t, b.port) for t, b in backends.items()))
    with tempfile.TemporaryDirectory(prefix="envoy-memory-") as tmp:
        mesh = Path(tmp) / "mesh.yaml"
        write_atomically(mesh, mesh_yaml(spec))
        server = ServerProcess(mesh, Path(tmp))
        try:
            server.start()
            server.wait_ready(min(60.0, deadline.left()))
            extra = ["--on-demand"] if mode == "on-demand" else []
            for k in range(sidecars):
                deadline.check(f"starting sidecar {k} ({mode}, N={services})")
                envoys.append(Envoy(Path(tmp), f"mem-{k}", service_name(k), server.xds_port,
                                    delta=delta and mode != "on-demand", extra=extra).start())
            case["per_sidecar"] = [measure_sidecar(e, k, services, deadline)
                                   for k, e in enumerate(envoys)]
            server.check_alive()
            check_calls(case)
        except (BenchError, AssertionError, RuntimeError) as exc:
            case["error"] = str(exc)[:2000]
        finally:
            for envoy in envoys:
                envoy.stop()
            server.stop()
            for backend in backends.values():
                backend.stop()
            case["server_log_lines"] = len(server.log_problems())
            case["server_log_sample"] = server.log_sample()
    return add_medians(case)


def run_captured_case(services: int, sidecars: int, deadline: Deadline) -> dict[str, Any]:
    """The full mesh with cluster IPs, K captured sidecars each in its own pod, the
    server and the backends on the pod network's gateway; all of it ended here."""
    case: dict[str, Any] = {"services": services, "mode": "captured", "sidecars": sidecars}
    reason = captured.unavailable()
    if reason is not None:
        case["skipped"] = reason
        return case
    wanted = sorted({t for k in range(sidecars) for t in called(k, services)})
    backends: dict[int, captured.GatewayBackend] = {}
    with tempfile.TemporaryDirectory(prefix="envoy-memory-") as tmp, \
            pods.PodNetwork() as network:
        server = ServerProcess(Path(tmp) / "mesh.yaml", Path(tmp), xds_host=network.gateway)
        try:
            for t in wanted:
                backends[t] = captured.GatewayBackend(service_name(t), network.gateway)
            spec = MeshSpec(services=services,
                            backends=tuple((t, b.port) for t, b in backends.items()))
            write_atomically(server.mesh, captured.captured_mesh(mesh_yaml(spec),
                                                                 network.gateway))
            server.start()
            server.wait_ready(min(60.0, deadline.left()))
            envoys = []
            for k in range(sidecars):
                deadline.check(f"starting captured sidecar {k} (N={services})")
                envoys.append(captured.PodSidecar(network, k, called(k, services),
                                                  server.xds_port, Path(tmp)))
            for envoy in envoys:
                envoy.wait_configured(services, min(120.0, deadline.left()))
            case["per_sidecar"] = [measure_sidecar(e, k, services, deadline)
                                   for k, e in enumerate(envoys)]
            server.check_alive()
            check_calls(case)
        except (BenchError, AssertionError, RuntimeError, subprocess.SubprocessError) as exc:
            case["error"] = str(exc)[:2000]
        finally:
            server.stop()  # the pods' Envoys end with the network
            for backend in backends.values():
                backend.stop()
            case["server_log_lines"] = len(server.log_problems())
            case["server_log_sample"] = server.log_sample()
    return add_medians(case)


def check_calls(case: dict[str, Any]) -> None:
    """BenchError unless every sidecar reached each of its services at its backend,
    through its own clusters: a sidecar that cannot proves nothing."""
    failed = [f"{s['sidecar']}: statuses {s['first_call_statuses']} {s['wrong_backend']}, "
              f"{s['called_clusters_upstream_rq']} requests through its clusters"
              for s in case["per_sidecar"] if s["calls_ok"] < s["calls"] or s["wrong_backend"]
              or s["called_clusters_upstream_rq"] < s["calls"]]
    if failed:
        raise BenchError("calls through the sidecar failed (0: refused or reset): "
                         + "; ".join(failed))


def add_medians(case: dict[str, Any]) -> dict[str, Any]:
    for key in ("rss_idle_mib", "rss_after_calls_mib", "allocated_idle_mib",
                "allocated_after_calls_mib"):
        values = [s[key] for s in case.get("per_sidecar", [])]
        if values:
            case[key + "_median"] = round(statistics.median(values), 1)
    return case


def compare(cases: list[dict[str, Any]]) -> dict[str, Any]:
    """Issue 9's two memory targets, from the medians (MB = 10^6 bytes); a case that
    failed (its sidecars could not reach their services) is not compared."""
    def rss(services: int, mode: str, when: str = "after_calls") -> float | None:
        for case in cases:
            if (case["services"], case["mode"]) == (services, mode) and "error" not in case:
                value = case.get(f"rss_{when}_mib_median")
                return float(value) if value is not None else None
        return None

    out: dict[str, Any] = {}
    reference, scoped, on_demand = rss(10, "full"), rss(1000, "scoped"), rss(1000, "on-demand")
    if reference is not None and scoped is not None:
        diff = (scoped - reference) * 2**20 / 1e6
        out["scoped_1000_minus_full_10_mb"] = round(diff, 1)
        out["scoped_target"] = f"within {SCOPED_MB:g} MB"
        out["scoped_meets_target"] = abs(diff) <= SCOPED_MB
    if scoped is not None and on_demand is not None:
        diff = (on_demand - scoped) * 2**20 / 1e6
        out["on_demand_minus_scoped_1000_mb"] = round(diff, 1)
        out["on_demand_target"] = f"within {ON_DEMAND_MB:g} MB"
        out["on_demand_meets_target"] = abs(diff) <= ON_DEMAND_MB
    for services in sorted({case["services"] for case in cases}):
        for when in ("idle", "after_calls"):  # what capture adds: a filter chain per IP
            full, capture = rss(services, "full", when), rss(services, "captured", when)
            if full is not None and capture is not None:
                out[f"captured_minus_full_{services}_{when}_mb"] = round(
                    (capture - full) * 2**20 / 1e6, 1)
    return out


def _list(text: str) -> list[str]:
    return [v.strip() for v in text.split(",") if v.strip()]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="RSS of real Envoy sidecars: full mesh, scoped, on demand, captured "
                    "in a pod (prints JSON).")
    parser.add_argument("--services", type=lambda t: [int(v) for v in _list(t)],
                        default=[10, 1000], help="mesh sizes N (default 10,1000)")
    parser.add_argument("--sidecars", type=int, default=3, help="real Envoys K per case (3)")
    parser.add_argument("--modes", type=_list, default=list(MODES),
                        help="full,scoped,on-demand,captured (default all four; captured "
                        "needs root and iptables)")
    parser.add_argument("--delta", action="store_true",
                        help="delta xDS for full and scoped too (on-demand always is)")
    add_output_flags(parser, "envoy_memory.json")
    parser.add_argument("--deadline", type=float, default=600.0,
                        help="seconds the whole run may take (600)")
    return parser


def progress(case: dict[str, Any]) -> str:
    head = f"N={case['services']} {case['mode']}:"
    if "skipped" in case:
        return f"{head} skipped: {case['skipped']}"
    if "error" in case:
        head += f" FAILED: {case['error'][:500]}"
    per = case.get("per_sidecar")
    if not per:
        return head
    return (f"{head} RSS idle {case['rss_idle_mib_median']:.1f} MiB, after calling "
            f"{per[0]['calls']} services {case['rss_after_calls_mib_median']:.1f} MiB "
            f"(median of {len(per)}); clusters idle/after "
            f"{per[0]['active_clusters_idle']}/{per[0]['active_clusters_after_calls']}; "
            f"calls ok {sum(s['calls_ok'] for s in per)}/{sum(s['calls'] for s in per)}, "
            f"first call {per[0]['first_call_ms_median']:.1f} ms (median; max "
            f"{per[0]['first_call_ms_max']:.1f})")


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    unknown = set(args.modes) - set(MODES)
    if unknown or args.sidecars < 1 or not args.services:
        print(f"--modes takes {','.join(MODES)}; --sidecars at least 1", file=sys.stderr)
        return 2
    out = results_path("envoy_memory.json", args.out, args.update_baseline)
    deadline = Deadline(args.deadline)
    cases = []
    try:
        for services in args.services:
            for mode in args.modes:
                case = run_case(services, mode, args.sidecars, args.delta, deadline)
                cases.append(case)
                print(progress(case), file=sys.stderr, flush=True)
    except KeyboardInterrupt:  # run_case has already stopped what it started
        print("interrupted", file=sys.stderr)
        return 130
    targets = compare(cases)
    result = {"host_cpus": os.cpu_count(), "cases": cases, "targets": targets}
    for key, value in targets.items():
        print(f"{key}: {value}", file=sys.stderr)
    text = json.dumps(result, indent=2)
    print(text)
    write_results(out, text, "envoy_memory.json")
    return 1 if any("error" in c for c in cases) else 0


if __name__ == "__main__":
    sys.exit(main())
