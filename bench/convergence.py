#!/usr/bin/env python3
"""Convergence as the server measures it, beside the same figure measured from outside.

Issue 12's server times every change from the source event (here: the mesh file's save)
to each proxy's ACK of the version that holds it, and reports it in ``/debug/changes``
(per change: p50 / p99 / max over the proxies) and in the histogram
``controlplane_convergence_seconds``. This bench checks that figure against one it takes
itself: it runs ``controlplane serve`` on a generated mesh (bench/serverproc.py,
bench/meshgen.py), connects S simulated sidecars (bench/xds_fleet.py, one snapshot group
each, as in a real mesh), moves one endpoint R times, and times each change from the
moment it renamed the new mesh file into place to the moment each stream wrote its ACK
of the new EDS version, on the wall clock the server uses too (``time.time()``).

    .venv/bin/python bench/convergence.py [--streams 10,100,1000] [--services 1000]
        [--changes 5] [--delta]

Prints a table (streams; server p50 / p99; outside p50 / p99; server minus outside) and
writes JSON; see bench/README.md for the keys.
"""

from __future__ import annotations

import argparse
import asyncio
import json
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
    add_output_flags,
    counts,
    metric,
    results_path,
    write_results,
)
from meshgen import CHANGED_PORTS, MeshSpec, mesh_yaml, proxy_identities, write_atomically
from serverproc import ServerProcess
from xds_figures import percentile
from xds_fleet import Fleet

BASELINE = "convergence.json"
DELTA_BASELINE = "convergence_delta.json"
QUIET_S = 0.3  # no message for this long = the server has finished pushing
HISTOGRAM = "controlplane_convergence_seconds"
ENDPOINT_TYPE = 'type="endpoint"'
SERVER_REPORT_S = 35.0  # after every ACK: the server's warn-after (30 s) and some
LOAD_LIMIT = 1.5  # above this 1-minute load average, other work shares the 2 CPUs


@dataclass(frozen=True)
class Options:
    services: int
    changes: int
    delta: bool
    deadline_s: float
    poll_interval_s: float | None
    per_stream: bool = False


def _ms(seconds: float) -> float:
    return round(seconds * 1000, 2)


def spread(values: Sequence[float]) -> dict[str, float]:
    """p50 / p99 (nearest rank) / max / mean of per-proxy seconds, rounded to 0.1 ms."""
    return {"p50": round(percentile(values, 50), 4), "p99": round(percentile(values, 99), 4),
            "max": round(max(values), 4), "mean": round(statistics.fmean(values), 4)}


def _entries(body: str) -> list[dict[str, Any]]:
    changes = json.loads(body).get("changes")
    if not isinstance(changes, list):
        raise BenchError("/debug/changes has no 'changes' list: is this server from "
                         "before issue 12's convergence tracking?")
    return [c for c in changes if isinstance(c, dict)]


async def _changes(server: ServerProcess) -> list[dict[str, Any]]:
    """The entries of ``/debug/changes``."""
    status, body = await asyncio.to_thread(server.get, "/debug/changes")
    if status == 404:
        raise BenchError(f"GET /debug/changes answered 404 ({body[:200]}): run the bench "
                         f"from a checkout whose server follows changes (issue 12)")
    if status != 200:
        raise BenchError(f"GET /debug/changes answered {status}: {body[:200]}")
    return _entries(body)


def latest_generation(entries: list[dict[str, Any]]) -> int:
    return max((int(c.get("generation") or 0) for c in entries), default=0)


async def _server_change(server: ServerProcess, after_generation: int,
                         deadline: Deadline) -> dict[str, Any]:
    """Poll ``/debug/changes`` until the change the bench made (a generation after
    ``after_generation``: the changes are made one at a time) is complete there. Matched
    by generation, not time: the stamp is the file's mtime, on the kernel's coarse clock,
    which can read a few ms before the bench's clock did at the write."""
    found: list[dict[str, Any]] = []
    # Every stream has ACKed and the server is idle by now: the entry is due at once,
    # unless the server's warn-after (30 s) has yet to end a change it thinks incomplete.
    limit = time.monotonic() + min(deadline.left(), SERVER_REPORT_S)
    while time.monotonic() < limit:
        found = [c for c in await _changes(server)
                 if int(c.get("generation") or 0) > after_generation]
        if found and all(c.get("complete") for c in found):
            break
        await asyncio.sleep(0.05)
    else:
        raise BenchError(f"every stream ACKed, but the server did not report the change "
                         f"complete in /debug/changes within {SERVER_REPORT_S:.0f} s: "
                         f"{found[:1] or 'no entry'}")
    entry = max(found, key=lambda c: int(c.get("affected") or 0))
    return {**entry, "entries_for_this_edit": len(found)}


