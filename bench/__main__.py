"""`python -m bench` (what `make bench` runs): measure, then write RESULTS.md and plots."""

from __future__ import annotations

import json
import shlex
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

import typer
from rich.console import Console

from bench import compression, delta, ingest, learned, plots, quant_families
from bench.compression import DEVICE_CLASSES, TARGETS
from bench.report import Results, render, splice
from controller.compression.recipe import Distill

console = Console(stderr=True)
app = typer.Typer(add_completion=False)

PLANNER_WORKLOADS = ("plaid", "basic-motions", "italy-power", "minilm")
SECTIONS = (
    "targets",
    "planner",
    "techniques",
    "distillation",
    "quant-families",
    "learned",
    "delta",
    "ingest",
)
DISTILL_STEP = Distill(student="ds-cnn1d", width=1.0)  # the student the PLAID planner picks


@app.command()
def main(
    out: Path = typer.Option(Path("bench/RESULTS.md"), help="Markdown report to write."),
    quick: bool = typer.Option(
        False, help="Smoke run: one small workload, one class, no targets (checks the harness)."
    ),
    sections: str = typer.Option(",".join(SECTIONS), help="Comma-separated sections to run."),
    work_dir: Path = typer.Option(
        Path(".cache/homefleet/bench"),
        help="Kept between runs: the delta section reuses the update pairs it built and the "
        "generic tools' sizes (bsdiff takes ~25 min on MiniLM).",
    ),
) -> None:
    started = time.perf_counter()
    wanted = {s.strip() for s in sections.split(",") if s.strip()}
    unknown = wanted - set(SECTIONS)
    if unknown:
        raise typer.BadParameter(
            f"unknown section(s) {sorted(unknown)}; choose from {', '.join(SECTIONS)}"
        )
    command = "make bench" if len(sys.argv) == 1 else "python -m bench " + shlex.join(sys.argv[1:])
    results = Results(command=command)
    workloads = ("italy-power",) if quick else PLANNER_WORKLOADS
    classes = ("camera",) if quick else DEVICE_CLASSES
    technique_workload = "italy-power" if quick else "plaid"
    seeds = (0,) if quick else (0, 1, 2)

    def progress(message: str) -> None:
        console.print(f"[dim]{time.perf_counter() - started:7.0f} s[/] {message}")

    plot_dir = out.parent / "plots"
    with tempfile.TemporaryDirectory(prefix="homefleet-bench-") as tmp:
        work = Path(tmp)
        if "targets" in wanted and not quick:
            results.targets = compression.target_rows(TARGETS, work, progress)
        if "planner" in wanted:
            results.planner = compression.planner_rows(workloads, classes, work, progress)
            results.plots["planner"] = plots.planner(
                results.planner, plot_dir / "planner-ratios.png"
            )
        if "techniques" in wanted:
            table = compression.technique_table(technique_workload, work, progress)
            results.techniques.append(table)
            results.plots[f"techniques-{technique_workload}"] = plots.techniques(
                table.rows, technique_workload, plot_dir / f"techniques-{technique_workload}.png"
            )
        if "distillation" in wanted:
            results.distillation.append(
                compression.distill_row(technique_workload, DISTILL_STEP, seeds, work, progress)
            )
        if "quant-families" in wanted:
            results.quant_families = quant_families.family_tables(
                quant_families.QUICK_PLANS if quick else quant_families.PLANS,
                work,
                None if quick else work_dir / "quant-families",
                progress,
            )
        if "learned" in wanted and not quick:  # training: minutes, not a smoke test
            results.learned = learned.learned_rows(work, progress)
        if "delta" in wanted and not quick:
            results.delta = delta.delta_rows(work_dir, progress)
        if "ingest" in wanted:
            results.ingest = (
                ingest.ingest_rows(progress, (100,), (ingest.BATCH_WINDOWS,), seconds=2.0)
                if quick
                else ingest.ingest_rows(progress)
            )
    results.seconds = time.perf_counter() - started
    out.parent.mkdir(parents=True, exist_ok=True)
    report = render(results, out)
    raw_path = out.parent / "results.json"
    partial = wanted != set(SECTIONS) and out.exists() and raw_path.exists()
    if partial:  # keep the other sections' stored results
        report = splice(out.read_text(), report, wanted)
    out.write_text(report + "\n")
    raw = {
        "command": results.command,
        "seconds": results.seconds,
        "targets": [
            {"target": asdict(t.target), "row": asdict(t.row), "achieved": t.achieved}
            for t in results.targets
        ],
        "planner": compression.as_json(results.planner),
        "techniques": [asdict(t) for t in results.techniques],
        "distillation": compression.as_json(results.distillation),
        "quant-families": quant_families.as_json(results.quant_families),
        "learned": learned.as_json(results.learned),
        "delta": delta.as_json(results.delta),
        "ingest": ingest.as_json(results.ingest),
    }
    if partial:
        kept = json.loads(raw_path.read_text())
        raw = {**kept, **{s: raw[s] for s in wanted}}
    raw_path.write_text(json.dumps(raw, indent=2) + "\n")
    console.print(f"wrote {out} and {out.parent / 'results.json'}")


if __name__ == "__main__":
    app()
