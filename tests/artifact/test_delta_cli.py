"""`homefleet artifact diff|patch` round-trip, refuse damaged patches, and run edge-only.

The commands run in a fresh interpreter where torch, onnx, onnxruntime, sqlalchemy and
sktime cannot be imported (as on a device with only the `edge` extra); the probe also
reports which of them were loaded, which must be none.
"""

from __future__ import annotations

import json
import os
import pty
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from artifact import cli as artifact_cli
from artifact import files
from tests.artifact.delta_models import Init, build, random_array, tweak

ROOT = Path(__file__).resolve().parents[2]
HEAVY = ("torch", "onnx", "onnxruntime", "sqlalchemy", "sktime", "onnxscript")

EDGE_ONLY = """
import importlib.abc, json, sys

HEAVY = set(json.loads(sys.argv[1]))

class NotInstalled(importlib.abc.MetaPathFinder):
    '''Pretend the controller extra is absent, as on a device.'''
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in HEAVY:
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None

sys.meta_path.insert(0, NotInstalled())
from homefleet.cli import app
try:
    app(sys.argv[2:], prog_name="homefleet")
    code = 0
except SystemExit as exit:
    code = exit.code or 0
loaded = sorted(m for m in sys.modules if m.split(".")[0] in HEAVY)
print("LOADED=" + json.dumps(loaded), file=sys.stderr)
sys.exit(code)
"""


