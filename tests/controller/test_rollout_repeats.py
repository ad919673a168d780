"""Rollouts of one (model, class) in a row: what the budget loop learns from one it keeps.

On a real controller (real gRPC telemetry, real compression jobs): bytes already rolled
back are not canaried again, the cool-down doubles with every rollout in a row that fixed
nothing (and a met budget resets it), and the relative speed a rollout learned is where
the next one starts, whatever version number the class's artifact carries by then.
As in ``test_budget_loop``, the tests call ``tick`` with a chosen "now"; the store stamps
rollouts with the wall clock, so each phase is placed after the rollout it follows. A
tick that should only carry a rollout on (a job ended) is given a "now" whose slices
predate the rollout, so the same tick cannot also judge the class.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from controller.config import BudgetPolicy
from controller.db import make_engine
from controller.rollouts.backoff import BUDGET_MET, MAX_FACTOR, Backoff
from controller.rollouts.loop import recalibrated_speed
from controller.rollouts.records import RolloutRecord, RolloutState
from controller.rollouts.store import RolloutStore
from protos import fleet_pb2 as pb
from tests.controller.helpers import Harness, run, running_controller
from tests.controller.test_budget_loop import (
    CLASSES_DIR,
    FAST,
    HUBS,
    POLICY,
    SLOW,
    WINDOW_MS,
    Fleet,
    desired,
    hubs_on_fp32_after_a_job,
    kinds,
    loop_of,
    next_slice_start,
    now_ms,
    start_request,
)
from tests.controller.test_compression_jobs import classifier, follow

COOLDOWN_S = 20
K = 3


def aligned_up(unix_ms: int) -> int:
    """The first slice boundary at or after ``unix_ms``."""
    return -(-unix_ms // WINDOW_MS) * WINDOW_MS


async def slow_slices(fleet: Fleet, end_ms: int, sha: str, latency_s: float = SLOW) -> None:
    """The K slices before ``end_ms``, every hub over budget."""
    for k in range(K, 0, -1):
        await fleet.slice(end_ms - k * WINDOW_MS, sha, latency_s)


async def latest_rollout(c: Harness) -> pb.Rollout:
    listing: pb.ListRolloutsResponse = await c.admin.ListRollouts(
        pb.ListRolloutsRequest(), timeout=10
    )
    return listing.rollouts[0]


async def failed_messages(c: Harness) -> list[str]:
    return [e.message for e in await c.events("rollout.failed")]


def test_a_rolled_back_candidate_is_not_canaried_again_and_the_cool_down_doubles(
    tmp_path: Path,
) -> None:
    policy = BudgetPolicy(
        window_seconds=10,
        windows_in_a_row=K,
        min_samples=50,
        check_seconds=0,
        cooldown_seconds=COOLDOWN_S,
    )

    async def body() -> None:
        async with running_controller(
            tmp_path, device_classes_dir=CLASSES_DIR, budget_policy=policy, compression_threads=1
        ) as c:
            fleet = Fleet(c)
            _, fp32 = await hubs_on_fp32_after_a_job(c)
            loop = loop_of(c)

            # rollout 1: the canary does worse than the rest of the class: rolled back
            t = next_slice_start(now_ms())
            await slow_slices(fleet, t + K * WINDOW_MS, fp32.sha256)
            await loop.tick(t + K * WINDOW_MS)
            job = json.loads((await c.events("rollout.recompress"))[-1].detail_json)["job_id"]
            await follow(c, job)
            await loop.tick(t)
            (canary,) = [json.loads(e.detail_json) for e in await c.events("rollout.canary")]
            assert canary["devices"] == ["hub-1"]
            candidate = await desired(c, "hub-1")
            u = max(next_slice_start(now_ms()), t + K * WINDOW_MS)
            for k in range(K):
                await fleet.slice(u + k * WINDOW_MS, candidate.sha256, SLOW * 2, ["hub-1"] * 2)
                await fleet.slice(u + k * WINDOW_MS, fp32.sha256, SLOW, HUBS[1:])
            await loop.tick(u + K * WINDOW_MS)
            (rollback,) = await c.events("rollout.rollback")
            assert "not better than the baseline" in rollback.message
            assert f"judged again after {COOLDOWN_S} s (the cool-down)" in rollback.message
            first = json.loads(rollback.detail_json)["rollout_id"]
            # the class is back on the baseline's bytes, as a newer signed re-release
            back = await desired(c, "hub-1")
            assert back.sha256 == fp32.sha256 and back.version > candidate.version

            # rollout 2: the class still misses (the rest's slices of the canary phase
            # may already be after the rollback, else fresh ones follow); the job makes
            # the same bytes again, and they are not canaried a second time
            if await kinds(c, "budget.miss") == ["budget.miss"]:
                v = max(next_slice_start(now_ms()), u + K * WINDOW_MS)
                await slow_slices(fleet, v + K * WINDOW_MS, fp32.sha256)
                await loop.tick(v + K * WINDOW_MS)
            assert await kinds(c, "budget.miss") == ["budget.miss"] * 2
            job = json.loads((await c.events("rollout.recompress"))[-1].detail_json)["job_id"]
            await follow(c, job)
            await loop.tick(t)
            (failed,) = await failed_messages(c)
            assert f"the same bytes as {candidate.id}" in failed
            assert f"which was rolled back in rollout {first}: not canaried again" in failed
            assert f"judged again after {2 * COOLDOWN_S} s: 2 rollouts in a row" in failed
            assert await kinds(c, "rollout.canary") == ["rollout.canary"]
            assert (await desired(c, "hub-1")).id == back.id  # no device got anything

            # the doubled cool-down holds although the class keeps missing, then it ends
            second = await latest_rollout(c)
            assert second.state == pb.ROLLOUT_STATE_FAILED
            assert "rolled back in rollout" in second.reason
            ended = second.finished_unix_ms
            inside = aligned_up(ended) + K * WINDOW_MS  # [COOLDOWN_S, 2 * COOLDOWN_S) later
            await slow_slices(fleet, inside, fp32.sha256)
            await loop.tick(inside)
            assert await kinds(c, "budget.miss") == ["budget.miss"] * 2
            after = aligned_up(ended + 2 * COOLDOWN_S * 1000)
            await slow_slices(fleet, after, fp32.sha256)
            await loop.tick(after)
            assert await kinds(c, "budget.miss") == ["budget.miss"] * 3
            job = json.loads((await c.events("rollout.recompress"))[-1].detail_json)["job_id"]
            await follow(c, job)
            await loop.tick(t)
            third = (await failed_messages(c))[-1]
            assert f"judged again after {4 * COOLDOWN_S} s: 3 rollouts in a row" in third

            # the class meets its budget again (a busy, fast period): the back-off is
            # reset, so the next sustained miss waits only the plain cool-down
            ended = (await latest_rollout(c)).finished_unix_ms
            start = aligned_up(ended)
            for k in range(K):
                await fleet.slice(start + k * WINDOW_MS, fp32.sha256, FAST, count=5000)
            met = start + K * WINDOW_MS
            await loop.tick(met)
            engine = make_engine(c.config.database_url)
            try:
                (noted, *_) = RolloutStore(engine).list(1)
            finally:
                engine.dispose()
            assert noted.detail[BUDGET_MET] == met
            await slow_slices(fleet, met + K * WINDOW_MS, fp32.sha256)
            await loop.tick(met + K * WINDOW_MS)  # under 4x the cool-down after rollout 3
            assert await kinds(c, "budget.miss") == ["budget.miss"] * 4
            job = json.loads((await c.events("rollout.recompress"))[-1].detail_json)["job_id"]
            await follow(c, job)
            await loop.tick(t)
            fourth = (await failed_messages(c))[-1]
            assert f"judged again after {COOLDOWN_S} s (the cool-down)" in fourth

    run(body())


def test_the_speed_a_rollout_learned_is_where_the_next_one_starts(tmp_path: Path) -> None:
    async def body() -> None:
        async with running_controller(
            tmp_path, device_classes_dir=CLASSES_DIR, budget_policy=POLICY, compression_threads=1
        ) as c:
            fleet = Fleet(c)
            # the class runs what a job made at the declared speed (home-hub: 0.6)
            await c.add_model("clf", classifier())
            made: pb.CompressionJob = await c.admin.StartCompression(
                iter(start_request()), timeout=30
            )
            await follow(c, made.id)
            made = await c.admin.GetCompressionJob(pb.CompressionJobRef(id=made.id), timeout=10)
            await c.admin.Assign(
                pb.AssignRequest(artifact_id=made.artifact_id, device_class="home-hub"),
                timeout=10,
            )
            for hub in HUBS:
                await c.register(hub, "home-hub")
            sha = (await desired(c, "hub-1")).sha256

            # rollout 1 learns how much slower the hubs are than that job predicted
            t = next_slice_start(now_ms())
            await slow_slices(fleet, t + K * WINDOW_MS, sha)
            await loop_of(c).tick(t + K * WINDOW_MS)
            first = json.loads((await c.events("rollout.recompress"))[-1].detail_json)
            assert first["relative_speed_before"] == 0.6
            assert first["relative_speed_basis"] == f"as job {made.id} planned"
            learned = first["relative_speed_after"]
            assert learned < 0.6
            assert learned == pytest.approx(
                recalibrated_speed(0.6, first["predicted_p95_ms"], first["observed_p95_ms"])
            )
            await follow(c, first["job_id"])
            await loop_of(c).tick(t)
            cursor = t + K * WINDOW_MS
            remade = await c.admin.GetCompressionJob(
                pb.CompressionJobRef(id=first["job_id"]), timeout=10
            )
            canaries = await c.events("rollout.canary")
            if canaries:  # new bytes: the canary holds the budget and is promoted
                (device,) = json.loads(canaries[0].detail_json)["devices"]
                u = max(next_slice_start(now_ms()), cursor)
                cand = (await desired(c, device)).sha256
                for k in range(K):
                    await fleet.slice(u + k * WINDOW_MS, cand, FAST, [device, device])
                cursor = u + K * WINDOW_MS
                await loop_of(c).tick(cursor)
                assert await kinds(c, "rollout.promote") == ["rollout.promote"]
            else:  # the job made the baseline's bytes again: the rollout failed, and
                # they were not published as a new version (the job names the baseline)
                assert remade.artifact_id == made.artifact_id

            # the operator tries the first artifact again, then goes back to the one the
            # rollout's job made: it comes back under a version no rollout made (a
            # re-release when it had been in use), as after a rollback
            for artifact_id in (made.artifact_id, remade.artifact_id):
                await c.admin.Assign(
                    pb.AssignRequest(artifact_id=artifact_id, device_class="home-hub"),
                    timeout=10,
                )
            now = await desired(c, "hub-1")
            assert now.id != made.artifact_id or not canaries

            # rollout 2 starts from the speed rollout 1 learned, not the declared one,
            # and compounds on it with what the job predicted at that speed
            v = max(next_slice_start(now_ms()), cursor)
            await slow_slices(fleet, v + K * WINDOW_MS, now.sha256, SLOW * 5)
            await loop_of(c).tick(v + K * WINDOW_MS)
            second = json.loads((await c.events("rollout.recompress"))[-1].detail_json)
            assert second["relative_speed_before"] == pytest.approx(learned)
            assert second["relative_speed_basis"] == f"as job {first['job_id']} planned"
            predicted = next(
                verdict.observed
                for verdict in remade.verdicts
                if verdict.budget == "p95_latency_ms"
            )
            assert second["predicted_p95_ms"] == pytest.approx(predicted)
            assert second["relative_speed_after"] == pytest.approx(
                recalibrated_speed(learned, predicted, second["observed_p95_ms"])
            )
            assert second["relative_speed_after"] <= learned
            await follow(c, second["job_id"])

    run(body())


def rollout(state: RolloutState, **detail: object) -> RolloutRecord:
    return RolloutRecord(
        id=1,
        model_name="clf",
        device_class="home-hub",
        state=state,
        baseline_artifact_id="clf/home-hub/v1",
        candidate_artifact_id="",
        job_id=None,
        canary_devices=(),
        relative_speed=0.6,
        p95_target_ms=18.0,
        reason="",
        detail=dict(detail),
        created_unix_ms=0,
        updated_unix_ms=0,
        canary_since_unix_ms=None,
        finished_unix_ms=0,
    )


def test_the_cool_down_doubles_per_rollout_that_fixed_nothing_until_reset() -> None:
    back, failed = rollout(RolloutState.ROLLED_BACK), rollout(RolloutState.FAILED)
    promoted = rollout(RolloutState.PROMOTED)
    assert Backoff.of([], 60).seconds == 60
    assert Backoff.of([promoted, failed, back], 60).seconds == 60
    assert Backoff.of([back], 60).seconds == 60  # one: the plain cool-down
    assert Backoff.of([failed, back, promoted, back], 60).seconds == 120
    assert Backoff.of([failed, back, failed], 60).seconds == 240
    assert Backoff.of([back] * 20, 60).seconds == 60 * MAX_FACTOR
    # the active rollout does not count; a met budget ends the streak like a promotion
    active = rollout(RolloutState.CANARY)
    assert Backoff.of([active, back, back], 60).misses == 2
    met = rollout(RolloutState.ROLLED_BACK, **{BUDGET_MET: 5})
    assert Backoff.of([failed, met, back, back], 60).misses == 1
    assert Backoff.of([back, back], 0).describe("clf", "home-hub") == ""
    said = Backoff.of([back, back], 60).describe("clf", "home-hub")
    assert "clf on home-hub is judged again after 120 s: 2 rollouts in a row" in said
