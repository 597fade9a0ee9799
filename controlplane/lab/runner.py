"""``controlplane lab``: the whole mesh in one command, no Docker needed.

Starts the control plane on the lab's mesh file, the demo apps, one real Envoy sidecar
per app, and a traffic generator; prints once a second what the sidecars see. Ctrl-C or
SIGTERM stops everything it started.

Two modes, said in the first line. Captured (root, with ``ip`` and ``iptables``): each
app in a network namespace of its own whose traffic ``controlplane capture`` sends to
its sidecar, calling the next service by name (captured.py). Explicit (elsewhere, or
``--explicit``): everything on loopback, each app calling its sidecar's egress port
with a Host header.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import fcntl
import signal
import sys
import tempfile
import time
from pathlib import Path
from typing import IO, TextIO

import aiohttp
import structlog
import yaml
from rich.live import Live

from controlplane.app import Running, start
from controlplane.lab.apps import start_app
from controlplane.lab.captured import CapturedLab, RemoteTraffic
from controlplane.lab.identity import LabCa
from controlplane.lab.pods import PROXY_UID, unavailable
from controlplane.lab.scenarios import scenarios
from controlplane.lab.sidecars import Sidecar
from controlplane.lab.topology import LabError, LabGateway, Plan, check_template, plan
from controlplane.lab.traffic import Traffic
from controlplane.lab.view import Stats, console, render_callers, render_line, render_table
from controlplane.lab.watch import KEEPS, MeshWatch, ServerWatch
from controlplane.mesh.loader import parse_mesh_yaml
from controlplane.settings import ServeSettings

log = structlog.get_logger("controlplane.lab")
_INBOUND = r"^http\.inbound\.downstream_rq_(completed|2xx)$"


async def _view(plan_: Plan, sidecars: list[Sidecar], traffic: Traffic | RemoteTraffic,
                session: aiohttp.ClientSession, out: TextIO, headless: bool,
                status: list[str]) -> None:
    """Once a second, what the sidecars saw: a live table, or a line when headless; what
    is wrong with the mesh file, in every refresh until a save fixes it; and how far the
    last edit got and any NACK, as the control plane saw them."""
    stats = Stats(sidecars)
    watch = MeshWatch(plan_.mesh_path)
    server = ServerWatch(f"http://127.0.0.1:{plan_.admin_port}")
    await server.poll(session)  # the changes made before now are not the user's edits
    told: list[tuple[str, str]] = []
    order = list(dict.fromkeys(i.service for i in plan_.instances))
    started = time.monotonic()
    live = None if headless else Live(console=console(out), auto_refresh=False)
    if live is not None:
        live.start()
    shown: list[str] = []
    seen_callers: dict[str, str] = {}
    try:
        while True:
            await asyncio.sleep(1.0)
            problems = await watch.check()
            if problems != shown:
                _tell(problems, out if live is None else None)
                shown = problems
            services = await stats.sample(session)
            _, statuses, _ = traffic.take()
            failed = sum(n for code, n in statuses.items() if code != 200)
            errors = f"client errors {failed} {dict(sorted(statuses.items()))}" if failed else ""
            elapsed = time.monotonic() - started
            callers = dict(traffic.callers)
            lines = await server.poll(session, timed=live is not None)
            if live is None:  # scenario steps print their own lines
                if callers != seen_callers:
                    print(render_callers(callers, order), file=out, flush=True)
                    seen_callers = callers
                for entry in lines:  # each once, when it is new
                    if entry not in told:
                        print(entry[0], file=out, flush=True)
                told = lines
                render_line(elapsed, services, order, errors, out, watch.summary())
            else:
                latest = status[-1] if status else ""
                live.update(render_table(elapsed, services, order, f"{errors} {latest}".strip(),
                                         problems, KEEPS, callers, lines), refresh=True)
    finally:
        if live is not None:
            live.stop()


def _tell(problems: list[str], out: TextIO | None) -> None:
    """Headless: the whole list once when it changes (each line then carries a summary)."""
    if out is None:
        return
    if problems:
        print(f"mesh file rejected ({KEEPS}):", file=out)
        for problem in problems:
            print(f"  {problem}", file=out)
    else:
        print("mesh file fixed: the control plane serves it", file=out)
    out.flush()


async def _scenario(name: str, path: Path, traffic: Traffic | RemoteTraffic, out: TextIO,
                    status: list[str]) -> None:
    """Edit the lab's mesh file step by step, as a person would."""
    scenario = scenarios()[name]
    print(f"scenario {name}: {scenario.summary}", file=out, flush=True)
    for step in scenario.steps:
        await asyncio.sleep(step.after)
        mesh = parse_mesh_yaml(path.read_text(encoding="utf-8"))
        step.change(mesh)
        temporary = path.with_suffix(".tmp")
        temporary.write_text(yaml.safe_dump(mesh, sort_keys=False), encoding="utf-8")
        temporary.replace(path)
        if step.rate is not None:
            traffic.rate = step.rate
        status.append(f"scenario {name}: {step.says}")
        print(status[-1], file=out, flush=True)
    status.append(f"scenario {name}: done")
    print(status[-1], file=out, flush=True)