async def one_change(fleet: Fleet, server: ServerProcess, mesh: Path, spec: MeshSpec,
                     affected: list[int], n: int, deadline: Deadline,
                     per_stream: bool = False) -> dict[str, Any]:
    """Move svc-0000's first endpoint; time it from the rename to each affected stream's
    ACK (outside), and read the server's own figures for the same change."""
    before = await server.metrics()
    known = latest_generation(await _changes(server))
    mark = fleet.begin_change(affected)
    text = mesh_yaml(spec, CHANGED_PORTS[n % 2])
    write_atomically(mesh, text)
    written_at = time.time()
    modified_at = mesh.stat().st_mtime_ns / 1e9  # the kernel's (coarse) clock of the save
    try:
        await deadline.wait(f"change {n + 1} to reach every stream", mark.done.wait(),
                            lambda: f"{len(mark.times)}/{len(affected)} streams have it")
        await fleet.quiet(QUIET_S, deadline.left())
        await server.idle(deadline.left())
    finally:
        fleet.end_change()
    fleet.check()
    server.check_alive()
    missing = [i for i in affected if i not in mark.acked]
    if missing:
        raise BenchError(f"change {n + 1}: {len(missing)} streams never ACKed the new "
                         f"version (stream {missing[0]} first)")
    entry = await _server_change(server, known, deadline)
    after = await server.metrics()
    outside = spread([mark.acked[i] - written_at for i in affected])
    published_at = entry.get("published_at")
    seconds = entry.get("seconds") or {}
    count = metric(after, HISTOGRAM + "_count", ENDPOINT_TYPE) - metric(
        before, HISTOGRAM + "_count", ENDPOINT_TYPE)
    total = metric(after, HISTOGRAM + "_sum", ENDPOINT_TYPE) - metric(
        before, HISTOGRAM + "_sum", ENDPOINT_TYPE)
    return {
        "generation": entry.get("generation"),
        "written_at": round(written_at, 4),  # the rename, time.time(): for the logs
        "server": {key: seconds.get(key) for key in ("p50", "p99", "max")},
        "server_histogram": {"count": round(count), "mean": round(total / count, 4)
                             if count else None},
        "outside": outside,
        "server_affected": entry.get("affected"), "server_acked": entry.get("acked"),
        "server_entries_for_this_edit": entry["entries_for_this_edit"],
        # The server's clock starts at its stamp of the file event (the file's mtime,
        # else the watch's wake-up); the bench's at the rename.
        "observed_after_write_ms": _ms(float(entry["observed_at"]) - written_at),
        "published_after_write_ms": _ms(float(entry["published_at"]) - written_at)
        if entry.get("published_at") is not None else None,
        # Where the file's mtime puts the save.
        "mtime_after_write_ms": _ms(modified_at - written_at),
        "laggards": entry.get("laggards", []),
        **_before_published(mark.acked, affected, published_at, written_at),
        **({"per_stream": await _per_stream(server, fleet, mark.acked, affected, entry)}
           if per_stream else {}),
    }


async def _per_stream(server: ServerProcess, fleet: Fleet, acked: dict[int, float],
                      affected: list[int], entry: dict[str, Any]) -> dict[str, Any]:
    """Stream by stream (``/debug/proxies``: each stream's last change and its seconds),
    the server's figure minus the outside one with both clocks at the server's stamp: how
    late the server counted each ACK; and how many it counted at ``published_at`` (ACKs
    it had taken before the pipeline told the tracker of the change). Costly at 1000
    streams (the answer lists every subscription), so only with --per-stream."""
    status, body = await asyncio.to_thread(server.get, "/debug/proxies", 120.0)
    if status != 200:
        raise BenchError(f"GET /debug/proxies answered {status}: {body[:200]}")
    seconds = {s.get("node_id"): (s.get("convergence") or {}).get("seconds")
               for s in json.loads(body)
               if (s.get("convergence") or {}).get("generation") == entry.get("generation")}
    observed = float(entry["observed_at"])
    at_publish = float(entry["published_at"]) - observed
    lags: list[float] = []
    credited_at_publish = 0
    for i in affected:
        server_s = seconds.get(fleet.proxies[i].node.id)
        if server_s is not None:
            lags.append(float(server_s) - (acked[i] - observed))
            credited_at_publish += abs(float(server_s) - at_publish) < 0.0006
    if not lags:
        return {"paired": 0}
    ordered = sorted(lags)
    return {"paired": len(lags), "credited_at_publish": credited_at_publish,
            "lag_ms": {"min": _ms(ordered[0]), "p50": _ms(percentile(ordered, 50)),
                       "p99": _ms(percentile(ordered, 99)), "max": _ms(ordered[-1])}}


