"""Operators steer the budget loop: pause and resume a (class, model), abort a rollout;
and the loop does not publish bytes it already judged as a new artifact version.

On a real controller (real gRPC telemetry, real compression jobs, real SQLite), driven as
in ``test_budget_loop``: the loop's background task is off and the tests call ``tick``
with a chosen "now"; the CLI runs in-process against the controller's real address.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
from pathlib import Path
from typing import Any

import grpc
from sqlalchemy import text
from typer.testing import CliRunner, Result

from artifact.tls import TlsBundle
from controller.db import create_schema, make_engine
from controller.records import NewEvent
from controller.rollouts.backoff import Backoff
from controller.rollouts.records import (
    Judged,
    NewRollout,
    RolloutChange,
    RolloutRecord,
    RolloutState,
)
from controller.rollouts.store import ABORTED_KEY, CANDIDATE_JUDGED, PAUSED_MS, RolloutStore
from homefleet.cli import app
from protos import fleet_pb2 as pb
from protos import fleet_pb2_grpc
from tests.controller.helpers import (
    CHANNEL_OPTIONS,
    Harness,
    catalogue,
    expect_status,
    onnx_model,
    run,
    running_controller,
)
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
)
from tests.controller.test_compression_jobs import CAMERA, classifier, follow
from tests.support.pki import make_pki

K = POLICY.windows_in_a_row
COOLDOWN_S = 60
QUIET = dataclasses.replace(POLICY, cooldown_seconds=COOLDOWN_S, canary_timeout_seconds=60)
PAIR = ("--class", "home-hub", "--model", "clf")


async def cli(c: Harness, *args: str) -> Result:
    """`homefleet ARGS --controller <c>`, in a thread (the controller runs in this loop)."""
    argv = [*args, "--controller", c.server.address]
    return await asyncio.to_thread(lambda: CliRunner().invoke(app, argv))


async def slow_slices(fleet: Fleet, end_ms: int, sha: str) -> None:
    for k in range(K, 0, -1):
        await fleet.slice(end_ms - k * WINDOW_MS, sha, SLOW)


async def listing(c: Harness) -> pb.ListRolloutsResponse:
    reply: pb.ListRolloutsResponse = await c.admin.ListRollouts(
        pb.ListRolloutsRequest(), timeout=10
    )
    return reply


async def recompress_and_canary(c: Harness, t: int) -> tuple[int, str]:
    """After a miss ticked at ``t + K windows``: wait for the loop's job, then carry the
    rollout into canary (a "now" before the rollout, so the tick judges nothing else).
    Returns the rollout id and the candidate's sha256 on hub-1."""
    job = json.loads((await c.events("rollout.recompress"))[-1].detail_json)["job_id"]
    await follow(c, job)
    await loop_of(c).tick(t)
    canary = json.loads((await c.events("rollout.canary"))[-1].detail_json)
    assert canary["devices"] == ["hub-1"]
    return int(canary["rollout_id"]), (await desired(c, "hub-1")).sha256


