"""What the lab shows, once a second, from the sidecars' own stats.

Per service: requests a second and success rate (the inbound listeners' counters of its
instances), p50/p99 latency (the inbound listeners' latency histograms, per 1 s flush
interval; the slowest instance's, as a conservative figure) and which versions answer
(each instance's share of the requests). Rendered as a live table on a terminal, or as
one line a second (``--headless``, or when the output is not a terminal).

Under it, from the control plane's own view: how far the last edit got ("your edit
reached 5/5 sidecars in 140 ms", from /debug/changes) and the NACKs standing now (from
/debug/rejections, else each proxy's last NACK in /debug/proxies).
"""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TextIO

import aiohttp
from rich.console import Console, Group, RenderableType
from rich.table import Table
from rich.text import Text

from controlplane.lab.sidecars import Sidecar

_COUNTERS = r"^http\.inbound\.downstream_rq_(completed|2xx)$"
_LATENCY = r"^http\.inbound\.downstream_rq_time$"


@dataclass
class ServiceStats:
    requests: int = 0
    ok: int = 0
    p50_ms: float | None = None
    p99_ms: float | None = None
    versions: dict[str, int] = field(default_factory=dict)

    def line(self, name: str, seconds: float) -> str:
        rate = f"{100 * self.ok / self.requests:5.1f}%" if self.requests else "   - "
        text = f"{name} {self.requests / seconds:5.1f} rps {rate} ok"
        if self.p50_ms is not None and self.p99_ms is not None:
            text += f" p50 {_ms(self.p50_ms)} p99 {_ms(self.p99_ms)}"
        total = sum(self.versions.values())
        if total and len(self.versions) > 1:
            text += " [" + " ".join(f"{v} {100 * n / total:.0f}%"
                                    for v, n in sorted(self.versions.items())) + "]"
        return text


def _ms(value: float) -> str:
    """Envoy records request times in whole milliseconds: 0 means under one."""
    return "<1ms" if value < 0.5 else f"{value:.0f}ms"


class Stats:
    """Turns the sidecars' cumulative counters into per-interval figures."""

    def __init__(self, sidecars: list[Sidecar]) -> None:
        self.sidecars = [s for s in sidecars if s.instance.app_port]
        self._before: dict[str, dict[str, int]] = {}

    async def sample(self, session: aiohttp.ClientSession) -> dict[str, ServiceStats]:
        result: dict[str, ServiceStats] = defaultdict(ServiceStats)
        for sidecar in self.sidecars:
            instance = sidecar.instance
            now = await sidecar.counters(session, _COUNTERS)
            old = self._before.get(instance.node_id, now)
            self._before[instance.node_id] = now
            done = now.get("http.inbound.downstream_rq_completed", 0) - old.get(
                "http.inbound.downstream_rq_completed", 0)
            ok = now.get("http.inbound.downstream_rq_2xx", 0) - old.get(
                "http.inbound.downstream_rq_2xx", 0)
            stats = result[instance.service]
            stats.requests += done
            stats.ok += ok
            stats.versions[instance.version] = stats.versions.get(instance.version, 0) + done
            p50, p99 = await _quantiles(sidecar, session)
            if p50 is not None and (stats.p50_ms is None or p50 > stats.p50_ms):
                stats.p50_ms = p50
            if p99 is not None and (stats.p99_ms is None or p99 > stats.p99_ms):
                stats.p99_ms = p99
        return dict(result)


async def _quantiles(sidecar: Sidecar,
                     session: aiohttp.ClientSession) -> tuple[float | None, float | None]:
    """P50 and P99 of the last flush interval, in ms (None when there was no request)."""
    try:
        async with session.get(f"{sidecar.admin_url}/stats",
                               params={"format": "json", "filter": _LATENCY}) as response:
            data = json.loads(await response.text())
    except (aiohttp.ClientError, TimeoutError, ValueError):
        return None, None
    for stat in data.get("stats", []):
        histograms = stat.get("histograms")
        if not histograms:
            continue
        supported = histograms.get("supported_quantiles", [])
        for computed in histograms.get("computed_quantiles", []):
            values = dict(zip(supported, computed.get("values", []), strict=False))
            p50 = (values.get(50) or values.get(50.0) or {}).get("interval")
            p99 = (values.get(99) or values.get(99.0) or {}).get("interval")
            return p50, p99
    return None, None


