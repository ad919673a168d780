"""The controller's dashboard: its JSON API over real stored telemetry, and the page
rendered in headless Chromium (Debian's ``chromium`` driven by Playwright) with charts,
budget lines and tables checked in the live DOM.

Telemetry arrives over real gRPC; decisions are written with ``Store.add_event`` the way
the budget loop records them. Chromium or Playwright missing is a failure naming the
install step, never a skip.
"""

from __future__ import annotations

import asyncio
import json
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from artifact import histogram
from controller.clock import unix_ms
from controller.config import BudgetPolicy
from controller.db import make_engine
from controller.records import NewEvent
from controller.sql_store import SqlStore
from protos import fleet_pb2 as pb
from tests.controller.helpers import Harness, onnx_model, run, running_controller

REPO = Path(__file__).resolve().parents[2]
DEVICE_CLASSES = REPO / "deploy" / "device-classes"
CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
MODEL = "motions"
MINUTE_MS = 60_000
FAST = histogram.histogram([0.004] * 90 + [0.008] * 10)  # p95 ≈ 8 ms
SLOW = histogram.histogram([0.004] * 50 + [0.040] * 50)  # p95 ≈ 40 ms: over the hub budget
SPEAKER = histogram.histogram([0.010] * 95 + [0.020] * 5)
EN_DASH = "\u2013"  # the fleet pager writes ranges with it: "devices 1-200 of 205"
# Text the page must show as text: a reason is free-form and must not become markup.
HOSTILE = '<img src=x onerror="document.body.dataset.pwned=1">'


@dataclass(frozen=True)
class Fleet:
    hub_artifact: str
    hub_canary: str
    speaker_artifact: str
    now_ms: int
    # (class, artifact) -> {minutes ago: merged bucket counts}
    expected: dict[tuple[str, str], dict[int, list[int]]]


def window(seq: int, sha: str, counts: list[int], end_ms: int, joules: float) -> pb.TelemetryWindow:
    return pb.TelemetryWindow(
        seq=seq,
        model_name=MODEL,
        artifact_sha256=sha,
        start_unix_ms=end_ms - 10_000,
        end_unix_ms=end_ms,
        count=sum(counts),
        latency_bucket_counts=counts,
        cpu_seconds=0.1,
        joules=joules,
        energy_source="estimate",
    )


async def populate(c: Harness) -> Fleet:
    """Two hubs on two artifacts of one model, a speaker, and a camera with no telemetry.

    Windows end 5 s after whole minutes back from now, one per minute, so each falls in
    its own one-minute bucket of the page's last-hour view.
    """
    await c.add_model(MODEL, onnx_model())
    hub = await c.artifact(MODEL, "home-hub")
    speaker = await c.artifact(MODEL, "smart-speaker")
    await c.add_model(MODEL, onnx_model(seed=1))  # version 2: the canary's source
    canary = await c.artifact(MODEL, "home-hub")
    for device_id, device_class in (
        ("hub-1", "home-hub"),
        ("hub-2", "home-hub"),
        ("spk-1", "smart-speaker"),
        ("cam-1", "camera"),
    ):
        await c.register(device_id, device_class)
    now = unix_ms()
    top = now - now % MINUTE_MS

    def end(minutes_ago: int) -> int:
        return top - minutes_ago * MINUTE_MS + 5_000 - MINUTE_MS

    expected: dict[tuple[str, str], dict[int, list[int]]] = {}
    batches: dict[str, list[pb.TelemetryWindow]] = {"hub-1": [], "hub-2": [], "spk-1": []}

    def add(device: str, cls: str, art: pb.Artifact, ago: int, counts: list[int]) -> None:
        seq = len(batches[device]) + 1
        joules = 0.005 * sum(counts)  # 5 mJ per inference
        batches[device].append(window(seq, art.sha256, counts, end(ago), joules))
        at = expected.setdefault((cls, art.id), {})
        at[ago] = histogram.merge(at.get(ago, histogram.empty()), counts)

    for ago in range(5):
        add("hub-1", "home-hub", hub, ago, SLOW if ago == 2 else FAST)
    for ago in range(2, 5):
        add("hub-2", "home-hub", hub, ago, FAST)
    for ago in range(2):
        add("hub-2", "home-hub", canary, ago, FAST)
    for ago in range(3):
        add("spk-1", "smart-speaker", speaker, ago, SPEAKER)
    for device_id, windows in batches.items():
        ack = await c.agent.ReportTelemetry(
            pb.TelemetryBatch(device_id=device_id, windows=windows), timeout=10
        )
        assert ack.highest_seq == len(windows)
    # hub-1 serves the hub artifact it should; hub-2 was told to run the canary and failed
    await c.admin.Assign(pb.AssignRequest(artifact_id=hub.id, device_class="home-hub"), timeout=10)
    await c.admin.Assign(pb.AssignRequest(artifact_id=canary.id, device_id="hub-2"), timeout=10)
    for device_id, sha, outcome in (
        ("hub-1", hub.sha256, pb.DEPLOYMENT_OUTCOME_ACTIVE),
        ("hub-2", hub.sha256, pb.DEPLOYMENT_OUTCOME_ACTIVE),
        ("hub-2", canary.sha256, pb.DEPLOYMENT_OUTCOME_FAILED),
    ):
        reason = "self-test failed" if outcome == pb.DEPLOYMENT_OUTCOME_FAILED else ""
        await c.agent.ReportStatus(
            pb.StatusReport(
                device_id=device_id, model_name=MODEL, artifact_sha256=sha, outcome=outcome,
                serving_sha256=hub.sha256, reason=reason,
            ),
            timeout=10,
        )  # fmt: skip
    return Fleet(hub.id, canary.id, speaker.id, now, expected)


