"""What the controller builds from stored blobs is built from sound bytes only.

Each test corrupts a real blob on disk under a real controller (one byte flipped in place,
as bit rot would) and asks over loopback gRPC for work that reads it: an artifact made
from a corrupt model and a compression job of it are refused with DATA_LOSS naming the
model and the fix, leave no row and no blob, and are recorded once as a blob.corrupt
event; the budget loop does not recompress with corrupt calibration data; a corrupt
previous int8 artifact is not reused. Adding the model's file again repairs the blob,
says so in a blob.repaired event, and the artifact can be made and downloaded again.
"""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path
from typing import Any

import grpc

from controller import agents
from controller.blobstore import BlobStore
from controller.db import make_engine
from controller.jobs.request import device_class_yaml, parse_device_class
from controller.records import CompressionInputs, JobResult, JobState, NewCompressionJob
from controller.sql_store import SqlStore
from protos import fleet_pb2 as pb
from tests.controller.helpers import (
    Harness,
    collect,
    expect_status,
    onnx_model,
    run,
    running_controller,
    sha256,
)
from tests.controller.test_agent_rpc import deployed, fetch_request
from tests.controller.test_budget_loop import (
    CLASSES_DIR,
    HUBS,
    POLICY,
    SLOW,
    WINDOW_MS,
    Fleet,
    loop_of,
    next_slice_start,
    now_ms,
)
from tests.controller.test_compression_jobs import (
    CALIBRATION,
    HOME_HUB,
    POOL,
    classifier,
    job_dirs,
    start,
    table_counts,
)
from tests.controller.test_compression_reuse import STATIC, record

DATA_LOSS = grpc.StatusCode.DATA_LOSS


def blob_path(c: Harness, digest: str) -> Path:
    return c.config.blob_dir / "sha256" / digest[:2] / digest


def corrupt(path: Path, at: int) -> bytes:
    """Flip one byte in place, as bit rot does: the file keeps its mode, inode, size and
    modification time (so nothing but its bytes tells it changed). The bytes now stored."""
    before = path.stat()
    path.chmod(0o644)
    with path.open("r+b") as f:
        f.seek(at)
        (byte,) = f.read(1)
        f.seek(at)
        f.write(bytes([byte ^ 0xFF]))
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
    path.chmod(stat.S_IMODE(before.st_mode))
    return path.read_bytes()


async def details(c: Harness, kind: str) -> list[dict[str, Any]]:
    return [json.loads(e.detail_json) for e in await c.events(kind)]


def stored_blobs(c: Harness) -> list[str]:
    """Stored blobs and temporaries (corruption records and kept copies aside)."""
    return [f for f in c.blob_files() if not f.startswith("corrupt/")]


def known_corrupt(c: Harness, digest: str) -> bool:
    return BlobStore(c.config.blob_dir).known_corrupt(digest) is not None


