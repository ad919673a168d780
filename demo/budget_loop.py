"""The demo's view of the closed loop: the controller's decisions as they happen, and
each class's observed numbers per artifact (from the controller's own /metrics).

Nothing here decides anything: the controller's budget loop does. The demo reads its
events (AdminService.ListEvents) and its Prometheus endpoint, as an operator would.
"""

from __future__ import annotations

import json
import time
import urllib.request
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass

from prometheus_client.parser import text_string_to_metric_families
from rich.markup import escape
from rich.table import Table

from artifact import histogram
from demo.operator import Operator, OperatorError

DECISION_KINDS = ("budget.", "rollout.")
ENDINGS = ("rollout.promote", "rollout.rollback", "rollout.failed", "rollout.aborted")
SCRAPE_TIMEOUT = 10.0
_POLL_SECONDS = 1.0


@dataclass(frozen=True)
class Decision:
    """One budget-loop event, stamped with the seconds since the demo's loop phase began."""

    at_s: float
    kind: str
    subject: str
    message: str
    detail: dict[str, object]


def watch_decisions(
    operator: Operator,
    started: float,
    *,
    device_class: str,
    timeout: float,
    on_decision: Callable[[Decision], None],
    on_poll: Callable[[float], None] | None = None,
) -> list[Decision]:
    """Every decision until a rollout for ``device_class`` ends (promoted, rolled back or
    failed); raises OperatorError when none ends within ``timeout`` seconds."""
    decisions: list[Decision] = []
    after = 0
    deadline = time.monotonic() + timeout
    while True:
        for event in operator.events("", after_id=after):
            after = max(after, event.id)
            if not event.kind.startswith(DECISION_KINDS):
                continue
            decision = Decision(
                at_s=event.unix_ms / 1000 - started,
                kind=event.kind,
                subject=event.subject,
                message=event.message,
                detail=json.loads(event.detail_json or "{}"),
            )
            decisions.append(decision)
            on_decision(decision)
            if decision.kind in ENDINGS and decision.detail.get("device_class") == device_class:
                return decisions
        if time.monotonic() > deadline:
            seen = ", ".join(d.kind for d in decisions) or "none"
            raise OperatorError(
                f"no rollout for {device_class} ended within {timeout:.0f} s "
                f"(decisions so far: {seen}); see the controller log"
            )
        if on_poll is not None:
            on_poll(time.time() - started)
        time.sleep(_POLL_SECONDS)


@dataclass(frozen=True)
class ArtifactNumbers:
    """What a class's devices reported for one artifact, summed over the whole run."""

    device_class: str
    artifact_id: str
    inferences: int
    p95_ms: float | None  # from the merged histogram, interpolated as the controller does
    energy_mj: float | None


def scrape_numbers(metrics_address: str, model_name: str) -> list[ArtifactNumbers]:
    """Per (class, artifact): inferences, p95 and energy per inference from /metrics."""
    url = f"http://{metrics_address}/metrics"
    with urllib.request.urlopen(url, timeout=SCRAPE_TIMEOUT) as response:
        text = response.read().decode()
    buckets: dict[tuple[str, str], list[tuple[float, float]]] = defaultdict(list)
    counts: dict[tuple[str, str], float] = defaultdict(float)
    joules: dict[tuple[str, str], float] = defaultdict(float)
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = sample.labels
            if labels.get("model") != model_name:
                continue
            key = (labels.get("device_class", ""), labels.get("artifact_id", ""))
            if sample.name == "homefleet_inference_latency_seconds_bucket":
                buckets[key].append((float(labels["le"]), sample.value))
            elif sample.name == "homefleet_inferences_total":
                counts[key] += sample.value
            elif sample.name == "homefleet_energy_joules_total":
                joules[key] += sample.value
    numbers = []
    for key in sorted(counts):
        n = counts[key]
        numbers.append(
            ArtifactNumbers(
                device_class=key[0],
                artifact_id=key[1],
                inferences=int(n),
                p95_ms=_p95_ms(sorted(buckets[key]), n),
                energy_mj=joules[key] * 1000 / n if n else None,
            )
        )
    return numbers


def _p95_ms(cumulative: list[tuple[float, float]], count: float) -> float | None:
    """The p95 the controller's decisions quote: /metrics gives cumulative buckets (le),
    which become the shared histogram's counts, then `histogram.percentile` (a bucket's
    upper bound alone would read 5.62 or 31.62 ms for anything in its range)."""
    if not count or len(cumulative) != len(histogram.empty()):
        return None
    seen = [int(value) for _, value in cumulative]
    counts = [b - a for a, b in zip([0, *seen[:-1]], seen, strict=True)]
    p95 = histogram.percentile(counts, 0.95)
    return None if p95 is None else p95 * 1000


def timeline_table(decisions: list[Decision]) -> Table:
    table = Table(title="What the controller decided, and when", title_justify="left")
    table.add_column("t (s)", justify="right")
    table.add_column("decision")
    table.add_column("class/model", overflow="fold")
    table.add_column("why / what", overflow="fold")
    for d in decisions:
        table.add_row(f"{d.at_s:.0f}", d.kind, escape(d.subject), escape(d.message))
    return table


def numbers_table(numbers: list[ArtifactNumbers], budgets: dict[str, float | None]) -> Table:
    table = Table(
        title="Observed on the devices, per class and artifact (whole run)", title_justify="left"
    )
    table.add_column("class")
    table.add_column("artifact", overflow="fold")
    table.add_column("inferences", justify="right")
    table.add_column("p95 ms", justify="right")
    table.add_column("p95 budget", justify="right")
    table.add_column("mJ/inference", justify="right")
    for n in numbers:
        budget = budgets.get(n.device_class)
        p95 = "n/a" if n.p95_ms is None else f"{n.p95_ms:.2f}"
        if n.p95_ms is not None and budget is not None:
            p95 = f"[{'red' if n.p95_ms > budget else 'green'}]{p95}[/]"
        table.add_row(
            n.device_class,
            n.artifact_id,
            f"{n.inferences:,}",
            p95,
            "—" if budget is None else f"{budget:g}",
            "n/a" if n.energy_mj is None else f"{n.energy_mj:.3f}",
        )
    return table