def record_decisions(c: Harness, f: Fleet) -> None:
    """The budget loop's record of a miss, a recompression, a canary rolled back and a
    second canary promoted — written straight into the store the controller reads."""
    hub = {"device_class": "home-hub", "model": MODEL}
    events = [
        NewEvent(
            "budget.miss",
            "home-hub/motions",
            "p95 over budget",
            {
                **hub,
                "artifact_id": f.hub_artifact,
                "p95_ms": 38.5,
                "p95_budget_ms": 20.0,
                "energy_mj": 5.0,
                "energy_budget_mj": 100.0,
                "windows": 3,
                "samples": 300,
                "rollout_id": "r-1",
            },
        ),
        NewEvent(
            "rollout.recompress",
            "home-hub/motions",
            "recompressing with a tighter target",
            {
                **hub,
                "rollout_id": "r-1",
                "job_id": 7,
                "relative_speed_before": 1.0,
                "relative_speed_after": 0.5,
                "p95_target_ms": 15.0,
            },
        ),
        NewEvent(
            "rollout.canary",
            "home-hub/motions",
            "canary",
            {
                **hub,
                "rollout_id": "r-1",
                "artifact_id": f.hub_canary,
                "baseline_artifact_id": f.hub_artifact,
                "devices": ["hub-2"],
            },
        ),
        NewEvent(
            "rollout.rollback",
            "home-hub/motions",
            "canary worse",
            {
                **hub,
                "rollout_id": "r-1",
                "artifact_id": f.hub_canary,
                "baseline_artifact_id": f.hub_artifact,
                "baseline_p95_ms": 38.5,
                "canary_p95_ms": 45.0,
                "p95_budget_ms": 20.0,
                "baseline_energy_mj": 5.0,
                "canary_energy_mj": 5.5,
                "reason": HOSTILE,
            },
        ),
        NewEvent(
            "rollout.promote",
            "smart-speaker/motions",
            "canary within budget",
            {
                "device_class": "smart-speaker",
                "model": MODEL,
                "rollout_id": "r-2",
                "artifact_id": f.speaker_artifact,
                "baseline_artifact_id": "old",
                "baseline_p95_ms": 35.0,
                "canary_p95_ms": 19.0,
                "p95_budget_ms": 30.0,
                "baseline_energy_mj": 6.0,
                "canary_energy_mj": 5.0,
                "reason": "canary p95 within budget",
            },
        ),
        NewEvent("compression.started", "motions", "not a decision"),
    ]
    engine = make_engine(c.config.database_url)
    try:
        store = SqlStore(engine)
        for event in events:
            store.add_event(event)
    finally:
        engine.dispose()