def _before_published(acked: dict[int, float], affected: list[int],
                      published_at: float | None, written_at: float) -> dict[str, Any]:
    """How many streams ACKed before the server's ``published_at`` (the pipeline tells
    the tracker of a change after its last group is published), and the outside figures
    if those ACKs counted only from then: what a tracker that credits an earlier ACK at
    publish time would report."""
    if published_at is None:
        return {}
    at = float(published_at)
    return {"acked_before_published": sum(acked[i] < at for i in affected),
            "outside_if_credited_at_publish": spread(
                [max(acked[i], at) - written_at for i in affected])}


def summarize(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    """Medians over the R changes of each figure, and server minus outside in ms."""
    def med(side: str, key: str) -> float | None:
        values = [r[side][key] for r in rounds if (r.get(side) or {}).get(key) is not None]
        return round(statistics.median(values), 4) if values else None

    figures: dict[str, Any] = {}
    for key in ("p50", "p99", "max"):
        server, outside = med("server", key), med("outside", key)
        figures[f"server_{key}_s"] = server
        figures[f"outside_{key}_s"] = outside
        diffs = [r["server"][key] - r["outside"][key] for r in rounds
                 if r["server"].get(key) is not None]
        figures[f"difference_{key}_ms"] = _ms(statistics.median(diffs)) if diffs else None
        # The same with the outside clock started at the server's stamp, not the rename:
        # what is left is the ACK side (the server reads an ACK after it was written).
        same = [r["server"][key] - r["outside"][key] + r["observed_after_write_ms"] / 1000
                for r in rounds if r["server"].get(key) is not None]
        figures[f"difference_same_start_{key}_ms"] = (_ms(statistics.median(same)) if same
                                                      else None)
    figures["server_histogram_mean_s"] = med("server_histogram", "mean")
    figures["outside_mean_s"] = med("outside", "mean")
    figures["server_histogram_count_per_change"] = statistics.median(
        r["server_histogram"]["count"] for r in rounds)
    for key in ("p50", "p99"):
        figures[f"outside_if_credited_at_publish_{key}_s"] = med(
            "outside_if_credited_at_publish", key)
    figures["acked_before_published_median"] = statistics.median(
        r.get("acked_before_published", 0) for r in rounds)
    for key in ("observed_after_write_ms", "mtime_after_write_ms"):
        figures[f"{key}_median"] = round(statistics.median(r[key] for r in rounds), 2)
    return figures


async def run_scenario(streams: int, opts: Options) -> dict[str, Any]:
    """Start a server, converge S streams, make R changes; always ends the server."""
    spec = MeshSpec(services=opts.services)
    identities = proxy_identities(streams, streams, 0)
    result: dict[str, Any] = {
        "bench": "convergence", "protocol": "delta" if opts.delta else "sotw",
        "streams": streams, "services": opts.services, "groups": streams,
        "changes": opts.changes, "host_cpus": os.cpu_count(),
        "load_avg_1m_start": round(os.getloadavg()[0], 2),
    }
    if result["load_avg_1m_start"] > LOAD_LIMIT:
        print(f"note: load average {result['load_avg_1m_start']} > {LOAD_LIMIT}: other work "
              f"shares the CPUs, the figures will be noisy", file=sys.stderr)
    deadline = Deadline(opts.deadline_s)
    with tempfile.TemporaryDirectory(prefix="convergence-") as tmp:
        mesh = Path(tmp) / "mesh.yaml"
        write_atomically(mesh, mesh_yaml(spec, CHANGED_PORTS[-1]))
        server = ServerProcess(mesh, Path(tmp), opts.poll_interval_s)
        try:
            server.start()
            await asyncio.to_thread(server.wait_ready, min(60.0, deadline.left()))
            fleet = Fleet(f"127.0.0.1:{server.xds_port}", identities, opts.delta)
            affected = [i for i, (s, _) in enumerate(identities) if spec.sees_changed(s)]
            try:
                fleet.open()
                await deadline.wait("every stream to be configured",
                                    fleet.configured.done.wait(),
                                    lambda: f"{len(fleet.configured.times)}/{streams} are")
                fleet.check()
                await fleet.quiet(QUIET_S, deadline.left())
                await server.idle(deadline.left())
                rounds = [await one_change(fleet, server, mesh, spec, affected, n, deadline,
                                           opts.per_stream)
                          for n in range(opts.changes)]
            finally:
                await fleet.close()
            result["affected_streams"] = len(affected)
            result.update(summarize(rounds))
            result["per_change"] = rounds
        except BenchError as exc:
            result["error"] = str(exc)
        finally:
            server.stop()
            result["server_log_lines"] = len(server.log_problems())
            result["server_log_sample"] = server.log_sample()
    result["load_avg_1m_end"] = round(os.getloadavg()[0], 2)
    return result


def _cell(value: float | None, scale: float = 1000) -> str:
    return "-" if value is None else f"{value * scale:.1f}"


def table(results: list[dict[str, Any]]) -> str:
    """The benchmark line per S, in ms: the server's p50 / p99, the outside ones, server
    minus outside, the watch's latency, and the difference left with both clocks started
    at the server's stamp (the ACK side)."""
    def pair(r: dict[str, Any], name: str, scale: float = 1000) -> str:
        cells = (_cell(r[name.format(q)], scale) for q in ("p50", "p99"))
        return " / ".join(cells)

    rows = [f"{'streams':>7}  {'server p50/p99':>15}  {'outside p50/p99':>15}  "
            f"{'difference':>13}  {'watch':>5}  {'same start':>13}  load"]
    for r in results:
        if "error" in r:
            rows.append(f"{r['streams']:>7}  FAILED: {r['error']}")
            continue
        rows.append(
            f"{r['streams']:>7}  {pair(r, 'server_{}_s'):>15}  {pair(r, 'outside_{}_s'):>15}  "
            f"{pair(r, 'difference_{}_ms', 1):>13}  {r['observed_after_write_ms_median']:>5.1f}"
            f"  {pair(r, 'difference_same_start_{}_ms', 1):>13}  {r['load_avg_1m_start']}")
    return "\n".join(rows) + "\n(ms; difference = server - outside; watch = the server's " \
        "stamp - the save; same start: the difference with both clocks at the stamp)"


# --- command line ----------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="The server's convergence figure for one endpoint change beside the "
                    "one measured from outside, at S streams (prints a table and JSON).")
    parser.add_argument("--streams", type=counts, default=[10, 100, 1000],
                        help="simulated ADS streams S, one service each (default "
                             "10,100,1000)")
    parser.add_argument("--services", type=int, default=1000,
                        help="services in the mesh (default 1000)")
    parser.add_argument("--changes", type=int, default=5,
                        help="endpoint changes R per scenario; medians are reported")
    parser.add_argument("--delta", action="store_true",
                        help="incremental xDS (DeltaAggregatedResources) instead of SotW")
    parser.add_argument("--per-stream", action="store_true",
                        help="after each change, pair the server's figure with the outside "
                             "one stream by stream (GET /debug/proxies: heavy at 1000 "
                             "streams)")
    add_output_flags(parser, BASELINE, "; convergence_delta with --delta")
    parser.add_argument("--deadline", type=float, default=180.0,
                        help="seconds a scenario may take in all (default 180)")
    parser.add_argument("--poll-interval", type=float, default=None,
                        help="the server's file poll interval (default: the server's own, "
                             "a fallback to notifications)")
    return parser


async def run_all(args: argparse.Namespace) -> list[dict[str, Any]]:
    opts = Options(services=args.services, changes=args.changes, delta=args.delta,
                   deadline_s=args.deadline, poll_interval_s=args.poll_interval,
                   per_stream=args.per_stream)
    results = []
    for streams in args.streams:
        result = await run_scenario(streams, opts)
        results.append(result)
        print(table([result]).splitlines()[1], file=sys.stderr, flush=True)
    return results


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.changes < 1 or args.services < 1:
        print("--changes and --services must be at least 1", file=sys.stderr)
        return 2
    baseline = DELTA_BASELINE if args.delta else BASELINE
    out = results_path(baseline, args.out, args.update_baseline)
    try:
        results = asyncio.run(run_all(args))
    except KeyboardInterrupt:  # run_scenario has already stopped its server
        print("interrupted", file=sys.stderr)
        return 130
    print(table(results))
    write_results(out, json.dumps(results, indent=2), baseline)
    return 1 if any("error" in r for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
