"""The file source keeps serving the last good mesh through every bad save: empty, no
``services``, missing for a while, not UTF-8, invalid; it parses only new content, and
off the event loop. Driven in-process as the async iterator the pipeline consumes."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
import structlog

from controlplane.mesh.loader import load_mesh_text
from controlplane.mesh.model import Mesh
from controlplane.sources import file as file_source
from controlplane.sources.file import FileSource

POLL = 0.02
WAIT = 10.0  # generous: the machine is shared; nothing here waits this long when it works

A = "services: [{name: a, port: 80}]\n"
AB = "services: [{name: a, port: 80}, {name: b, port: 81}]\n"


class Watch:
    """A running FileSource: its meshes in a queue, its log events in a list."""

    def __init__(self, path: Path) -> None:
        self.source = FileSource(path, poll_interval=POLL)
        self.meshes: asyncio.Queue[Mesh] = asyncio.Queue()
        self.logs: list[dict[str, Any]] = []

    async def consume(self) -> None:
        async for mesh in self.source.updates():
            await self.meshes.put(mesh)

    async def mesh(self) -> list[str]:
        mesh = await asyncio.wait_for(self.meshes.get(), WAIT)
        return [s.name for s in mesh.services]

    async def event(self, name: str, count: int = 1) -> dict[str, Any]:
        """Wait for the ``count``-th log event called ``name``."""
        for _ in range(int(WAIT / POLL)):
            found = [e for e in self.logs if e["event"] == name]
            if len(found) >= count:
                return found[count - 1]
            await asyncio.sleep(POLL)
        raise AssertionError(f"no {name!r} event (#{count}); logged: {self.logs}")

    async def polls(self, rounds: int = 5) -> None:
        """Let the source poll a few times, for checks that nothing happened."""
        await asyncio.sleep(POLL * rounds)


@pytest.fixture
async def watch(tmp_path: Path) -> AsyncIterator[Watch]:
    path = tmp_path / "mesh.yaml"
    path.write_text(A)
    watched = Watch(path)
    with structlog.testing.capture_logs() as logs:
        watched.logs = logs
        task = asyncio.create_task(watched.consume())
        try:
            yield watched
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)


def write(path: Path, data: str | bytes) -> None:
    """A save by rename, as editors do, so each save is one complete change."""
    tmp = path.with_suffix(".tmp")
    tmp.write_bytes(data.encode() if isinstance(data, str) else data)
    tmp.replace(path)


async def test_an_empty_file_keeps_the_last_good_mesh(watch: Watch) -> None:
    assert await watch.mesh() == ["a"]
    path = watch.source.path
    path.write_bytes(b"")  # truncate, as `>` and many editors do before writing
    event = await watch.event("source.file_empty")
    assert "the file is empty" in event["problem"] and "services: []" in event["hint"]
    assert event["log_level"] == "warning"
    assert watch.meshes.empty() and watch.source.problem is not None
    path.write_text(AB)
    assert await watch.mesh() == ["a", "b"]
    assert watch.source.problem is None


@pytest.mark.parametrize("text", ["{}\n", "# just a comment\n", "other: 1\n", "---\n"])
async def test_a_file_without_services_keeps_the_last_good_mesh(
    watch: Watch, text: str
) -> None:
    assert await watch.mesh() == ["a"]
    write(watch.source.path, text)
    event = await watch.event("source.file_empty")
    assert "no 'services' key" in event["problem"]
    await watch.polls()
    assert watch.meshes.empty()


async def test_no_services_must_be_said_explicitly(watch: Watch) -> None:
    assert await watch.mesh() == ["a"]
    write(watch.source.path, "services: []\n")
    assert await watch.mesh() == []


async def test_a_missing_file_keeps_the_last_good_mesh(watch: Watch) -> None:
    assert await watch.mesh() == ["a"]
    path = watch.source.path
    path.unlink()
    event = await watch.event("source.file_missing")
    assert event["log_level"] == "warning" and "still served" in event["hint"]
    await watch.polls()
    assert watch.meshes.empty()
    write(path, A)  # back with the mesh being served: nothing to push
    await watch.event("source.file_restored")
    assert watch.meshes.empty() and watch.source.problem is None
    write(path, AB)
    assert await watch.mesh() == ["a", "b"]
    # a file that stays missing is said once, not on every poll
    assert len([e for e in watch.logs if e["event"] == "source.file_missing"]) == 1


async def test_a_non_utf8_byte_is_an_error_naming_line_and_byte(watch: Watch) -> None:
    assert await watch.mesh() == ["a"]
    write(watch.source.path, b"services:\n  - {name: a, port: 80, zone: \xff}\n")
    event = await watch.event("mesh.invalid")
    [problem] = event["problems"]
    assert problem.startswith("line 2, byte 31 of the line") and "0xff" in problem, problem
    assert "save the file as UTF-8" in problem
    await watch.polls()
    assert watch.meshes.empty()
    write(watch.source.path, AB)
    assert await watch.mesh() == ["a", "b"]


async def test_an_invalid_save_is_said_once_and_the_last_mesh_stays(watch: Watch) -> None:
    assert await watch.mesh() == ["a"]
    write(watch.source.path, "services: [{name: a, port: true}]\n")
    event = await watch.event("mesh.invalid")
    assert any("services[0] (a.default).port" in p for p in event["problems"])
    assert watch.source.problem is not None and "port" in watch.source.problem
    await watch.polls()
    assert watch.meshes.empty()
    assert len([e for e in watch.logs if e["event"] == "mesh.invalid"]) == 1


async def test_content_already_read_is_not_parsed_again(
    watch: Watch, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A touch, or a save of the same bytes, changes the stat but not the content: the
    file is hashed, not parsed, and nothing is pushed."""
    parsed: list[int] = []
    real: Callable[..., Mesh] = watch.source.loader.load

    def counting(data: bytes, origin: str = "<mesh>") -> Mesh:
        parsed.append(len(data))
        return real(data, origin)

    monkeypatch.setattr(watch.source.loader, "load", counting)
    assert await watch.mesh() == ["a"]
    before = len(parsed)
    for _ in range(3):
        write(watch.source.path, A)
        await watch.polls()
    assert len(parsed) == before and watch.meshes.empty()
    write(watch.source.path, AB)
    assert await watch.mesh() == ["a", "b"]
    assert len(parsed) == before + 1