@asynccontextmanager
async def dashboard(tmp_path: Path) -> AsyncIterator[tuple[Harness, Fleet, str]]:
    """A controller knowing deploy/device-classes, with telemetry and decisions; yields
    the address of its HTTP port. Its budget loop never runs by itself (check_seconds=0),
    so the decisions on the page are exactly the ones written here."""
    async with running_controller(
        tmp_path,
        metrics_port=0,
        device_classes_dir=DEVICE_CLASSES,
        budget_policy=BudgetPolicy(check_seconds=0),
    ) as c:
        f = await populate(c)
        await asyncio.to_thread(record_decisions, c, f)
        yield c, f, json.loads(c.config.info_path.read_text())["metrics_address"]


def get(address: str, path: str) -> tuple[int, str, Any]:
    """(status, content type, parsed JSON or text) of a GET; errors are returned, not raised."""
    try:
        with urllib.request.urlopen(f"http://{address}{path}", timeout=30) as response:
            status, ctype, raw = response.status, response.headers["Content-Type"], response.read()
    except urllib.error.HTTPError as exc:
        status, ctype, raw = exc.code, exc.headers["Content-Type"], exc.read()
    body = json.loads(raw) if ctype == "application/json" else raw.decode()
    return status, ctype, body


# ---------------------------------------------------------------- API


def test_api_serves_fleet_classes_series_and_decisions(tmp_path: Path) -> None:
    async def body() -> None:
        async with dashboard(tmp_path) as (_, f, address):
            # One port: Prometheus /metrics, the page and the API.
            status, ctype, text = await asyncio.to_thread(get, address, "/metrics")
            assert status == 200 and ctype.startswith("text/plain")
            assert "homefleet_inference_latency_seconds_bucket{" in text
            status, ctype, page = await asyncio.to_thread(get, address, "/")
            assert status == 200 and ctype.startswith("text/html")
            assert '<script src="/dashboard.js"' in page

            _, _, fleet = await asyncio.to_thread(get, address, "/api/fleet")
            assert [d["device_id"] for d in fleet["devices"]] == [
                "cam-1",
                "hub-1",
                "hub-2",
                "spk-1",
            ]
            counts = {x["device_class"]: x["devices"] for x in fleet["classes"]}
            assert counts == {"camera": 1, "home-hub": 2, "smart-speaker": 1}
            assert (fleet["total"], fleet["next_after"]) == (4, "")
            # Paged by id: the class counts stay the whole fleet's on every page.
            _, _, first = await asyncio.to_thread(get, address, "/api/fleet?limit=3")
            assert [d["device_id"] for d in first["devices"]] == ["cam-1", "hub-1", "hub-2"]
            assert (first["next_after"], first["total"], first["classes"]) == (
                "hub-2",
                4,
                fleet["classes"],
            )
            _, _, last = await asyncio.to_thread(get, address, "/api/fleet?limit=3&after=hub-2")
            assert [d["device_id"] for d in last["devices"]] == ["spk-1"]
            assert last["next_after"] == ""

            _, _, classes = await asyncio.to_thread(get, address, "/api/classes")
            budgets = {
                x["name"]: (x["p95_budget_ms"], x["energy_budget_mj"]) for x in classes["classes"]
            }
            assert budgets == {
                "camera": (50.0, 30.0),
                "home-hub": (20.0, 100.0),
                "smart-speaker": (30.0, 40.0),
            }

            # One-minute buckets over the last hour: each window in its own bucket, both
            # hubs' windows of a minute merged bucket by bucket before the p95 is taken.
            until = f.now_ms - f.now_ms % MINUTE_MS + MINUTE_MS
            since = until - 60 * MINUTE_MS
            query = f"/api/series?since={since}&until={until}&buckets=60"
            _, _, series = await asyncio.to_thread(get, address, query)
            assert series["bucket_ms"] == MINUTE_MS
            assert (series["omitted_series"], series["max_series"]) == (0, 40)
            found = {(s["device_class"], s["artifact_id"]): s["points"] for s in series["series"]}
            assert set(found) == set(f.expected)
            for key, by_ago in f.expected.items():
                points = found[key]
                assert len(points) == len(by_ago), key
                for point, ago in zip(points, sorted(by_ago, reverse=True), strict=True):
                    merged = by_ago[ago]
                    assert point["start_unix_ms"] == until - (ago + 2) * MINUTE_MS
                    assert point["count"] == sum(merged)
                    p95 = histogram.percentile(merged, 0.95)
                    assert p95 is not None
                    assert point["p95_ms"] == pytest.approx(p95 * 1000)
                    assert point["energy_per_inference_mj"] == pytest.approx(5.0)
            hub = [p["p95_ms"] for p in found[("home-hub", f.hub_artifact)]]
            assert max(hub) > 20.0 > min(hub)  # the slow minute is over the hub budget

            _, _, decisions = await asyncio.to_thread(get, address, "/api/decisions?limit=4")
            kinds = [d["kind"] for d in decisions["decisions"]]
            assert kinds == [
                "rollout.recompress",
                "rollout.canary",
                "rollout.rollback",
                "rollout.promote",
            ]
            rollouts = {r["rollout_id"]: r for r in decisions["rollouts"]}
            assert rollouts["r-1"]["state"] == "rolled back"
            assert rollouts["r-1"]["canary_p95_ms"] == 45.0
            assert rollouts["r-1"]["artifact_id"] == f.hub_canary
            assert rollouts["r-2"]["state"] == "promoted"

    run(body())


