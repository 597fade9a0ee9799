"""The lab's traffic generator: requests to the frontend through its own sidecar.

Also runs alone: ``python -m controlplane.lab.traffic --url http://frontend:9080/`` in a
captured pod (the captured lab, the compose lab), or ``--egress-port 15001`` to call the
sidecar's egress port with ``Host: frontend``. With ``--json`` it prints one JSON line a
second and takes ``rate N`` lines on stdin: how the captured lab runs it in its pod.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import threading
import time
from collections import Counter

import aiohttp


class Traffic:
    """Requests to the frontend through the load generator's own sidecar."""

    def __init__(self, session: aiohttp.ClientSession, egress_port: int, rate: float,
                 url: str | None = None) -> None:
        """``url``: the frontend's plain URL (captured); None: the egress port by Host."""
        self.session = session
        self.url = url or f"http://127.0.0.1:{egress_port}/"
        self.headers = {} if url else {"Host": "frontend"}
        self.rate = rate
        self.latencies: list[float] = []
        self.statuses: Counter[int] = Counter()
        self.versions: Counter[str] = Counter()
        self.callers: dict[str, str] = {}
        """Per service, the SPIFFE ID its app last saw calling it (mTLS), from the
        answers' ``caller`` fields."""

    async def run(self) -> None:
        gate = asyncio.Semaphore(64)
        tasks: set[asyncio.Task[None]] = set()
        while True:
            await gate.acquire()
            task = asyncio.create_task(self._one(gate))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
            await asyncio.sleep(1 / self.rate)

    async def _one(self, gate: asyncio.Semaphore) -> None:
        started = time.perf_counter()
        try:
            async with self.session.get(self.url, headers=self.headers,
                                        timeout=aiohttp.ClientTimeout(total=5)) as response:
                body = await response.json(content_type=None) if response.status == 200 else {}
                self.statuses[response.status] += 1
                version = body.get("reviews", {}).get("version") if isinstance(body, dict) else None
                if version:
                    self.versions[str(version)] += 1
                record_callers(body, self.callers)
        except (aiohttp.ClientError, TimeoutError, ValueError):
            self.statuses[0] += 1
        finally:
            self.latencies.append(time.perf_counter() - started)
            gate.release()

    def take(self) -> tuple[list[float], Counter[int], Counter[str]]:
        taken = self.latencies, self.statuses, self.versions
        self.latencies, self.statuses, self.versions = [], Counter(), Counter()
        return taken


def record_callers(body: object, callers: dict[str, str]) -> None:
    """Each nested answer's ``caller`` by its ``service`` (frontend's, then reviews' in
    it, then ratings'), into ``callers``."""
    while isinstance(body, dict):
        service, caller = body.get("service"), body.get("caller")
        if isinstance(service, str) and isinstance(caller, str):
            callers[service] = caller
        body = next((v for v in body.values() if isinstance(v, dict)), None)


def _follow_rate(traffic: Traffic, loop: asyncio.AbstractEventLoop) -> None:
    """``rate N`` lines on stdin set the rate (the captured lab's scenarios use it)."""
    def read() -> None:
        for line in sys.stdin:
            words = line.split()
            if len(words) == 2 and words[0] == "rate":
                try:
                    rate = float(words[1])
                except ValueError:
                    continue
                if rate > 0:
                    loop.call_soon_threadsafe(setattr, traffic, "rate", rate)
    threading.Thread(target=read, daemon=True).start()


async def _main(egress_port: int, rate: float, duration: float, url: str | None,
                as_json: bool) -> None:
    async with aiohttp.ClientSession(trust_env=False) as session:
        traffic = Traffic(session, egress_port, rate, url)
        if as_json:
            _follow_rate(traffic, asyncio.get_running_loop())
        task = asyncio.create_task(traffic.run())
        started = time.monotonic()
        while not duration or time.monotonic() - started < duration:
            await asyncio.sleep(1.0)
            latencies, statuses, versions = traffic.take()
            if as_json:
                print(json.dumps({"latencies": latencies, "statuses": statuses,
                                  "versions": versions, "callers": traffic.callers}),
                      flush=True)
                continue
            p50 = 1000 * statistics.median(latencies) if latencies else 0.0
            print(f"requests {len(latencies)} statuses {dict(statuses)} "
                  f"reviews {dict(versions)} p50 {p50:.1f}ms", flush=True)
        task.cancel()


def main() -> None:
    parser = argparse.ArgumentParser(description="Send lab traffic to the frontend.")
    parser.add_argument("--url", help="the frontend's plain URL, e.g. http://frontend:9080/ "
                        "(captured); without it, --egress-port with Host: frontend")
    parser.add_argument("--egress-port", type=int, default=15001)
    parser.add_argument("--rate", type=float, default=20.0, help="requests per second")
    parser.add_argument("--duration", type=float, default=0.0, help="seconds (0: forever)")
    parser.add_argument("--json", action="store_true",
                        help="one JSON line a second; `rate N` lines on stdin set the rate")
    args = parser.parse_args()
    asyncio.run(_main(args.egress_port, args.rate, args.duration, args.url, args.json))


if __name__ == "__main__":
    main()
