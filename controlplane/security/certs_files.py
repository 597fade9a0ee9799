"""Publishing a certificate, its key and the roots as files a reader never sees torn.

gRPC's ``file_watcher`` reads the three files every refresh interval. Were they replaced
one by one, a read between two renames could pair the new key with the old certificate.
So each set is written into a fresh hidden directory (the key 0600, before anything
points at it), and one rename of the ``..data`` symlink switches all three at once; the
visible names are symlinks through it (the layout of Kubernetes' projected volumes).
Older sets are removed after the switch.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Final

DATA: Final = "..data"  # the symlink to the current set
_PREFIX: Final = "..certs-"  # each set's directory


def publish(directory: Path, files: dict[str, tuple[bytes, int]]) -> None:
    """Make ``directory/<name>`` hold ``files[name]`` (content, mode), all at once."""
    directory.mkdir(parents=True, exist_ok=True)
    made = directory / f"{_PREFIX}{time.time_ns()}"
    made.mkdir(mode=0o755)
    try:
        for name, (content, mode) in files.items():
            handle = os.open(made / name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
            with os.fdopen(handle, "wb") as out:
                out.write(content)
                out.flush()
                os.fsync(out.fileno())
        _link(directory / DATA, made.name)
    except BaseException:
        _remove(made)
        raise
    for name in files:
        target = f"{DATA}/{name}"
        path = directory / name
        if not (path.is_symlink() and os.readlink(path) == target):
            _link(path, target)
    for old in directory.glob(f"{_PREFIX}*"):
        if old.name != made.name:
            _remove(old)


def _link(path: Path, target: str) -> None:
    """Point ``path`` at ``target`` by rename (atomic), whatever was there."""
    temp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    temp.unlink(missing_ok=True)
    os.symlink(target, temp)
    os.replace(temp, path)


def _remove(directory: Path) -> None:
    for child in directory.iterdir():
        child.unlink()
    directory.rmdir()