BAD_REQUESTS = [
    ("/api/series?since=abc", 400, "'since' must be an integer"),
    ("/api/series?since=5&until=5", 400, "must be before until"),
    ("/api/series?since=-1", 400, "'since' must be in 0.."),
    ("/api/series?buckets=0", 400, "'buckets' must be in 1..240"),
    ("/api/series?buckets=241", 400, "'buckets' must be in 1..240"),
    ("/api/series?buckets=1&buckets=2", 400, "given 2 times"),
    ("/api/series?since=0&until=9999999999999", 400, "31 days"),
    ("/api/series?until=99999999999999999999", 400, "must be an integer"),
    ("/api/series?step=5", 400, "unknown query parameter 'step'; accepted: buckets, since, until"),
    ("/api/decisions?limit=0", 400, "'limit' must be in 1..1000"),
    ("/api/decisions?limit=1001", 400, "'limit' must be in 1..1000"),
    ("/api/fleet?device=hub-1", 400, "unknown query parameter 'device'; accepted: after, limit"),
    ("/api/fleet?limit=0", 400, "'limit' must be in 1..10000"),
    ("/api/fleet?after=Hub%201", 400, "query parameter 'after' (a device id) 'Hub 1' is not valid"),
    ("/api/classes?x=1", 400, "unknown query parameter 'x'"),
    ("/api/series?" + "&".join(f"a{i}=1" for i in range(20)), 400, "at most 16 query parameters"),
    ("/api/nothing", 404, "no page at '/api/nothing'"),
]


def test_bad_query_parameters_get_400_naming_the_parameter(tmp_path: Path) -> None:
    async def body() -> None:
        async with running_controller(tmp_path, metrics_port=0) as c:
            address = json.loads(c.config.info_path.read_text())["metrics_address"]
            for path, status, fragment in BAD_REQUESTS:
                got, ctype, answer = await asyncio.to_thread(get, address, path)
                assert (got, ctype) == (status, "application/json"), path
                assert fragment in answer["error"], (path, answer)

            def post() -> int:
                request = urllib.request.Request(
                    f"http://{address}/api/fleet", b"{}", method="POST"
                )
                try:
                    urllib.request.urlopen(request, timeout=30)
                except urllib.error.HTTPError as exc:
                    return exc.code
                return 200

            assert await asyncio.to_thread(post) == 405
            # The controller still serves after all that.
            got, _, fleet = await asyncio.to_thread(get, address, "/api/fleet")
            assert got == 200
            assert fleet == {"devices": [], "classes": [], "total": 0, "next_after": ""}

    run(body())


# ---------------------------------------------------------------- the page in Chromium


