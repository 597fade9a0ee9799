#!/usr/bin/env python3
"""Push convergence benchmark: how fast one endpoint change reaches every ADS stream, in a
mesh shaped like a real one.

Runs ``controlplane serve`` as a subprocess on a generated mesh of M services, opens S
simulated Envoy sidecars (state-of-the-world, or incremental with ``--delta``) in this
process, changes one endpoint R times, and prints as JSON, per scenario: the time until
every stream that can see the changed service holds the new endpoints (p50 / p99 over
the R changes), the server's CPU per change, the bytes it encoded per change, its RSS
after the initial sync and at peak, and the initial convergence time, each beside the
target of issue 9.

What it simulates: by default every stream is the sidecar of its own service (stream i
is ``svc-i``, its ``node.cluster``), so the server keeps one snapshot group per stream,
as in a real mesh. ``--groups N`` spreads the streams over N services instead (N = 10
gives the old, flattering figure), ``--zones K`` puts the proxies and endpoints in K
zones (zone-aware endpoints: a variant per zone), ``--scoped N`` adds a ``sidecars:``
entry per service that lets its sidecar reach N services (each sidecar then subscribes
to what it was given, and the change reaches only the sidecars that call svc-0000).

    .venv/bin/python bench/xds_push.py [--streams 10,100,1000] [--services 100,1000]
        [--changes 5] [--groups N] [--zones K] [--scoped N] [--delta]

See bench/README.md for what each figure means.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from common import (  # bench/ is on sys.path as the script's folder
    BenchError,
    Deadline,
    Profiler,
    add_output_flags,
    counts,
    metric,
    results_path,
    write_results,
)
from meshgen import (
    CHANGED_PORTS,
    MeshSpec,
    group_count,
    mesh_yaml,
    proxy_identities,
    write_atomically,
)
from serverproc import ServerProcess
from xds_figures import LATE_JOINERS, TARGETS, check_targets, metric_figures, percentile, progress
from xds_fleet import STREAMS_PER_CHANNEL, Fleet

QUIET_S = 0.3  # no message for this long = the server has finished pushing

@dataclass
class Options:
    changes: int
    delta: bool
    deadline_s: float
    poll_interval_s: float | None
    profile_dir: Path | None
    profile_native: bool
    groups: int | None  # None: one per stream
    zones: int
    scoped: int


def _round_s(seconds: float) -> float:
    """Seconds, rounded to 0.1 ms."""
    return round(seconds, 4)


async def run_scenario(streams: int, services: int, opts: Options) -> dict[str, Any]:
    """Start a server, converge S streams, apply R endpoint changes, measure; always
    ends the server (by its PID) before returning or raising."""
    spec = MeshSpec(services=services, zones=opts.zones, scoped=opts.scoped)
    identities = proxy_identities(streams, opts.groups or streams, opts.zones)
    result: dict[str, Any] = {
        "protocol": "delta" if opts.delta else "sotw",
        "streams": streams, "services": services,
        "groups": group_count(identities),
        "zones": opts.zones, "scoped": opts.scoped,
        "affected_streams": sum(spec.sees_changed(s) for s, _ in identities),
        "channels": math.ceil(streams / STREAMS_PER_CHANNEL),
        "changes": opts.changes,
        "file_poll_interval_s": opts.poll_interval_s,
        "host_cpus": os.cpu_count(),
    }
    deadline = Deadline(opts.deadline_s)
    with tempfile.TemporaryDirectory(prefix="xds-push-") as tmp:
        mesh = Path(tmp) / "mesh.yaml"
        write_atomically(mesh, mesh_yaml(spec, CHANGED_PORTS[-1]))
        server = ServerProcess(mesh, Path(tmp), opts.poll_interval_s)
        try:
            server.start()
            result["server_ready_s"] = _round_s(
                await asyncio.to_thread(server.wait_ready, min(60.0, deadline.left())))
            await _measure(server, mesh, spec, identities, opts, deadline, result)
        except BenchError as exc:
            result["error"] = str(exc)
        finally:
            with contextlib.suppress(OSError, BenchError):
                result["server_peak_rss_mib"] = round(server.memory_mib("VmHWM"), 1)
                result["server_rss_end_mib"] = round(server.memory_mib("VmRSS"), 1)
            server.stop()
            problems = server.log_problems()
            result["server_log_lines"] = len(problems)
            result["server_log_sample"] = server.log_sample()
    result["targets"] = {key: f"{op} {limit:g}" for key, (op, limit) in TARGETS.items()}
    result["meets"] = check_targets(result)
    return result


async def _measure(server: ServerProcess, mesh: Path, spec: MeshSpec,
                   identities: list[tuple[int, str]], opts: Options, deadline: Deadline,
                   result: dict[str, Any]) -> None:
    fleet = Fleet(f"127.0.0.1:{server.xds_port}", identities, opts.delta)
    streams = len(identities)
    affected = [i for i, (s, _) in enumerate(identities) if spec.sees_changed(s)]
    cpu_start, bench_cpu_start = server.cpu_seconds(), time.process_time()
    try:
        # Phase 1: initial convergence.
        profiler = (Profiler(server.pid, opts.profile_dir / _profile_name(result, "initial"),
                             opts.profile_native)
                    if opts.profile_dir else None)
        started = time.perf_counter()
        fleet.open()
        try:
            await deadline.wait("every stream to ACK EDS", fleet.eds_acked.done.wait(),
                                lambda: f"{len(fleet.eds_acked.times)}/{streams} did")
            fleet.check()
            result["initial_eds_acked_all_s"] = _round_s(
                max(fleet.eds_acked.times.values()) - started)
            await deadline.wait("every stream to ACK LDS and RDS",
                                fleet.configured.done.wait(),
                                lambda: f"{len(fleet.configured.times)}/{streams} did")
            fleet.check()
        finally:
            if profiler is not None:
                profiler.stop()
                result["profile_initial"] = str(profiler.output)
        result["initial_configured_all_s"] = _round_s(
            max(fleet.configured.times.values()) - started)
        await fleet.quiet(QUIET_S, deadline.left())
        await server.idle(deadline.left())
        result["server_cpu_initial_s"] = round(server.cpu_seconds() - cpu_start, 2)
        result["bench_cpu_initial_s"] = round(time.process_time() - bench_cpu_start, 2)
        result["server_rss_after_initial_mib"] = round(server.memory_mib("VmRSS"), 1)
        result["clusters_per_stream_median"] = statistics.median(
            len(p.clusters) for p in fleet.proxies)

        # Phase 2: R changes of one endpoint, one at a time.
        before = await server.metrics()
        result["server_groups"] = round(metric(before, "controlplane_proxy_groups"))
        cpu_before, bench_cpu_before = server.cpu_seconds(), time.process_time()
        threads_before = server.thread_cpu_seconds()
        profiler = (Profiler(server.pid, opts.profile_dir / _profile_name(result, "changes"),
                             opts.profile_native)
                    if opts.profile_dir else None)
        try:
            rounds = [await _one_change(fleet, server, mesh, spec, affected, n, deadline)
                      for n in range(opts.changes)]
        finally:
            if profiler is not None:
                profiler.stop()
                result["profile"] = str(profiler.output)
        cpu_after, bench_cpu_after = server.cpu_seconds(), time.process_time()
        threads = {name: cpu - threads_before.get(name, 0.0)
                   for name, cpu in server.thread_cpu_seconds().items()}
        after = await server.metrics()

        # Phase 3: new sidecars joining the loaded server, one at a time.
        joins = [await _late_joiner(server, spec.services + k, opts.delta, deadline)
                 for k in range(LATE_JOINERS)]
        result["new_sidecar_configured_s_median"] = _round_s(statistics.median(joins))
        result["new_sidecar_configured_s_max"] = _round_s(max(joins))
    finally:
        await fleet.close()

    alls = [r["all"] for r in rounds]
    result.update({
        "converge_all_s_median": _round_s(statistics.median(alls)),
        "converge_all_s_p99": _round_s(percentile(alls, 99)),
        "converge_first_s_median": _round_s(statistics.median(r["first"] for r in rounds)),
        "converge_p50_s_median": _round_s(statistics.median(r["p50"] for r in rounds)),
        "converge_p99_s_median": _round_s(statistics.median(r["p99"] for r in rounds)),
        "converge_all_s_min": _round_s(min(alls)),
        "converge_all_s_max": _round_s(max(alls)),
        "converge_all_s_each": [_round_s(a) for a in alls],
        "eds_responses_per_stream_per_change": round(
            statistics.mean(r["eds_per_stream"] for r in rounds), 2),
        "unaffected_eds_responses_per_change": round(
            statistics.mean(r["others"] for r in rounds), 1),
        "new_port_seen": all(r["port_seen"] for r in rounds),
        "server_cpu_s": round(cpu_after - cpu_before, 3),
        "server_cpu_s_per_change": round((cpu_after - cpu_before) / opts.changes, 3),
        "server_main_thread_cpu_s_per_change": round(threads.get("main", 0.0) / opts.changes,
                                                     3),
        "server_thread_cpu_s_per_change": {
            name: round(cpu / opts.changes, 3)
            for name, cpu in sorted(threads.items(), key=lambda t: -t[1]) if cpu > 0},
        "bench_cpu_s": round(bench_cpu_after - bench_cpu_before, 3),
    })
    result.update(metric_figures(before, after, opts.changes))


async def _one_change(fleet: Fleet, server: ServerProcess, mesh: Path, spec: MeshSpec,
                      affected: list[int], n: int, deadline: Deadline) -> dict[str, Any]:
    """Move svc-0000's first endpoint; time until every stream that sees svc-0000 has a
    new EDS version (the others should get nothing)."""
    port = CHANGED_PORTS[n % 2]
    counts = {p.index: p.eds_responses for p in fleet.proxies}
    mark = fleet.begin_change(affected)
    write_atomically(mesh, mesh_yaml(spec, port))
    t0 = time.perf_counter()
    try:
        await deadline.wait(f"change {n + 1} to reach every stream", mark.done.wait(),
                            lambda: f"{len(mark.times)}/{len(affected)} streams have it")
        await fleet.quiet(QUIET_S, deadline.left())
        await server.idle(deadline.left())
    finally:
        fleet.end_change()
    fleet.check()
    server.check_alive()
    latencies = [at - t0 for at in mark.times.values()]
    verified = fleet.proxies[0].changed_ports
    return {
        "all": max(latencies), "first": min(latencies), "p50": percentile(latencies, 50),
        "p99": percentile(latencies, 99),
        "eds_per_stream": statistics.mean(
            fleet.proxies[i].eds_responses - counts[i] for i in affected),
        "others": mark.others,
        "port_seen": verified is not None and port in verified,
    }


async def _late_joiner(server: ServerProcess, service: int, delta: bool,
                       deadline: Deadline) -> float:
    """One new sidecar (of a service not in the mesh, so a new snapshot group) connects
    while the S streams stay connected: seconds from opening its stream until it has
    ACKed CDS, EDS, LDS and RDS (its own four request round trips included)."""
    joiner = Fleet(f"127.0.0.1:{server.xds_port}", [(service, "")], delta,
                   prefix=f"late-{service}")
    try:
        started = time.perf_counter()
        joiner.open()
        await deadline.wait("a new sidecar to be configured", joiner.configured.done.wait())
        joiner.check()
        return max(joiner.configured.times.values()) - started
    finally:
        await joiner.close()


def _profile_name(result: dict[str, Any], phase: str) -> str:
    return (f"xds_push-{result['protocol']}-S{result['streams']}-M{result['services']}"
            f"-G{result['groups']}-Z{result['zones']}-scoped{result['scoped']}-{phase}.txt")


# --- command line ----------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Push convergence of one endpoint change over S ADS streams and M "
                    "services (prints JSON).")
    parser.add_argument("--streams", type=counts, default=[10, 100, 1000],
                        help="simulated ADS streams S (default 10,100,1000)")
    parser.add_argument("--services", type=counts, default=[100, 1000],
                        help="services in the mesh M (default 100,1000)")
    parser.add_argument("--changes", type=int, default=5,
                        help="endpoint changes R per scenario; median and p99 are reported")
    parser.add_argument("--groups", type=int, default=None,
                        help="spread the streams over this many services (default: one "
                             "per stream, as in a real mesh; 10 reproduces the old figure)")
    parser.add_argument("--zones", type=int, default=0,
                        help="put proxies and endpoints in this many zones (default none)")
    parser.add_argument("--scoped", type=int, default=0, metavar="N",
                        help="a sidecars: entry per service lets its sidecar reach N "
                             "services (default: every sidecar sees every service)")
    parser.add_argument("--delta", action="store_true",
                        help="incremental xDS (DeltaAggregatedResources) instead of SotW")
    add_output_flags(parser, "xds_push.json", "; xds_push_delta with --delta")
    parser.add_argument("--deadline", type=float, default=180.0,
                        help="seconds a scenario may take in all (default 180)")
    parser.add_argument("--poll-interval", type=float, default=None,
                        help="the server's file poll interval (CONTROLPLANE_POLL_INTERVAL; "
                             "default: the server's own, a fallback to notifications)")
    parser.add_argument("--profile", type=Path, metavar="DIR",
                        help="record py-spy stacks of the server's initial and change "
                             "phases into DIR "
                             "(needs py-spy in the venv)")
    parser.add_argument("--profile-native", action="store_true",
                        help="with --profile: native frames too (gRPC's C core, the "
                             "interpreter, the garbage collector)")
    return parser


def options(args: argparse.Namespace) -> Options:
    return Options(changes=args.changes, delta=args.delta, deadline_s=args.deadline,
                   poll_interval_s=args.poll_interval, profile_dir=args.profile,
                   profile_native=args.profile_native, groups=args.groups,
                   zones=args.zones, scoped=args.scoped)


async def run_all(args: argparse.Namespace) -> list[dict[str, Any]]:
    opts = options(args)
    results = []
    for services in args.services:
        for streams in args.streams:
            result = await run_scenario(streams, services, opts)
            results.append(result)
            print(progress(result), file=sys.stderr, flush=True)
    return results


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.changes < 1 or (args.groups is not None and args.groups < 1) \
            or args.zones < 0 or args.scoped < 0:
        print("--changes and --groups must be at least 1, --zones and --scoped at least 0",
              file=sys.stderr)
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
