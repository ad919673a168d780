"""The on-disk telemetry queue: numbering across restarts, the bound, what a send holds."""

from __future__ import annotations

import logging
import random
from pathlib import Path

import pytest

from artifact import histogram
from edge_agent.meters import NoMeter
from edge_agent.telemetry import Sample, Telemetry, Window
from edge_agent.telemetry_queue import TelemetryQueue

SHA_A = "a" * 64
SHA_B = "b" * 64


def window(model: str, sha: str, latencies: list[float], start_ms: int) -> Window:
    """A closed window built through Telemetry's own aggregation."""
    telemetry = Telemetry(NoMeter(), clock=lambda: start_ms / 1000)
    for i, latency in enumerate(latencies):
        telemetry.record(Sample(model, sha, latency, latency / 2, 0.1, 1000 + i, ok=i % 7 != 3))
    (closed,) = telemetry.close_windows()
    return closed


def test_sequence_numbers_increase_across_a_restart_and_windows_survive_it(
    tmp_path: Path,
) -> None:
    queue = TelemetryQueue(tmp_path)
    first = queue.append([window("m", SHA_A, [0.001], 1000), window("n", SHA_B, [0.002], 1000)])
    queue.close()  # the agent stops (or crashes: every append is committed)
    reopened = TelemetryQueue(tmp_path)
    assert [w.seq for w in reopened.windows()] == first
    second = reopened.append([window("m", SHA_A, [0.003], 2000)])
    assert second[0] > first[-1] and first[1] == first[0] + 1
    assert [w.model_name for w in reopened.windows()] == ["m", "n", "m"]
    reopened.close()


def test_a_wiped_state_directory_keeps_numbering_above_what_was_sent(tmp_path: Path) -> None:
    old = TelemetryQueue(tmp_path / "a", clock=lambda: 1_000.0)
    sent = old.append([window("m", SHA_A, [0.001], 1000)] * 5)
    fresh = TelemetryQueue(tmp_path / "b", clock=lambda: 1_001.0)  # a second later, wiped
    assert fresh.append([window("m", SHA_A, [0.001], 1000)])[0] > sent[-1]


def test_over_the_bound_the_oldest_windows_are_summarised_exactly_never_dropped(
    tmp_path: Path,
) -> None:
    queue = TelemetryQueue(tmp_path, max_windows=10)
    originals = [
        window("m" if i % 3 else "n", SHA_A if i % 3 else SHA_B, [1e-4 * (i + 1)] * (i + 1), i)
        for i in range(40)
    ]
    for w in originals:
        queue.append([w])
    stored = queue.windows()
    assert len(stored) <= 10
    seqs = [w.seq for w in stored]
    assert seqs == sorted(set(seqs))
    for model in ("m", "n"):
        mine = [w for w in originals if w.model_name == model]
        kept = [w for w in stored if w.model_name == model]
        assert sum(w.count for w in kept) == sum(w.count for w in mine)
        assert sum(w.errors for w in kept) == sum(w.errors for w in mine)
        assert histogram.merge(*(list(w.latency_bucket_counts) for w in kept)) == histogram.merge(
            *(w.latency_bucket_counts for w in mine)
        )
        assert min(w.start_unix_ms for w in kept) == min(w.start_unix_ms for w in mine)
        assert max(w.peak_memory_bytes for w in kept) == max(w.peak_memory_bytes for w in mine)
    stats = queue.stats()
    assert stats.depth == len(stored)
    assert stats.summarised_windows >= 40 - 10  # said so in a metric


def test_windows_handed_to_a_send_are_never_summarised(tmp_path: Path) -> None:
    queue = TelemetryQueue(tmp_path, max_windows=4)
    queue.append([window("m", SHA_A, [0.001], i) for i in range(3)])
    in_flight = queue.next_batch(3)  # the controller may already hold these
    queue.append([window("m", SHA_A, [0.002], 10 + i) for i in range(6)])
    stored = queue.windows()
    assert stored[:3] == in_flight
    assert all(w.count == 1 for w in stored[:3]) and sum(w.count for w in stored) == 9
    assert queue.acknowledge(in_flight[-1].seq) == 3
    assert queue.windows() == stored[3:]


def test_a_corrupt_queue_file_is_moved_aside_and_an_empty_queue_started(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    queue = TelemetryQueue(tmp_path)
    queue.append([window("m", SHA_A, [0.001], 1000)])
    queue.close()
    garbage = random.Random(7).randbytes(50_000)  # `head -c 50000 /dev/urandom > ...`
    (tmp_path / "telemetry.db").write_bytes(garbage)

    fresh = TelemetryQueue(tmp_path)
    assert fresh.windows() == [] and fresh.stats().depth == 0
    seqs = fresh.append([window("m", SHA_A, [0.002], 2000)])  # and it works
    assert [w.seq for w in fresh.windows()] == seqs
    fresh.close()
    (aside,) = tmp_path.glob("telemetry.db.corrupt-*")
    assert aside.read_bytes() == garbage  # kept for a person, not deleted
    (warning,) = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert str(aside) in warning.getMessage() and "set aside" in warning.getMessage()