async def _start_server(layout: Plan, workdir: Path, ca: LabCa,
                        xds_host: str = "127.0.0.1") -> Running:
    """The control plane on the plan's ports, or on free ones when another process took
    them between the plan and now; running the lab's CA (xDS over TLS, proxies
    authenticated by their tokens, a certificate per workload over SDS)."""
    def settings(xds: int, admin: int) -> ServeSettings:
        return ServeSettings(
            source=f"file:{layout.mesh_path}", xds_address=f"{xds_host}:{xds}",
            admin_address=f"127.0.0.1:{admin}", snapshot_dir=workdir / "snapshots",
            poll_interval=0.1, ca_dir=ca.directory)
    try:
        return await start(settings(layout.xds_port, layout.admin_port))
    except (OSError, RuntimeError):  # grpc says RuntimeError("Failed to bind ...")
        return await start(settings(0, 0))


def _claim_preferred_ports() -> IO[bytes] | None:
    """The lock that lets this lab use the mesh file's ports, or None when another lab on
    this machine holds it. Envoy's listeners share a port with SO_REUSEPORT, so two labs
    on the same ports would each get half of the other's traffic, silently."""
    path = Path(tempfile.gettempdir()) / "controlplane-lab-ports.lock"
    handle: IO[bytes]
    try:
        handle = open(path, "ab")  # noqa: SIM115 (held while the lab runs)
    except PermissionError:  # another user's lab made it: a read-only handle locks too
        handle = open(path, "rb")  # noqa: SIM115
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.close()
        return None
    return handle


def choose_mode(explicit: bool) -> tuple[bool, str]:
    """(captured, the first line saying which mode and why)."""
    if explicit:
        return False, ("explicit mode (--explicit): apps on loopback call their sidecar's "
                       "egress port with a Host header")
    reason = unavailable()
    if reason is not None:
        return False, (f"explicit mode ({reason}): apps on loopback call their sidecar's "
                       "egress port with a Host header; as root with iptables the lab "
                       "captures their traffic instead")
    return True, ("capture mode: each app in its own network namespace calls the next "
                  "service by name, and iptables (controlplane capture) sends its traffic "
                  "through its Envoy; --explicit runs without namespaces")


