"""Making a state directory read-only for real, as a remount or a wrong owner does.

Root ignores permission bits, so as root the directory gets a read-only bind mount (in
this process's mount namespace, or in a private one for a child process); any other
user gets the write bits removed. Where neither works the test fails saying why (a
test that cannot do its job must not pass by skipping).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

# run "$@" with $1 mounted read-only over itself, in a private mount namespace
_READ_ONLY_SH = (
    'd="$1"; shift; mount --bind "$d" "$d" && mount -o remount,bind,ro "$d" && exec "$@"'
)


def _tree(directory: Path) -> list[Path]:
    return [directory, *(p for p in directory.rglob("*") if p.is_dir())]


@contextlib.contextmanager
def read_only(directory: Path) -> Iterator[None]:
    """``directory`` (and everything in it) is read-only for this process inside the block."""
    if os.geteuid() != 0:
        modes = {d: d.stat().st_mode for d in _tree(directory)}
        for d, mode in modes.items():
            d.chmod(mode & ~0o222)
        try:
            yield
        finally:
            for d, mode in modes.items():
                d.chmod(mode)
        return
    bind = subprocess.run(["mount", "--bind", str(directory), str(directory)], capture_output=True)
    if bind.returncode != 0:
        pytest.fail(f"root without mount privileges cannot make a directory read-only: {bind}")
    try:
        subprocess.run(
            ["mount", "-o", "remount,bind,ro", str(directory)], check=True, capture_output=True
        )
        yield
    finally:
        subprocess.run(["umount", str(directory)], check=True, capture_output=True)


def read_only_prefix(directory: Path) -> list[str]:
    """A command prefix that runs its command with ``directory`` mounted read-only in a
    private user and mount namespace ([] after removing the write bits, for a non-root
    user without namespaces: call it right before starting the command)."""
    unshare = shutil.which("unshare")
    if unshare and subprocess.run([unshare, "-rm", "true"], capture_output=True).returncode == 0:
        return [unshare, "-rm", "sh", "-c", _READ_ONLY_SH, "sh", str(directory)]
    if os.geteuid() != 0:
        for d in _tree(directory):
            d.chmod(d.stat().st_mode & ~0o222)
        return []
    pytest.fail("neither unshare nor a non-root user: cannot make a directory read-only")
