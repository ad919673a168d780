"""The on-disk telemetry queue: every closed window is stored before it is sent.

SQLite (WAL) in the state directory. A window gets its sequence number in the same
transaction that stores it, so numbers are strictly increasing across restarts. The
sender reads the oldest windows, sends them (ReportTelemetry) and deletes only those at
or below the controller's acknowledged ``highest_seq``; the controller stores a
(device, seq) once, so resending after a lost acknowledgement is harmless.

Numbering starts at unix milliseconds times 1000 when the queue file is new: an agent whose
state directory was wiped keeps numbering above everything it sent before (the
controller would otherwise ignore the reused numbers as already stored).

Bounded: above ``max_windows`` the oldest windows that were never handed to a send are
merged per (model, artifact, energy source) into one summary window each, which keeps
the highest seq of what it replaces; the histograms merge exactly. Windows that were
handed to a send are never summarised (the controller may hold them already). The
number of windows folded into summaries is kept and exported as a metric.
"""

from __future__ import annotations

import logging
import sqlite3
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from edge_agent.errors import AgentError, ErrorCode
from edge_agent.telemetry import Window, merge_windows
from protos import fleet_pb2

log = logging.getLogger(__name__)

FILE_NAME = "telemetry.db"
DEFAULT_MAX_WINDOWS = 10_000
_SCHEMA = (
    "CREATE TABLE IF NOT EXISTS windows (seq INTEGER PRIMARY KEY, body BLOB NOT NULL)",
    "CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL)",
)
NEXT_SEQ = "next_seq"
ATTEMPTED_THROUGH = "attempted_through"  # highest seq ever handed to a send
SUMMARISED = "summarised_windows"  # windows folded into summaries, all time
REJECTED = "rejected_windows"  # windows the controller refused as invalid, all time


@dataclass(frozen=True)
class QueueStats:
    depth: int
    summarised_windows: int
    rejected_windows: int


