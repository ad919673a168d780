"""Accuracy-aware fallback: keep the nodes that hurt most in float until the drop fits.

Method (the one NNCF's ``quantize_with_accuracy_control`` uses, without re-ranking):

1. Quantize every candidate node and score it. If the drop from the float baseline fits,
   stop.
2. Rank: for each candidate, score the model quantized with *only that node* kept in
   float. Its harm is how much score that recovers over the fully quantized model. This
   measures each node in the context it will really run in (all its neighbours
   quantized), which the reverse probe (quantize one node alone) does not, for the same
   cost of one evaluation per node. When the evaluation budget cannot cover every
   node, the nodes with the largest estimated rounding error (rounding.py: a free
   prior from weights and calibration activations) are measured first and the rest
   follow in prior order; ties in measured harm keep prior order too.
3. Fall back greedily in order of harm: keep the top-k nodes in float for growing k
   (1, 2, 4, ... then bisect between the last k that missed and the first that fit), so
   a model that needs many nodes back costs O(log n) evaluations rather than n.

Every evaluation is a recorded trial; identical exclusion sets are evaluated once. If
nothing fits within the budget, the best-scoring trial wins and ``met`` is False.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

Purpose = Literal["full", "sensitivity", "fallback"]
Build = Callable[[frozenset[str]], Path]
"""Quantize with these extra nodes kept in float; return the written file."""
Evaluate = Callable[[Path], float]


@dataclass(frozen=True)
class QuantizeTrial:
    """One quantized candidate: which nodes stayed float, its size and score."""

    index: int
    purpose: Purpose
    kept_float: tuple[str, ...]  # nodes the search kept in float (user exclusions not listed)
    path: Path | None  # None once the search is over, except for the chosen trial
    bytes: int
    score: float | None
    drop: float | None
    seconds: float


TrialCallback = Callable[[QuantizeTrial], None]


class TrialRunner:
    """Builds and scores exclusion sets, each once, within an evaluation budget."""

    def __init__(
        self,
        build: Build,
        evaluate: Evaluate | None,
        baseline: float | None,
        *,
        budget: int,
        on_trial: TrialCallback | None = None,
    ) -> None:
        self._build = build
        self._evaluate = evaluate
        self._baseline = baseline
        self._on_trial = on_trial
        self.budget = budget
        self.trials: list[QuantizeTrial] = []
        self._cache: dict[frozenset[str], QuantizeTrial] = {}
        self._paths: dict[int, Path] = {}

    @property
    def left(self) -> int:
        return self.budget - len(self.trials)

    def path_of(self, trial: QuantizeTrial) -> Path:
        """Where a trial's model was written (``trial.path`` too, until the search ends)."""
        return self._paths[trial.index]

    def cached(self, kept: frozenset[str]) -> QuantizeTrial | None:
        return self._cache.get(kept)

    def run(
        self, kept: frozenset[str], purpose: Purpose, order: Sequence[str] = ()
    ) -> QuantizeTrial:
        """Build and score one candidate (from the cache when already tried)."""
        if kept in self._cache:
            return self._cache[kept]
        started = time.perf_counter()
        path = self._build(kept)
        score = self._evaluate(path) if self._evaluate else None
        drop = None if score is None or self._baseline is None else self._baseline - score
        ordered = tuple(n for n in order if n in kept) or tuple(sorted(kept))
        trial = QuantizeTrial(
            index=len(self.trials),
            purpose=purpose,
            kept_float=ordered,
            path=path,
            bytes=path.stat().st_size,
            score=score,
            drop=drop,
            seconds=time.perf_counter() - started,
        )
        self.trials.append(trial)
        self._cache[kept] = trial
        self._paths[trial.index] = path
        if self._on_trial:
            self._on_trial(trial)
        return trial


@dataclass(frozen=True)
class FallbackOutcome:
    best: QuantizeTrial
    met: bool
    ranking: tuple[
        tuple[str, float | None], ...
    ]  # (node, measured harm or None), most harmful first


def fits(trial: QuantizeTrial, max_drop: float) -> bool:
    return trial.drop is not None and trial.drop <= max_drop


def rank_by_harm(
    runner: TrialRunner,
    full: QuantizeTrial,
    candidates: Sequence[str],
    prior: Mapping[str, float],
    measure_at_most: int,
) -> list[tuple[str, float | None]]:
    """Harm of each candidate = score with it alone in float minus the full-quantized score."""
    by_prior = sorted(candidates, key=lambda n: -prior.get(n, 0.0))
    measured: list[tuple[str, float]] = []
    for name in by_prior[: max(measure_at_most, 0)]:
        trial = runner.run(frozenset({name}), "sensitivity", (name,))
        if trial.score is not None and full.score is not None:
            measured.append((name, trial.score - full.score))
    measured.sort(key=lambda item: -item[1])
    done = {name for name, _ in measured}
    rest: list[tuple[str, float | None]] = [(n, None) for n in by_prior if n not in done]
    return [*measured, *rest]


def fallback(
    runner: TrialRunner,
    full: QuantizeTrial,
    candidates: Sequence[str],
    prior: Mapping[str, float],
    max_drop: float,
) -> FallbackOutcome:
    """Keep the most harmful nodes in float until the drop fits or the budget runs out."""
    if fits(full, max_drop) or not candidates:
        return FallbackOutcome(full, fits(full, max_drop), ())
    # half of what is left ranks nodes, the rest searches the prefix length
    measure = min(len(candidates), max(runner.left // 2, 1 if runner.left else 0))
    ranking = rank_by_harm(runner, full, candidates, prior, measure)
    order = [name for name, _ in ranking]

    def attempt(k: int) -> QuantizeTrial | None:
        kept = frozenset(order[:k])
        if runner.cached(kept) is None and runner.left <= 0:
            return None
        return runner.run(kept, "fallback", order)

    missed, fitted = 0, None
    k = 1
    while k <= len(order):
        trial = attempt(k)
        if trial is None:
            break
        if fits(trial, max_drop):
            fitted = k
            break
        missed = k
        if k == len(order):
            break
        k = min(k * 2, len(order))
    if fitted is not None:
        lo, hi = missed, fitted
        while hi - lo > 1:
            mid = (lo + hi) // 2
            trial = attempt(mid)
            if trial is None:
                break
            if fits(trial, max_drop):
                hi = mid
            else:
                lo = mid
    best = _best(runner.trials, max_drop)
    return FallbackOutcome(best, fits(best, max_drop), tuple(ranking))


def _best(trials: Sequence[QuantizeTrial], max_drop: float) -> QuantizeTrial:
    """Fewest float nodes among trials that fit (then highest score); else highest score."""
    fitting = [t for t in trials if fits(t, max_drop)]
    if fitting:
        return min(fitting, key=lambda t: (len(t.kept_float), -(t.score or 0.0), t.index))
    scored = [t for t in trials if t.score is not None] or list(trials)
    return max(scored, key=lambda t: (t.score or 0.0, -len(t.kept_float), -t.index))
