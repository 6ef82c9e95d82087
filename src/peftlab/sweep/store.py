"""The results store of a sweep: one SQLite file (stdlib sqlite3, WAL journal) in the sweep's output folder.

Table ``runs`` holds one row per expanded run: its id, the fields the sweep file sets for it (``definition``), its
status (queued -> running -> done | failed), attempts, timings, the error text of a failure and the run's record
(the JSON of its ``results.json``, as :class:`~peftlab.record.RunRecord` writes it). Table ``meta`` holds the
sweep's fingerprint (a hash of every run's definition), its name and the file it came from. Each update is one
short transaction, so a sweep killed at any point leaves a consistent store: at worst a row still says
``running``, and the next sweep redoes that run.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import sqlite3
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from peftlab.errors import UserError
from peftlab.record import RunRecord

STORE_FILE = "sweep.sqlite"
STATUSES = ("queued", "running", "done", "failed")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS runs (
    id TEXT PRIMARY KEY,
    position INTEGER NOT NULL,
    definition TEXT NOT NULL,
    status TEXT NOT NULL CHECK (status IN ('queued', 'running', 'done', 'failed')),
    attempts INTEGER NOT NULL DEFAULT 0,
    pid INTEGER,
    queued_at TEXT,
    started_at TEXT,
    finished_at TEXT,
    wall_s REAL,
    exit_code INTEGER,
    error TEXT,
    output_tail TEXT,
    note TEXT,
    results TEXT
);
"""


def now_iso() -> str:
    """The current UTC time, ISO 8601 to the millisecond (parallel runs' start and end times are compared)."""
    return dt.datetime.now(dt.UTC).isoformat(timespec="milliseconds")


@dataclass(frozen=True)
class RunRow:
    """One run as the store records it."""

    id: str
    position: int
    definition: dict[str, Any]
    status: str
    attempts: int
    pid: int | None
    queued_at: str | None
    started_at: str | None
    finished_at: str | None
    wall_s: float | None
    exit_code: int | None
    error: str | None
    output_tail: str | None
    note: str | None
    results: dict[str, Any] | None  # the record's JSON, as stored

    def record(self) -> RunRecord | None:
        """The stored results as a typed record (None for a run that has none)."""
        if self.results is None:
            return None
        return RunRecord.from_dict(self.results, f"sweep store, run {self.id!r}")


