"""Compression jobs run by a real controller: its process pool, its store, its artifacts.

Every job compresses a tiny ONNX classifier (post-training steps only), so a job takes
seconds: most of it is the pool process importing the compression stack once.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper
from sqlalchemy import create_engine, text
from typer.testing import CliRunner

from artifact.manifest import Manifest
from artifact.signing import TrustedKey
from controller.db import create_schema, make_engine
from controller.errors import ErrorCode, FleetError
from controller.records import JobResult, JobState, NewCompressionJob, NewModel, TrialRecord
from controller.sql_store import SqlStore
from controller.store import JOB_LEASE_MS
from homefleet.cli import app
from protos import fleet_pb2 as pb
from protos import fleet_pb2_grpc
from tests.controller.helpers import (
    CHANNEL_OPTIONS,
    Harness,
    collect,
    expect_status,
    run,
    running_controller,
)
from tests.support.controller import ControllerThread

ROOT = Path(__file__).resolve().parents[2]
HOME_HUB = (ROOT / "deploy" / "device-classes" / "home-hub.yaml").read_text()
CAMERA = (ROOT / "deploy" / "device-classes" / "camera.yaml").read_text()
FEATURES, CLASSES = 32, 8
JOB_TABLES = ("models", "artifacts", "events", "compression_jobs", "compression_trials")
START_TIMEOUT_S = 90.0
WATCH_TIMEOUT_S = 300.0  # a safety limit for a hung job, never a timing assertion
# One pool process with one thread: the machine is shared.
POOL = {"compression_threads": 1}


def classifier() -> bytes:
    """logits[N, 8] = relu(x[N, 32] @ W1 + b1) @ W2 + b2: 21 KB of float32 weights."""
    rng = np.random.default_rng(0)
    weights = [
        numpy_helper.from_array(rng.standard_normal((FEATURES, 128)).astype(np.float32), "w1"),
        numpy_helper.from_array(rng.standard_normal(128).astype(np.float32) * 0.1, "b1"),
        numpy_helper.from_array(rng.standard_normal((128, CLASSES)).astype(np.float32), "w2"),
        numpy_helper.from_array(np.zeros(CLASSES, np.float32), "b2"),
    ]
    nodes = [
        helper.make_node("MatMul", ["x", "w1"], ["h"]),
        helper.make_node("Add", ["h", "b1"], ["h1"]),
        helper.make_node("Relu", ["h1"], ["r"]),
        helper.make_node("MatMul", ["r", "w2"], ["l"]),
        helper.make_node("Add", ["l", "b2"], ["logits"]),
    ]
    graph = helper.make_graph(
        nodes,
        "classifier",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", FEATURES])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", CLASSES])],
        initializer=weights,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    onnx.checker.check_model(model)
    return model.SerializeToString()


def inputs(samples: int = 64, features: int = FEATURES) -> dict[str, np.ndarray[Any, Any]]:
    return {"x": np.random.default_rng(1).standard_normal((samples, features)).astype(np.float32)}


def npz(**arrays: np.ndarray[Any, Any]) -> bytes:
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)  # type: ignore[arg-type]
    return buffer.getvalue()


CALIBRATION = npz(**inputs())


def budgets(**fields: Any) -> pb.BudgetOverrides:
    return pb.BudgetOverrides(**fields)


EASY = {"min_fidelity": 0.9, "max_size_ratio": 0.6}


def start_messages(
    *,
    model: str = "clf",
    version: int = 0,
    workload: str = "",
    device_class: str = HOME_HUB,
    calibration: bytes = CALIBRATION,
    announced: int | None = None,
    **overrides: Any,
) -> list[pb.StartCompressionChunk]:
    header = pb.StartCompressionHeader(
        device_class_yaml=device_class,
        budgets=budgets(**(overrides or EASY)),
        calibration_bytes=len(calibration) if announced is None else announced,
    )
    if workload:
        header.workload = workload
    elif model:
        header.model.CopyFrom(pb.ModelRef(name=model, version=version))
    return [pb.StartCompressionChunk(header=header)] + [
        pb.StartCompressionChunk(data=calibration[i : i + 4096])
        for i in range(0, len(calibration), 4096)
    ]


async def start(c: Harness, **kwargs: Any) -> pb.CompressionJob:
    job: pb.CompressionJob = await c.admin.StartCompression(
        iter(start_messages(**kwargs)), timeout=30
    )
    return job


async def follow(c: Harness, job_id: int) -> list[pb.CompressionJob]:
    """Every update WatchCompressionJob sends until the job ends."""
    stream = c.admin.WatchCompressionJob(pb.CompressionJobRef(id=job_id), timeout=WATCH_TIMEOUT_S)
    updates: list[pb.CompressionJob] = await collect(stream)
    return updates


def table_counts(database_url: str) -> dict[str, int]:
    engine = create_engine(database_url)
    try:
        with engine.connect() as conn:
            return {
                t: int(conn.execute(text(f"SELECT COUNT(*) FROM {t}")).scalar_one())
                for t in JOB_TABLES
            }
    finally:
        engine.dispose()


def job_dirs(c: Harness) -> list[str]:
    """Job and upload directories (the pool's own scratch directories aside)."""
    root = c.config.jobs_dir
    return sorted(p.name for p in root.iterdir() if not p.name.startswith(".worker-"))


SUCCEEDED = pb.COMPRESSION_JOB_STATE_SUCCEEDED
ACTIVE_STATES = (pb.COMPRESSION_JOB_STATE_QUEUED, pb.COMPRESSION_JOB_STATE_RUNNING)


# -------------------------------------------------------------------- a job end to end


def test_a_job_publishes_a_signed_smaller_artifact_with_its_recipe(tmp_path: Path) -> None:
    async def body() -> None:
        async with running_controller(tmp_path, **POOL) as c:
            source = classifier()
            model = await c.add_model("clf", source)
            job = await start(c)
            assert job.state == pb.COMPRESSION_JOB_STATE_QUEUED and job.model_version == 1

            # a second start for the same (model, class) names the active job
            await expect_status(
                start(c), grpc.StatusCode.ALREADY_EXISTS, f"compression job {job.id}"
            )
            # a job for another class queues behind it; cancelled before its turn, at once
            other = await start(c, device_class=CAMERA)
            cancelled = await c.admin.CancelCompressionJob(
                pb.CompressionJobRef(id=other.id), timeout=10
            )
            assert cancelled.id == other.id
            assert cancelled.state == pb.COMPRESSION_JOB_STATE_CANCELLED

            updates = await follow(c, job.id)
            final = updates[-1]
            assert final.state == SUCCEEDED, final.error
            assert [u.state for u in updates[:-1]] and all(
                u.state in (pb.COMPRESSION_JOB_STATE_QUEUED, pb.COMPRESSION_JOB_STATE_RUNNING)
                for u in updates[:-1]
            )
            assert final.trials_done == len(final.trials) >= 2
            assert final.trials[0].recipe == "source" and final.trials[-1].met
            assert all(t.summary.startswith(f"trial {t.index}: ") for t in final.trials)
            assert final.verdicts and all(v.met for v in final.verdicts)
            assert final.started_unix_ms >= final.created_unix_ms > 0
            assert final.finished_unix_ms >= final.started_unix_ms

            # the artifact: smaller bytes, the job's recipe and metrics, signed
            listed = await c.admin.ListArtifacts(pb.ListArtifactsRequest(), timeout=10)
            (artifact,) = listed.artifacts
            assert artifact.id == final.artifact_id == "clf/home-hub/v1"
            assert artifact.size_bytes < 0.6 * model.size_bytes
            key = TrustedKey.from_pem(c.config.key_dir.joinpath("signing.pub.pem").read_bytes())
            key.verify(artifact.manifest.manifest_json, artifact.manifest.signature)
            manifest = Manifest.from_json_bytes(artifact.manifest.manifest_json)
            assert manifest.model_name == "clf" and manifest.model_version == model.version
            assert [step.kind for step in manifest.recipe] == ["quantize"]
            assert manifest.recipe[0].params["mode"] in final.recipe
            assert manifest.metrics["size_ratio"] <= 0.6
            assert manifest.metrics["budgets_met"] == 1.0
            assert manifest.sha256 == artifact.sha256 != model.sha256
            assert [t.name for t in manifest.inputs] == ["x"]

            # the stored bytes run and agree with the source model
            blob = c.config.blob_dir / "sha256" / artifact.sha256[:2] / artifact.sha256
            compressed = ort.InferenceSession(str(blob), providers=["CPUExecutionProvider"])
            original = ort.InferenceSession(source, providers=["CPUExecutionProvider"])
            feed = inputs()
            agree = np.mean(
                compressed.run(None, feed)[0].argmax(1) == original.run(None, feed)[0].argmax(1)
            )
            assert agree >= 0.9

            # the cancelled job ended without trials or an artifact
            other_final = (await follow(c, other.id))[-1]
            assert other_final.state == pb.COMPRESSION_JOB_STATE_CANCELLED
            assert not other_final.artifact_id

            jobs = await c.admin.ListCompressionJobs(pb.ListCompressionJobsRequest(), timeout=10)
            assert [j.id for j in jobs.jobs] == [other.id, job.id]  # newest first
            assert jobs.jobs[1].trials_done == final.trials_done and not jobs.jobs[1].trials

            kinds = [
                (e.kind, json.loads(e.detail_json)["job_id"])
                for e in await c.events("compression.")
            ]
            for expected in ("queued", "started", "finished"):
                assert (f"compression.{expected}", job.id) in kinds
            assert ("compression.cancelled", other.id) in kinds

            # the pair is free again: the next job publishes the next version
            again = await start(c)
            assert (await follow(c, again.id))[-1].artifact_id == "clf/home-hub/v2"
            assert job_dirs(c) == []

    run(body())


# -------------------------------------------------------------------- the store


def test_the_store_keeps_one_active_job_per_pair_and_fails_only_its_owners(
    tmp_path: Path,
) -> None:
    engine = make_engine(f"sqlite:///{tmp_path / 'jobs.db'}")
    create_schema(engine)
    store = SqlStore(engine)
    store.add_model(NewModel("clf", "ab" * 32, 10, (), ()))
    ours = store.create_compression_job(NewCompressionJob("clf", 1, "", "home-hub", "host:a"))
    with pytest.raises(FleetError) as refused:
        store.create_compression_job(NewCompressionJob("clf", 1, "", "home-hub", "host:b"))
    assert refused.value.code is ErrorCode.ALREADY_EXISTS
    assert f"compression job {ours.id}" in refused.value.message
    theirs = store.create_compression_job(NewCompressionJob("clf", 1, "", "camera", "host:b"))
    assert store.start_compression_job(ours.id) is not None
    assert store.start_compression_job(ours.id) is None  # already running
    trial = TrialRecord(
        index=0, summary="trial 0: source", recipe="source", met=False, artifact_bytes=9
    )
    store.add_compression_trial(ours.id, trial)
    store.add_compression_trial(ours.id, trial)  # reported twice, stored once

    assert store.active_compression_job_owners() == {ours.id: "host:a", theirs.id: "host:b"}
    assert store.fail_active_compression_jobs("host:a", "controller restarted") == [ours.id]
    assert store.active_compression_job_owners() == {theirs.id: "host:b"}
    failed = store.get_compression_job(ours.id)
    assert failed is not None and failed.state is JobState.FAILED
    assert failed.trials == (trial,) and failed.trials_done == 1
    other = store.get_compression_job(theirs.id)
    assert other is not None and other.state is JobState.QUEUED  # another controller's job
    # an ended job neither changes again nor blocks the pair
    assert store.finish_compression_job(ours.id, JobResult(JobState.SUCCEEDED)) is None
    again = store.create_compression_job(NewCompressionJob("clf", 1, "", "home-hub", "host:a"))
    assert [j.id for j in store.list_compression_jobs("clf", "home-hub", 10)] == [again.id, ours.id]
    engine.dispose()


def test_a_job_whose_controller_stops_renewing_its_lease_is_failed_by_another(
    tmp_path: Path,
) -> None:
    now = [1_000_000_000]
    engine = make_engine(f"sqlite:///{tmp_path / 'jobs.db'}")
    create_schema(engine)
    store = SqlStore(engine, clock=lambda: now[0])
    store.add_model(NewModel("clf", "ab" * 32, 10, (), ()))
    gone = store.create_compression_job(NewCompressionJob("clf", 1, "", "home-hub", "host:dead"))
    alive = store.create_compression_job(NewCompressionJob("clf", 1, "", "camera", "host:live"))
    now[0] += JOB_LEASE_MS // 2
    assert store.renew_compression_leases("host:live", now[0] + JOB_LEASE_MS) == 1
    assert store.fail_expired_compression_jobs(now[0], "lost") == []  # both within lease
    now[0] += JOB_LEASE_MS // 2 + 1
    assert store.fail_expired_compression_jobs(now[0], "lost") == [gone.id]
    failed = store.get_compression_job(gone.id)
    assert failed is not None and failed.state is JobState.FAILED and failed.error == "lost"
    kept = store.get_compression_job(alive.id)
    assert kept is not None and kept.state is JobState.QUEUED  # its owner renewed it
    # the pair is free again for any controller
    store.create_compression_job(NewCompressionJob("clf", 1, "", "home-hub", "host:live"))
    # a job recorded before leases existed: its creation time stands in for the lease
    with engine.begin() as conn:
        conn.execute(text(f"DELETE FROM compression_job_leases WHERE job_id = {alive.id}"))
    assert store.fail_expired_compression_jobs(now[0], "lost") == [alive.id]
    engine.dispose()


# -------------------------------------------------------------------- refusals


def test_bad_requests_are_refused_and_leave_nothing_behind(tmp_path: Path) -> None:
    async def body() -> None:
        async with running_controller(tmp_path, max_model_bytes=30_000, **POOL) as c:
            await c.add_model("clf", classifier())
            before = table_counts(c.config.database_url), c.blob_files()
            invalid = grpc.StatusCode.INVALID_ARGUMENT
            cases: list[tuple[dict[str, Any], grpc.StatusCode, str]] = [
                ({"model": "nosuch"}, grpc.StatusCode.NOT_FOUND, "'nosuch' is not registered"),
                ({"version": 9}, grpc.StatusCode.NOT_FOUND, "version 9"),
                ({"model": ""}, invalid, "exactly one source"),
                ({"device_class": "name: [home"}, invalid, "not valid YAML"),
                ({"device_class": HOME_HUB.replace("cores: 4", "cores: zero")}, invalid, "cores"),
                ({"calibration": npz(y=inputs()["x"])}, invalid, "no array for model input"),
                ({"calibration": npz(**inputs(features=31))}, invalid, "expects 32 on axis 1"),
                ({"calibration": b"not an npz"}, invalid, "not an .npz"),
                ({"calibration": b""}, invalid, "calibration inputs"),
                ({"announced": len(CALIBRATION) + 1}, invalid, "cut short"),
                ({"max_bytes": 1000, "max_size_ratio": 0.5}, invalid, "not both"),
                ({"min_fidelity": 1.5}, invalid, "min_fidelity must be in (0, 1]"),
                ({"max_bytes": 10**12}, invalid, "model_storage_bytes"),
                ({"workload": "basic-motions"}, invalid, "calibration_bytes must be 0"),
                ({"workload": "nosuch", "calibration": b""}, invalid, "known workloads"),
                # no quality budget of the kind that applies: nobody would judge quality
                (
                    {
                        "device_class": HOME_HUB.replace("min_fidelity: 0.98", ""),
                        "max_size_ratio": 0.6,  # and no min_fidelity override
                    },
                    invalid,
                    "model clf has no labels, so it is judged by fidelity",
                ),
                (
                    {
                        "workload": "plaid",
                        "calibration": b"",
                        "device_class": HOME_HUB.replace("max_accuracy_drop: 0.01", ""),
                        "max_size_ratio": 0.6,
                    },
                    invalid,
                    "workload plaid is judged by its accuracy on labelled data",
                ),
                (
                    {"calibration": npz(**inputs(samples=300))},
                    grpc.StatusCode.RESOURCE_EXHAUSTED,
                    "at most 30000 bytes (max_model_bytes)",
                ),
            ]
            for kwargs, code, fragment in cases:
                call = c.admin.StartCompression(iter(start_messages(**kwargs)), timeout=30)
                await expect_status(call, code, fragment)
            headless = [pb.StartCompressionChunk(data=b"x")]
            await expect_status(
                c.admin.StartCompression(iter(headless), timeout=10), invalid, "header"
            )
            for call in (c.admin.GetCompressionJob, c.admin.CancelCompressionJob):
                await expect_status(
                    call(pb.CompressionJobRef(id=404), timeout=10),
                    grpc.StatusCode.NOT_FOUND,
                    "compression job 404 does not exist",
                )
            assert (table_counts(c.config.database_url), c.blob_files()) == before
            assert list(c.config.jobs_dir.iterdir()) == []  # no upload left, no pool started

    run(body())


# -------------------------------------------------------------------- restarts


@pytest.fixture
def controller_process(tmp_path: Path) -> Iterator[tuple[Path, subprocess.Popen[bytes]]]:
    """`homefleet controller serve` in a process group of its own (its pool included)."""
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    log = (tmp_path / "controller.log").open("wb")
    argv = [sys.executable, "-m", "homefleet", "controller", "serve", "--port", "0"]
    proc = subprocess.Popen(
        [*argv, "--data-dir", str(data_dir)],
        cwd=tmp_path,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while not (data_dir / "controller.json").exists():
            if proc.poll() is not None or time.monotonic() > deadline:
                output = (tmp_path / "controller.log").read_text()
                pytest.fail(f"controller did not start (exit {proc.poll()}):\n{output}")
            time.sleep(0.05)
        yield data_dir, proc
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        log.close()


@contextlib.contextmanager
def admin_with_classifier(data_dir: Path) -> Iterator[Any]:
    """A sync AdminService stub to the controller process serving ``data_dir``, the
    classifier registered as "clf"."""
    address = json.loads((data_dir / "controller.json").read_text())["address"]
    with grpc.insecure_channel(address, options=CHANNEL_OPTIONS) as channel:
        admin = fleet_pb2_grpc.AdminServiceStub(channel)  # type: ignore[no-untyped-call]
        add_classifier(admin)
        yield admin


def add_classifier(admin: Any) -> None:
    """Register the classifier as "clf" through a sync AdminService stub."""
    source = classifier()
    header = pb.AddModelHeader(name="clf", size_bytes=len(source))
    admin.AddModel(
        iter([pb.AddModelChunk(header=header), pb.AddModelChunk(data=source)]), timeout=30
    )


def test_a_restarted_controller_fails_the_jobs_it_left_behind(
    tmp_path: Path, controller_process: tuple[Path, subprocess.Popen[bytes]]
) -> None:
    data_dir, proc = controller_process
    with admin_with_classifier(data_dir) as admin:
        job = admin.StartCompression(iter(start_messages()), timeout=30)
    # the controller dies with its pool: no graceful stop, the job stays active in the database
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()

    async def body() -> None:
        async with running_controller(tmp_path, data_dir=data_dir, **POOL) as c:
            failed = await c.admin.GetCompressionJob(pb.CompressionJobRef(id=job.id), timeout=10)
            assert failed.state == pb.COMPRESSION_JOB_STATE_FAILED
            assert "controller restarted" in failed.error and not failed.artifact_id
            details = [json.loads(e.detail_json) for e in await c.events("compression.failed")]
            assert [d["job_id"] for d in details] == [job.id]
            assert job_dirs(c) == []
            # the pair is free again; stopping the controller fails the new job at once
            again = await start(c)
        async with running_controller(tmp_path, data_dir=data_dir, **POOL) as c:
            stopped = await c.admin.GetCompressionJob(pb.CompressionJobRef(id=again.id), timeout=10)
            assert stopped.state == pb.COMPRESSION_JOB_STATE_FAILED
            assert "controller stopped" in stopped.error
            assert job_dirs(c) == []

    run(body())


def test_a_second_controller_on_the_data_dir_leaves_a_running_ones_jobs_alone(
    tmp_path: Path, controller_process: tuple[Path, subprocess.Popen[bytes]]
) -> None:
    """Replicas may share a data directory: one starting (or stopping) there fails only
    the jobs of a run whose process is gone, never a live one's, nor removes their
    directories or its workers' scratch space."""
    data_dir, proc = controller_process
    with admin_with_classifier(data_dir) as admin:
        running = admin.StartCompression(iter(start_messages()), timeout=30)
        queued = admin.StartCompression(iter(start_messages(device_class=CAMERA)), timeout=30)

        async def body() -> None:
            async with running_controller(tmp_path / "second", data_dir=data_dir, **POOL) as c:
                for job in (running, queued):
                    now = await c.admin.GetCompressionJob(
                        pb.CompressionJobRef(id=job.id), timeout=10
                    )
                    assert now.state in ACTIVE_STATES, now.error
                assert {str(running.id), str(queued.id)} <= set(job_dirs(c))
                assert await c.events("compression.failed") == []

        run(body())  # the second controller started and stopped
        assert proc.poll() is None
        for job in (running, queued):
            stream = admin.WatchCompressionJob(
                pb.CompressionJobRef(id=job.id), timeout=WATCH_TIMEOUT_S
            )
            final = list(stream)[-1]
            assert final.state == SUCCEEDED, final.error
    # the workers' log lines join the controller's, in its format (QA: bare "INFO:name:")
    log = (tmp_path / "controller.log").read_text()
    worker_line = re.search(r"^(\S+ \S+) INFO controller\.compression\.quantize: ", log, re.M)
    assert worker_line is not None, log
    assert not re.search(r"^(DEBUG|INFO|WARNING|ERROR):", log, re.M), log


# -------------------------------------------------------------------- the CLI


def test_the_cli_runs_a_job_on_a_controller_and_prints_the_artifact(tmp_path: Path) -> None:
    runner = CliRunner(env={"COLUMNS": "200", "HOMEFLEET_CONTROLLER": None})
    device_class = tmp_path / "home-hub.yaml"
    device_class.write_text(HOME_HUB)
    calib = tmp_path / "inputs.npz"
    calib.write_bytes(CALIBRATION)
    with ControllerThread(tmp_path / "data", **POOL) as live:
        live.add_model("clf", classifier())
        base = ["compress", "--controller", live.address, "--device-class", str(device_class)]
        base += ["--calib", str(calib)]

        easy = ["--min-fidelity", "0.9", "--max-size-ratio", "0.6"]
        met = runner.invoke(app, [*base, "--model", "clf", *easy])
        assert met.exit_code == 0, met.output
        assert met.stdout.strip() == "clf/home-hub/v1"
        assert "trial 1: quantize(mode=fp16)" in met.stderr

        missed = runner.invoke(app, [*base, "--model", "clf", "--max-bytes", "100", "--json"])
        assert missed.exit_code == 5, missed.output
        job = json.loads(missed.stdout)
        assert job["state"] == "not_met" and job["artifact_id"] == "clf/home-hub/v2"
        assert not next(v for v in job["verdicts"] if v["budget"] == "max_artifact_bytes")["met"]

        unknown = runner.invoke(app, [*base, "--model", "nosuch"])
        assert unknown.exit_code == 2 and "not registered" in unknown.stderr

        listed = runner.invoke(app, ["jobs", "--controller", live.address, "--json"])
        assert listed.exit_code == 0, listed.output
        states = [(j["id"], j["state"]) for j in json.loads(listed.stdout)["jobs"]]
        assert states == [(2, "not_met"), (1, "succeeded")]