def homefleet(*args: str | Path) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(
        [sys.executable, "-c", EDGE_ONLY, json.dumps(HEAVY), *map(str, args)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env={**os.environ, "COLUMNS": "200"},
        timeout=120,
    )
    loaded = [line for line in done.stderr.splitlines() if line.startswith("LOADED=")]
    assert loaded == ["LOADED=[]"], done.stderr
    return done


def _models(tmp_path: Path) -> tuple[Path, Path]:
    rng = np.random.default_rng(11)
    weights = [Init(f"layer{i}.weight", random_array(rng, np.float32, (48, 32))) for i in range(3)]
    old, new = tmp_path / "old.onnx", tmp_path / "new.onnx"
    old.write_bytes(build(weights))
    new.write_bytes(build([Init(w.name, tweak(rng, w.array)) for w in weights]))
    return old, new


def test_diff_then_patch_rebuilds_the_model_bit_for_bit(tmp_path: Path) -> None:
    old, new = _models(tmp_path)
    patch, out = tmp_path / "update.hfd", tmp_path / "out.onnx"
    done = homefleet("artifact", "diff", old, new, "-o", patch)
    assert done.returncode == 0, done.stderr
    assert "smaller" in done.stdout
    assert patch.stat().st_size < new.stat().st_size
    done = homefleet("artifact", "patch", old, patch, "-o", out)
    assert done.returncode == 0, done.stderr
    assert out.read_bytes() == new.read_bytes()
    stats = json.loads(homefleet("artifact", "diff", old, new, "-o", patch, "--json").stdout)
    assert stats["mode"] == "delta" and stats["target_size"] == new.stat().st_size


def test_a_corrupt_or_mismatched_patch_exits_1_with_a_message_and_writes_nothing(
    tmp_path: Path,
) -> None:
    old, new = _models(tmp_path)
    patch, out = tmp_path / "update.hfd", tmp_path / "out.onnx"
    assert homefleet("artifact", "diff", old, new, "-o", patch).returncode == 0
    data = bytearray(patch.read_bytes())
    data[len(data) // 2] ^= 0x10
    bad = tmp_path / "bad.hfd"
    bad.write_bytes(bytes(data))
    done = homefleet("artifact", "patch", old, bad, "-o", out)
    assert done.returncode == 1
    assert "damaged" in done.stderr and "error:" in done.stderr
    assert not out.exists()

    done = homefleet("artifact", "patch", new, patch, "-o", out)  # the wrong base
    assert done.returncode == 1
    assert "applies to base sha256" in done.stderr
    assert not out.exists()

    done = homefleet("artifact", "patch", old, patch, "-o", out, "--sha256", "0" * 64)
    assert done.returncode == 1 and "expected" in done.stderr
    assert not out.exists()

    done = homefleet("artifact", "patch", old, patch, "-o", out, "--sha256", "nothex")
    assert done.returncode == 2
    done = homefleet("artifact", "patch", old, tmp_path / "missing.hfd", "-o", out)
    assert done.returncode == 2
    assert not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "bad.hfd",
        "new.onnx",
        "old.onnx",
        "update.hfd",
    ]


def test_outputs_go_only_into_existing_directories_with_the_usual_permissions(
    tmp_path: Path,
) -> None:
    old, new = _models(tmp_path)
    missing = tmp_path / "no" / "such" / "update.hfd"
    done = homefleet("artifact", "diff", old, new, "-o", missing)
    assert done.returncode == 2
    assert f"directory {missing.parent} does not exist" in done.stderr
    assert not (tmp_path / "no").exists()
    done = homefleet("artifact", "diff", old, new, "-o", tmp_path)
    assert done.returncode == 2 and "is a directory" in done.stderr
    before = new.read_bytes()
    done = homefleet("artifact", "diff", old, new, "-o", new)  # would replace an input
    assert done.returncode == 2 and "which it would replace" in done.stderr
    assert new.read_bytes() == before

    umask = os.umask(0o022)
    try:
        patch, out = tmp_path / "update.hfd", tmp_path / "out.onnx"
        assert homefleet("artifact", "diff", old, new, "-o", patch).returncode == 0
        assert homefleet("artifact", "patch", old, patch, "-o", out).returncode == 0
    finally:
        os.umask(umask)
    assert patch.stat().st_mode & 0o777 == 0o644  # as cp would make it, not 0600
    assert out.stat().st_mode & 0o777 == 0o644


def test_a_diff_of_files_that_are_not_models_says_so(tmp_path: Path) -> None:
    old, new = tmp_path / "a.txt", tmp_path / "b.txt"
    old.write_bytes(b"hello\n")
    new.write_bytes(b"world\n")
    done = homefleet("artifact", "diff", old, new, "-o", tmp_path / "p.hfd")
    assert done.returncode == 0, done.stderr
    assert "no ONNX tensors in it" in done.stdout
    assert "larger than the file itself" in done.stdout and "smaller" not in done.stdout
    out = tmp_path / "b2.txt"
    assert homefleet("artifact", "patch", old, tmp_path / "p.hfd", "-o", out).returncode == 0
    assert out.read_bytes() == new.read_bytes()


def test_the_codec_imports_neither_torch_nor_onnx() -> None:
    probe = (
        "import sys, json; import artifact.delta, artifact.cli; "
        "print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in "
        f"{HEAVY!r} or m.startswith(('grpc', 'controller', 'edge_agent')))))"
    )
    done = subprocess.run(
        [sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, check=True
    )
    assert json.loads(done.stdout) == []


def test_on_a_terminal_diff_shows_its_progress_and_ctrl_c_leaves_nothing(tmp_path: Path) -> None:
    """Coding a large model takes a while: a terminal shows the phase and how far it is.
    Ctrl-C then ends it with exit 130 and nothing at -o (the patch is written whole or
    not at all)."""
    rng = np.random.default_rng(5)
    weights = [Init(f"w{i}", random_array(rng, np.float32, (512, 512))) for i in range(40)]
    old, new = tmp_path / "old.onnx", tmp_path / "new.onnx"
    old.write_bytes(build(weights))
    new.write_bytes(build([Init(w.name, tweak(rng, w.array)) for w in weights]))
    patch = tmp_path / "update.hfd"
    leader, follower = pty.openpty()
    command: list[str | Path] = [sys.executable, "-m", "homefleet", "artifact", "diff", old, new]
    command += ["-o", patch]
    process = subprocess.Popen(
        command, cwd=ROOT, stdin=subprocess.DEVNULL, stdout=follower, stderr=follower
    )
    os.close(follower)
    screen = bytearray()
    interrupted = False
    while True:
        try:
            chunk = os.read(leader, 65536)
        except OSError:  # EIO: the process closed the terminal
            break
        if not chunk:
            break
        screen += chunk
        if not interrupted and b"coding tensors" in screen:
            process.send_signal(signal.SIGINT)  # as Ctrl-C would
            interrupted = True
    os.close(leader)
    text = screen.decode(errors="replace")
    assert process.wait(timeout=120) == 130, text
    assert interrupted, text
    assert f"interrupted: nothing written to {patch}" in " ".join(text.split()), text
    assert "Traceback" not in text
    assert sorted(p.name for p in tmp_path.iterdir()) == ["new.onnx", "old.onnx"]


def test_ctrl_c_after_the_rename_reports_the_complete_file_not_nothing_written(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The result is renamed over -o only when whole; a Ctrl-C that lands after the rename
    (here: while the directory is synced) must not say "nothing written" about a file
    that was replaced (QA saw exit 130 and the new model at -o)."""
    rng = np.random.default_rng(9)
    weights = [Init(f"w{i}", random_array(rng, np.float32, (64, 64))) for i in range(3)]
    old, new = tmp_path / "old.onnx", tmp_path / "new.onnx"
    old.write_bytes(build(weights))
    new.write_bytes(build([Init(w.name, tweak(rng, w.array)) for w in weights]))
    patch, out = tmp_path / "update.hfd", tmp_path / "out.onnx"
    runner = CliRunner()
    assert (
        runner.invoke(artifact_cli.app, ["diff", str(old), str(new), "-o", str(patch)]).exit_code
        == 0
    )
    out.write_bytes(b"the model that was here")

    def interrupted(directory: Path) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(files, "fsync_dir", interrupted)
    done = runner.invoke(artifact_cli.app, ["patch", str(old), str(patch), "-o", str(out)])
    assert done.exit_code == 0, done.output
    assert f"interrupted after {out} was written in full: it is complete" in done.stderr
    assert "nothing written" not in done.output
    assert out.read_bytes() == new.read_bytes()
    assert out.stat().st_mode & 0o044 == 0o044 & ~_umask()  # shared as a finished file is
    # done: a later Ctrl-C (the interpreter still shuts down) cannot make it look failed
    assert signal.getsignal(signal.SIGINT) == signal.SIG_IGN

    # an interrupt before the rename leaves -o as it was, and says so
    out.write_bytes(b"the model that was here")

    def interrupted_replace(src: object, dst: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(files.os, "replace", interrupted_replace)
    done = runner.invoke(artifact_cli.app, ["patch", str(old), str(patch), "-o", str(out)])
    assert done.exit_code == 130, done.output
    assert f"interrupted: nothing written to {out}" in done.stderr
    assert out.read_bytes() == b"the model that was here"
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "new.onnx",
        "old.onnx",
        "out.onnx",
        "update.hfd",
    ]


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
