"""Codebook fitting in numpy: levels, indices, error feedback and bit packing.

A group (a tensor, or one output channel of it) shares ``2**bits`` levels. ``kmeans``
starts from the quantiles and runs Lloyd steps; with the values sorted once per group, a
step is one search for the midpoints between levels plus prefix sums, so a whole
embedding table fits in seconds. ``gaussian`` places the Lloyd-Max levels of a Gaussian
fitted to the group: no iterations on the data, but the heavy tails of trained weights
are clipped (on MiniLM's MatMuls it is far worse than k-means). ``keep_zero`` pins one
level at exactly 0, so pruned weights stay pruned.

``gptq_assign`` chooses indices with error feedback (GPTQ's procedure with the codebook
as the rounding grid); ``snap_int8`` moves levels onto the int8 grid for int8 compute;
``pack_indices`` stores indices as bit planes. codebook.py puts all of it in a graph.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
from numpy.typing import NDArray

from controller.compression.errors import CompressionError

Method = Literal["kmeans", "gaussian"]
_CHUNK_ELEMENTS = 1 << 21  # weights fitted at once: bounds the sort's memory


# ------------------------------------------------------------------ fitting


@dataclass(frozen=True)
class Fit:
    """Codebooks of a set of equal-sized groups: levels ascending, an index per value."""

    levels: NDArray[np.float64]  # [groups, 2**bits]
    indices: NDArray[np.uint8]  # [groups, values per group]

    def values(self) -> NDArray[np.float64]:
        """The weights as the codebooks give them back."""
        return np.take_along_axis(self.levels, self.indices.astype(np.intp), axis=1)


def fit_codebooks(
    groups: NDArray[np.floating],
    bits: int,
    *,
    method: Method = "kmeans",
    iterations: int = 15,
    keep_zero: bool = False,
    importance: NDArray[np.floating] | None = None,
) -> Fit:
    """One codebook of ``2**bits`` levels per row of ``groups`` ([groups, values]).

    ``importance`` (broadcast to ``groups``, non-negative) weighs each value's squared
    error: k-means levels become weighted means, the Gaussian a weighted fit.
    """
    if not 1 <= bits <= 8:
        raise CompressionError(f"bits must be between 1 and 8, got {bits}")
    array = np.asarray(groups, dtype=np.float64)
    if array.ndim != 2 or array.size == 0:
        raise CompressionError(f"groups must be a non-empty 2-D array, got shape {array.shape}")
    count = 1 << bits
    if array.shape[1] < count:
        raise CompressionError(
            f"{count} levels ({bits} bits) for groups of {array.shape[1]} weights: a codebook "
            "needs at least as many weights as levels"
        )
    if not np.isfinite(array).all():
        raise CompressionError("the weights contain NaN or infinity")
    weights = np.ones((1, 1)) if importance is None else np.asarray(importance, np.float64)
    try:
        weights = np.broadcast_to(weights, array.shape)
    except ValueError as exc:
        raise CompressionError(
            f"importance of shape {weights.shape} does not broadcast to groups {array.shape}"
        ) from exc
    if not (np.isfinite(weights).all() and (weights >= 0).all()):
        raise CompressionError("importance must be finite and non-negative")
    rows = max(1, _CHUNK_ELEMENTS // array.shape[1])
    levels = np.empty((array.shape[0], count), dtype=np.float64)
    for start in range(0, array.shape[0], rows):
        chunk, chunk_weights = array[start : start + rows], weights[start : start + rows]
        if method == "gaussian":
            levels[start : start + rows] = _gaussian_fit(chunk, chunk_weights, count, keep_zero)
        else:
            levels[start : start + rows] = _kmeans(
                chunk, chunk_weights, count, iterations, keep_zero
            )
    return Fit(levels, assign(array, levels))


def assign(groups: NDArray[np.floating], levels: NDArray[np.float64]) -> NDArray[np.uint8]:
    """Index of the nearest level for every value (levels ascending per row; a value on a
    midpoint goes up)."""
    array = np.asarray(groups, dtype=np.float64)
    out = np.empty(array.shape, dtype=np.uint8)
    rows = max(1, _CHUNK_ELEMENTS // array.shape[1])
    for start in range(0, array.shape[0], rows):
        chunk, lv = array[start : start + rows], levels[start : start + rows]
        keys = _Keys(chunk.min(axis=1, keepdims=True), chunk.max(axis=1, keepdims=True))
        mids = keys.of((lv[:, :-1] + lv[:, 1:]) / 2, clip=True)
        found = np.searchsorted(mids.ravel(), keys.of(chunk).ravel(), side="right")
        found = found.reshape(chunk.shape) - keys.row[:, None] * (lv.shape[1] - 1)
        out[start : start + rows] = found
    return out


@dataclass(frozen=True)
class _Keys:
    """Maps each row's values into its own interval [2r, 2r+1], so one ``searchsorted``
    over all rows compares values of the same row only."""

    low: NDArray[np.float64]  # [rows, 1]
    high: NDArray[np.float64]
    row: NDArray[np.float64] = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "row", np.arange(self.low.shape[0], dtype=np.float64))

    def of(self, values: NDArray[np.float64], *, clip: bool = False) -> NDArray[np.float64]:
        span = np.where(self.high > self.low, self.high - self.low, 1.0)
        unit = (values - self.low) / span
        if clip:  # midpoints beyond the data: keep them inside the row's interval
            unit = np.clip(unit, -0.25, 1.25)
        result: NDArray[np.float64] = unit + 2.0 * self.row[:, None]
        return result


def _kmeans(
    x: NDArray[np.float64],
    weights: NDArray[np.float64],
    count: int,
    iterations: int,
    keep_zero: bool,
) -> NDArray[np.float64]:
    """Weighted Lloyd's algorithm in 1-D per row, from the quantiles.

    Values are sorted once: a cluster is then a run between two midpoints, found by one
    search, and its weighted mean comes from prefix sums. A cluster without weight keeps
    its level.
    """
    groups, n = x.shape
    order = np.argsort(x, axis=1, kind="stable")
    ordered = np.take_along_axis(x, order, axis=1)
    weight = np.take_along_axis(weights, order, axis=1)
    keys = _Keys(ordered[:, :1], ordered[:, -1:])
    sorted_keys = keys.of(ordered).ravel()
    zero = np.zeros((groups, 1))
    sums = np.concatenate([zero, np.cumsum(ordered * weight, axis=1)], axis=1)
    masses = np.concatenate([zero, np.cumsum(weight, axis=1)], axis=1)
    rows = np.arange(groups)[:, None]
    levels = ordered[:, ((np.arange(count) + 0.5) * n / count).astype(np.intp)]
    levels = _pin_zero(levels) if keep_zero else levels
    for _ in range(iterations):
        mids = keys.of((levels[:, :-1] + levels[:, 1:]) / 2, clip=True).ravel()
        inner = np.searchsorted(sorted_keys, mids, side="left").reshape(groups, count - 1)
        inner -= (rows * n).astype(inner.dtype)
        bounds = np.concatenate(
            [np.zeros((groups, 1), dtype=inner.dtype), inner, np.full((groups, 1), n)], axis=1
        )
        mass = masses[rows, bounds[:, 1:]] - masses[rows, bounds[:, :-1]]
        totals = sums[rows, bounds[:, 1:]] - sums[rows, bounds[:, :-1]]
        filled = mass > 1e-12 * np.maximum(masses[:, -1:], 1e-300)
        levels = np.where(filled, totals / np.where(filled, mass, 1.0), levels)
        levels = np.sort(levels, axis=1)
        if keep_zero:
            levels = _pin_zero(levels)
    return levels


def _gaussian_fit(
    x: NDArray[np.float64], weights: NDArray[np.float64], count: int, keep_zero: bool
) -> NDArray[np.float64]:
    """Lloyd-Max levels of the Gaussian with each row's (weighted) mean and deviation."""
    standard = np.asarray(gaussian_levels(count))
    total = np.maximum(weights.sum(axis=1, keepdims=True), 1e-300)
    mean = (weights * x).sum(axis=1, keepdims=True) / total
    deviation = np.sqrt((weights * (x - mean) ** 2).sum(axis=1, keepdims=True) / total)
    levels = mean + deviation * standard[None, :]
    return _pin_zero(levels) if keep_zero else levels