async def _lab(duration: float, mesh_template: str | None, rate: float, out: TextIO,
               headless: bool, scenario: str | None, explicit: bool = False) -> int:
    captured, mode = choose_mode(explicit)
    print(f"controlplane lab: {mode}", file=out, flush=True)
    workdir = Path(tempfile.mkdtemp(prefix="controlplane-lab-"))
    claim = _claim_preferred_ports()
    if claim is None:
        print("controlplane lab: another lab runs on this machine; this one takes free "
              "ports, not the mesh file's", file=out, flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):  # HUP: its terminal closed
        loop.add_signal_handler(sig, stop.set)

    pods = CapturedLab(workdir) if captured else None
    running: Running | None = None
    sidecars: list[Sidecar] = []
    gateway: Sidecar | None = None
    runners = []
    tasks: list[asyncio.Task[None]] = []
    session = aiohttp.ClientSession(trust_env=False)
    try:
        print(f"controlplane lab: starting in {workdir}", file=out, flush=True)
        if pods is not None:
            layout, swept = pods.open(mesh_template, prefer=claim is not None)
            if swept:
                print(f"controlplane lab: removed what a stopped lab left behind "
                      f"(networks {swept})", file=out, flush=True)
            ca = LabCa(workdir)
            running = await _start_server(layout, workdir, ca, pods.network.gateway)
            sidecars = await pods.start(layout, running.xds_port, lambda i: ca.identity(
                i.node_id, i.service_account, owner=PROXY_UID))
        else:
            layout = plan(workdir, mesh_template, prefer=claim is not None)
            ca = LabCa(workdir)
            running = await _start_server(layout, workdir, ca, "127.0.0.1")
            instances = []
            for instance in layout.instances:
                runner, instance = await start_app(instance, session)
                runners.append(runner)
                instances.append(instance)
            layout = dataclasses.replace(layout, instances=tuple(instances))
            sidecars = [Sidecar(i, workdir, running.xds_port,
                                identity=ca.identity(i.node_id, i.service_account))
                        for i in (*layout.instances, layout.loadgen)]
        layout = dataclasses.replace(layout, xds_port=running.xds_port,
                                     admin_port=running.admin_port)
        xds_host = pods.network.gateway if pods is not None else "127.0.0.1"
        if layout.gateway is not None:  # the way in from outside, on this host's loopback
            ingress = layout.gateway.instance
            gateway = Sidecar(ingress, workdir, running.xds_port, xds_host=xds_host,
                              identity=ca.identity(ingress.node_id, ingress.service_account),
                              gateway=layout.gateway.name, listens=(layout.gateway.port,))
        for sidecar in sidecars:
            await sidecar.start()
        if gateway is not None:
            await gateway.start()
        await asyncio.gather(*(s.wait_ready(session) for s in sidecars),
                             *([gateway.wait_ready(session)] if gateway is not None else []))
        print(f"  mesh file (edit it live): {layout.mesh_path}", file=out)
        print(f"  control plane admin:      http://127.0.0.1:{layout.admin_port}/  "
              f"(xDS on {xds_host}:{layout.xds_port})", file=out)
        print(f"  identity: the lab's CA in {ca.directory}; each sidecar reaches xDS over TLS "
              f"with its token ({ca.tokens}), gets its certificate over SDS and calls the "
              "others over mTLS", file=out)
        if pods is not None:
            _tell_captured(layout, pods, sidecars, out)
        else:
            _tell_explicit(layout, sidecars, out)
        if layout.gateway is not None and gateway is not None:
            _tell_gateway(layout.gateway, gateway, out)
        print("  Ctrl-C stops everything.", file=out, flush=True)

        traffic: Traffic | RemoteTraffic
        if pods is not None:
            traffic = await pods.traffic(layout, rate)
        else:
            traffic = Traffic(session, layout.loadgen.egress_port, rate)
        status: list[str] = []
        tasks = [asyncio.create_task(traffic.run()),
                 asyncio.create_task(_view(layout, sidecars, traffic, session, out, headless,
                                           status))]
        if scenario is not None:
            tasks.append(asyncio.create_task(
                _scenario(scenario, layout.mesh_path, traffic, out, status)))
        waiter = asyncio.create_task(stop.wait())
        await asyncio.wait([waiter], timeout=duration or None)
        waiter.cancel()
        return 0
    finally:
        print("controlplane lab: stopping", file=out, flush=True)
        for task in tasks:
            task.cancel()
            with contextlib.suppress(BaseException):
                await task
        await asyncio.gather(*(s.stop() for s in [*sidecars, *([gateway] if gateway else [])]),
                             return_exceptions=True)
        for runner in runners:
            await runner.cleanup()
        if pods is not None:
            await pods.close()
        await session.close()
        if running is not None:
            await running.stop(grace=0.5)
        if claim is not None:
            claim.close()
        print("controlplane lab: stopped", file=out, flush=True)