def open_page(
    address: str, screenshot: Path, interact: Callable[[Any], Any] | None = None
) -> dict[str, Any]:
    """Load the page in headless Chromium; return what the DOM shows and any errors, and
    what ``interact`` (given the Playwright page once it has rendered) returns."""
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.fail(
            "the dashboard test needs Playwright: .venv/bin/pip install -e '.[dev]' "
            "(never `playwright install`: it drives Debian's chromium)"
        )
    if not CHROMIUM.exists():
        pytest.fail(f"{CHROMIUM} is missing: run `make system-tools` (apt-get install chromium)")
    errors: list[str] = []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 1600})
            page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
            page.on("pageerror", lambda exc: errors.append(str(exc)))
            page.on("requestfailed", lambda r: errors.append(f"request failed: {r.url}"))
            page.goto(f"http://{address}/")
            # A selector, not wait_for_function: the page's CSP forbids eval, which that uses.
            page.wait_for_selector("body[data-renders]", state="attached")
            state: dict[str, Any] = page.evaluate(DOM_PROBE)
            page.screenshot(path=str(screenshot), full_page=True)
            state["interaction"] = interact(page) if interact else None
        finally:
            browser.close()
    state["errors"] = errors
    return state


# What the test reads from the live DOM, as plain JSON.
DOM_PROBE = """() => {
  const charts = {};
  for (const box of document.querySelectorAll('.class-charts')) {
    const perKind = {};
    for (const fig of box.querySelectorAll('figure.chart')) {
      perKind[fig.dataset.chart] = {
        series: [...fig.querySelectorAll('polyline.series')].map((l) => ({
          name: l.dataset.series,
          points: l.getAttribute('points').trim().split(/\\s+/).length,
          declared: Number(l.dataset.points),
          length: l.getTotalLength(),
        })),
        budget: [...fig.querySelectorAll('line.budget')].map((l) => Number(l.dataset.budget)),
        over: fig.querySelectorAll('circle.dot.over').length,
        dots: fig.querySelectorAll('circle.dot').length,
      };
    }
    charts[box.dataset.class] = {kinds: perKind, text: box.textContent};
  }
  const rows = (id, attr) => [...document.querySelectorAll(`#${id} tbody tr`)].map(
    (tr) => ({key: tr.getAttribute(attr), cells: [...tr.cells].map((td) => td.textContent)}));
  return {
    charts,
    decisions: rows('decisions', 'data-kind'),
    rollouts: rows('rollouts', 'data-rollout'),
    fleet: rows('fleet', 'data-device'),
    fleet_bad: [...document.querySelectorAll('#fleet tbody tr')].filter(
      (tr) => tr.querySelector('td.bad')).map((tr) => tr.dataset.device),
    classes: rows('classes', 'data-none'),
    pager: {
      text: document.getElementById('fleet-page').textContent,
      prev: !document.getElementById('fleet-prev').disabled,
      next: !document.getElementById('fleet-next').disabled,
    },
    images: document.querySelectorAll('main img').length,
    pwned: document.body.dataset.pwned || '',
    status: document.getElementById('status').textContent,
  };
}"""