def _pin_zero(levels: NDArray[np.float64]) -> NDArray[np.float64]:
    """Set each row's level nearest 0 to exactly 0 (order is kept: it was the nearest)."""
    pinned = levels.copy()
    pinned[np.arange(levels.shape[0]), np.argmin(np.abs(levels), axis=1)] = 0.0
    return pinned


@functools.cache
def gaussian_levels(count: int) -> tuple[float, ...]:
    """Lloyd-Max levels of the standard normal distribution (minimum mean squared error)."""
    levels = np.linspace(-2.0, 2.0, count) if count > 1 else np.zeros(1)
    erf = np.vectorize(math.erf)
    for _ in range(500):
        edges = np.concatenate([[-np.inf], (levels[:-1] + levels[1:]) / 2, [np.inf]])
        density = np.exp(-0.5 * np.where(np.isfinite(edges), edges, 0.0) ** 2) / math.sqrt(
            2 * math.pi
        )
        density = np.where(np.isfinite(edges), density, 0.0)
        cumulative = 0.5 * (1.0 + erf(edges / math.sqrt(2.0)))
        mass = np.maximum(np.diff(cumulative), 1e-300)
        updated = (density[:-1] - density[1:]) / mass
        if np.allclose(updated, levels, atol=1e-10):
            break
        levels = updated
    return tuple(float(v) for v in levels)


