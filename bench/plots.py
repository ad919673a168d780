"""Plots for RESULTS.md: where a reader would rather look than read a table."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # no display here, and none needed
import matplotlib.pyplot as plt

from bench.compression import PlannerRow, TechniqueRow


def techniques(rows: Sequence[TechniqueRow], workload: str, path: Path) -> Path:
    """Bytes (log) against test accuracy, one labelled point per technique."""
    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    for i, row in enumerate(rows):
        point = (row.bytes / 1024, row.test_score * 100)
        ax.scatter(*point, s=40)
        label = row.technique.split(" (")[0]  # the short name; the table has the details
        offset = (5, 4) if i % 2 == 0 else (5, -11)  # alternate, so close points stay legible
        ax.annotate(label, point, fontsize=7, xytext=offset, textcoords="offset points")
    ax.set_xscale("log")
    ax.set_xlabel("artifact size (KiB, log scale)")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(f"{workload}: each technique alone")
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def planner(rows: Sequence[PlannerRow], path: Path) -> Path:
    """Per workload and class: how much smaller and faster the planner's artifact is."""
    labels = [f"{r.workload}\n{r.device_class}" for r in rows]
    xs = range(len(rows))
    fig, ax = plt.subplots(figsize=(max(6.0, 0.7 * len(rows) + 2), 4.2))
    width = 0.4
    ax.bar([x - width / 2 for x in xs], [r.size_ratio for r in rows], width, label="x smaller")
    ax.bar([x + width / 2 for x in xs], [r.st_speedup for r in rows], width,
           label="x faster (1 thread)")  # fmt: skip
    ax.set_xticks(list(xs), labels, fontsize=7)
    ax.axhline(1.0, color="grey", linewidth=0.8)
    ax.set_ylabel("ratio to FP32 source")
    ax.set_title("Planner artifact vs FP32 source, under each class's budgets")
    ax.legend()
    ax.grid(True, axis="y", alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
