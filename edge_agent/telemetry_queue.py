"""The on-disk telemetry queue: every closed window is stored before it is sent.

SQLite (WAL) in the state directory. A window gets its sequence number in the same
transaction that stores it, so numbers are strictly increasing across restarts. The
sender reads the oldest windows, sends them (ReportTelemetry) and deletes only those at
or below the controller's acknowledged ``highest_seq``; the controller stores a
(device, seq) once, so resending after a lost acknowledgement is harmless.

Numbering starts at unix milliseconds times 1000 when the queue file is new: an agent whose
state directory was wiped keeps numbering above everything it sent before (the
controller would otherwise ignore the reused numbers as already stored). That fails
when the clock was behind as the file was made (no RTC, before NTP: numbering from about
0) or when the directory was restored from a backup, so the controller's highest seq
for the device has the last word (``number_above``; the sender asks for it as each
session starts, and every acknowledgement carries it): one this queue never sent that
reaches its numbering moves the numbering past it, windows not yet sent renumbered.

Bounded: above ``max_windows`` the oldest windows that were never handed to a send are
merged per (model, artifact, energy source) into one summary window each, which keeps
the highest seq of what it replaces; the histograms merge exactly. Windows that were
handed to a send are never summarised (the controller may hold them already). The
number of windows folded into summaries is kept and exported as a metric.

A file SQLite finds corrupt (not a database, a malformed image) is moved aside under a
timestamped name, as slots.json is, and an empty queue started: the device keeps serving,
and the windows it held (telemetry not yet sent) are kept there for a person, not sent.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sqlite3
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from edge_agent.errors import AgentError, ErrorCode, describe_os_error
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
MAX_SEQ = 2**63 - 1  # SQLite's INTEGER, and the controller's bound on a seq
# What SQLite says of a file that is not (or no longer) a database: move it aside.
_CORRUPT = frozenset({sqlite3.SQLITE_CORRUPT, sqlite3.SQLITE_NOTADB})


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
            try:
                self._open(clock)
            except sqlite3.DatabaseError as exc:
                if getattr(exc, "sqlite_errorcode", 0) & 0xFF not in _CORRUPT:
                    raise  # e.g. busy or read-only: the file itself may be fine
                try:
                    aside = self._set_aside()
                except OSError as move:
                    raise AgentError(
                        ErrorCode.STATE_CORRUPT,
                        f"telemetry queue {self.path} is corrupt ({exc}) and cannot be moved "
                        f"aside ({describe_os_error(move)}); move or delete it to start an "
                        "empty queue",
                    ) from exc
                log.warning(
                    "telemetry queue %s is corrupt (%s): moved it to %s and started an empty "
                    "queue; the telemetry queued in it (windows not yet sent) was set aside "
                    "there and will not be sent",
                    self.path,
                    exc,
                    aside,
                )
                self._open(clock)
        except sqlite3.Error as exc:
            raise AgentError(
                ErrorCode.STATE_CORRUPT,
                f"telemetry queue {self.path} cannot be opened ({exc}); move it aside to start "
                "an empty queue (its unsent windows are then lost)",
            ) from exc

    def _set_aside(self) -> Path:
        """Move the corrupt file (and its write-ahead log) aside; drop its shared-memory index."""
        aside = self.path.with_name(f"{FILE_NAME}.corrupt-{int(time.time())}")
        os.replace(self.path, aside)
        wal = self.path.with_name(f"{FILE_NAME}-wal")
        if wal.exists():  # never replayed into the new file: it belongs to the old one
            os.replace(wal, aside.with_name(f"{aside.name}-wal"))
        self.path.with_name(f"{FILE_NAME}-shm").unlink(missing_ok=True)
        return aside

    def _open(self, clock: Callable[[], float]) -> None:
        db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        try:
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=FULL")  # a window is on disk once append returns
            with _Transaction(db):
                for statement in _SCHEMA:
                    db.execute(statement)
                db.execute(
                    "INSERT OR IGNORE INTO meta VALUES (?, ?)",
                    (NEXT_SEQ, int(clock() * 1000) * 1000),
                )
                # -1: none yet, as a first seq may be 0 (a clock at 1970)
                for key, value in ((ATTEMPTED_THROUGH, -1), (SUMMARISED, 0), (REJECTED, 0)):
                    db.execute("INSERT OR IGNORE INTO meta VALUES (?, ?)", (key, value))
        except BaseException:
            with contextlib.suppress(sqlite3.Error):
                db.close()  # the file may have to be moved aside: let go of it
            raise
        self._db = db

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
        """Delete every window at or below ``highest_seq``; returns how many were deleted.

        First, as ``number_above``: windows not yet sent that the controller's older
        seqs reach are renumbered above them, not deleted. Windows already sent at or
        below ``highest_seq`` are deleted as acknowledged: the controller stored them, or
        skipped them as duplicates of its older windows with those seqs, and resending
        one it stored under a new seq would count it twice."""
        with self._lock, self._transaction():
            moved = self._number_above(highest_seq)
            cursor = self._db.execute("DELETE FROM windows WHERE seq <= ?", (highest_seq,))
            deleted = cursor.rowcount
        if moved is not None:
            _log_jump(highest_seq, moved, deleted)
        return deleted

    def number_above(self, highest_seq: int) -> None:
        """Take the controller's highest stored seq for this device (the sender asks for
        it as a session starts; every acknowledgement carries it too).

        Above every seq this queue handed to a send, it is not one of ours: this device
        id numbered windows before its state directory was lost or restored from a
        backup, and a new window with one of those seqs would be skipped as already
        stored. So when it reaches a queued window not yet sent, or the next seq, the
        windows not yet sent are renumbered from ``highest_seq + 1`` (in order) and new
        ones follow them; a warning says so."""
        with self._lock, self._transaction():
            moved = self._number_above(highest_seq)
        if moved is not None:
            _log_jump(highest_seq, moved, 0)

    def _number_above(self, highest_seq: int) -> int | None:
        """How many windows were renumbered above ``highest_seq``; None: nothing to do."""
        attempted = self._meta(ATTEMPTED_THROUGH)
        if highest_seq <= attempted:  # ours (the usual acknowledgement), or below ours
            return None
        next_seq = self._meta(NEXT_SEQ)
        rows = self._db.execute(
            "SELECT seq, body FROM windows WHERE seq > ? ORDER BY seq", (attempted,)
        ).fetchall()
        reached = highest_seq >= next_seq or (bool(rows) and rows[0][0] <= highest_seq)
        if not reached or highest_seq + 1 + len(rows) > MAX_SEQ:
            return None
        renumbered = []
        for seq, (_, body) in enumerate(rows, start=highest_seq + 1):
            window = fleet_pb2.TelemetryWindow.FromString(body)
            window.seq = seq
            renumbered.append((seq, window.SerializeToString()))
        # out and back in: a new seq may be one an unsent window still holds
        self._db.execute("DELETE FROM windows WHERE seq > ?", (attempted,))
        self._db.executemany("INSERT INTO windows VALUES (?, ?)", renumbered)
        self._set_meta(NEXT_SEQ, max(highest_seq + 1 + len(rows), next_seq))
        return len(rows)

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


def _log_jump(highest_seq: int, renumbered: int, deleted: int) -> None:
    log.warning(
        "the controller holds telemetry windows of this device id up to seq %d, which this "
        "agent never sent: this device numbered them before its state directory was lost, "
        "replaced or restored from a backup (or another agent uses the same device id: give "
        "each its own). Numbering windows above %d so they are not taken for those: %d "
        "queued windows not yet sent renumbered; %d sent ones at or below it deleted as "
        "acknowledged (stored, or skipped as duplicates)",
        highest_seq,
        highest_seq,
        renumbered,
        deleted,
    )


class _Transaction:
    """BEGIN IMMEDIATE ... COMMIT, or ROLLBACK when the block raises."""

    def __init__(self, db: sqlite3.Connection) -> None:
        self._db = db

    def __enter__(self) -> None:
        self._db.execute("BEGIN IMMEDIATE")

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        self._db.execute("COMMIT" if exc_type is None else "ROLLBACK")