def snap_int8(
    levels: NDArray[np.float64], qmax: int, *, shared_scale: bool
) -> tuple[NDArray[np.int8], NDArray[np.float32]]:
    """Codebook levels on the int8 grid: (int8 levels [groups, L], scale per group).

    The scale maps each group's largest level to ``qmax`` (one scale for all groups with
    ``shared_scale``); levels that round onto the same integer are moved apart, so a
    codebook keeps ``L`` distinct values.
    """
    count = levels.shape[1]
    if count > 2 * qmax + 1:
        raise CompressionError(
            f"{count} levels do not fit on the {2 * qmax + 1} int8 values [-{qmax}, {qmax}]"
        )
    peak = np.abs(levels).max(axis=1)
    if shared_scale:
        peak = np.full_like(peak, peak.max())
    scale = np.where(peak > 0, peak / qmax, 1.0).astype(np.float32)
    q = np.clip(np.rint(levels / scale[:, None].astype(np.float64)), -qmax, qmax)
    for i in range(1, count):  # strictly increasing, then back under qmax
        q[:, i] = np.maximum(q[:, i], q[:, i - 1] + 1)
    for i in range(count - 1, -1, -1):
        top = qmax if i == count - 1 else q[:, i + 1] - 1
        q[:, i] = np.minimum(q[:, i], top)
    return q.astype(np.int8), scale


# ------------------------------------------------------------------ packing


def pack_indices(indices: NDArray[np.integer], bits: int) -> NDArray[np.uint8]:
    """Indices [..., n] as ``bits`` bit planes [..., bits, ceil(n/8)]; uint8 [..., n] at 8."""
    array = np.asarray(indices)
    if bits == 8:
        return array.astype(np.uint8)
    if array.size and (array.min() < 0 or array.max() >= 1 << bits):
        raise CompressionError(f"indices must lie in [0, {(1 << bits) - 1}] for {bits} bits")
    planes = (array[..., None, :].astype(np.uint8) >> np.arange(bits, dtype=np.uint8)[:, None]) & 1
    packed: NDArray[np.uint8] = np.packbits(planes, axis=-1, bitorder="little")
    return packed


def unpack_indices(packed: NDArray[np.uint8], bits: int, count: int) -> NDArray[np.uint8]:
    """Inverse of ``pack_indices`` for ``count`` indices per row."""
    if bits == 8:
        return np.asarray(packed, dtype=np.uint8)[..., :count]
    planes = np.unpackbits(packed, axis=-1, count=count, bitorder="little")
    weights = (1 << np.arange(bits, dtype=np.uint16))[:, None]
    indices: NDArray[np.uint8] = (planes.astype(np.uint16) * weights).sum(axis=-2).astype(np.uint8)
    return indices


# ------------------------------------------------------------------ error feedback


def gptq_assign(
    weights: NDArray[np.floating],
    levels: NDArray[np.float64],
    moment: NDArray[np.float64],
    *,
    damping: float = 0.01,
    block: int = 128,
) -> NDArray[np.uint8]:
    """Codebook indices for ``weights`` [K, N] (y = x @ W) chosen with error feedback.

    GPTQ's procedure with the codebook as the rounding grid: input rows are assigned one
    at a time, largest input power first, and each row's rounding error is spread over
    the rows not yet assigned through the Cholesky factor of the inverse second moment
    of the inputs, so the layer's output error (not the weights') is what stays small.
    ``levels``: [N, L] ascending per column (or [1, L] shared); ``moment``: [K, K].
    """
    w = np.asarray(weights, dtype=np.float64).copy()
    rows, columns = w.shape
    grid = np.broadcast_to(np.asarray(levels, dtype=np.float64), (columns, levels.shape[-1]))
    mids = (grid[:, :-1] + grid[:, 1:]) / 2
    hessian = np.asarray(moment, dtype=np.float64).copy()
    dead = np.diag(hessian) <= 0
    hessian[dead, dead] = 1.0
    order = np.argsort(-np.diag(hessian), kind="stable")
    w, hessian = w[order], hessian[np.ix_(order, order)]
    hessian[np.diag_indices(rows)] += damping * float(np.mean(np.diag(hessian)))
    try:
        upper = np.linalg.cholesky(np.linalg.inv(hessian)).T
    except np.linalg.LinAlgError as exc:
        raise CompressionError(f"the inputs' second moment is not invertible: {exc}") from exc
    chosen = np.empty((rows, columns), dtype=np.uint8)
    every = np.arange(columns)
    for first in range(0, rows, block):
        last = min(first + block, rows)
        part = w[first:last].copy()
        errors = np.empty_like(part)
        for i in range(last - first):
            row = part[i]
            index = (row[:, None] >= mids).sum(axis=1)
            chosen[first + i] = index
            error = (row - grid[every, index]) / upper[first + i, first + i]
            part[i:] -= np.outer(upper[first + i, first + i : last], error)
            errors[i] = error
        w[last:] -= upper[first:last, last:].T @ errors
    result = np.empty_like(chosen)
    result[order] = chosen
    return result
