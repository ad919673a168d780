"""The committed generated stubs must equal what `make protos` would generate now."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
GENERATED = ("fleet_pb2.py", "fleet_pb2.pyi", "fleet_pb2_grpc.py")


def test_committed_stubs_match_fleet_proto(tmp_path: Path) -> None:
    (tmp_path / "protos").mkdir()
    shutil.copy(ROOT / "protos" / "fleet.proto", tmp_path / "protos" / "fleet.proto")
    subprocess.run(
        [
            sys.executable,
            "-m",
            "grpc_tools.protoc",
            "-I.",
            "--python_out=.",
            "--pyi_out=.",
            "--grpc_python_out=.",
            "protos/fleet.proto",
        ],
        cwd=tmp_path,
        check=True,
    )
    stale = [
        name
        for name in GENERATED
        if (tmp_path / "protos" / name).read_bytes() != (ROOT / "protos" / name).read_bytes()
    ]
    assert not stale, f"generated stubs are stale: {stale}; run `make protos` and commit them"


def test_package_is_versioned() -> None:
    from protos import fleet_pb2

    assert fleet_pb2.DESCRIPTOR.package == "homefleet.v1"
    assert {"AgentService", "AdminService", "InferenceService"} <= set(
        fleet_pb2.DESCRIPTOR.services_by_name
    )
