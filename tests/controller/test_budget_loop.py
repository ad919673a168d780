"""The closed budget loop on a real controller: telemetry over real gRPC, real compression
jobs in the controller's process pool, real assignments and re-releases.

The loop's background task is off (``check_seconds=0``); the tests call ``tick`` with a
chosen "now", so which telemetry slices are judged never depends on the wall clock.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import math
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
from typer.testing import CliRunner

from artifact import histogram
from artifact.manifest import Manifest
from controller.config import BudgetPolicy, ConfigError
from controller.dashboard.api import decisions
from controller.db import make_engine
from controller.device_classes import Budgets
from controller.rollouts.check import (
    SliceStats,
    SliceVerdict,
    check,
    slice_bounds,
    slice_misses,
)
from controller.rollouts.loop import (
    CanaryReference,
    RolloutLoop,
    over_budget,
    recalibrated_speed,
)
from controller.rollouts.records import RolloutRecord, RolloutState
from controller.rollouts.store import RolloutStore
from controller.sql_store import SqlStore
from homefleet.cli import app
from protos import fleet_pb2 as pb
from tests.controller.helpers import Harness, expect_status, run, running_controller
from tests.controller.test_compression_jobs import (
    CALIBRATION,
    CAMERA,
    HOME_HUB,
    classifier,
    follow,
)

ROOT = Path(__file__).resolve().parents[2]
CLASSES_DIR = ROOT / "deploy" / "device-classes"  # home-hub: p95 20 ms, 100 mJ/inference
WINDOW_MS = 10_000
POLICY = BudgetPolicy(
    window_seconds=10, windows_in_a_row=3, min_samples=50, check_seconds=0, cooldown_seconds=0
)
HUBS = ("hub-1", "hub-2", "hub-3", "hub-4")
FAST = 0.001  # seconds: well within home-hub's 20 ms
SLOW = 0.040  # over it


class Fleet:
    """Reports telemetry for devices as their agents would (one seq counter per device)."""

    def __init__(self, c: Harness) -> None:
        self.c = c
        self.seqs: dict[str, itertools.count[int]] = defaultdict(lambda: itertools.count(1))

    async def report(
        self,
        device_id: str,
        sha: str,
        end_ms: int,
        latency_s: float,
        count: int = 30,
        *,
        joules_each: float = 0.01,  # 10 mJ per inference: within budget
        energy_source: str = "estimate",
    ) -> None:
        window = pb.TelemetryWindow(
            seq=next(self.seqs[device_id]),
            model_name="clf",
            artifact_sha256=sha,
            start_unix_ms=end_ms - WINDOW_MS + 1,
            end_unix_ms=end_ms,
            count=count,
            errors=0,
            latency_bucket_counts=histogram.histogram([latency_s] * count),
            cpu_seconds=latency_s * count,
            joules=joules_each * count,
            energy_source=energy_source,
        )
        await self.c.agent.ReportTelemetry(
            pb.TelemetryBatch(device_id=device_id, windows=[window]), timeout=10
        )

    async def slice(
        self, start_ms: int, sha: str, latency_s: float, devices: Any = HUBS, count: int = 30
    ) -> None:
        """One slice [start, start + window) of telemetry from ``devices``."""
        for device_id in devices:
            await self.report(device_id, sha, start_ms + WINDOW_MS // 2, latency_s, count)


def next_slice_start(after_ms: int) -> int:
    """The first slice boundary after ``after_ms`` (slices are epoch-aligned).

    Each phase of a test reports into slices after the previous phase's (the chosen
    "now" runs ahead of the wall clock) and after the wall clock (the store stamps
    rollouts with it, and only telemetry after a rollout's start or end counts).
    """
    return (after_ms // WINDOW_MS + 1) * WINDOW_MS


def now_ms() -> int:
    return int(time.time() * 1000)


async def kinds(c: Harness, prefix: str) -> list[str]:
    return [e.kind for e in await c.events(prefix)]


@dataclass(frozen=True)
class Desired:
    id: str
    version: int
    sha256: str


async def desired(c: Harness, device_id: str) -> Desired:
    """The clf artifact a device's watch stream carries (what its agent would install)."""
    stream = c.agent.WatchAssignments(pb.WatchAssignmentsRequest(device_id=device_id), timeout=10)
    async for update in stream:
        stream.cancel()
        (assignment,) = [a for a in update.assignments if a.model_name == "clf"]
        manifest = Manifest.from_json_bytes(assignment.manifest.manifest_json)
        return Desired(manifest.artifact_id, manifest.version, assignment.artifact_sha256)
    raise AssertionError("no update")


def loop_of(c: Harness) -> RolloutLoop:
    assert c.server.budget_loop is not None
    return c.server.budget_loop


async def hubs_on_fp32_after_a_job(c: Harness) -> tuple[pb.CompressionJob, pb.Artifact]:
    """The controller compresses clf for home-hub once (so its inputs are kept), then the
    operator assigns the uncompressed model to the class by hand: too slow for the
    budget. Four hubs are registered; returns the job and the FP32 artifact."""
    await c.add_model("clf", classifier())
    first: pb.CompressionJob = await c.admin.StartCompression(iter(start_request()), timeout=30)
    assert (await follow(c, first.id))[-1].state == pb.COMPRESSION_JOB_STATE_SUCCEEDED
    fp32 = await c.artifact("clf", "home-hub")
    await c.admin.Assign(pb.AssignRequest(artifact_id=fp32.id, device_class="home-hub"), timeout=10)
    for hub in HUBS:
        await c.register(hub, "home-hub")
    return first, fp32


def test_a_sustained_miss_recompresses_once_and_a_canary_within_budget_is_promoted_to_the_class(
    tmp_path: Path, database_url: str | None
) -> None:
    async def body() -> None:
        async with running_controller(
            tmp_path,
            device_classes_dir=CLASSES_DIR,
            budget_policy=POLICY,
            compression_threads=1,
            db_url=database_url,
        ) as c:
            fleet = Fleet(c)
            first, fp32 = await hubs_on_fp32_after_a_job(c)
            loop = loop_of(c)

            # one slow slice among fast ones, and slices with too few samples: nothing
            t = next_slice_start(now_ms())
            await fleet.slice(t, fp32.sha256, FAST)
            await fleet.slice(t + WINDOW_MS, fp32.sha256, SLOW)
            await fleet.slice(t + 2 * WINDOW_MS, fp32.sha256, FAST)
            await loop.tick(t + 3 * WINDOW_MS)
            await fleet.report("hub-1", fp32.sha256, t + 3 * WINDOW_MS + 5, SLOW)  # 30 < 50
            await fleet.slice(t + 4 * WINDOW_MS, fp32.sha256, SLOW)
            await fleet.slice(t + 5 * WINDOW_MS, fp32.sha256, SLOW)
            await loop.tick(t + 6 * WINDOW_MS)
            assert await kinds(c, "budget.") == []

            # three slow slices in a row: exactly one decision and one recompression,
            # however often the loop looks
            await fleet.slice(t + 6 * WINDOW_MS, fp32.sha256, SLOW)
            for _ in range(3):
                await loop.tick(t + 7 * WINDOW_MS)
            await loop.tick(t + 8 * WINDOW_MS)
            (miss,) = [e for e in await c.events("budget.")]
            detail = json.loads(miss.detail_json)
            assert miss.kind == "budget.miss" and detail["artifact_id"] == fp32.id
            assert detail["p95_budget_ms"] == 20 and detail["p95_ms"] > 20
            assert detail["windows"] == 3 and detail["samples"] == 3 * 4 * 30
            assert "p95" in miss.message and "3 windows in a row" in miss.message
            jobs = await c.admin.ListCompressionJobs(pb.ListCompressionJobsRequest(), timeout=10)
            assert len(jobs.jobs) == 2
            (recompress,) = [
                json.loads(e.detail_json) for e in await c.events("rollout.recompress")
            ]
            second = recompress["job_id"]
            assert second == jobs.jobs[0].id != first.id
            assert recompress["p95_target_ms"] == pytest.approx(20 * POLICY.latency_margin)

            # the job ends; the next tick puts the candidate on a canary share (1 of 4)
            assert (await follow(c, second))[-1].state in (
                pb.COMPRESSION_JOB_STATE_SUCCEEDED,
                pb.COMPRESSION_JOB_STATE_NOT_MET,
            )
            await loop.tick(t + 8 * WINDOW_MS)
            (canary,) = [json.loads(e.detail_json) for e in await c.events("rollout.canary")]
            assert canary["devices"] == ["hub-1"] and canary["baseline_artifact_id"] == fp32.id
            candidate = canary["artifact_id"]
            assert (await desired(c, "hub-1")).id == candidate
            assert (await desired(c, "hub-2")).id == fp32.id
            cand_sha = (await desired(c, "hub-1")).sha256
            assert cand_sha != fp32.sha256

            # the canary holds the budget while the rest of the class (hubs 2-4, enough
            # inferences in every slice) stays slow: promoted to the whole class
            u = max(next_slice_start(now_ms()), t + 8 * WINDOW_MS)
            for k in range(3):
                await fleet.slice(u + k * WINDOW_MS, cand_sha, FAST, devices=["hub-1", "hub-1"])
                await fleet.slice(u + k * WINDOW_MS, fp32.sha256, SLOW, devices=HUBS[1:])
            await loop.tick(u + 2 * WINDOW_MS)  # not yet three whole slices: no verdict
            assert await kinds(c, "rollout.promote") == []
            await loop.tick(u + 3 * WINDOW_MS)
            (promote,) = await c.events("rollout.promote")
            detail = json.loads(promote.detail_json)
            assert detail["canary_p95_ms"] < 20 < detail["baseline_p95_ms"]
            assert detail["baseline_from"] == "rest_of_class"
            assert "rest of the class p95" in promote.message
            for hub in HUBS:
                assert (await desired(c, hub)).sha256 == cand_sha
            assert await kinds(c, "rollout.") == [
                "rollout.recompress",
                "rollout.canary",
                "rollout.promote",
            ]

            # the operator's view, with what the rollout did and why
            listing = await c.admin.ListRollouts(pb.ListRolloutsRequest(), timeout=10)
            (listed,) = listing.rollouts
            assert listed.state == pb.ROLLOUT_STATE_PROMOTED
            assert listed.candidate_artifact_id == candidate
            assert listed.baseline_artifact_id == fp32.id and listed.job_id == second
            assert list(listed.canary_devices) == ["hub-1"] and listed.finished_unix_ms > 0
            assert "within budget" in listed.reason
            active = await c.admin.ListRollouts(
                pb.ListRolloutsRequest(active_only=True), timeout=10
            )
            assert list(active.rollouts) == []

            # the dashboard's decisions view folds the loop's own events into rollouts
            engine = make_engine(c.config.database_url)
            try:
                view = decisions(SqlStore(engine), 100)
            finally:
                engine.dispose()
            (shown,) = view.rollouts
            assert shown.state == "promoted" and shown.rollout_id == str(listed.id)
            assert shown.artifact_id == candidate
            assert shown.canary_p95_ms is not None and shown.canary_p95_ms < 20
            assert [d.kind for d in view.decisions].count("budget.miss") == 1

    run(body())


def start_request() -> list[pb.StartCompressionChunk]:
    header = pb.StartCompressionHeader(
        device_class_yaml=HOME_HUB,
        budgets=pb.BudgetOverrides(min_fidelity=0.9, max_size_ratio=0.6),
        calibration_bytes=len(CALIBRATION),
    )
    header.model.CopyFrom(pb.ModelRef(name="clf"))
    return [pb.StartCompressionChunk(header=header)] + [
        pb.StartCompressionChunk(data=CALIBRATION[i : i + 4096])
        for i in range(0, len(CALIBRATION), 4096)
    ]


def test_a_class_without_a_compression_job_gets_a_failed_decision_not_a_crash(
    tmp_path: Path,
) -> None:
    async def body() -> None:
        async with running_controller(
            tmp_path, device_classes_dir=CLASSES_DIR, budget_policy=POLICY
        ) as c:
            fleet = Fleet(c)
            await c.add_model("clf", classifier())
            art = await c.artifact("clf", "home-hub")
            await c.admin.Assign(
                pb.AssignRequest(artifact_id=art.id, device_class="home-hub"), timeout=10
            )
            for hub in HUBS:
                await c.register(hub, "home-hub")
            t = next_slice_start(now_ms())
            for k in range(3):
                await fleet.slice(t + k * WINDOW_MS, art.sha256, SLOW)
            await loop_of(c).tick(t + 3 * WINDOW_MS)
            assert await kinds(c, "budget.") == ["budget.miss"]
            (failed,) = await c.events("rollout.failed")
            assert "homefleet compress --controller" in failed.message
            assert (await desired(c, "hub-1")).id == art.id  # nothing changed for devices

            # `homefleet rollouts` shows it, and refuses a malformed filter
            shown = await asyncio.to_thread(
                CliRunner().invoke,
                app,
                ["rollouts", "--json", "--class", "home-hub", "--controller", c.server.address],
            )
            assert shown.exit_code == 0, shown.output
            (listed,) = json.loads(shown.output)["rollouts"]
            assert listed["state"] == "failed" and listed["baseline_artifact_id"] == art.id
            assert "homefleet compress --controller" in listed["reason"]
            await expect_status(
                c.admin.ListRollouts(pb.ListRolloutsRequest(model_name="../etc"), timeout=10),
                grpc.StatusCode.INVALID_ARGUMENT,
                "model_name",
            )
            # a failed rollout is not retried on the same artifact (no event storm): the
            # decision said what the operator has to do
            for k in range(3, 6):
                await fleet.slice(t + k * WINDOW_MS, art.sha256, SLOW)
            await loop_of(c).tick(t + 6 * WINDOW_MS)
            assert await kinds(c, "budget.") == ["budget.miss"]

    run(body())


def test_a_recompression_lost_to_a_cancel_is_tried_again_on_the_next_miss(
    tmp_path: Path,
) -> None:
    async def body() -> None:
        async with running_controller(
            tmp_path, device_classes_dir=CLASSES_DIR, budget_policy=POLICY, compression_threads=1
        ) as c:
            fleet = Fleet(c)
            _, fp32 = await hubs_on_fp32_after_a_job(c)
            # a workload job (it trains) keeps the one compression worker busy, so the
            # loop's recompression waits in the queue, where the operator cancels it
            blocker = pb.StartCompressionHeader(device_class_yaml=CAMERA, workload="basic-motions")
            await c.admin.StartCompression(
                iter([pb.StartCompressionChunk(header=blocker)]), timeout=30
            )
            t = next_slice_start(now_ms())
            for k in range(3):
                await fleet.slice(t + k * WINDOW_MS, fp32.sha256, SLOW)
            await loop_of(c).tick(t + 3 * WINDOW_MS)
            job = json.loads((await c.events("rollout.recompress"))[-1].detail_json)["job_id"]
            await c.admin.CancelCompressionJob(pb.CompressionJobRef(id=job), timeout=10)
            assert (await follow(c, job))[-1].state == pb.COMPRESSION_JOB_STATE_CANCELLED
            await loop_of(c).tick(t + 3 * WINDOW_MS)
            (failed,) = await c.events("rollout.failed")
            assert json.loads(failed.detail_json)["retry"] is True and "cancelled" in failed.message
            # the loop's own remedy, not the one an operator's job failure gives
            assert "the budget loop tries again at the class's next miss" in failed.message
            assert "start it again" not in failed.message

            # the class still misses on fresh telemetry: a new rollout, a new job
            u = max(next_slice_start(now_ms()), t + 3 * WINDOW_MS)
            for k in range(3):
                await fleet.slice(u + k * WINDOW_MS, fp32.sha256, SLOW)
            await loop_of(c).tick(u + 3 * WINDOW_MS)
            assert await kinds(c, "budget.miss") == ["budget.miss"] * 2
            again = json.loads((await c.events("rollout.recompress"))[-1].detail_json)["job_id"]
            assert again != job

    run(body())


def test_inferences_with_no_energy_reading_count_for_latency_but_not_for_energy(
    tmp_path: Path,
) -> None:
    """A device with no meter and no power model reports 0 J (source "none"). QA: the
    loop judged a canary on such a device at "0.00 mJ/inference ... within budget"."""

    async def body() -> None:
        async with running_controller(tmp_path, device_classes_dir=CLASSES_DIR) as c:
            await c.add_model("clf", classifier())
            model = await c.admin.CreateArtifact(  # telemetry names bytes the fleet was sent
                pb.CreateArtifactRequest(model_name="clf", device_class="home-hub"), timeout=10
            )
            for device in ("hub-1", "hub-2"):
                await c.register(device)
            fleet, end = Fleet(c), next_slice_start(now_ms()) + WINDOW_MS // 2
            await fleet.report("hub-1", model.sha256, end, FAST, 30, joules_each=0.05)
            await fleet.report("hub-2", model.sha256, end, FAST, 90, joules_each=0.0,
                               energy_source="none")  # fmt: skip
            await fleet.report("hub-2", model.sha256, end + WINDOW_MS, FAST, 90,
                               joules_each=0.0, energy_source="none")  # fmt: skip
            store = RolloutStore(make_engine(c.config.database_url))
            start = end - WINDOW_MS // 2
            both, unmetered = store.slices(
                "home-hub",
                "clf",
                model.sha256,
                [(start, start + WINDOW_MS), (start + WINDOW_MS, start + 2 * WINDOW_MS)],
            )
            assert both.count == 120 and both.devices == 2  # latency: every inference
            assert both.energy_mj == pytest.approx(50.0)  # hub-1's, not diluted to 12.5
            assert unmetered.count == 90 and unmetered.energy_mj is None
            assert slice_misses(Budgets(energy_per_inference_mj=20), both) == [
                "energy 50.00 mJ/inference > budget 20 mJ"
            ]
            assert slice_misses(Budgets(energy_per_inference_mj=20), unmetered) == []
            merged = both.merged_with(unmetered)
            assert merged.count == 210 and merged.energy_mj == pytest.approx(50.0)

    run(body())


# -------------------------------------------------------------------- the pure parts


BUDGETS = Budgets(p95_latency_ms=20, energy_per_inference_mj=100)


def stats(latency_s: float, count: int, joules_each: float = 0.01) -> SliceStats:
    return SliceStats(
        0,
        WINDOW_MS,
        count,
        0,
        tuple(histogram.histogram([latency_s] * count)),
        joules_each * count,
        1,
    )


def test_check_needs_k_judged_misses_in_a_row() -> None:
    slow, fast, few = stats(SLOW, 60), stats(FAST, 60), stats(SLOW, 10)
    assert check(BUDGETS, [slow, slow, slow], 50).missed
    assert not check(BUDGETS, [slow, fast, slow], 50).missed
    mixed = check(BUDGETS, [slow, few, slow], 50)
    assert not mixed.missed and not mixed.judged
    assert mixed.verdicts[1] is SliceVerdict.TOO_FEW
    assert check(BUDGETS, [fast] * 3, 50).met
    # energy alone can miss
    hungry = check(BUDGETS, [stats(FAST, 60, joules_each=0.2)] * 3, 50)
    assert hungry.missed and "energy 200.00 mJ/inference > budget 100 mJ" in hungry.reasons
    # the merged p95 is a p95 of all samples, not an average of slice p95s
    merged = check(BUDGETS, [stats(FAST, 95), stats(SLOW, 5)], 1).merged
    assert merged.count == 100 and merged.p95_ms is not None and merged.p95_ms < 20


def test_slices_are_epoch_aligned_and_complete() -> None:
    assert slice_bounds(35_500, 10_000, 3) == [(0, 10_000), (10_000, 20_000), (20_000, 30_000)]
    assert slice_bounds(30_000, 10_000, 1) == [(20_000, 30_000)]


def test_recalibration_only_slows_a_class_down() -> None:
    assert recalibrated_speed(0.6, 5.0, 15.0) == pytest.approx(0.2)
    assert recalibrated_speed(0.6, 5.0, 4.0) == 0.6  # faster than predicted: unchanged
    assert recalibrated_speed(0.6, None, 15.0) == 0.6  # nothing predicted: unchanged
    assert math.isclose(recalibrated_speed(0.6, 1e-9, 1e9), 1e-4)


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("canary_share", 0.0, "canary_share must be in (0, 1]"),
        ("windows_in_a_row", 0, "budget_windows_in_a_row must be an integer in 1..1000"),
        ("min_samples", -1, "budget_min_samples"),
        ("latency_margin", 1.5, "latency_margin"),
    ],
)
def test_a_bad_policy_is_refused_naming_the_setting(field: str, value: Any, message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        BudgetPolicy(**{field: value})


def test_canary_share_keeps_a_rest_of_the_class() -> None:
    policy = BudgetPolicy(canary_share=0.25)
    assert [policy.canary_size(n) for n in (0, 1, 2, 4, 10)] == [0, 1, 1, 1, 2]
    assert BudgetPolicy(canary_share=1.0).canary_size(4) == 3


def rollout_record(**detail: Any) -> RolloutRecord:
    return RolloutRecord(
        id=1,
        model_name="clf",
        device_class="home-hub",
        state=RolloutState.CANARY,
        baseline_artifact_id="clf/home-hub/v1",
        candidate_artifact_id="clf/home-hub/v2",
        job_id=2,
        canary_devices=("hub-1",),
        relative_speed=0.6,
        p95_target_ms=18.0,
        reason="",
        detail=dict(detail),
        created_unix_ms=0,
        updated_unix_ms=0,
        canary_since_unix_ms=0,
        finished_unix_ms=None,
    )


def test_a_canary_over_budget_is_kept_only_when_clearly_better() -> None:
    rest = check(BUDGETS, [stats(0.080, 60)] * 3, 1)  # the class: p95 ~80 ms
    reference = CanaryReference.of(rest, rollout_record())
    assert reference.what == "the rest of the class"
    assert reference.improved_by(check(BUDGETS, [stats(0.040, 60)] * 3, 50))  # 2x better
    assert not reference.improved_by(check(BUDGETS, [stats(0.078, 60)] * 3, 50))  # noise
    # lower latency bought with more energy per inference is not an improvement
    assert not reference.improved_by(check(BUDGETS, [stats(0.040, 60, joules_each=0.05)] * 3, 50))
    # the whole class was the canary: compared with the miss that started the rollout
    alone = CanaryReference.of(
        check(BUDGETS, [SliceStats.empty(0, WINDOW_MS)], 1),
        rollout_record(miss={"p95_ms": 80.0, "energy_mj": 10.0}),
    )
    assert alone.what == "the class before the rollout" and alone.p95_ms == 80.0
    assert alone.improved_by(check(BUDGETS, [stats(0.040, 60)] * 3, 50))
    assert alone.summary().startswith("no comparable telemetry from the rest of the class;")
    assert "n/a" not in alone.summary()
    # a rest of the class with too few inferences in a slice is no reference either
    few = CanaryReference.of(
        check(BUDGETS, [stats(0.080, 60), stats(0.080, 10), stats(0.080, 60)], 50),
        rollout_record(miss={"p95_ms": 30.0}),
    )
    assert few.what == "the class before the rollout" and few.p95_ms == 30.0
    assert "130 inferences on 1 other device(s)" in few.summary()
    assert not few.improved_by(check(BUDGETS, [stats(0.040, 60)] * 3, 50))


def test_what_a_canary_misses_is_said_even_when_only_one_slice_misses() -> None:
    slow = check(BUDGETS, [stats(SLOW, 60)] * 3, 50)
    assert over_budget(slow) == "; ".join(slow.reasons) and "p95" in over_budget(slow)
    one_slow_slice = check(BUDGETS, [stats(FAST, 600), stats(SLOW, 60), stats(FAST, 600)], 50)
    assert not one_slow_slice.met and one_slow_slice.reasons == ()  # merged: within budget
    assert over_budget(one_slow_slice) == "1 of 3 slices"
