"""What the benchmarks share: the server's Prometheus metrics, a run's time budget, and
py-spy profiles."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import signal
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


def parse_metrics(text: str) -> dict[str, float]:
    """Prometheus text exposition -> {'name{labels}': value}."""
    samples: dict[str, float] = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            key, _, value = line.rpartition(" ")
            with contextlib.suppress(ValueError):
                samples[key] = float(value)
    return samples


def metric(samples: dict[str, float], name: str, labels: str = "") -> float:
    """Sum of the samples of ``name`` whose label text contains ``labels``."""
    return sum(value for key, value in samples.items()
               if (key == name or key.startswith(name + "{")) and labels in key)


class BenchError(Exception):
    """A run could not finish (deadline, a process exited, a wrong answer): reported with
    an ``error`` key and exit code 1, never a traceback."""


@dataclass
class Deadline:
    """One time budget for a whole run; every wait draws on it."""

    seconds: float
    ends: float = field(init=False)

    def __post_init__(self) -> None:
        self.ends = time.monotonic() + self.seconds

    def left(self, cap: float = math.inf) -> float:
        return max(0.0, min(cap, self.ends - time.monotonic()))

    def check(self, what: str) -> None:
        if time.monotonic() >= self.ends:
            raise BenchError(f"the deadline of {self.seconds:.0f} s passed while {what}")

    async def wait(self, what: str, awaitable: Awaitable[Any],
                   progress: Callable[[], str] | None = None) -> None:
        try:
            await asyncio.wait_for(awaitable, self.left())
        except TimeoutError:
            detail = f" ({progress()})" if progress else ""
            raise BenchError(f"the deadline of {self.seconds:.0f} s passed while waiting "
                             f"for {what}{detail}") from None


class Profiler:
    """``py-spy record`` of the server (optional), with threads, as collapsed stacks: one
    ``frame;frame;... count`` line per stack, for speedscope or flamegraph.pl."""

    def __init__(self, pid: int, output: Path, native: bool = False) -> None:
        self.output = output
        output.parent.mkdir(parents=True, exist_ok=True)
        binary = Path(sys.executable).parent / "py-spy"
        if not binary.exists():
            raise BenchError(f"--profile needs py-spy: {sys.executable} -m pip install py-spy")
        with open(output.with_suffix(".log"), "wb") as log:
            self.proc = subprocess.Popen(
                [str(binary), "record", "--pid", str(pid), "--rate", "250", "--threads",
                 *(["--native"] if native else ["--nonblocking"]), "--format", "raw",
                 "--output", str(output)],
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)

    def stop(self) -> None:
        """SIGINT makes py-spy write its output; it is our own child, ended by PID."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


RESULTS = Path(__file__).parent / "results"


def counts(text: str) -> list[int]:
    """An argparse type: positive numbers separated by commas (``10,100,1000``)."""
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: give numbers separated by commas") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: give positive numbers")
    return values


def add_output_flags(parser: Any, baseline: str, note: str = "") -> None:
    """``--out`` and ``--update-baseline`` for a bench whose committed baseline is
    ``bench/results/<baseline>``: a run never overwrites it unless asked to."""
    stem = Path(baseline).stem
    parser.add_argument("--out", type=Path,
                        help=f"JSON output (default: a new bench/results/runs/{stem}-<UTC "
                             f"time>.json, beside the committed baseline "
                             f"bench/results/{baseline}{note})")
    parser.add_argument("--update-baseline", action="store_true",
                        help=f"write the committed baseline bench/results/{baseline} "
                             f"instead{note}")


def results_path(baseline: str, out: Path | None = None, update_baseline: bool = False,
                 now: float | None = None) -> Path:
    """Where a run's JSON goes: ``out`` if given, the baseline only when asked to update
    it, else a new timestamped file under bench/results/runs/ (not committed)."""
    if out is not None:
        return out
    if update_baseline:
        return RESULTS / baseline
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(now))
    return RESULTS / "runs" / f"{Path(baseline).stem}-{stamp}.json"


def write_results(path: Path, text: str, baseline: str) -> None:
    """Write the run's JSON and say where, and where the baseline to compare with is."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text + "\n", encoding="utf-8")
    print(f"wrote {path} (committed baseline: {RESULTS / baseline})", file=sys.stderr)


def finish(result: dict[str, Any], args: argparse.Namespace, baseline: str) -> int:
    """Print the run's JSON, write it where ``--out``/``--update-baseline`` say, and give
    the exit code: 1 if the run recorded an error, else 0."""
    text = json.dumps(result, indent=2)
    print(text)
    write_results(results_path(baseline, args.out, args.update_baseline), text, baseline)
    return 1 if "error" in result else 0


class LoopStalls:
    """The longest the event loop went without running a 5 ms ticker: how long a change
    held up every stream. ``with`` (inside a running loop) or ``async with``; the async
    form lets the ticker start before and settle after the measured block."""

    def __init__(self) -> None:
        self.longest = 0.0
        self._task: asyncio.Task[None] | None = None

    async def _tick(self) -> None:
        last = time.perf_counter()
        while True:
            await asyncio.sleep(0.005)
            now = time.perf_counter()
            self.longest = max(self.longest, now - last - 0.005)
            last = now

    def __enter__(self) -> LoopStalls:
        self._task = asyncio.get_running_loop().create_task(self._tick())
        return self

    def __exit__(self, *exc: object) -> None:
        assert self._task is not None
        self._task.cancel()

    async def __aenter__(self) -> LoopStalls:
        self.__enter__()
        await asyncio.sleep(0.02)
        return self

    async def __aexit__(self, *exc: object) -> None:
        await asyncio.sleep(0.02)
        self.__exit__()

    @property
    def ms(self) -> float:
        return round(self.longest * 1000, 1)
