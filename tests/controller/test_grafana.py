"""deploy/grafana/homefleet.json cannot drift from the controller's metrics: every metric
name and label its PromQL uses is one a real controller's /metrics exports.

The controller is started on a real port, telemetry arrives over real gRPC, and the
scrape is parsed with prometheus_client's own parser; the dashboard's expressions are
taken apart with a small tokenizer (metric names are the identifiers left once strings,
label matchers, ranges, grouping clauses, functions and keywords are removed).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from artifact import histogram
from controller.clock import unix_ms
from controller.device_classes import DeviceClass
from protos import fleet_pb2 as pb
from tests.controller.helpers import onnx_model, run, running_controller

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
DASHBOARD = DEPLOY / "grafana" / "homefleet.json"
DEVICE_CLASSES = DEPLOY / "device-classes"
BUDGET_METRIC = "homefleet_class_budget_"  # per class: a budget holds for all its models
# Metrics with no model label: a budget holds for all of a class's models, and a refused
# window may name no model the controller knows.
PER_CLASS_METRICS = (BUDGET_METRIC, "homefleet_telemetry_refusals_total")
KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "and", "or"}
KEYWORDS |= {"unless", "bool", "offset", "inf", "nan"}
IDENTIFIER = re.compile(r"[A-Za-z_:][A-Za-z0-9_:]*")
GROUPING = re.compile(r"\b(by|without|on|ignoring|group_left|group_right)\s*\(([^)]*)\)")
MATCHERS = re.compile(r"\{([^}]*)\}")
MATCHER_LABEL = re.compile(r"\s*([A-Za-z_][A-Za-z0-9_]*)\s*(=~|!~|!=|=)")
LABEL_VALUES = re.compile(r"^label_values\((.*),\s*([A-Za-z_][A-Za-z0-9_]*)\)$", re.S)
LEGEND_LABEL = re.compile(r"\{\{\s*([A-Za-z_][A-Za-z0-9_]*)\s*\}\}")


def panels(dashboard: dict[str, Any]) -> Iterator[dict[str, Any]]:
    for panel in dashboard["panels"]:
        yield panel
        yield from panel.get("panels", [])  # panels inside collapsed rows


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression reads."""
    text = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)
    text = re.sub(r"\$\{?\w+\}?", "", text)  # dashboard variables
    text = MATCHERS.sub("", text)
    text = re.sub(r"\[[^\]]*\]", "", text)  # range selectors
    text = GROUPING.sub("", text)
    text = re.sub(r"(?<![A-Za-z0-9_:])[0-9][A-Za-z0-9_.]*", "", text)  # numbers, durations
    names = set()
    for match in IDENTIFIER.finditer(text):
        following = text[match.end() :].lstrip()
        if following.startswith("(") or match.group().lower() in KEYWORDS:
            continue  # a function call or a keyword
        names.add(match.group())
    return names


def label_names(expr: str) -> set[str]:
    """The label names an expression groups by or matches on."""
    labels = set()
    for _, inside in GROUPING.findall(expr):
        labels |= {x.strip() for x in inside.split(",") if x.strip()}
    for inside in MATCHERS.findall(expr):
        labels |= {m.group(1) for m in MATCHER_LABEL.finditer(inside)}
    return labels


def test_metric_names_parses_what_the_dashboard_writes() -> None:
    expr = (
        'histogram_quantile(0.95, sum by (le, device_class) (rate(a_bucket{model=~"$model",'
        ' x="b{c}"}[5m]))) / on (device_class) group_left sum without (source) (b_total offset'
        " 5m) * 1000"
    )
    assert metric_names(expr) == {"a_bucket", "b_total"}
    assert label_names(expr) == {"le", "device_class", "model", "x", "source"}


def exported(tmp_path: Path) -> tuple[set[str], set[str]]:
    """(sample names, label names) a real controller's /metrics serves with telemetry."""

    async def body() -> str:
        async with running_controller(
            tmp_path, metrics_port=0, device_classes_dir=DEVICE_CLASSES
        ) as c:
            await c.add_model("motions", onnx_model())
            art = await c.artifact("motions", "home-hub")
            await c.register("hub-1", "home-hub")
            counts = histogram.histogram([0.002] * 10)
            window = pb.TelemetryWindow(
                seq=1,
                model_name="motions",
                artifact_sha256=art.sha256,
                start_unix_ms=unix_ms() - 20_000,
                end_unix_ms=unix_ms() - 10_000,
                count=10,
                errors=1,
                latency_bucket_counts=counts,
                cpu_seconds=0.1,
                joules=0.5,
                energy_source="rapl",
            )
            await c.agent.ReportTelemetry(
                pb.TelemetryBatch(device_id="hub-1", windows=[window]), timeout=10
            )
            # a window refused (a clock set back 400 days), for the refusal counter
            stale = pb.TelemetryWindow()
            stale.CopyFrom(window)
            stale.start_unix_ms -= 400 * 24 * 3600 * 1000
            stale.end_unix_ms -= 400 * 24 * 3600 * 1000
            with contextlib.suppress(grpc.aio.AioRpcError):
                await c.agent.ReportTelemetry(
                    pb.TelemetryBatch(device_id="hub-1", windows=[stale]), timeout=10
                )
            # and a download, for the update counters
            await c.admin.Assign(
                pb.AssignRequest(artifact_id=art.id, device_class="home-hub"), timeout=10
            )
            fetch = pb.FetchArtifactRequest(device_id="hub-1", target_sha256=art.sha256)
            chunks = [chunk async for chunk in c.agent.FetchArtifact(fetch, timeout=10)]
            applied = pb.StatusReport(
                device_id="hub-1",
                model_name="motions",
                artifact_sha256=art.sha256,
                outcome=pb.DEPLOYMENT_OUTCOME_ACTIVE,
                bytes_received=sum(len(chunk.data) for chunk in chunks),
                encoding=pb.PAYLOAD_ENCODING_FULL,
                serving_sha256=art.sha256,
            )
            await c.agent.ReportStatus(applied, timeout=10)
            address = json.loads(c.config.info_path.read_text())["metrics_address"]

            def scrape() -> str:
                url = f"http://{address}/metrics"
                with urllib.request.urlopen(url, timeout=30) as response:
                    return str(response.read().decode())

            return await asyncio.to_thread(scrape)

    text = run(body())
    samples = [s for f in text_string_to_metric_families(text) for s in f.samples]
    ours = [s for s in samples if s.name.startswith("homefleet_")]
    return {s.name for s in ours}, {label for s in ours for label in s.labels}