def render_line(elapsed: float, services: dict[str, ServiceStats], order: list[str],
                extra: str, out: TextIO, problem: str = "") -> None:
    """One line a second; ``problem`` (the mesh file's, until fixed) ends every line."""
    parts = [services.get(name, ServiceStats()).line(name, 1.0) for name in order]
    tail = f" | {problem}" if problem else ""
    print(f"[{elapsed:5.0f}s]", " | ".join(parts), extra + tail, file=out, flush=True)


def render_callers(callers: dict[str, str], order: list[str]) -> str:
    """Who calls each service over mTLS, as its app sees it (the SPIFFE ID its sidecar
    verified and passed in ``x-forwarded-client-cert``); said again when it changes."""
    if not callers:
        return "mTLS: no app sees a caller's identity (plaintext calls)"
    return "mTLS: " + ", ".join(f"{name} called by {callers[name]}" for name in order
                                if name in callers)


def render_table(elapsed: float, services: dict[str, ServiceStats], order: list[str],
                 extra: str, problems: list[str] | None = None,
                 note: str = "", callers: dict[str, str] | None = None,
                 server: Sequence[tuple[str, str]] = ()) -> RenderableType:
    """The live table; under it the server's lines (``(text, style)``: the last edit's
    convergence, NACKs), and in red the mesh file's problems until a save fixes them.
    ``callers``: a column with the SPIFFE ID each service's app sees calling it."""
    table = _table(elapsed, services, order, extra, callers or {})
    parts: list[RenderableType] = [table]
    if server:
        told = Text()
        for line, style in server:
            told.append(line + "\n", style=style)
        parts.append(told)
    if not problems:
        return parts[0] if len(parts) == 1 else Group(*parts)
    shown = problems[:8]
    text = Text("Mesh file rejected: " + (note or "fix it and save again") + "\n", style="bold red")
    for problem in shown:
        text.append(f"  {problem}\n", style="red")
    if len(problems) > len(shown):
        text.append(f"  ... and {len(problems) - len(shown)} more\n", style="red")
    return Group(*parts, text)


def _table(elapsed: float, services: dict[str, ServiceStats], order: list[str],
           extra: str, callers: dict[str, str]) -> Table:
    table = Table(title=f"controlplane lab: {elapsed:.0f}s  {extra}".rstrip(),
                  title_justify="left", expand=False)
    for column in ("service", "rps", "success", "p50", "p99", "versions answering",
                   "caller (mTLS)"):
        table.add_column(column, justify="right" if column in ("rps", "success", "p50",
                                                               "p99") else "left")
    for name in order:
        stats = services.get(name, ServiceStats())
        total = sum(stats.versions.values())
        success = f"{100 * stats.ok / stats.requests:.1f}%" if stats.requests else "-"
        style = "red" if stats.requests and stats.ok < stats.requests else ""
        table.add_row(
            name, f"{stats.requests:.0f}", f"[{style}]{success}[/]" if style else success,
            _ms(stats.p50_ms) if stats.p50_ms is not None else "-",
            _ms(stats.p99_ms) if stats.p99_ms is not None else "-",
            " ".join(f"{v} {100 * n / total:.0f}%" for v, n in sorted(stats.versions.items()))
            if total else "-", callers.get(name, "-"))
    return table


def console(out: TextIO) -> Console:
    return Console(file=out)


# --- the control plane's view: the last edit's convergence, the NACKs standing now ------

MAX_ERROR_SHOWN = 160  # an Envoy error can be kilobytes: the line keeps its start


def _plural(count: int, word: str) -> str:
    return f"{count} {word}" if count == 1 else f"{count} {word}s"


def _duration(seconds: float) -> str:
    return f"{seconds * 1000:.0f} ms" if seconds < 1 else f"{seconds:.1f} s"


def _int(value: Any) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) else 0


