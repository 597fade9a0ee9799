"""Where a change's clock starts: the file source stamps the save's time (the file's new
mtime; else the notification's or the poll's time), before it waits for an in-place
write to settle and before it reads; a mesh no source stamped has no time. And the
warning's setting."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
from pydantic import ValidationError

from controlplane import cli
from controlplane.mesh.model import Mesh
from controlplane.settings import ServeSettings
from controlplane.sources.base import observed_at, stamp
from controlplane.sources.file import FileSource
from tests.test_source_file_notify import AB, ABC, SLOW_POLL, running, save_by_rename

COARSE = 0.02  # the kernel stamps mtimes with a coarse clock: a few ms behind time.time()


@pytest.fixture
def mesh_file(tmp_path: Path) -> Path:
    path = tmp_path / "mesh.yaml"
    path.write_text("services: [{name: a, port: 80}]\n")
    return path


async def test_a_notified_save_is_stamped_with_the_notification_time(mesh_file: Path) -> None:
    settle = 0.5
    source = FileSource(mesh_file, poll_interval=SLOW_POLL, settle=settle)
    async with running(source) as watched:
        first = await watched.meshes.get()
        assert observed_at(first) is not None
        assert source.wakeups is not None and source.wakeups.notifying
        written = time.time()
        save_by_rename(mesh_file, AB)
        mesh = await watched.meshes.get()
        seen = observed_at(mesh)
        assert seen is not None and written - COARSE <= seen <= time.time()
        # Written in place: read once it held still for ``settle`` seconds; the clock
        # started at the first notification, not after the wait.
        written = time.time()
        mesh_file.write_text(ABC)
        mesh = await watched.meshes.get()
        yielded = time.time()
        seen = observed_at(mesh)
        assert seen is not None and [s.name for s in mesh.services] == ["a", "b", "c"]
        assert written - COARSE <= seen and yielded - seen >= settle


async def test_a_polled_save_is_stamped_with_the_poll_that_saw_it(mesh_file: Path) -> None:
    source = FileSource(mesh_file, poll_interval=0.1, notify=False)
    async with running(source) as watched:
        await watched.meshes.get()
        written = time.time()
        save_by_rename(mesh_file, AB)
        mesh = await watched.meshes.get()
        seen = observed_at(mesh)
        assert seen is not None and written - COARSE <= seen <= time.time()


async def test_the_clock_starts_at_the_save_not_at_the_wake_up(mesh_file: Path) -> None:
    """The watch hands a save over 10-20 ms after it: the file's mtime is the save. An
    mtime that did not move forward (``cp -p``, ``touch -d``) is not believed."""
    source = FileSource(mesh_file, poll_interval=SLOW_POLL)
    async with running(source) as watched:
        await watched.meshes.get()
        save_by_rename(mesh_file, AB)
        mesh = await watched.meshes.get()
        assert observed_at(mesh) == mesh_file.stat().st_mtime_ns / 1e9
        written = time.time()
        save_by_rename(mesh_file, ABC)
        os.utime(mesh_file, (written - 3600, written - 3600))  # an old mtime, kept
        mesh = await watched.meshes.get()
        seen = observed_at(mesh)
        assert seen is not None and written - COARSE <= seen <= time.time()


def test_stamp_copies_and_survives_copies() -> None:
    plain = Mesh()
    stamped = stamp(plain, 12.5)
    assert observed_at(plain) is None and observed_at(stamped) == 12.5
    assert stamped == plain  # the time is not content
    assert observed_at(stamped.model_copy(update={"services": []})) == 12.5


def test_warn_after_setting_flag_and_env(monkeypatch: pytest.MonkeyPatch,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    assert ServeSettings().convergence_warn_after == 30.0
    monkeypatch.setenv("CONTROLPLANE_CONVERGENCE_WARN_AFTER", "5")
    assert ServeSettings().convergence_warn_after == 5.0
    with pytest.raises(ValidationError, match="convergence_warn_after"):
        ServeSettings(convergence_warn_after=0)
    assert cli.main(["serve", "--convergence-warn-after", "-1"]) == 2
    assert "--convergence-warn-after" in capsys.readouterr().err
