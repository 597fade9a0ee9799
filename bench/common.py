"""What the benchmarks share: the server's Prometheus metrics, and py-spy profiles."""

from __future__ import annotations

import contextlib
import signal
import subprocess
import sys
from pathlib import Path


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


class Profiler:
    """``py-spy record`` of the server (optional), with threads, as collapsed stacks: one
    ``frame;frame;... count`` line per stack, for speedscope or flamegraph.pl."""

    def __init__(self, pid: int, output: Path) -> None:
        self.output = output
        output.parent.mkdir(parents=True, exist_ok=True)
        binary = Path(sys.executable).parent / "py-spy"
        if not binary.exists():
            raise BenchError(f"--profile needs py-spy: {sys.executable} -m pip install py-spy")
        with open(output.with_suffix(".log"), "wb") as log:
            self.proc = subprocess.Popen(
                [str(binary), "record", "--pid", str(pid), "--rate", "250", "--nonblocking",
                 "--threads", "--format", "raw", "--output", str(output)],
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