def convergence_line(change: Mapping[str, Any], now: float | None) -> tuple[str, str]:
    """How far one change of /debug/changes got, and a style: "your edit reached 5/5
    sidecars in 140 ms" once every sidecar it changed has ACKed it (the slowest ACK, from
    the save as the server saw it), else how many have so far and who is missing (and,
    given ``now``, how long ago the save was)."""
    affected, acked = _int(change.get("affected")), _int(change.get("acked"))
    gone = _int(change.get("disconnected"))
    left = f" ({gone} disconnected first)" if gone else ""
    seconds = change.get("seconds")
    slowest = seconds.get("max") if isinstance(seconds, Mapping) else None
    result = change.get("result")
    if affected == 0:
        return "your edit changed no connected sidecar's config", "dim"
    if change.get("complete") and isinstance(slowest, (int, float)):
        return (f"your edit reached {acked}/{_plural(affected, 'sidecar')} in "
                f"{_duration(float(slowest))}{left}", "green")
    if change.get("complete"):  # every affected sidecar left before it ACKed
        return f"your edit reached 0/{_plural(affected, 'sidecar')}{left}", "yellow"
    laggards = [str(n) for n in change.get("laggards") or [] if n][:3]
    waiting = f"; waiting for {', '.join(laggards)}" if laggards else ""
    since = change.get("observed_at")
    after = (f" {_duration(max(0.0, now - since))} after the save"
             if now is not None and isinstance(since, (int, float))
             and not isinstance(since, bool) else "")
    reached = f"{acked}/{_plural(affected, 'sidecar')}"
    if result == "not_converged":
        missing = f"; not {', '.join(laggards)}" if laggards else ""
        return (f"your edit reached only {reached}{missing}{left} (the server stopped "
                "waiting: see its change.not_converged warning and controlplane status)",
                "bold red")
    if result == "dropped":
        return (f"your edit reached {reached} when the server stopped following it (too "
                "many changes at once)", "yellow")
    return f"your edit reached {reached} so far{after}{waiting}{left}", "yellow"


@dataclass(frozen=True)
class Nack:
    """A sidecar rejecting the last config of one type, and what the server says made it."""

    node_id: str
    type: str
    error: str
    origin: str = ""


def nacks_of_rejections(summary: Any) -> list[Nack]:
    """The NACKs standing now, from /debug/rejections (each with the objects it comes
    from: the policies, else the services)."""
    found: list[Nack] = []
    rows = summary.get("rejections") if isinstance(summary, Mapping) else None
    for row in rows if isinstance(rows, list) else []:
        if not isinstance(row, Mapping):
            continue
        policies = [f"{p.get('kind')} {p.get('namespace')}/{p.get('name')}"
                    for p in row.get("policies") or [] if isinstance(p, Mapping)]
        services = [f"Service {s}" for s in row.get("services") or [] if isinstance(s, str)]
        found.append(Nack(str(row.get("node_id") or "?"), str(row.get("type") or "?"),
                          str(row.get("error") or ""), ", ".join(policies or services)))
    return found


def nacks_of_proxies(proxies: Any) -> list[Nack]:
    """The NACKs standing now, from /debug/proxies: a type whose latest push the proxy
    rejected (its last NACK is of the version last sent, which it has not ACKed)."""
    found: list[Nack] = []
    for proxy in proxies if isinstance(proxies, list) else []:
        types = proxy.get("types") if isinstance(proxy, Mapping) else None
        for short, state in (types or {}).items() if isinstance(types, Mapping) else ():
            nack = state.get("last_nack") if isinstance(state, Mapping) else None
            if not isinstance(nack, Mapping):
                continue
            sent = state.get("sent_version")
            if nack.get("version") == sent and state.get("acked_version") != sent:
                found.append(Nack(str(proxy.get("node_id") or "?"), str(short),
                                  str(nack.get("error") or "")))
    return found


def nack_lines(nacks: Sequence[Nack], limit: int = 3) -> list[str]:
    """One line per distinct rejection (type, origin, error), naming its sidecars."""
    grouped: dict[tuple[str, str, str], list[str]] = {}
    for nack in nacks:
        grouped.setdefault((nack.type, nack.origin, nack.error), []).append(nack.node_id)
    lines = []
    for (type_, origin, error), nodes in sorted(grouped.items())[:limit]:
        names = ", ".join(sorted(nodes)[:3]) + (f" +{len(nodes) - 3}" if len(nodes) > 3 else "")
        source = f" from {origin}" if origin else ""
        text = " ".join(error.split())
        if len(text) > MAX_ERROR_SHOWN:
            text = text[:MAX_ERROR_SHOWN] + "..."
        verb = "rejects" if len(nodes) == 1 else "reject"
        lines.append(f"NACK: {_plural(len(nodes), 'sidecar')} ({names}) {verb} {type_}"
                     f"{source}: {text} (they keep their last accepted config)")
    if len(grouped) > limit:
        lines.append(f"NACK: ... and {len(grouped) - limit} more (see /debug/rejections)")
    return lines
