#!/usr/bin/env python3
"""Reconnect storm benchmark: S sidecars reconnecting at once (a control-plane rollout),
and what that does to pushes for the sidecars already connected.

What it simulates, on 127.0.0.1 with the real server as a subprocess and simulated
Envoy streams in this process (bench/xds_fleet.py, one sidecar identity per stream, as
in bench/xds_push.py):

1. a mesh of M services; S "storm" sidecars (``svc-i``) and P "resident" sidecars
   connect and converge;
2. a quiet endpoint change: how long until every resident has it (the reference);
3. the storm. ``--mode restart`` (default): every stream is dropped, the server process
   is stopped (SIGTERM) and started again on the same ports, as in a rollout; the
   residents reconnect first and converge (they are "already connected" to the new
   server), then all S storm streams connect at once. ``--mode drop``: the server stays
   up and the S storm streams are cancelled and opened again at once;
4. ``--change-after`` seconds into the storm, the same endpoint change: how long until
   every resident has it while the server is busy with the storm (starvation shows here),
   and how long until all S storm streams are configured again (CDS, EDS, LDS, RDS
   ACKed; target < 5 s).

    .venv/bin/python bench/reconnect_storm.py [--streams 1000] [--services 1000]
        [--residents 50] [--mode restart|drop] [--delta] [--change-after 0.2]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from common import BenchError, Deadline, add_output_flags, results_path, write_results
from meshgen import CHANGED_PORTS, MeshSpec, mesh_yaml, write_atomically
from serverproc import ServerProcess
from xds_figures import percentile
from xds_fleet import Fleet

STORM_TARGET_S = 5.0
QUIET_S = 0.3


def _r(seconds: float) -> float:
    return round(seconds, 4)


async def converge(fleet: Fleet, deadline: Deadline, what: str) -> float:
    """Open the fleet's streams and wait until every one is configured; the seconds the
    last one took."""
    started = time.perf_counter()
    fleet.open()
    await deadline.wait(f"{what} to be configured", fleet.configured.done.wait(),
                        lambda: f"{len(fleet.configured.times)}/{len(fleet.proxies)} are")
    fleet.check()
    return max(fleet.configured.times.values()) - started


async def change_delay(fleet: Fleet, mesh: Path, spec: MeshSpec, port: int,
                       deadline: Deadline, what: str) -> dict[str, float]:
    """Write the endpoint change and wait until every stream of ``fleet`` has it."""
    mark = fleet.begin_change()
    write_atomically(mesh, mesh_yaml(spec, port))
    t0 = time.perf_counter()
    try:
        await deadline.wait(f"{what} to reach every resident", mark.done.wait(),
                            lambda: f"{len(mark.times)}/{len(fleet.proxies)} have it")
    finally:
        fleet.end_change()
    fleet.check()
    latencies = [at - t0 for at in mark.times.values()]
    return {"all": _r(max(latencies)), "p50": _r(percentile(latencies, 50)),
            "first": _r(min(latencies))}


async def run(args: argparse.Namespace) -> dict[str, Any]:
    spec = MeshSpec(services=args.services, scoped=args.scoped)
    result: dict[str, Any] = {
        "protocol": "delta" if args.delta else "sotw", "mode": args.mode,
        "streams": args.streams, "services": args.services, "residents": args.residents,
        "scoped": args.scoped, "change_after_s": args.change_after,
        "host_cpus": os.cpu_count(), "storm_target_s": STORM_TARGET_S,
    }
    deadline = Deadline(args.deadline)
    with tempfile.TemporaryDirectory(prefix="reconnect-storm-") as tmp:
        mesh = Path(tmp) / "mesh.yaml"
        write_atomically(mesh, mesh_yaml(spec, CHANGED_PORTS[0]))
        server = ServerProcess(mesh, Path(tmp))
        fleets: list[Fleet] = []
        try:
            server.start()
            await asyncio.to_thread(server.wait_ready, min(60.0, deadline.left()))
            await _phases(server, mesh, spec, args, deadline, result, fleets)
        except BenchError as exc:
            result["error"] = str(exc)
        finally:
            for fleet in fleets:
                await fleet.close()
            with contextlib.suppress(OSError, BenchError):
                result["server_peak_rss_mib"] = round(server.memory_mib("VmHWM"), 1)
            server.stop()
            result["server_log_lines"] = len(server.log_problems())
            result["server_log_sample"] = server.log_sample()
    if "storm_configured_all_s" in result:
        result["storm_meets_target"] = result["storm_configured_all_s"] < STORM_TARGET_S
    return result


async def _phases(server: ServerProcess, mesh: Path, spec: MeshSpec, args: argparse.Namespace,
                  deadline: Deadline, result: dict[str, Any], fleets: list[Fleet]) -> None:
    address = f"127.0.0.1:{server.xds_port}"
    storm_ids = [(i % args.services, "") for i in range(args.streams)]
    resident_ids = [(i % args.services, "") for i in range(args.residents)]

    def fleet(ids: list[tuple[int, str]], prefix: str) -> Fleet:
        made = Fleet(address, ids, args.delta, prefix=prefix)
        fleets.append(made)
        return made

    # 1. Everybody connects and converges.
    storm = fleet(storm_ids, "storm")
    result["initial_configured_all_s"] = _r(await converge(storm, deadline, "the storm streams"))
    residents = fleet(resident_ids, "resident")
    await converge(residents, deadline, "the residents")
    await storm.quiet(QUIET_S, deadline.left())
    await server.idle(deadline.left())

    # 2. The reference: one change with nothing else going on.
    result["quiet_change_to_residents"] = await change_delay(
        residents, mesh, spec, CHANGED_PORTS[1], deadline, "the quiet change")
    await residents.quiet(QUIET_S, deadline.left())
    await server.idle(deadline.left())

    # 3. The storm.
    await storm.close()
    if args.mode == "restart":
        await residents.close()
        server.stop()
        started = time.perf_counter()
        server.start()
        await asyncio.to_thread(server.wait_ready, min(60.0, deadline.left()))
        result["restart_ready_s"] = _r(time.perf_counter() - started)
        residents = fleet(resident_ids, "resident")
        await converge(residents, deadline, "the residents, on the new server")
        await residents.quiet(QUIET_S, deadline.left())
    cpu_before, bench_cpu_before = server.cpu_seconds(), time.process_time()
    storm = fleet(storm_ids, "storm")
    t0 = time.perf_counter()
    storm.open()

    # 4. The change, during the storm.
    await asyncio.sleep(args.change_after)
    result["storm_configured_at_change"] = len(storm.configured.times)
    result["storm_change_to_residents"] = await change_delay(
        residents, mesh, spec, CHANGED_PORTS[0], deadline, "the change during the storm")
    await deadline.wait("the storm streams to be configured again",
                        storm.configured.done.wait(),
                        lambda: f"{len(storm.configured.times)}/{args.streams} are")
    storm.check()
    times = [at - t0 for at in storm.configured.times.values()]
    result.update({
        "storm_configured_all_s": _r(max(times)),
        "storm_configured_p50_s": _r(statistics.median(times)),
        "storm_configured_first_s": _r(min(times)),
    })
    await storm.quiet(QUIET_S, deadline.left())
    await server.idle(deadline.left())
    result["server_cpu_storm_s"] = round(server.cpu_seconds() - cpu_before, 2)
    result["bench_cpu_storm_s"] = round(time.process_time() - bench_cpu_before, 2)
    result["server_rss_after_storm_mib"] = round(server.memory_mib("VmRSS"), 1)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="S sidecars reconnecting at once, and the push delay for sidecars "
                    "already connected meanwhile (prints JSON).")
    parser.add_argument("--streams", type=int, default=1000, help="storm streams S (1000)")
    parser.add_argument("--services", type=int, default=1000, help="services M (1000)")
    parser.add_argument("--residents", type=int, default=50,
                        help="already-connected streams whose push delay is measured (50)")
    parser.add_argument("--mode", choices=("restart", "drop"), default="restart",
                        help="restart the server on the same ports (a rollout), or drop "
                             "and reopen the storm streams (default restart)")
    parser.add_argument("--scoped", type=int, default=0, metavar="N",
                        help="each sidecar may reach N services (default: all)")
    parser.add_argument("--change-after", type=float, default=0.2,
                        help="seconds into the storm to change an endpoint (0.2)")
    parser.add_argument("--delta", action="store_true", help="incremental xDS")
    add_output_flags(parser, "reconnect_storm.json")
    parser.add_argument("--deadline", type=float, default=240.0,
                        help="seconds the run may take in all (240)")
    return parser


def progress(r: dict[str, Any]) -> str:
    head = (f"{r['protocol']} {r['mode']} S={r['streams']} M={r['services']} "
            f"residents={r['residents']}:")
    if "error" in r:
        return f"{head} FAILED: {r['error']}"
    verdict = "ok" if r["storm_meets_target"] else "MISSED"
    quiet, storm = r["quiet_change_to_residents"], r["storm_change_to_residents"]
    return (f"{head}\n  storm: all {r['streams']} configured again in "
            f"{r['storm_configured_all_s']:.3f} s (p50 {r['storm_configured_p50_s']:.3f} s) "
            f"[target < {STORM_TARGET_S:g}: {verdict}]"
            + (f", server ready again in {r['restart_ready_s']:.2f} s"
               if "restart_ready_s" in r else "")
            + f"\n  change to residents: quiet {quiet['all']:.3f} s, during the storm "
              f"{storm['all']:.3f} s ({r['storm_configured_at_change']} storm streams "
              f"configured when it was written)"
            + f"\n  CPU over the storm: server {r['server_cpu_storm_s']:.2f} s, the simulated "
              f"sidecars {r['bench_cpu_storm_s']:.2f} s; server peak RSS "
              f"{r['server_peak_rss_mib']:.0f} MiB")


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if min(args.streams, args.services, args.residents) < 1 or args.change_after < 0:
        print("--streams, --services and --residents must be at least 1", file=sys.stderr)
        return 2
    out = results_path("reconnect_storm.json", args.out, args.update_baseline)
    try:
        result = asyncio.run(run(args))
    except KeyboardInterrupt:  # run() has already stopped its server
        print("interrupted", file=sys.stderr)
        return 130
    print(progress(result), file=sys.stderr)
    text = json.dumps(result, indent=2)
    print(text)
    write_results(out, text, "reconnect_storm.json")
    return 1 if "error" in result else 0


if __name__ == "__main__":
    sys.exit(main())
