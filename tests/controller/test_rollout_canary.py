"""What a canary is compared with, on a real controller with real telemetry windows.

"The rest of the class" is the baseline on the devices that are not canaries, with enough
inferences in every slice: a canary's own windows of the baseline (sent around its
switch) and a trickle from an idle device are no reference, and the canary is then held
to the numbers of the miss that started the rollout, which the decision says.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from protos import fleet_pb2 as pb
from tests.controller.helpers import run, running_controller
from tests.controller.test_budget_loop import (
    CLASSES_DIR,
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
from tests.controller.test_compression_jobs import follow

K = POLICY.windows_in_a_row
# a cool-down, so the class is not judged again (a second rollout) right after the verdict
QUIET = dataclasses.replace(POLICY, cooldown_seconds=600)
VERY_SLOW = 0.200  # seconds: the canary device's last baseline inferences, and an idle hub's


def test_a_canary_is_not_compared_with_its_own_baseline_windows_nor_with_too_few(
    tmp_path: Path,
) -> None:
    async def body() -> None:
        async with running_controller(
            tmp_path, device_classes_dir=CLASSES_DIR, budget_policy=QUIET, compression_threads=1
        ) as c:
            fleet = Fleet(c)
            _, fp32 = await hubs_on_fp32_after_a_job(c)
            loop = loop_of(c)
            t = next_slice_start(now_ms())
            for k in range(K):
                await fleet.slice(t + k * WINDOW_MS, fp32.sha256, SLOW)
            await loop.tick(t + K * WINDOW_MS)
            (miss,) = [json.loads(e.detail_json) for e in await c.events("budget.miss")]
            job = json.loads((await c.events("rollout.recompress"))[-1].detail_json)["job_id"]
            await follow(c, job)
            await loop.tick(t)  # carries the rollout on; no slice after it to judge
            (canary,) = [json.loads(e.detail_json) for e in await c.events("rollout.canary")]
            assert canary["devices"] == ["hub-1"]
            cand = (await desired(c, "hub-1")).sha256

            # the canary runs as slow as the class did before. In the same slices hub-1
            # also reports baseline windows (enough for a verdict on their own), and hub-2
            # a few baseline inferences (fewer than min_samples in a slice), all far
            # slower: neither is a rest of the class the canary could be "better" than
            u = max(next_slice_start(now_ms()), t + K * WINDOW_MS)
            for k in range(K):
                start = u + k * WINDOW_MS
                await fleet.slice(start, cand, SLOW, ["hub-1", "hub-1"])
                await fleet.slice(start, fp32.sha256, VERY_SLOW, ["hub-1"], count=60)
                await fleet.slice(start, fp32.sha256, VERY_SLOW, ["hub-2"], count=10)
            await loop.tick(u + K * WINDOW_MS)
            assert await kinds(c, "rollout.promote") == []
            (rollback,) = await c.events("rollout.rollback")
            detail = json.loads(rollback.detail_json)
            assert detail["baseline_from"] == "budget_miss"
            assert detail["baseline_p95_ms"] == miss["p95_ms"]
            assert "on the class before the rollout (the budget miss" in rollback.message
            nothing = "no comparable telemetry from the rest of the class"
            assert f"{nothing} (30 inferences on 1 other device(s)" in rollback.message
            assert "n/a" not in rollback.message
            listed = (await c.admin.ListRollouts(pb.ListRolloutsRequest(), timeout=10)).rollouts
            assert listed[0].state == pb.ROLLOUT_STATE_ROLLED_BACK
            assert "not better than the baseline" in listed[0].reason

    run(body())