def test_dashboard_uses_only_metrics_and_labels_the_controller_exports(tmp_path: Path) -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    assert dashboard["schemaVersion"] >= 39
    assert [i["name"] for i in dashboard["__inputs"]] == ["DS_PROMETHEUS"]
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert set(variables) == {"device_class", "model"}

    exprs: list[str] = []
    legends: list[str] = []
    for panel in panels(dashboard):
        if panel["type"] == "row":
            continue
        assert panel["datasource"]["uid"] == "${DS_PROMETHEUS}", panel["title"]
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            assert target["datasource"]["uid"] == "${DS_PROMETHEUS}"
            exprs.append(target["expr"])
            legends.append(target.get("legendFormat", ""))
            # Every panel follows the class and model the viewer picked.
            assert 'device_class=~"$device_class"' in target["expr"], panel["title"]
            if not any(m in target["expr"] for m in PER_CLASS_METRICS):
                assert 'model=~"$model"' in target["expr"], panel["title"]
    for variable in variables.values():
        assert variable["datasource"]["uid"] == "${DS_PROMETHEUS}"
        match = LABEL_VALUES.match(variable["query"])
        assert match, variable["query"]
        exprs.append(match.group(1))
        assert match.group(2) == variable["name"]  # the label the variable filters on

    names, labels = exported(tmp_path)
    used = set().union(*(metric_names(e) for e in exprs))
    assert used, "the dashboard reads no metric"
    assert used <= names, f"not exported by the controller: {sorted(used - names)}"
    # The panels the issue asks for are there.
    for needed in (
        "homefleet_inference_latency_seconds_bucket",
        "homefleet_inferences_total",
        "homefleet_energy_joules_total",
        "homefleet_inference_errors_total",
    ):
        assert needed in used, needed
    assert any(e.startswith("histogram_quantile(0.95,") for e in exprs)
    # The latency and energy panels draw their class budgets as lines.
    by_title = {p["title"]: p for p in panels(dashboard)}
    for title, budget in (
        ("p95 inference latency", "homefleet_class_budget_p95_latency_seconds"),
        ("Energy per inference", "homefleet_class_budget_energy_per_inference_joules"),
    ):
        assert any(budget in t["expr"] for t in by_title[title]["targets"]), title
    used_labels = set().union(*(label_names(e) for e in exprs))
    used_labels |= {m for legend in legends for m in LEGEND_LABEL.findall(legend)}
    assert used_labels <= labels, f"labels not exported: {sorted(used_labels - labels)}"


def test_budgets_are_exported_per_declared_class(tmp_path: Path) -> None:
    """The gauges carry each device-class file's budgets in base units (s, J, bytes)."""

    async def body() -> str:
        async with running_controller(
            tmp_path, metrics_port=0, device_classes_dir=DEVICE_CLASSES
        ) as c:
            address = json.loads(c.config.info_path.read_text())["metrics_address"]

            def scrape() -> str:
                with urllib.request.urlopen(f"http://{address}/metrics", timeout=30) as response:
                    return str(response.read().decode())

            return await asyncio.to_thread(scrape)

    text = run(body())
    values = {
        (s.name, s.labels["device_class"]): s.value
        for f in text_string_to_metric_families(text)
        for s in f.samples
        if s.name.startswith(BUDGET_METRIC)
    }
    classes = {
        path.stem: DeviceClass.model_validate(yaml.safe_load(path.read_text()))
        for path in DEVICE_CLASSES.glob("*.yaml")
    }
    assert {cls for _, cls in values} == set(classes)
    for name, spec in classes.items():
        budgets = spec.budgets
        if budgets.p95_latency_ms is not None:
            got = values[(f"{BUDGET_METRIC}p95_latency_seconds", name)]
            assert got == pytest.approx(budgets.p95_latency_ms / 1000)
        if budgets.energy_per_inference_mj is not None:
            got = values[(f"{BUDGET_METRIC}energy_per_inference_joules", name)]
            assert got == pytest.approx(budgets.energy_per_inference_mj / 1000)
        if budgets.max_artifact_bytes is not None:
            got = values[(f"{BUDGET_METRIC}artifact_bytes", name)]
            assert got == budgets.max_artifact_bytes
