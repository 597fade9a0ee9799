"""The test helpers take ports without races, so the suite can run in parallel: what our
code binds is port 0 read back, and a sidecar whose picked port another process took is
started again on new ports. Test host numbers are exclusive while held."""

from __future__ import annotations

import asyncio
import dataclasses
import fcntl
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from controlplane.lab.identity import LabCa
from controlplane.lab.runner import _start_server
from controlplane.lab.topology import plan
from tests.support import netns, procs
from tests.support.procs import Backend, ControlPlane, Envoy, wait_for


@pytest.fixture
def held() -> Iterator[socket.socket]:
    """A port this test holds open, as another process would."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield sock


@pytest.mark.e2e
def test_a_sidecar_whose_port_was_taken_starts_again_on_new_ports(
        tmp_path: Path, held: socket.socket, monkeypatch: pytest.MonkeyPatch) -> None:
    backend = Backend("ratings")
    mesh = tmp_path / "mesh.yaml"
    mesh.write_text("services:\n  - name: ratings\n    port: 9080\n    endpoints: "
                    f"[{{address: 127.0.0.1, port: {backend.port}}}]\n")
    server = ControlPlane(mesh, tmp_path)
    envoy: Envoy | None = None
    try:
        server.start()
        first_xds = server.xds_port
        taken = held.getsockname()[1]
        picks = iter([taken])  # the first pick is a port another process holds
        real = procs.free_port
        monkeypatch.setattr(procs, "free_port", lambda: next(picks, None) or real())
        envoy = Envoy(tmp_path, "frontend-1", "frontend", server.xds_port).start()
        assert envoy.egress_port != taken
        assert f"cannot bind '127.0.0.1:{taken}'" in envoy.log_path.read_text()
        wait_for(lambda: envoy is not None and envoy.request("ratings")[1] == "ratings",
                 what="a route through the second start")
        server.stop()
        server.start()  # a restart keeps the port its sidecars dial
        assert server.xds_port == first_xds
    finally:
        if envoy is not None:
            envoy.stop()
        server.stop()
        backend.stop()


@pytest.mark.e2e
def test_a_sidecar_given_another_envoys_port_moves_off_it(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Envoy listeners set SO_REUSEPORT: a second Envoy on the same port binds it too and
    takes half its connections. The helper sees two listening sockets and starts again."""
    backend = Backend("ratings")
    mesh = tmp_path / "mesh.yaml"
    mesh.write_text("services:\n  - name: ratings\n    port: 9080\n    endpoints: "
                    f"[{{address: 127.0.0.1, port: {backend.port}}}]\n")
    server = ControlPlane(mesh, tmp_path)
    envoys: list[Envoy] = []
    try:
        server.start()
        envoys.append(Envoy(tmp_path, "first-1", "frontend", server.xds_port).start())
        shared = envoys[0].egress_port
        assert procs.listening_sockets(shared) == 1
        picks = iter([shared])
        real = procs.free_port
        monkeypatch.setattr(procs, "free_port", lambda: next(picks, None) or real())
        envoys.append(Envoy(tmp_path, "second-1", "frontend", server.xds_port).start())
        assert envoys[1].egress_port != shared
        assert procs.listening_sockets(shared) == 1
        for envoy in envoys:
            def routed(envoy: Envoy = envoy) -> bool:
                return envoy.request("ratings")[1] == "ratings"
            wait_for(routed, what=f"a route through {envoy.node_id}")
    finally:
        for envoy in envoys:
            envoy.stop()
        server.stop()
        backend.stop()


def test_the_lab_server_moves_off_ports_taken_after_the_plan(
        tmp_path: Path, held: socket.socket) -> None:
    layout = plan(tmp_path)
    taken = held.getsockname()[1]
    layout = dataclasses.replace(layout, xds_port=taken, admin_port=taken)

    async def run() -> tuple[int, int]:
        running = await _start_server(layout, tmp_path, LabCa(tmp_path))
        try:
            return running.xds_port, running.admin_port
        finally:
            await running.stop(grace=0)

    xds, admin = asyncio.run(run())
    assert taken not in (xds, admin) and xds > 0 and admin > 0


def test_test_host_numbers_are_exclusive_while_held() -> None:
    number, lock = netns.lease()
    other, other_lock = netns.lease()
    path = Path(lock.name)
    try:
        assert number != other
        with open(path, "ab") as handle, pytest.raises(BlockingIOError):
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)  # as another worker would
    finally:
        lock.close()
        other_lock.close()
    with open(path, "ab") as handle:  # released with its holder
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
