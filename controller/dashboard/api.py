"""The dashboard's JSON views: the fleet, the classes and their budgets, telemetry over
time, and the budget loop's decisions — read from the store, shaped as pydantic models.

Every view takes already-parsed query parameters; ``parse_*`` functions bound and check
them and raise ``BadRequest`` naming the parameter and the accepted values, so a bad URL
gets a 400 that says what to fix and never reaches the store.
"""

from __future__ import annotations

import math
import re
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, ConfigDict, JsonValue

from artifact.names import InvalidNameError, check_name
from controller.device_classes import DeviceClass
from controller.records import EventRecord
from controller.store import MAX_SERIES, MAX_SERIES_BUCKETS, Store, TelemetrySeries

# /api/series
DEFAULT_RANGE_MS = 60 * 60 * 1000
MAX_RANGE_MS = 31 * 24 * 60 * 60 * 1000
DEFAULT_BUCKETS = 60
MAX_BUCKETS = MAX_SERIES_BUCKETS
# /api/decisions
DEFAULT_DECISIONS = 200
MAX_DECISIONS = 1000
DECISION_PREFIXES = ("budget.", "rollout.")
EVENT_PAGE = 1000
MAX_ROLLOUTS = 100
# A timestamp far enough in the future to be a mistake (year 2286).
MAX_UNIX_MS = 10**13

# The state a rollout is in after an event of this kind.
ROLLOUT_STATES = {
    "rollout.recompress": "recompressing",
    "rollout.canary": "canary",
    "rollout.promote": "promoted",
    "rollout.rollback": "rolled back",
    "rollout.failed": "failed",
    "rollout.aborted": "aborted",
}

Query = Mapping[str, list[str]]
_INTEGER = re.compile(r"-?[0-9]{1,19}")


class BadRequest(ValueError):
    """A query parameter out of bounds or malformed; the message says what is accepted."""


