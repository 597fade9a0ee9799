"""The file source on a big mesh file: how long a save takes to become a mesh, how long
it holds the event loop, and what memory it leaves behind.

In process, with the real FileSource driven as the async iterator the server consumes.
A mesh file of N services (E endpoints each, block style, as people and tools write it)
is saved by rename; the bench records: the full parse and validation of the file
(``load_mesh_bytes``, what every save cost before), the first load by the file source
(every service parsed, in a worker thread), a one-endpoint edit (only that service is
parsed again), a save of identical bytes (hashed, not parsed), and for each the longest
the event loop went without running (a 5 ms ticker). RSS is read from /proc before the
big mesh, with it, and after the file is back to 2 services.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from common import (
    BenchError,
    Deadline,
    LoopStalls,
    add_output_flags,
    results_path,
    write_results,
)

from controlplane.mesh import Mesh, load_mesh_bytes
from controlplane.sources.file import FileSource

BASELINE = "mesh_file.json"
SMALL = "services: [{name: a, port: 80}, {name: b, port: 81}]\n"


def mesh_text(services: int, endpoints: int, port: int = 8080) -> str:
    lines = ["services:"]
    for i in range(services):
        lines += [f"  - name: svc-{i:05d}", "    port: 9080", "    endpoints:"]
        lines += [f"      - {{address: 10.{i // 250 % 250}.{i % 250}.{j + 1}, "
                  f"port: {port if (i, j) == (0, 0) else 8080}, zone: zone-a, "
                  f"labels: {{version: v{j % 2}}}}}" for j in range(endpoints)]
        lines.append("    policy: {timeout: 2s, retries: {attempts: 3}}")
    return "\n".join(lines) + "\n"


def rss_mib() -> float:
    pages = int(Path("/proc/self/statm").read_text().split()[1])
    return round(pages * os.sysconf("SC_PAGE_SIZE") / 2**20, 1)


async def run(args: argparse.Namespace, root: Path) -> dict[str, Any]:
    deadline = Deadline(args.deadline)
    path = root / "mesh.yaml"

    def save(text: str) -> None:
        tmp = root / "mesh.tmp"
        tmp.write_text(text, encoding="utf-8")
        tmp.replace(path)

    big = mesh_text(args.services, args.endpoints)
    edited = mesh_text(args.services, args.endpoints, port=8081)
    results: dict[str, Any] = {"services": args.services, "endpoints_per_service":
                               args.endpoints, "file_mib": round(len(big) / 2**20, 2)}
    started = time.perf_counter()
    load_mesh_bytes(big.encode())
    results["full_parse_s"] = round(time.perf_counter() - started, 2)
    gc.collect()

    save(SMALL)
    source = FileSource(path, poll_interval=0.05)
    updates: AsyncIterator[Mesh] = source.updates()
    try:
        await deadline.wait("the first mesh", anext(updates))
        gc.collect()
        results["rss_before_mib"] = rss_mib()
        for name, text in (("first_load", big), ("one_endpoint_edit", edited)):
            with LoopStalls() as stall:
                started = time.perf_counter()
                save(text)
                mesh = await asyncio.wait_for(anext(updates), deadline.left())
                results[name] = {"seconds": round(time.perf_counter() - started, 3),
                                 "services_parsed": source.loader.parsed,
                                 "loop_stall_ms": round(stall.longest * 1000, 1)}
            if len(mesh.services) != args.services:
                raise BenchError(f"{name}: {len(mesh.services)} services, not {args.services}")
            del mesh
        results["rss_with_big_mesh_mib"] = rss_mib()
        with LoopStalls() as stall:
            save(edited)  # the same bytes: hashed, not parsed, nothing yielded
            await asyncio.sleep(0.5)
            results["identical_save_loop_stall_ms"] = round(stall.longest * 1000, 1)
        save(SMALL)
        await asyncio.wait_for(anext(updates), deadline.left())
        gc.collect()
        results["rss_after_mib"] = rss_mib()
    except TimeoutError:
        raise BenchError(f"the deadline of {args.deadline:.0f} s passed") from None
    finally:
        await updates.aclose()
    return results


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--services", type=int, default=12000,
                        help="services in the big mesh file (default 12000: ~5 MB)")
    parser.add_argument("--endpoints", type=int, default=4,
                        help="endpoints per service (default 4)")
    parser.add_argument("--deadline", type=float, default=300.0,
                        help="the whole run ends within this many seconds (default 300)")
    add_output_flags(parser, BASELINE)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    out = results_path(BASELINE, args.out, args.update_baseline)
    with tempfile.TemporaryDirectory(prefix="mesh-file-bench-") as tmp:
        try:
            results = asyncio.run(run(args, Path(tmp)))
        except BenchError as exc:
            results = {"error": str(exc)}
    text = json.dumps(results, indent=2)
    print(text)
    write_results(out, text, BASELINE)
    return 1 if "error" in results else 0


if __name__ == "__main__":
    sys.exit(main())