def test_page_renders_charts_tables_and_decisions_in_chromium(tmp_path: Path) -> None:
    screenshot = tmp_path / "dashboard.png"

    async def body() -> dict[str, Any]:
        async with dashboard(tmp_path) as (_, f, address):
            state = await asyncio.to_thread(open_page, address, screenshot)
            state["fleet_fixture"] = f
            return state

    state = run(body())
    f: Fleet = state["fleet_fixture"]
    assert state["errors"] == [], state["errors"]
    assert screenshot.stat().st_size > 10_000

    charts = state["charts"]
    assert set(charts) == {"camera", "home-hub", "smart-speaker"}
    assert "no telemetry in this range" in charts["camera"]["text"]
    assert charts["camera"]["kinds"] == {}
    budgets = {"home-hub": (20.0, 100.0), "smart-speaker": (30.0, 40.0)}
    for cls, (p95_budget, energy_budget) in budgets.items():
        kinds = charts[cls]["kinds"]
        assert kinds["p95"]["budget"] == [p95_budget]
        assert kinds["energy"]["budget"] == [energy_budget]
        for kind in ("p95", "energy"):
            lines = {s["name"]: s for s in kinds[kind]["series"]}
            want = {
                f"{MODEL} {artifact}": len(by_ago)
                for (c, artifact), by_ago in f.expected.items()
                if c == cls
            }
            # One line per (model, artifact), a vertex per bucket with data, drawn.
            assert {n: s["points"] for n, s in lines.items()} == want, (cls, kind)
            assert all(s["declared"] == s["points"] for s in lines.values())
            assert all(s["length"] > 0 for s in lines.values() if s["points"] > 1)
            assert kinds[kind]["dots"] == sum(want.values())
    # The slow minute is marked over the hub's 20 ms budget; energy is within budget.
    assert charts["home-hub"]["kinds"]["p95"]["over"] == 1
    assert charts["home-hub"]["kinds"]["energy"]["over"] == 0
    assert charts["smart-speaker"]["kinds"]["p95"]["over"] == 0

    decisions = state["decisions"]
    assert [d["key"] for d in decisions] == [
        "rollout.promote",
        "rollout.rollback",
        "rollout.canary",
        "rollout.recompress",
        "budget.miss",
    ]
    miss = decisions[-1]["cells"]
    assert miss[2:5] == ["budget.miss", "home-hub", MODEL]
    assert "p95 38.5 ms (budget 20.0)" in miss[5] and "300 inferences" in miss[5]
    assert HOSTILE in decisions[1]["cells"][5]  # shown as text ...
    assert state["images"] == 0 and state["pwned"] == ""  # ... never run as markup

    rollouts = {r["key"]: r["cells"] for r in state["rollouts"]}
    assert rollouts["r-1"][3] == "rolled back" and rollouts["r-1"][4] == f.hub_canary
    assert rollouts["r-2"][3] == "promoted" and rollouts["r-2"][1] == "smart-speaker"

    fleet = {r["key"]: r["cells"] for r in state["fleet"]}
    assert list(fleet) == ["cam-1", "hub-1", "hub-2", "spk-1"]
    assert state["pager"] == {"text": f"devices 1{EN_DASH}4 of 4", "prev": False, "next": False}
    assert fleet["spk-1"][1] == "smart-speaker"
    assert fleet["hub-1"][4] == f"{MODEL}: {f.hub_artifact}"  # as it should be: no news
    assert fleet["hub-2"][4] == f"{MODEL}: {f.hub_artifact} → {f.hub_canary} (failed)"
    assert state["fleet_bad"] == ["hub-2"]
    classes = {r["cells"][0]: r["cells"] for r in state["classes"]}
    assert classes["home-hub"][1:4] == ["2", "0", "20.0"]
    assert "4 devices, 3 series, 5 decisions" in state["status"]


PAGER_PROBE = """() => ({
  text: document.getElementById('fleet-page').textContent,
  rows: [...document.querySelectorAll('#fleet tbody tr')].map((tr) => tr.dataset.device),
  prev: !document.getElementById('fleet-prev').disabled,
  next: !document.getElementById('fleet-next').disabled,
})"""


def test_fleet_table_pages_forward_and_back_in_chromium(tmp_path: Path) -> None:
    """205 devices: the table shows 200, "next" the last 5, "previous" the first 200 again;
    the class table counts all 205 on every page."""
    ids = [f"d-{i:03d}" for i in range(205)]

    def turn_pages(page: Any) -> list[dict[str, Any]]:
        seen = [page.evaluate(PAGER_PROBE)]
        page.click("#fleet-next")
        page.wait_for_selector('#fleet tbody tr[data-device="d-200"]', state="attached")
        seen.append(page.evaluate(PAGER_PROBE))
        page.click("#fleet-prev")
        page.wait_for_selector('#fleet tbody tr[data-device="d-000"]', state="attached")
        seen.append(page.evaluate(PAGER_PROBE))
        return seen

    async def body() -> dict[str, Any]:
        async with running_controller(tmp_path, metrics_port=0) as c:
            for device_id in ids:
                await c.register(device_id, "camera")
            address = json.loads(c.config.info_path.read_text())["metrics_address"]
            return await asyncio.to_thread(open_page, address, tmp_path / "p.png", turn_pages)

    state = run(body())
    assert state["errors"] == [], state["errors"]
    first, second, back = state["interaction"]
    assert first == {
        "text": f"devices 1{EN_DASH}200 of 205",
        "rows": ids[:200],
        "prev": False,
        "next": True,
    }
    assert second == {
        "text": f"devices 201{EN_DASH}205 of 205",
        "rows": ids[200:],
        "prev": True,
        "next": False,
    }
    assert back == first
    assert [r["cells"][:3] for r in state["classes"]] == [["camera", "205", "0"]]