def _create_atomically(path: Path) -> None:
    """Write an empty store beside ``path`` and link it into place, so no reader ever sees a file without tables."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.unlink(missing_ok=True)
    conn = sqlite3.connect(tmp, isolation_level=None)
    try:
        conn.executescript(_SCHEMA)  # rollback journal while building: one self-contained file to move
    finally:
        conn.close()
    try:
        os.link(tmp, path)  # fails if another process created the store first; theirs wins
    except FileExistsError:
        pass
    finally:
        tmp.unlink(missing_ok=True)


class SweepStore:
    """Read and update a sweep's SQLite store."""

    def __init__(self, conn: sqlite3.Connection, path: Path) -> None:
        self.conn = conn
        self.path = path

    @classmethod
    def open(cls, folder: str | Path, create: bool = True, read_only: bool = False) -> SweepStore:
        """Open ``folder/sweep.sqlite``; create it (and the folder) when ``create``."""
        path = Path(folder) / STORE_FILE
        if not path.is_file():
            if not create:
                raise UserError(f"{folder}: no {STORE_FILE} here; pass the --output-dir of a `peftlab sweep` run")
            _create_atomically(path)
        try:
            if read_only:
                conn = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True, isolation_level=None)
            else:
                conn = sqlite3.connect(path, isolation_level=None, timeout=30)
                conn.execute("PRAGMA journal_mode=WAL")
                conn.execute("PRAGMA synchronous=FULL")
                conn.executescript(_SCHEMA)
            conn.row_factory = sqlite3.Row
            conn.execute("SELECT count(*) FROM runs").fetchone()
        except sqlite3.DatabaseError as exc:
            raise UserError(f"{path}: not a readable sweep store ({exc}); use a new --output-dir") from None
        return cls(conn, path)

    def close(self) -> None:
        """Close the connection."""
        self.conn.close()

    # --- meta ----------------------------------------------------------------------------------------------
    def get_meta(self, key: str) -> str | None:
        """A meta value, or None."""
        row = self.conn.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return row["value"] if row else None

    def set_meta(self, values: dict[str, str]) -> None:
        """Insert or replace meta values in one transaction."""
        with self.conn:
            self.conn.execute("BEGIN IMMEDIATE")
            self.conn.executemany("INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)", values.items())

    # --- runs ----------------------------------------------------------------------------------------------
    def add_runs(self, runs: list[tuple[str, dict[str, Any]]]) -> int:
        """Insert (id, definition) rows that are not there yet, as queued; return how many were added."""
        stamp = now_iso()
        with self.conn:
            self.conn.execute("BEGIN IMMEDIATE")
            before = self.conn.total_changes
            self.conn.executemany(
                "INSERT OR IGNORE INTO runs (id, position, definition, status, queued_at) "
                "VALUES (?, ?, ?, 'queued', ?)",
                [(rid, i, json.dumps(d, sort_keys=True), stamp) for i, (rid, d) in enumerate(runs)])
            return self.conn.total_changes - before

    def rows(self) -> list[RunRow]:
        """Every run, in sweep order."""
        return [_row(r) for r in self.conn.execute("SELECT * FROM runs ORDER BY position")]

    def row(self, run_id: str) -> RunRow:
        """One run by id."""
        found = self.conn.execute("SELECT * FROM runs WHERE id = ?", (run_id,)).fetchone()
        if found is None:
            raise KeyError(run_id)
        return _row(found)

    def counts(self) -> dict[str, int]:
        """How many runs are in each status."""
        out = dict.fromkeys(STATUSES, 0)
        for r in self.conn.execute("SELECT status, count(*) AS n FROM runs GROUP BY status"):
            out[r["status"]] = r["n"]
        return out

    def requeue_interrupted(self) -> list[str]:
        """Rows left 'running' by a sweep that stopped: back to queued, noted. Returns their ids."""
        with self.conn:
            self.conn.execute("BEGIN IMMEDIATE")
            ids = [r["id"] for r in self.conn.execute("SELECT id FROM runs WHERE status = 'running'")]
            self.conn.execute("UPDATE runs SET status = 'queued', pid = NULL, queued_at = ?, "
                              "note = 'interrupted: the sweep stopped while this run was running' "
                              "WHERE status = 'running'", (now_iso(),))
        return ids

    def mark_running(self, run_id: str, pid: int | None) -> None:
        """A run's process has started."""
        self._update(run_id, "UPDATE runs SET status = 'running', attempts = attempts + 1, pid = ?, started_at = ?, "
                     "finished_at = NULL, wall_s = NULL, exit_code = NULL, error = NULL, output_tail = NULL "
                     "WHERE id = ?", (pid, now_iso(), run_id))

    def mark_done(self, run_id: str, record: RunRecord, wall_s: float | None, exit_code: int | None,
                  note: str | None = None) -> None:
        """A run finished: store its record."""
        self._update(run_id, "UPDATE runs SET status = 'done', pid = NULL, finished_at = ?, wall_s = ?, "
                     "exit_code = ?, error = NULL, note = ?, results = ? WHERE id = ?",
                     (now_iso(), wall_s, exit_code, note, json.dumps(record.to_dict()), run_id))

    def mark_failed(self, run_id: str, error: str, wall_s: float | None, exit_code: int | None,
                    output_tail: str | None) -> None:
        """A run failed: keep its error text and the tail of its output."""
        self._update(run_id, "UPDATE runs SET status = 'failed', pid = NULL, finished_at = ?, wall_s = ?, "
                     "exit_code = ?, error = ?, output_tail = ?, results = NULL WHERE id = ?",
                     (now_iso(), wall_s, exit_code, error, output_tail, run_id))

    def mark_queued(self, run_id: str, note: str) -> None:
        """Put a run back in the queue (e.g. the sweep was interrupted while it ran)."""
        self._update(run_id, "UPDATE runs SET status = 'queued', pid = NULL, queued_at = ?, note = ? WHERE id = ?",
                     (now_iso(), note, run_id))

    def _update(self, run_id: str, sql: str, params: tuple) -> None:
        with self.conn:
            self.conn.execute("BEGIN IMMEDIATE")
            if self.conn.execute(sql, params).rowcount != 1:
                raise KeyError(run_id)


def _row(r: sqlite3.Row) -> RunRow:
    return RunRow(id=r["id"], position=r["position"], definition=json.loads(r["definition"]), status=r["status"],
                  attempts=r["attempts"], pid=r["pid"], queued_at=r["queued_at"], started_at=r["started_at"],
                  finished_at=r["finished_at"], wall_s=r["wall_s"], exit_code=r["exit_code"], error=r["error"],
                  output_tail=r["output_tail"], note=r["note"],
                  results=json.loads(r["results"]) if r["results"] else None)