def test_a_paused_pair_starts_nothing_and_holds_its_canary_until_resumed(tmp_path: Path) -> None:
    fleets: list[Fleet] = []  # one, kept across the restart (its sequence numbers)
    t = 0

    async def before_restart() -> None:
        nonlocal t
        async with running_controller(
            tmp_path, device_classes_dir=CLASSES_DIR, budget_policy=QUIET, compression_threads=1
        ) as c:
            fleet = Fleet(c)
            fleets.append(fleet)
            _, fp32 = await hubs_on_fp32_after_a_job(c)
            paused = await cli(c, "rollouts", "pause", *PAIR, "--reason", "QA looks at the hubs")
            assert paused.exit_code == 0, paused.output
            assert "budget loop paused for clf on home-hub" in paused.stdout
            (event,) = await c.events("rollout.paused")
            detail = json.loads(event.detail_json)
            assert detail["reason"] == "QA looks at the hubs"
            assert detail["by"].endswith("(no client certificate)")  # plaintext: an address
            again = await cli(c, "rollouts", "pause", *PAIR)
            assert again.exit_code == 1 and "already paused" in again.stderr
            assert "QA looks at the hubs" in again.stderr

            # the class misses K slices in a row: judged, shown, but nothing starts
            t = next_slice_start(now_ms())
            await slow_slices(fleet, t + K * WINDOW_MS, fp32.sha256)
            await loop_of(c).tick(t + K * WINDOW_MS)
            assert await kinds(c, "budget.") == []
            assert await kinds(c, "rollout.recompress") == []
            shown = await listing(c)
            assert list(shown.rollouts) == []
            (pause,) = shown.pauses
            assert pause.verdict_unix_ms == t + K * WINDOW_MS
            assert "misses its budget" in pause.verdict and "the pair is paused" in pause.verdict
            assert pause.paused_by == detail["by"] and pause.reason == "QA looks at the hubs"

    async def after_restart() -> None:
        async with running_controller(
            tmp_path, device_classes_dir=CLASSES_DIR, budget_policy=QUIET, compression_threads=1
        ) as c:
            (fleet,) = fleets
            fleet.c = c  # same devices, same sequence numbers
            fp32 = (await desired(c, "hub-1")).sha256
            # the pause is in the database: a restarted controller still holds off
            await loop_of(c).tick(t + K * WINDOW_MS)
            assert await kinds(c, "budget.") == []
            resumed = await cli(c, "rollouts", "resume", *PAIR)
            assert resumed.exit_code == 0, resumed.output
            assert "budget loop resumed for clf on home-hub" in resumed.stdout
            (event,) = await c.events("rollout.resumed")
            assert json.loads(event.detail_json)["paused_by"].endswith("(no client certificate)")
            assert list((await listing(c)).pauses) == []
            not_paused = await cli(c, "rollouts", "resume", *PAIR)
            assert not_paused.exit_code == 1 and "not paused" in not_paused.stderr

            # resumed: the same miss starts the rollout, which reaches its canary
            await loop_of(c).tick(t + K * WINDOW_MS)
            assert await kinds(c, "budget.miss") == ["budget.miss"]
            rollout_id, cand = await recompress_and_canary(c, t)

            # paused in canary: the canary meets its budget, and later its timeout
            # passes, but it is neither promoted nor rolled back; devices keep what they
            # run, and the canary's numbers are shown
            await c.admin.PauseRollouts(
                pb.PauseRolloutsRequest(model_name="clf", device_class="home-hub"), timeout=10
            )
            u = max(next_slice_start(now_ms()), t + K * WINDOW_MS)
            for k in range(K):
                await fleet.slice(u + k * WINDOW_MS, cand, FAST, ["hub-1", "hub-1"])
                await fleet.slice(u + k * WINDOW_MS, fp32, SLOW, HUBS[1:])
            await loop_of(c).tick(u + K * WINDOW_MS)
            await loop_of(c).tick(u + K * WINDOW_MS + 10 * QUIET.canary_timeout_seconds * 1000)
            assert await kinds(c, "rollout.promote") == []
            assert await kinds(c, "rollout.rollback") == []
            assert (await desired(c, "hub-1")).sha256 == cand
            assert (await desired(c, "hub-2")).sha256 == fp32
            shown = await listing(c)
            (held,) = shown.rollouts
            assert held.id == rollout_id and held.state == pb.ROLLOUT_STATE_CANARY and held.paused
            (pause,) = shown.pauses
            assert f"rollout {rollout_id} holds its canary" in pause.verdict
            table = await cli(c, "rollouts")
            assert table.exit_code == 0 and "canary (paused)" in table.stdout
            assert "Paused" in table.stdout and "holds its canary" in table.stdout
            as_json = json.loads((await cli(c, "rollouts", "--json")).stdout)
            assert as_json["rollouts"][0]["paused"] is True
            assert as_json["pauses"][0]["device_class"] == "home-hub"

            # resumed: carried on where it stood (the timeout did not run while paused)
            await c.admin.ResumeRollouts(
                pb.ResumeRolloutsRequest(model_name="clf", device_class="home-hub"), timeout=10
            )
            await loop_of(c).tick(u + K * WINDOW_MS)
            assert await kinds(c, "rollout.promote") == ["rollout.promote"]
            for hub in HUBS:
                assert (await desired(c, hub)).sha256 == cand

    run(before_restart())
    run(after_restart())


