"""The file source sees a save through filesystem notifications, not a poll: each test
here polls every 30 s (and the safety net is no shorter), so a change that arrives
within WAIT came by notification. Without notifications (turned off, or unavailable)
it polls. Real files, a real inotify watch; driven as the pipeline's async iterator."""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections.abc import AsyncIterator, MutableMapping
from pathlib import Path
from typing import Any

import pytest
import structlog

from controlplane.mesh.model import Mesh
from controlplane.sources import notify
from controlplane.sources.file import FileSource

SLOW_POLL = 30.0  # longer than any wait below: only a notification can be this quick
WAIT = 10.0  # generous: the machine is shared; a notification takes about 10 ms

A = "services: [{name: a, port: 80}]\n"
AB = "services: [{name: a, port: 80}, {name: b, port: 81}]\n"
ABC = "services: [{name: a, port: 80}, {name: b, port: 81}, {name: c, port: 82}]\n"


class Running:
    """A FileSource being consumed: its meshes in a queue, its log events in a list."""

    def __init__(self, source: FileSource, logs: list[MutableMapping[str, Any]]) -> None:
        self.source = source
        self.logs = logs
        self.meshes: asyncio.Queue[Mesh] = asyncio.Queue()

    async def consume(self) -> None:
        async for mesh in self.source.updates():
            await self.meshes.put(mesh)

    async def mesh(self) -> list[str]:
        mesh = await asyncio.wait_for(self.meshes.get(), WAIT)
        return [s.name for s in mesh.services]

    async def event(self, name: str) -> MutableMapping[str, Any]:
        deadline = time.monotonic() + WAIT
        while time.monotonic() < deadline:
            found = [e for e in self.logs if e["event"] == name]
            if found:
                return found[0]
            await asyncio.sleep(0.01)
        raise AssertionError(f"no {name!r} event; logged: {self.logs}")


@contextlib.asynccontextmanager
async def running(source: FileSource) -> AsyncIterator[Running]:
    """Consume ``source`` for the block; cancel it after (which must end it)."""
    with structlog.testing.capture_logs() as logs:
        watched = Running(source, logs)
        task = asyncio.create_task(watched.consume())
        try:
            yield watched
        finally:
            task.cancel()
            await asyncio.wait_for(asyncio.gather(task, return_exceptions=True), WAIT)