class TelemetryQueue:
    """Thread-safe; every method blocks on SQLite, so call them from worker threads."""

    def __init__(
        self,
        state_dir: Path,
        max_windows: int = DEFAULT_MAX_WINDOWS,
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if max_windows < 2:
            raise ValueError(f"max_windows must be at least 2, got {max_windows}")
        state_dir.mkdir(parents=True, exist_ok=True)
        self.path = state_dir / FILE_NAME
        self.max_windows = max_windows
        self._lock = threading.Lock()
        try:
            self._open(clock)
        except sqlite3.Error as exc:
            raise AgentError(
                ErrorCode.STATE_CORRUPT,
                f"telemetry queue {self.path} cannot be opened ({exc}); move it aside to start "
                "an empty queue (its unsent windows are then lost)",
            ) from exc

    def _open(self, clock: Callable[[], float]) -> None:
        self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")  # a window is on disk once append returns
        with self._transaction():
            for statement in _SCHEMA:
                self._db.execute(statement)
            self._db.execute(
                "INSERT OR IGNORE INTO meta VALUES (?, ?)", (NEXT_SEQ, int(clock() * 1000) * 1000)
            )
            for key in (ATTEMPTED_THROUGH, SUMMARISED, REJECTED):
                self._db.execute("INSERT OR IGNORE INTO meta VALUES (?, 0)", (key,))

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def _transaction(self) -> _Transaction:
        return _Transaction(self._db)

    def _meta(self, key: str) -> int:
        row = self._db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return int(row[0])

    def _set_meta(self, key: str, value: int) -> None:
        self._db.execute("UPDATE meta SET value = ? WHERE key = ?", (value, key))

    # -- producing ------------------------------------------------------------------

    def append(self, windows: list[Window]) -> list[int]:
        """Store ``windows`` with new sequence numbers (returned); summarise if over the bound."""
        with self._lock, self._transaction():
            seq = self._meta(NEXT_SEQ)
            seqs = list(range(seq, seq + len(windows)))
            rows = [
                (s, w.to_proto(s).SerializeToString()) for s, w in zip(seqs, windows, strict=True)
            ]
            self._db.executemany("INSERT INTO windows VALUES (?, ?)", rows)
            self._set_meta(NEXT_SEQ, seq + len(windows))
            self._summarise_if_over()
        return seqs

    def _summarise_if_over(self) -> None:
        depth = self._depth()
        if depth <= self.max_windows:
            return
        attempted = self._meta(ATTEMPTED_THROUGH)
        # Halve the queue at once so summarising is rare, not once per append.
        rows = self._db.execute(
            "SELECT seq, body FROM windows WHERE seq > ? ORDER BY seq LIMIT ?",
            (attempted, depth - self.max_windows // 2),
        ).fetchall()
        groups: dict[tuple[str, str, str], list[tuple[int, Window]]] = {}
        for seq, body in rows:
            window = Window.from_proto(fleet_pb2.TelemetryWindow.FromString(body))
            key = (window.model_name, window.artifact_sha256, window.energy_source)
            groups.setdefault(key, []).append((seq, window))
        folded = 0
        for members in groups.values():
            if len(members) < 2:
                continue
            summary_seq = members[-1][0]
            summary = merge_windows([w for _, w in members])
            self._db.executemany(
                "DELETE FROM windows WHERE seq = ?", [(s,) for s, _ in members[:-1]]
            )
            self._db.execute(
                "UPDATE windows SET body = ? WHERE seq = ?",
                (summary.to_proto(summary_seq).SerializeToString(), summary_seq),
            )
            folded += len(members)
        if folded:
            self._set_meta(SUMMARISED, self._meta(SUMMARISED) + folded)
            log.warning(
                "telemetry queue over its bound of %d windows (controller unreachable?): "
                "merged the %d oldest into summaries; %d windows queued",
                self.max_windows,
                folded,
                self._depth(),
            )
        else:
            log.warning(
                "telemetry queue holds %d windows, over its bound of %d, and none can be "
                "merged (each belongs to a different model, artifact or energy source)",
                depth,
                self.max_windows,
            )

    # -- sending --------------------------------------------------------------------

    def next_batch(self, limit: int) -> list[fleet_pb2.TelemetryWindow]:
        """The oldest ``limit`` windows, marked as handed to a send (never summarised now)."""
        with self._lock, self._transaction():
            rows = self._db.execute(
                "SELECT body FROM windows ORDER BY seq LIMIT ?", (limit,)
            ).fetchall()
            batch = [fleet_pb2.TelemetryWindow.FromString(body) for (body,) in rows]
            if batch:
                self._set_meta(ATTEMPTED_THROUGH, max(self._meta(ATTEMPTED_THROUGH), batch[-1].seq))
            return batch

    def acknowledge(self, highest_seq: int) -> int:
        """Delete every window at or below ``highest_seq``; returns how many were deleted."""
        with self._lock, self._transaction():
            cursor = self._db.execute("DELETE FROM windows WHERE seq <= ?", (highest_seq,))
            return cursor.rowcount

    def reject(self, seqs: list[int]) -> None:
        """Drop windows the controller refused as invalid (resending cannot help); counted."""
        with self._lock, self._transaction():
            self._db.executemany("DELETE FROM windows WHERE seq = ?", [(s,) for s in seqs])
            self._set_meta(REJECTED, self._meta(REJECTED) + len(seqs))

    # -- looking --------------------------------------------------------------------

    def _depth(self) -> int:
        return int(self._db.execute("SELECT COUNT(*) FROM windows").fetchone()[0])

    def stats(self) -> QueueStats:
        with self._lock:
            return QueueStats(
                depth=self._depth(),
                summarised_windows=self._meta(SUMMARISED),
                rejected_windows=self._meta(REJECTED),
            )

    def windows(self) -> list[fleet_pb2.TelemetryWindow]:
        """Everything queued, oldest first (for tests and diagnostics)."""
        with self._lock:
            rows = self._db.execute("SELECT body FROM windows ORDER BY seq").fetchall()
        return [fleet_pb2.TelemetryWindow.FromString(body) for (body,) in rows]


class _Transaction:
    """BEGIN IMMEDIATE ... COMMIT, or ROLLBACK when the block raises."""

    def __init__(self, db: sqlite3.Connection) -> None:
        self._db = db

    def __enter__(self) -> None:
        self._db.execute("BEGIN IMMEDIATE")

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        self._db.execute("COMMIT" if exc_type is None else "ROLLBACK")
