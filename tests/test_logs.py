"""Log lines: whole lines from any thread, written to stderr as it is at the time."""

from __future__ import annotations

import io
import json
import sys
import threading

import pytest
import structlog

from controlplane import logs


@pytest.fixture(autouse=True)
def _restore_logging() -> object:
    saved = structlog.get_config()
    yield
    structlog.reset_defaults()
    structlog.configure(**saved)


def test_lines_from_many_threads_never_mix(monkeypatch: pytest.MonkeyPatch) -> None:
    out = io.StringIO()
    monkeypatch.setattr(sys, "stderr", out)
    logs.configure("info", "json")
    log = logs.get_logger("test")

    def write(worker: int) -> None:
        for index in range(300):
            log.info("test.line", worker=worker, index=index, padding="x" * 200)

    threads = [threading.Thread(target=write, args=(n,)) for n in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    lines = out.getvalue().splitlines()
    assert len(lines) == 8 * 300
    assert {(line["worker"], line["index"]) for line in map(json.loads, lines)} == {
        (w, i) for w in range(8) for i in range(300)}


def test_a_closed_stderr_of_the_past_is_not_written_to(monkeypatch: pytest.MonkeyPatch) -> None:
    """A command run in-process configures logging while stderr is a capture; that capture
    closes, and later lines go to whatever stderr is then."""
    first = io.StringIO()
    monkeypatch.setattr(sys, "stderr", first)
    logs.configure("info", "json")
    log = logs.get_logger("test")
    log.info("test.first")
    first.close()
    second = io.StringIO()
    monkeypatch.setattr(sys, "stderr", second)
    log.info("test.second")
    assert json.loads(second.getvalue())["event"] == "test.second"