def save_by_rename(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    tmp.replace(path)


@pytest.fixture
def mesh_file(tmp_path: Path) -> Path:
    path = tmp_path / "mesh.yaml"
    path.write_text(A)
    return path


async def test_a_save_by_rename_is_seen_without_waiting_for_a_poll(mesh_file: Path) -> None:
    source = FileSource(mesh_file, poll_interval=SLOW_POLL)
    async with running(source) as watched:
        assert await watched.mesh() == ["a"]
        assert source.wakeups is not None and source.wakeups.notifying
        began = time.monotonic()
        save_by_rename(mesh_file, AB)
        assert await watched.mesh() == ["a", "b"]
        assert time.monotonic() - began < SLOW_POLL / 3  # not a poll: far sooner
        save_by_rename(mesh_file, ABC)  # and the next one too
        assert await watched.mesh() == ["a", "b", "c"]


async def test_a_write_in_place_is_seen_once_it_holds_still(mesh_file: Path) -> None:
    """An in-place write wakes the source on every write; it reads once the file has
    held still for ``settle``, never the first half (a valid, smaller mesh)."""
    source = FileSource(mesh_file, poll_interval=SLOW_POLL, settle=0.3)
    async with running(source) as watched:
        assert await watched.mesh() == ["a"]
        with mesh_file.open("w") as out:
            out.write("services:\n  - {name: a, port: 80}\n")
            out.flush()
            await watched.event("source.file_settling")
            out.write("  - {name: b, port: 81}\n")
        assert await watched.mesh() == ["a", "b"]
        await asyncio.sleep(0.5)
        assert watched.meshes.empty()


async def test_a_configmap_symlink_swap_is_seen(tmp_path: Path) -> None:
    """Kubernetes mounts a ConfigMap as ``mesh.yaml -> ..data/mesh.yaml`` and updates
    it by pointing ``..data`` at a new directory (a rename of a symlink): the file
    itself is never written, only the directory changes."""
    for version, text in (("v1", A), ("v2", AB)):
        (tmp_path / version).mkdir()
        (tmp_path / version / "mesh.yaml").write_text(text)
    (tmp_path / "..data").symlink_to("v1")
    (tmp_path / "mesh.yaml").symlink_to("..data/mesh.yaml")
    source = FileSource(tmp_path / "mesh.yaml", poll_interval=SLOW_POLL)
    async with running(source) as watched:
        assert await watched.mesh() == ["a"]
        (tmp_path / "..data_tmp").symlink_to("v2")
        (tmp_path / "..data_tmp").replace(tmp_path / "..data")
        assert await watched.mesh() == ["a", "b"]


async def test_a_link_to_a_file_elsewhere_is_followed(
    tmp_path: Path
) -> None:
    """``mesh.yaml`` links into another directory: saves there are seen too."""
    (tmp_path / "real").mkdir()
    target = tmp_path / "real" / "mesh.yaml"
    target.write_text(A)
    (tmp_path / "link").mkdir()
    (tmp_path / "link" / "mesh.yaml").symlink_to(target)
    source = FileSource(tmp_path / "link" / "mesh.yaml", poll_interval=SLOW_POLL)
    async with running(source) as watched:
        assert await watched.mesh() == ["a"]
        save_by_rename(target, AB)
        assert await watched.mesh() == ["a", "b"]


async def test_without_notifications_the_file_is_polled(mesh_file: Path) -> None:
    source = FileSource(mesh_file, poll_interval=0.02, notify=False)
    async with running(source) as watched:
        assert await watched.mesh() == ["a"]
        assert source.wakeups is not None and not source.wakeups.notifying
        save_by_rename(mesh_file, AB)
        assert await watched.mesh() == ["a", "b"]
        with mesh_file.open("w") as out:  # in place: settles for one poll
            out.write(ABC)
        assert await watched.mesh() == ["a", "b", "c"]


async def test_notifications_that_cannot_start_fall_back_to_polling(
    mesh_file: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No inotify instance left (here: the watch refuses to start): the source says so
    once, with what to do, and polls; once notifications work again, it uses them."""
    refuse = True
    real = notify.RustNotify

    def limited(*args: Any) -> Any:
        if refuse:
            raise OSError("Too many open files (os error 24)")
        return real(*args)

    monkeypatch.setattr(notify, "RustNotify", limited)
    monkeypatch.setattr(notify, "RETRY", 0.2)
    source = FileSource(mesh_file, poll_interval=0.05)
    async with running(source) as watched:
        assert await watched.mesh() == ["a"]
        event = await watched.event("source.file_polling")
        assert "Too many open files" in event["reason"]
        assert event["log_level"] == "warning" and "max_user_instances" in event["hint"]
        save_by_rename(mesh_file, AB)
        assert await watched.mesh() == ["a", "b"]
        assert source.wakeups is not None and not source.wakeups.notifying
        await asyncio.sleep(0.5)  # retried and refused again: said once
        assert len([e for e in watched.logs if e["event"] == "source.file_polling"]) == 1
        refuse = False
        await watched.event("source.file_notifying")
        assert source.wakeups.notifying


async def test_force_polling_is_honoured(
    mesh_file: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``WATCHFILES_FORCE_POLLING`` (for file systems inotify does not see) polls."""
    monkeypatch.setenv("WATCHFILES_FORCE_POLLING", "1")
    source = FileSource(mesh_file, poll_interval=0.02)
    async with running(source) as watched:
        assert await watched.mesh() == ["a"]
        await watched.event("source.file_polling")
        assert source.wakeups is not None and not source.wakeups.notifying
        save_by_rename(mesh_file, AB)
        assert await watched.mesh() == ["a", "b"]


async def test_a_replaced_directory_is_watched_again(
    tmp_path: Path
) -> None:
    """The directory deleted and made again (a redeploy, a volume remount) loses its
    inotify watch: the source notices, watches the new one, and sees its saves."""
    folder = tmp_path / "conf"
    folder.mkdir()
    (folder / "mesh.yaml").write_text(A)
    source = FileSource(folder / "mesh.yaml", poll_interval=SLOW_POLL)
    async with running(source) as watched:
        assert await watched.mesh() == ["a"]
        aside = tmp_path / "old"
        folder.rename(aside)
        folder.mkdir()
        save_by_rename(folder / "mesh.yaml", AB)
        assert await watched.mesh() == ["a", "b"]
        await watched.event("source.file_notify_restart")
        save_by_rename(folder / "mesh.yaml", ABC)
        assert await watched.mesh() == ["a", "b", "c"]
        assert source.wakeups is not None and source.wakeups.notifying


def inotify_fds() -> set[str]:
    found = set()
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):
            if os.readlink(f"/proc/self/fd/{fd}") == "anon_inode:inotify":
                found.add(fd)
    return found


async def test_cancelling_the_source_stops_its_watch_thread(mesh_file: Path) -> None:
    """Stopping the source ends its watch thread and inotify instance (a server that
    restarts its source must not leak them), even right after a burst of saves."""
    before = inotify_fds()
    source = FileSource(mesh_file, poll_interval=SLOW_POLL)
    async with running(source) as watched:
        assert await watched.mesh() == ["a"]
        assert source.wakeups is not None and source.wakeups.watch is not None
        thread = source.wakeups.watch._thread
        mine = inotify_fds() - before
        assert len(mine) == 1
        for text in (AB, ABC, A, AB):
            save_by_rename(mesh_file, text)
        await watched.mesh()
    deadline = time.monotonic() + WAIT
    while (thread.is_alive() or mine & inotify_fds()) and time.monotonic() < deadline:
        await asyncio.sleep(0.01)
    assert not thread.is_alive() and not mine & inotify_fds()