class _Out(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


# ---------------------------------------------------------------- fleet


class DeviceModelOut(_Out):
    model: str
    desired_artifact_id: str
    serving_artifact_id: str
    last_outcome: str


class DeviceOut(_Out):
    device_id: str
    device_class: str
    online: bool
    last_seen_unix_ms: int
    agent_version: str
    models: list[DeviceModelOut]


class ClassCountOut(_Out):
    device_class: str
    devices: int
    online: int


class FleetOut(_Out):
    devices: list[DeviceOut]  # one page, in device-id order
    classes: list[ClassCountOut]  # over the whole fleet
    total: int  # devices in the whole fleet
    next_after: str  # pass as ``after`` for the next page; "" on the last page


DEFAULT_FLEET_PAGE = 200
MAX_FLEET_PAGE = 10_000


@dataclass(frozen=True)
class FleetQuery:
    after: str  # the last device id of the previous page; "" for the first
    limit: int


def parse_fleet_query(query: Query) -> FleetQuery:
    """``after``: a device id (the previous page's last); ``limit``: devices per page."""
    only_parameters(query, {"after", "limit"})
    limit = _int(query, "limit", default=DEFAULT_FLEET_PAGE, low=1, high=MAX_FLEET_PAGE)
    after = query.get("after", [""])
    if len(after) > 1:
        raise BadRequest("query parameter 'after' given 2 times; give it once")
    if after[0]:
        try:
            check_name(after[0], field="query parameter 'after' (a device id)")
        except InvalidNameError as exc:
            raise BadRequest(str(exc)) from exc
    return FleetQuery(after=after[0], limit=limit)


def fleet(store: Store, query: FleetQuery) -> FleetOut:
    """One page of devices with what each serves, and device counts per class."""
    views = store.list_devices(after=query.after, limit=query.limit + 1)
    more = len(views) > query.limit
    views = views[: query.limit]
    devices = [
        DeviceOut(
            device_id=v.device.device_id,
            device_class=v.device.device_class,
            online=v.online,
            last_seen_unix_ms=v.device.last_seen_unix_ms,
            agent_version=v.device.agent_version,
            models=[
                DeviceModelOut(
                    model=m.model_name,
                    desired_artifact_id=m.desired_artifact_id,
                    serving_artifact_id=m.serving_artifact_id,
                    last_outcome=m.last_outcome.value if m.last_outcome else "",
                )
                for m in v.models
            ],
        )
        for v in views
    ]
    counts = [
        ClassCountOut(device_class=c.device_class, devices=c.devices, online=c.online)
        for c in store.count_devices()
    ]
    return FleetOut(
        devices=devices,
        classes=counts,
        total=sum(c.devices for c in counts),
        next_after=devices[-1].device_id if more and devices else "",
    )


# ---------------------------------------------------------------- classes


class ClassOut(_Out):
    name: str
    description: str
    declared: bool  # False: devices report this class but no device-class file declares it
    p95_budget_ms: float | None
    energy_budget_mj: float | None
    devices: int
    online: int


class ClassesOut(_Out):
    classes: list[ClassOut]


def classes(store: Store, declared: Mapping[str, DeviceClass]) -> ClassesOut:
    """The declared classes with their budgets, plus any class devices report undeclared."""
    counts = {c.device_class: c for c in store.count_devices()}
    out = []
    for name in sorted(set(declared) | set(counts)):
        spec = declared.get(name)
        count = counts.get(name)
        out.append(
            ClassOut(
                name=name,
                description=spec.description if spec else "",
                declared=spec is not None,
                p95_budget_ms=spec.budgets.p95_latency_ms if spec else None,
                energy_budget_mj=spec.budgets.energy_per_inference_mj if spec else None,
                devices=count.devices if count else 0,
                online=count.online if count else 0,
            )
        )
    return ClassesOut(classes=out)


# ---------------------------------------------------------------- series


class SeriesQuery(_Out):
    since_unix_ms: int
    until_unix_ms: int
    buckets: int

    @property
    def bucket_ms(self) -> int:
        return math.ceil((self.until_unix_ms - self.since_unix_ms) / self.buckets)


class PointOut(_Out):
    start_unix_ms: int
    count: int
    errors: int
    p95_ms: float | None
    energy_per_inference_mj: float | None


class SeriesOut(_Out):
    device_class: str
    model: str
    artifact_id: str
    points: list[PointOut]


class SeriesListOut(_Out):
    since_unix_ms: int
    until_unix_ms: int
    bucket_ms: int
    buckets: int
    series: list[SeriesOut]  # the busiest MAX_SERIES
    omitted_series: int  # quieter series with data in the range, not in ``series``
    max_series: int


def parse_series_query(query: Query, now_unix_ms: int) -> SeriesQuery:
    """``since`` and ``until`` (unix ms, default: the last hour) and ``buckets`` (1-240)."""
    only_parameters(query, {"since", "until", "buckets"})
    until = _int(query, "until", default=now_unix_ms, low=1, high=MAX_UNIX_MS)
    since = _int(query, "since", default=until - DEFAULT_RANGE_MS, low=0, high=MAX_UNIX_MS)
    buckets = _int(query, "buckets", default=DEFAULT_BUCKETS, low=1, high=MAX_BUCKETS)
    if since >= until:
        raise BadRequest(f"since ({since}) must be before until ({until})")
    if until - since > MAX_RANGE_MS:
        raise BadRequest(
            f"until - since is {until - since} ms; at most {MAX_RANGE_MS} ms (31 days) is served"
        )
    return SeriesQuery(since_unix_ms=since, until_unix_ms=until, buckets=buckets)


def series(store: Store, q: SeriesQuery) -> SeriesListOut:
    """p95 and energy per inference per (class, model, artifact) and time bucket."""
    found = store.telemetry_series(q.since_unix_ms, q.until_unix_ms, q.bucket_ms)
    return SeriesListOut(
        since_unix_ms=q.since_unix_ms,
        until_unix_ms=q.until_unix_ms,
        bucket_ms=q.bucket_ms,
        buckets=q.buckets,
        series=[_series(s) for s in found.series],
        omitted_series=found.omitted,
        max_series=MAX_SERIES,
    )


def _series(s: TelemetrySeries) -> SeriesOut:
    return SeriesOut(
        device_class=s.device_class,
        model=s.model_name,
        artifact_id=s.artifact_id,
        points=[
            PointOut(
                start_unix_ms=p.start_unix_ms,
                count=p.count,
                errors=p.errors,
                p95_ms=None if p.p95_seconds is None else p.p95_seconds * 1000,
                energy_per_inference_mj=(
                    None if p.joules_per_inference is None else p.joules_per_inference * 1000
                ),
            )
            for p in s.points
        ],
    )


# ---------------------------------------------------------------- decisions


class DecisionOut(_Out):
    id: int
    unix_ms: int
    kind: str
    subject: str
    message: str
    detail: dict[str, JsonValue]


class RolloutOut(_Out):
    rollout_id: str
    device_class: str
    model: str
    state: str
    artifact_id: str
    baseline_artifact_id: str
    started_unix_ms: int
    updated_unix_ms: int
    baseline_p95_ms: float | None
    canary_p95_ms: float | None
    p95_budget_ms: float | None
    reason: str


class DecisionsOut(_Out):
    decisions: list[DecisionOut]  # newest last
    rollouts: list[RolloutOut]  # most recently updated first


def parse_decisions_query(query: Query) -> int:
    """``limit``: how many of the newest decisions to return (1-1000)."""
    only_parameters(query, {"limit"})
    return _int(query, "limit", default=DEFAULT_DECISIONS, low=1, high=MAX_DECISIONS)


def decisions(store: Store, limit: int) -> DecisionsOut:
    """The newest ``limit`` budget./rollout. events, and every rollout's latest state.

    Decisions are rare (one per budget miss or rollout step), so reading them all in pages
    is cheap; only the newest ``limit`` are kept in memory.
    """
    newest: deque[EventRecord] = deque(maxlen=limit)
    rollouts: dict[str, RolloutOut] = {}
    events: list[EventRecord] = []
    for prefix in DECISION_PREFIXES:
        events.extend(_all_events(store, prefix))
    for event in sorted(events, key=lambda e: e.id):
        newest.append(event)
        _track_rollout(rollouts, event)
    latest = sorted(rollouts.values(), key=lambda r: r.updated_unix_ms, reverse=True)
    return DecisionsOut(
        decisions=[
            DecisionOut(
                id=e.id,
                unix_ms=e.unix_ms,
                kind=e.kind,
                subject=e.subject,
                message=e.message,
                detail=e.detail,
            )
            for e in newest
        ],
        rollouts=latest[:MAX_ROLLOUTS],
    )


def _all_events(store: Store, prefix: str) -> list[EventRecord]:
    found: list[EventRecord] = []
    after = 0
    while True:
        page = store.list_events(after, EVENT_PAGE, prefix)
        found.extend(page)
        if len(page) < EVENT_PAGE:
            return found
        after = page[-1].id


def _track_rollout(rollouts: dict[str, RolloutOut], event: EventRecord) -> None:
    state = ROLLOUT_STATES.get(event.kind)
    detail = event.detail
    raw_id = detail.get("rollout_id")  # the budget loop writes the rollouts table's id
    rollout_id = str(raw_id) if isinstance(raw_id, int | str) and raw_id != "" else ""
    if state is None or not rollout_id:
        return
    before = rollouts.get(rollout_id)
    # A later event names only what it knows; the rest is carried over from earlier ones.
    known = before.model_dump() if before else {}
    texts = ("device_class", "model", "artifact_id", "baseline_artifact_id", "reason")
    numbers = ("baseline_p95_ms", "canary_p95_ms", "p95_budget_ms")
    merged: dict[str, Any] = {k: _text(detail, k) or known.get(k, "") for k in texts}
    for k in numbers:
        value = _number(detail, k)
        merged[k] = value if value is not None else known.get(k)
    rollouts[rollout_id] = RolloutOut(
        rollout_id=rollout_id,
        state=state,
        started_unix_ms=known.get("started_unix_ms", event.unix_ms),
        updated_unix_ms=event.unix_ms,
        **merged,
    )


def _text(detail: Mapping[str, Any], key: str) -> str:
    value = detail.get(key)
    return value if isinstance(value, str) else ""


def _number(detail: Mapping[str, Any], key: str) -> float | None:
    value = detail.get(key)
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value) if math.isfinite(value) else None


# ---------------------------------------------------------------- query parsing


def only_parameters(query: Query, accepted: set[str]) -> None:
    """BadRequest naming the first parameter not in ``accepted``."""
    unknown = sorted(set(query) - accepted)
    if unknown:
        names = ", ".join(sorted(accepted)) or "none"
        raise BadRequest(f"unknown query parameter {unknown[0]!r}; accepted: {names}")


def _int(query: Query, name: str, *, default: int, low: int, high: int) -> int:
    values = query.get(name)
    if not values:
        return default
    if len(values) > 1:
        raise BadRequest(f"query parameter {name!r} given {len(values)} times; give it once")
    raw = values[0]
    if not _INTEGER.fullmatch(raw):
        raise BadRequest(f"query parameter {name!r} must be an integer, got {raw[:40]!r}")
    value = int(raw)
    if not low <= value <= high:
        raise BadRequest(f"query parameter {name!r} must be in {low}..{high}, got {value}")
    return value