async def test_parsing_runs_off_the_event_loop(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Reading, parsing and validating happen in a worker thread: a big file cannot
    stall xDS pushes or /healthz."""
    threads: list[int] = []
    path = tmp_path / "mesh.yaml"
    services = ", ".join(f"{{name: s{i}, port: 80}}" for i in range(2000))
    path.write_text(f"services: [{services}]\n")
    source = FileSource(path, poll_interval=POLL)
    real: Callable[..., Mesh] = source.loader.load

    def recording(data: bytes, origin: str = "<mesh>") -> Mesh:
        threads.append(threading.get_ident())
        return real(data, origin)

    monkeypatch.setattr(source.loader, "load", recording)
    updates = source.updates()
    ticks = 0

    async def ticker() -> None:
        nonlocal ticks
        while True:
            ticks += 1
            await asyncio.sleep(0)

    task = asyncio.create_task(ticker())
    try:
        mesh = await asyncio.wait_for(anext(updates), WAIT)
    finally:
        task.cancel()
        await updates.aclose()
    assert len(mesh.services) == 2000
    assert threads and threading.get_ident() not in threads
    assert ticks > 1  # the loop kept running while the file was parsed


async def test_starting_on_a_bad_file_serves_nothing_and_says_why(tmp_path: Path) -> None:
    path = tmp_path / "mesh.yaml"
    path.write_text("services: [{name: a, port: 80, policy: {timeout: .inf}}]\n")
    watched = Watch(path)
    with structlog.testing.capture_logs() as logs:
        watched.logs = logs
        task = asyncio.create_task(watched.consume())
        try:
            event = await watched.event("mesh.invalid")
            assert any("policy.timeout" in p for p in event["problems"]), event
            assert watched.meshes.empty() and watched.source.problem is not None
            write(path, A)
            assert await watched.mesh() == ["a"]
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)


async def test_a_one_service_edit_parses_only_that_service(watch: Watch) -> None:
    """A big mesh file edited in one place: only the service whose text changed is
    parsed and validated again; the mesh is the same as a full load's."""
    assert await watch.mesh() == ["a"]
    items = "".join(f"  - name: s{i}\n    port: 80\n    endpoints:\n"
                    f"      - {{address: 10.0.{i // 200}.{i % 200 + 1}, port: 8080}}\n"
                    for i in range(300))
    write(watch.source.path, f"# the mesh\nservices:\n{items}")
    assert len(await watch.mesh()) == 300
    assert watch.source.loader.parsed == 300
    edited = items.replace("10.0.1.8, port: 8080", "10.0.1.8, port: 9090")
    write(watch.source.path, f"# the mesh\nservices:\n{edited}")
    mesh = await asyncio.wait_for(watch.meshes.get(), WAIT)
    assert watch.source.loader.parsed == 1
    assert mesh == load_mesh_text(f"services:\n{edited}")
    assert mesh.services[207].endpoints[0].port == 9090


async def test_a_split_to_labels_no_endpoint_has_is_served_with_a_warning(watch: Watch) -> None:
    assert await watch.mesh() == ["a"]
    write(watch.source.path, """
services:
  - name: a
    port: 80
    endpoints: [{address: 10.0.0.1, port: 8080, labels: {version: v1}}]
    policy: {split: [{labels: {version: v1}, weight: 90}, {labels: {version: v3}, weight: 10}]}
""")
    assert await watch.mesh() == ["a"]
    event = await watch.event("mesh.subset_empty")
    assert event["subsets"] == ["services[0] (a.default).policy.split[1].labels (version=v3)"]
    assert event["log_level"] == "warning" and "503" in event["hint"]


async def test_a_file_written_in_place_is_read_once_it_holds_still(tmp_path: Path) -> None:
    """Half of a file being written can be a valid, smaller mesh (here: one service of
    two): it must never be served. The source waits for the stat to hold still."""
    path = tmp_path / "mesh.yaml"
    path.write_text(A)
    watched = Watch(path)
    watched.source.poll_interval = 0.3
    watched.source.settle = 0.3  # room for the test to write the second part
    with structlog.testing.capture_logs() as logs:
        watched.logs = logs
        task = asyncio.create_task(watched.consume())
        try:
            assert await watched.mesh() == ["a"]
            with path.open("w") as out:  # in place: truncate, then write in two parts
                out.write("services:\n  - {name: a, port: 80}\n")
                out.flush()
                await watched.event("source.file_settling")
                out.write("  - {name: b, port: 81}\n")
            assert await watched.mesh() == ["a", "b"]
            assert watched.meshes.empty()
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)


async def test_a_huge_file_is_refused_without_being_read(
    watch: Watch, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert await watch.mesh() == ["a"]
    monkeypatch.setattr(file_source, "MAX_FILE_BYTES", 1000)
    write(watch.source.path, "services:\n" + "".join(
        f"  - {{name: s{i}, port: 80}}\n" for i in range(100)))
    event = await watch.event("mesh.invalid")
    assert "a mesh file is at most" in event["problems"][0]
    await watch.polls()
    assert watch.meshes.empty()