def _tell_explicit(layout: Plan, sidecars: list[Sidecar], out: TextIO) -> None:
    for sidecar in sidecars:
        i = sidecar.instance
        where = f"inbound 127.0.0.1:{i.inbound_port}, " if i.inbound_port else ""
        print(f"  sidecar {i.node_id:14s} {where}egress 127.0.0.1:{i.egress_port}, "
              f"admin {sidecar.admin_url}/", file=out)
    print(f"  try: curl -H 'Host: frontend' http://127.0.0.1:{layout.loadgen.egress_port}/",
          file=out)


def _tell_gateway(gateway: LabGateway, proxy: Sidecar, out: TextIO) -> None:
    print(f"  ingress gateway:          http://127.0.0.1:{gateway.port}/  (Gateway "
          f"{gateway.namespace}/{gateway.name}, a real Envoy, admin {proxy.admin_url}/)",
          file=out)
    print(f"  the demo from outside, as a user reaches it: curl http://127.0.0.1:"
          f"{gateway.port}/", file=out)


def _tell_captured(layout: Plan, pods: CapturedLab, sidecars: list[Sidecar],
                   out: TextIO) -> None:
    network = pods.network
    print(f"  pods on bridge {network.bridge} ({network.subnet}); services by name: "
          + ", ".join(f"{name} {ip}:{layout.service_ports.get(name, 80)}"
                      for name, ip in layout.virtual_ips.items()), file=out)
    for sidecar in sidecars:
        i = sidecar.instance
        pod = pods.pods[i.node_id]
        app = f"app :{i.app_port}, " if i.app_port else "traffic generator, "
        print(f"  pod {i.node_id:14s} {i.address:13s} {app}sidecar admin "
              f"{sidecar.admin_url}/  (ip netns exec {pod.ns} ...)", file=out)
    loadgen = pods.pods[layout.loadgen.node_id]
    frontend = layout.service_ports.get("frontend", 80)
    print(f"  try: ip netns exec {loadgen.ns} curl http://frontend:{frontend}/", file=out)


def read_template(mesh_path: str) -> tuple[str, list[str]]:
    """``--mesh FILE``'s text and notes on it; LabError, saying what to do, when the lab
    cannot run it."""
    try:
        text = Path(mesh_path).read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise LabError(f"{mesh_path}: not UTF-8 text ({exc.reason} at byte {exc.start}); "
                       "save the mesh file as UTF-8") from exc
    except OSError as exc:
        raise LabError(f"cannot read the mesh file {mesh_path}: {exc.strerror or exc}; give "
                       "an existing file, or leave out --mesh for the lab's own mesh") from exc
    _, notes = check_template(text, mesh_path)
    return text, notes


def run_lab(duration: float = 0.0, mesh_path: str | None = None, rate: float = 20.0,
            headless: bool | None = None, scenario: str | None = None,
            explicit: bool = False) -> int:
    """``headless`` None: a live table on a terminal, lines otherwise. ``explicit``: no
    capture even where the machine allows it."""
    if scenario is not None and scenario not in scenarios():
        raise ValueError(f"no scenario {scenario!r}; choose one of {', '.join(scenarios())}")
    template = None
    if mesh_path:
        template, notes = read_template(mesh_path)
        for note in notes:
            print(f"controlplane lab: note: {note}", file=sys.stderr)
    if headless is None:
        headless = not sys.stdout.isatty()
    return asyncio.run(_lab(duration, template, rate, sys.stdout, headless, scenario,
                            explicit))