def test_a_corrupt_model_makes_no_artifact_until_its_file_is_added_again(tmp_path: Path) -> None:
    async def body() -> None:
        async with running_controller(tmp_path) as c:
            data, art = await deployed(c, weights=2000)  # motions v1, its hub artifact
            rotten = corrupt(blob_path(c, art.sha256), len(data) // 2)  # inside a weight
            counts, blobs = c.counts(), stored_blobs(c)

            refused = await expect_status(
                c.artifact("motions", "camera"),
                DATA_LOSS,
                "model motions v1",
                sha256(rotten),
                "no artifact of it is made for camera",
                "homefleet model add motions FILE",
            )
            assert art.sha256 in (refused.details() or "")
            (event,) = await c.events(agents.CORRUPT_EVENT)  # one kind, whoever finds it
            assert event.subject == "motions"
            detail = json.loads(event.detail_json)
            assert (detail["blob"], detail["model_name"], detail["model_version"]) == (
                "model",
                "motions",
                1,
            )
            assert (detail["expected_sha256"], detail["actual_sha256"]) == (
                art.sha256,
                sha256(rotten),
            )
            assert detail["bytes_found"] == len(data)
            assert detail["found_while"] == "creating an artifact"
            assert known_corrupt(c, art.sha256)

            # refused again, and a download of the artifact with these bytes is refused at
            # once (no byte sent): the corruption is recorded, and said once
            await expect_status(c.artifact("motions", "camera"), DATA_LOSS, "model motions v1")
            try:
                chunks = await collect(c.agent.FetchArtifact(fetch_request(art), timeout=10))
            except grpc.aio.AioRpcError as exc:
                assert exc.code() == DATA_LOSS, exc
            else:
                raise AssertionError(f"a corrupt artifact was served ({len(chunks)} chunks)")
            assert len(await c.events("blob.corrupt")) == 1
            assert c.counts()["artifacts"] == counts["artifacts"]  # no artifact row
            assert stored_blobs(c) == blobs  # no blob

            # the documented fix: the same file added again replaces the corrupt copy and
            # says so, so blob.corrupt is not the last word
            again = await c.add_model("motions", data)
            assert (again.version, again.unchanged, again.repaired) == (1, True, True)
            (repaired,) = await c.events("blob.repaired")
            assert repaired.subject == "motions" and "blobs/corrupt/" in repaired.message
            assert "model motions v1 (also the bytes of artifact motions/home-hub/v1)" in (
                repaired.message
            )
            detail = json.loads(repaired.detail_json)
            assert (detail["blob"], detail["sha256"], detail["model_version"]) == (
                "model",
                art.sha256,
                1,
            )
            assert detail["artifact_id"] == art.id
            assert [e.kind for e in await c.events("blob.")][-1] == "blob.repaired"
            assert not known_corrupt(c, art.sha256)

            camera = await c.artifact("motions", "camera")
            assert camera.sha256 == sha256(data)
            chunks = await collect(c.agent.FetchArtifact(fetch_request(art), timeout=10))
            assert b"".join(ch.data for ch in chunks) == data
            # adding the sound file once more is no repair
            assert not (await c.add_model("motions", data)).repaired
            assert len(await c.events("blob.repaired")) == 1

    run(body())


def test_a_corrupt_model_starts_no_compression_job(tmp_path: Path) -> None:
    async def body() -> None:
        async with running_controller(tmp_path, **POOL) as c:
            source = classifier()
            model = await c.add_model("clf", source)
            rotten = corrupt(blob_path(c, model.sha256), len(source) // 2)
            before = table_counts(c.config.database_url)
            blobs = stored_blobs(c)

            await expect_status(
                start(c),
                DATA_LOSS,
                "model clf v1",
                sha256(rotten),
                "no compression job of it is started for home-hub",
                "homefleet model add clf FILE",
            )
            after = table_counts(c.config.database_url)
            assert (after["compression_jobs"], after["artifacts"]) == (0, 0)
            assert after["events"] == before["events"] + 1
            (detail,) = await details(c, "blob.corrupt")
            assert (detail["blob"], detail["model_name"]) == ("model", "clf")
            assert detail["found_while"] == "starting a compression job"
            # nothing half-written: no job directory, the calibration data not kept
            assert job_dirs(c) == []
            assert stored_blobs(c) == blobs
            assert sha256(CALIBRATION) not in "".join(blobs)

            # said once, refused every time
            await expect_status(start(c), DATA_LOSS, "model clf v1")
            assert len(await c.events("blob.corrupt")) == 1
            assert table_counts(c.config.database_url)["compression_jobs"] == 0

    run(body())


def test_a_corrupt_previous_int8_artifact_is_not_reused(tmp_path: Path) -> None:
    """The job goes on from the model alone: it makes the artifact that replaces it."""
    source = tmp_path / "previous.onnx"
    source.write_bytes(onnx_model(width=32, weights=500, seed=3))

    async def body() -> None:
        async with running_controller(tmp_path, **POOL) as c:
            await c.add_model("clf", classifier())
            engine = make_engine(c.config.database_url)
            try:
                previous = record(SqlStore(engine), BlobStore(c.config.blob_dir), source, 1, STATIC)
            finally:
                engine.dispose()
            corrupt(blob_path(c, previous.sha256), source.stat().st_size // 2)

            job = await start(c)  # accepted
            await c.admin.CancelCompressionJob(pb.CompressionJobRef(id=job.id), timeout=10)
            (event,) = await c.events("blob.corrupt")
            assert event.subject == "clf/home-hub/v1"
            assert "does not reuse its quantization parameters" in event.message
            assert "assign the artifact this compression makes for home-hub" in event.message
            detail = json.loads(event.detail_json)
            assert (detail["blob"], detail["artifact_id"]) == ("artifact", "clf/home-hub/v1")
            assert detail["found_while"] == "starting a compression of clf for home-hub"
            assert known_corrupt(c, previous.sha256)  # downloads refuse it too

    run(body())


def test_the_budget_loop_does_not_recompress_with_corrupt_calibration_data(
    tmp_path: Path,
) -> None:
    async def body() -> None:
        async with running_controller(
            tmp_path, device_classes_dir=CLASSES_DIR, budget_policy=POLICY, **POOL
        ) as c:
            await c.add_model("clf", classifier())
            fp32 = await c.artifact("clf", "home-hub")
            await c.admin.Assign(
                pb.AssignRequest(artifact_id=fp32.id, device_class="home-hub"), timeout=10
            )
            for hub in HUBS:
                await c.register(hub, "home-hub")
            # what a finished compression of clf for home-hub leaves: its calibration data
            # kept, and its row naming it (the loop recompresses from these)
            engine = make_engine(c.config.database_url)
            try:
                store = SqlStore(engine)
                kept = BlobStore(c.config.blob_dir).put_bytes(CALIBRATION)
                yaml = device_class_yaml(parse_device_class(HOME_HUB))
                job = store.create_compression_job(
                    NewCompressionJob(
                        "clf",
                        1,
                        "",
                        "home-hub",
                        "elsewhere",
                        CompressionInputs(kept.sha256, yaml, 0.6),
                    )
                )
                store.start_compression_job(job.id)
                store.finish_compression_job(job.id, JobResult(JobState.SUCCEEDED))
            finally:
                engine.dispose()
            rotten = corrupt(blob_path(c, kept.sha256), len(CALIBRATION) // 2)

            fleet = Fleet(c)
            t = next_slice_start(now_ms())
            for k in range(3):
                await fleet.slice(t + k * WINDOW_MS, fp32.sha256, SLOW)
            await loop_of(c).tick(t + 3 * WINDOW_MS)

            (failed,) = await c.events("rollout.failed")
            for fragment in (
                "the recompression could not start",
                f"the calibration data of model clf (kept by compression job {job.id}",
                sha256(rotten),
                "homefleet compress --controller",
            ):
                assert fragment in failed.message, (fragment, failed.message)
            (detail,) = await details(c, "blob.corrupt")
            assert (detail["blob"], detail["model_name"]) == ("calibration", "clf")
            assert detail["expected_sha256"] == kept.sha256
            assert detail["found_while"] == "recompressing for the budget loop"
            listed = await c.admin.ListCompressionJobs(pb.ListCompressionJobsRequest(), timeout=10)
            assert [j.id for j in listed.jobs] == [job.id]  # no job started
            assert job_dirs(c) == []

            # the fix it names: a compression with the calibration file; the same bytes
            # replace the corrupt copy, and an event says so
            again = await start(c)
            await c.admin.CancelCompressionJob(pb.CompressionJobRef(id=again.id), timeout=10)
            (repaired,) = await details(c, "blob.repaired")
            assert (repaired["blob"], repaired["sha256"]) == ("calibration", kept.sha256)
            assert not known_corrupt(c, kept.sha256)
            assert blob_path(c, kept.sha256).read_bytes() == CALIBRATION

    run(body())