def test_abort_ends_a_canary_as_a_rollback_does_and_cancels_a_queued_recompression(
    tmp_path: Path,
) -> None:
    async def body() -> None:
        async with running_controller(
            tmp_path, device_classes_dir=CLASSES_DIR, budget_policy=QUIET, compression_threads=1
        ) as c:
            fleet = Fleet(c)
            _, fp32 = await hubs_on_fp32_after_a_job(c)
            await expect_status(
                c.admin.AbortRollout(pb.AbortRolloutRequest(rollout_id=7), timeout=10),
                grpc.StatusCode.NOT_FOUND,
                "rollout 7 does not exist",
            )
            await expect_status(
                c.admin.AbortRollout(pb.AbortRolloutRequest(), timeout=10),
                grpc.StatusCode.INVALID_ARGUMENT,
                "rollout_id",
            )

            # rollout 1 is in canary on hub-1 when the operator aborts it
            t = next_slice_start(now_ms())
            await slow_slices(fleet, t + K * WINDOW_MS, fp32.sha256)
            await loop_of(c).tick(t + K * WINDOW_MS)
            first, _ = await recompress_and_canary(c, t)
            on_canary = await desired(c, "hub-1")
            aborted = await cli(c, "rollouts", "abort", str(first), "--reason", "hub-1 is needed")
            assert aborted.exit_code == 0, aborted.output
            assert f"rollout {first} (clf on home-hub) aborted by" in aborted.stdout
            (event,) = await c.events("rollout.aborted")
            detail = json.loads(event.detail_json)
            assert detail["rollout_id"] == first and detail["from_state"] == "canary"
            assert detail["reason"] == "hub-1 is needed" and detail["canary_devices"] == ["hub-1"]
            assert f"judged again after {COOLDOWN_S} s (the cool-down)" in event.message
            # the canary is back on the baseline's bytes, as a newer re-release (agents
            # refuse older versions), and follows its class again
            back = await desired(c, "hub-1")
            assert back.sha256 == fp32.sha256 and back.version > on_canary.version
            (model,) = [m for m in (await c.device("hub-1")).models if m.model_name == "clf"]
            assert not model.own_assignment
            (listed,) = (await listing(c)).rollouts
            assert listed.state == pb.ROLLOUT_STATE_ABORTED and listed.finished_unix_ms > 0
            assert "hub-1 is needed" in listed.reason and not listed.paused
            again = await cli(c, "rollouts", "abort", str(first))
            assert again.exit_code == 1 and "has already ended aborted" in again.stderr
            assert (await cli(c, "rollouts", "abort", "99")).exit_code == 1

            # the cool-down follows: a class still missing is not judged again within it
            ended = listed.finished_unix_ms
            inside = -(-ended // WINDOW_MS) * WINDOW_MS + K * WINDOW_MS  # < COOLDOWN_S later
            await slow_slices(fleet, inside, fp32.sha256)
            await loop_of(c).tick(inside)
            assert await kinds(c, "budget.miss") == ["budget.miss"]

            # rollout 2: its job waits behind another (a training workload holds the one
            # worker); the abort cancels it
            blocker = pb.StartCompressionHeader(device_class_yaml=CAMERA, workload="basic-motions")
            await c.admin.StartCompression(
                iter([pb.StartCompressionChunk(header=blocker)]), timeout=30
            )
            after = -(-(ended + COOLDOWN_S * 1000) // WINDOW_MS) * WINDOW_MS + K * WINDOW_MS
            await slow_slices(fleet, after, fp32.sha256)
            await loop_of(c).tick(after)
            assert await kinds(c, "budget.miss") == ["budget.miss"] * 2
            recompress = json.loads((await c.events("rollout.recompress"))[-1].detail_json)
            second, job = recompress["rollout_id"], recompress["job_id"]
            done: pb.Rollout = await c.admin.AbortRollout(
                pb.AbortRolloutRequest(rollout_id=second), timeout=10
            )
            assert done.state == pb.ROLLOUT_STATE_ABORTED
            # cancelled at once when still queued, else after its current trial
            assert any(
                f"compression job {job} {said}" in done.reason
                for said in ("cancelled", "stops after its current trial")
            )
            assert "no reason given" in done.reason
            assert (await follow(c, job))[-1].state == pb.COMPRESSION_JOB_STATE_CANCELLED
            # an abort is no failure of the loop: the cool-down after it is not doubled
            assert f"judged again after {COOLDOWN_S} s (the cool-down)" in done.reason

    run(body())


def test_bytes_already_rolled_back_are_not_published_again(tmp_path: Path) -> None:
    """The loop's second job makes the rolled-back candidate's bytes again (the same
    source, calibration and learned speed): the job is given that artifact, no new
    version appears, and the rollout fails saying so."""

    async def body() -> None:
        async with running_controller(
            tmp_path, device_classes_dir=CLASSES_DIR, budget_policy=POLICY, compression_threads=1
        ) as c:
            fleet = Fleet(c)
            _, fp32 = await hubs_on_fp32_after_a_job(c)
            t = next_slice_start(now_ms())
            await slow_slices(fleet, t + K * WINDOW_MS, fp32.sha256)
            await loop_of(c).tick(t + K * WINDOW_MS)
            first, cand = await recompress_and_canary(c, t)
            candidate = await desired(c, "hub-1")
            u = max(next_slice_start(now_ms()), t + K * WINDOW_MS)
            for k in range(K):
                await fleet.slice(u + k * WINDOW_MS, cand, SLOW * 2, ["hub-1"] * 2)
                await fleet.slice(u + k * WINDOW_MS, fp32.sha256, SLOW, HUBS[1:])
            await loop_of(c).tick(u + K * WINDOW_MS)
            assert await kinds(c, "rollout.rollback") == ["rollout.rollback"]
            versions = await artifact_ids(c)

            if await kinds(c, "budget.miss") == ["budget.miss"]:
                v = max(next_slice_start(now_ms()), u + K * WINDOW_MS)
                await slow_slices(fleet, v + K * WINDOW_MS, fp32.sha256)
                await loop_of(c).tick(v + K * WINDOW_MS)
            job = json.loads((await c.events("rollout.recompress"))[-1].detail_json)["job_id"]
            assert (await follow(c, job))[-1].artifact_id == candidate.id
            await loop_of(c).tick(t)
            assert await artifact_ids(c) == versions  # nothing published
            (failed,) = await c.events("rollout.failed")
            assert "(not published again)" in failed.message
            said = f"the same bytes as {candidate.id}, which was rolled back in rollout {first}"
            assert said in failed.message
            listed = (await listing(c)).rollouts[0]
            assert listed.state == pb.ROLLOUT_STATE_FAILED
            assert listed.candidate_artifact_id == candidate.id  # what the job made, kept

    run(body())


async def artifact_ids(c: Harness) -> list[str]:
    reply = await c.admin.ListArtifacts(
        pb.ListArtifactsRequest(model_name="clf", device_class="home-hub"), timeout=10
    )
    return [a.id for a in reply.artifacts]


def test_operator_calls_need_an_admin_certificate_and_name_who_made_them(tmp_path: Path) -> None:
    pki = make_pki(tmp_path / "pki")

    def stub(tls_dir: Path, address: str) -> tuple[grpc.aio.Channel, Any]:
        channel = grpc.aio.secure_channel(
            address, TlsBundle.load(tls_dir).channel_credentials(), options=CHANNEL_OPTIONS
        )
        return channel, fleet_pb2_grpc.AdminServiceStub(channel)  # type: ignore[no-untyped-call]

    async def body() -> None:
        async with running_controller(
            tmp_path, tls_dir=pki.controller(), device_classes_dir=CLASSES_DIR
        ) as c:
            alice_channel, alice = stub(pki.admin("alice"), c.server.address)
            device_channel, device = stub(pki.device("hub-1"), c.server.address)
            try:
                data = classifier()
                header = pb.AddModelHeader(name="clf", size_bytes=len(data))
                await alice.AddModel(
                    iter([pb.AddModelChunk(header=header), pb.AddModelChunk(data=data)]),
                    timeout=30,
                )
                pair = {"model_name": "clf", "device_class": "home-hub"}
                await expect_status(
                    device.PauseRollouts(pb.PauseRolloutsRequest(**pair), timeout=10),
                    grpc.StatusCode.PERMISSION_DENIED,
                    "admin certificate",
                )
                await expect_status(
                    device.AbortRollout(pb.AbortRolloutRequest(rollout_id=1), timeout=10),
                    grpc.StatusCode.PERMISSION_DENIED,
                )
                for bad, code, said in (
                    ({"model_name": "../x", "device_class": "home-hub"}, "INVALID_ARGUMENT", ""),
                    ({"model_name": "clf", "device_class": ""}, "INVALID_ARGUMENT", ""),
                    ({"model_name": "nope", "device_class": "home-hub"}, "NOT_FOUND", "nope"),
                    ({"model_name": "clf", "device_class": "hom-hub"}, "NOT_FOUND", "home-hub"),
                    ({**pair, "reason": "x" * 501}, "INVALID_ARGUMENT", "reason"),
                ):
                    await expect_status(
                        alice.PauseRollouts(pb.PauseRolloutsRequest(**bad), timeout=10),
                        grpc.StatusCode[code],
                        said,
                    )
                await expect_status(
                    alice.ResumeRollouts(pb.ResumeRolloutsRequest(**pair), timeout=10),
                    grpc.StatusCode.FAILED_PRECONDITION,
                    "not paused",
                )
                pause = await alice.PauseRollouts(
                    pb.PauseRolloutsRequest(**pair, reason="night freeze"), timeout=10
                )
                assert pause.paused_by == "alice (admin certificate)"
                resumed = await alice.ResumeRollouts(pb.ResumeRolloutsRequest(**pair), timeout=10)
                assert resumed.reason == "night freeze"
                events = await alice.ListEvents(
                    pb.ListEventsRequest(kind_prefix="rollout.", limit=10), timeout=10
                )
                assert [e.kind for e in events.events] == ["rollout.paused", "rollout.resumed"]
                for e in events.events:
                    assert json.loads(e.detail_json)["by"] == "alice (admin certificate)"
            finally:
                await alice_channel.close(None)
                await device_channel.close(None)

    run(body())


def test_listing_options_before_a_subcommand_are_a_usage_error() -> None:
    result = CliRunner().invoke(app, ["rollouts", "--class", "home-hub", "pause", *PAIR])
    assert result.exit_code == 2 and "before `pause` would be ignored" in result.output
    missing = CliRunner().invoke(app, ["rollouts", "pause", "--class", "home-hub"])
    assert missing.exit_code == 2 and "--model" in missing.output


# -------------------------------------------------------------------- the store alone


class Clock:
    def __init__(self) -> None:
        self.now = 1_000

    def __call__(self) -> int:
        return self.now


def event(kind: str) -> NewEvent:
    return NewEvent(kind, "home-hub/clf", kind, {})


def test_the_store_credits_paused_time_and_keeps_aborted_and_judged_apart(
    tmp_path: Path, database_url: str | None
) -> None:
    engine = make_engine(database_url or f"sqlite:///{tmp_path / 'db.sqlite'}")
    try:
        create_schema(engine)
        ids = catalogue(engine, "clf", "a" * 64, "b" * 64, "c" * 64, "d" * 64)
        clock = Clock()
        store = RolloutStore(engine, clock)

        def started(baseline: str) -> RolloutRecord:
            new = NewRollout("clf", "home-hub", ids[baseline], 0.6, 18.0, "slow")
            record = store.start(new, event("budget.miss"))
            assert record is not None
            return record

        # a canary paused at 2 s and resumed at 10 s, then again for 1 s: 9 s credited
        canary = started("a" * 64)
        store.advance(
            canary.id,
            RolloutState.RECOMPRESSING,
            RolloutChange(RolloutState.CANARY, "canary", candidate_artifact_id=ids["b" * 64]),
        )
        for pause_at, resume_at in ((2_000, 10_000), (12_000, 13_000)):
            clock.now = pause_at
            _, created = store.pause("clf", "home-hub", "alice", "why", event("rollout.paused"))
            assert created
            assert not store.pause("clf", "home-hub", "bob", "", event("rollout.paused"))[1]
            clock.now = resume_at
            assert store.resume("clf", "home-hub", lambda p, now: event("rollout.resumed"))
        assert store.resume("clf", "home-hub", lambda p, now: event("rollout.resumed")) is None
        again = store.get(canary.id)
        assert again is not None and again.detail[PAUSED_MS] == 9_000

        # aborted: stored as "failed" (the old CHECK constraint), read back as aborted
        aborted = store.advance(
            canary.id, RolloutState.CANARY, RolloutChange(RolloutState.ABORTED, "aborted")
        )
        assert aborted is not None and aborted.state is RolloutState.ABORTED
        assert ABORTED_KEY in aborted.detail and store.active() == []
        with engine.connect() as conn:
            stored = conn.execute(text("SELECT state FROM rollouts")).scalar_one()
        assert stored == "failed"
        # an aborted canary's bytes were never judged; they may be tried again
        assert store.known_bytes("clf", "home-hub", "b" * 64) is None
        # an abort neither counts in the back-off streak nor ends it
        assert Backoff.of([aborted], 60).misses == 0

        # a failed rollout's candidate counts once it was judged (not for want of devices)
        for sha, judged in (("c" * 64, True), ("d" * 64, False)):
            r = started("a" * 64)
            store.advance(
                r.id,
                RolloutState.RECOMPRESSING,
                RolloutChange(
                    RolloutState.FAILED,
                    "failed",
                    candidate_artifact_id=ids[sha],
                    detail={CANDIDATE_JUDGED: judged},
                ),
            )
        known = store.known_bytes("clf", "home-hub", "c" * 64)
        assert known is not None and known.judged is Judged.FAILED
        assert known.artifact_id == ids["c" * 64]
        assert store.known_bytes("clf", "home-hub", "d" * 64) is None
        baseline = store.known_bytes("clf", "home-hub", "a" * 64)
        assert baseline is not None and baseline.judged is Judged.MISSED
    finally:
        engine.dispose()


def test_a_pause_can_be_resumed_after_its_class_file_is_gone(tmp_path: Path) -> None:
    """A controller restarted without --device-classes still lists a stored pause: the
    operator must be able to end it (QA: resume was NOT_FOUND for the undeclared class)."""

    async def declared() -> None:
        async with running_controller(tmp_path, device_classes_dir=CLASSES_DIR) as c:
            await c.add_model("clf", onnx_model())
            paused = await cli(c, "rollouts", "pause", *PAIR)
            assert paused.exit_code == 0, paused.output

    async def undeclared() -> None:
        async with running_controller(tmp_path) as c:
            assert [(p.model_name, p.device_class) for p in (await listing(c)).pauses] == [
                ("clf", "home-hub")
            ]
            resumed = await cli(c, "rollouts", "resume", *PAIR)
            assert resumed.exit_code == 0, resumed.output
            assert list((await listing(c)).pauses) == []
            # with no pause left, the unknown pair is NOT_FOUND again, naming the class
            again = await cli(c, "rollouts", "resume", *PAIR)
            assert again.exit_code == 1, again.output
            assert "device class 'home-hub' is not declared" in again.stderr

    run(declared())
    run(undeclared())
