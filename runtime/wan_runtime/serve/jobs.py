"""The durable job queue: every accepted job and its state in one SQLite file (WAL mode, synchronous FULL),
so that nothing accepted is lost when the server dies at any moment.

A job is ``queued`` -> ``in_progress`` -> ``completed`` | ``failed``. Accepting is one transaction (the
queue-depth check and the insert), committed before the client hears 200. At start, jobs left
``in_progress`` by a killed server go back to ``queued`` (re-run from the start; their outputs are
written whole by temp + rename, so a re-run replaces nothing half-written). Completing is conditional on
the job still being ``in_progress`` under the same attempt, so each job completes exactly once.
A deleted job is gone from every listing at once; if it is running, its outputs are removed when it ends.
"""
from __future__ import annotations

import dataclasses
import json
import pathlib
import sqlite3
import threading
import time
import uuid
from typing import Any

SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT UNIQUE NOT NULL,
    created_at INTEGER NOT NULL,
    status TEXT NOT NULL,
    progress INTEGER NOT NULL DEFAULT 0,
    request TEXT NOT NULL,
    batch_key TEXT,
    error TEXT,
    completed_at INTEGER,
    attempts INTEGER NOT NULL DEFAULT 0,
    completions INTEGER NOT NULL DEFAULT 0,
    deleted INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS jobs_status ON jobs (status, deleted, seq);
"""
ACTIVE = ("queued", "in_progress")


class QueueFull(Exception):
    pass


@dataclasses.dataclass(frozen=True)
class Job:
    id: str
    seq: int
    created_at: int
    status: str
    progress: int
    request: dict
    batch_key: str | None
    error: dict | None
    completed_at: int | None
    attempts: int
    completions: int
    deleted: bool

    @classmethod
    def from_row(cls, row: sqlite3.Row) -> "Job":
        d = dict(row)
        d["request"] = json.loads(d["request"])
        d["error"] = json.loads(d["error"]) if d["error"] else None
        d["deleted"] = bool(d["deleted"])
        return cls(**d)


class JobStore:
    """The jobs table behind one connection and a lock (the HTTP handlers and the worker thread share it)."""

    def __init__(self, path: str | pathlib.Path):
        self.path = pathlib.Path(path)
        self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None, timeout=30)
        self._db.row_factory = sqlite3.Row
        self._lock = threading.Lock()
        with self._lock:
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")
            self._db.executescript(SCHEMA)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def _tx(self, fn):
        """Run ``fn(db)`` in one IMMEDIATE transaction (the write lock taken up front)."""
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                out = fn(self._db)
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")
            return out

    # ------------------------------------------------------------------ the API side
    def add(self, request: dict, batch_key: str | None, max_queue: int, job_id: str | None = None) -> Job:
        """Accept a job (QueueFull when ``max_queue`` jobs are queued or running)."""
        job_id = job_id or new_id()

        def tx(db):
            (depth,) = db.execute(f"SELECT COUNT(*) FROM jobs WHERE status IN {ACTIVE} AND deleted = 0").fetchone()
            if depth >= max_queue:
                raise QueueFull(f"the queue is full ({depth} jobs queued or running; --max-queue {max_queue})")
            db.execute("INSERT INTO jobs (id, created_at, status, request, batch_key) VALUES (?, ?, 'queued', ?, ?)",
                       (job_id, int(time.time()), json.dumps(request), batch_key))
            return db.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()

        return Job.from_row(self._tx(tx))

    def get(self, job_id: str) -> Job | None:
        with self._lock:
            row = self._db.execute("SELECT * FROM jobs WHERE id = ? AND deleted = 0", (job_id,)).fetchone()
        return Job.from_row(row) if row else None

    def list(self, limit: int = 20, after: str | None = None, order: str = "desc") -> tuple[list[Job], bool]:
        """Jobs newest first (``order`` "desc") or oldest first, after the job ``after``; and whether more follow."""
        op, direction = ("<", "DESC") if order == "desc" else (">", "ASC")
        with self._lock:
            start = None
            if after:
                row = self._db.execute("SELECT seq FROM jobs WHERE id = ?", (after,)).fetchone()
                if row is None:
                    raise KeyError(after)
                start = row["seq"]
            where = "deleted = 0" + (f" AND seq {op} ?" if start is not None else "")
            rows = self._db.execute(f"SELECT * FROM jobs WHERE {where} ORDER BY seq {direction} LIMIT ?",
                                    ((start,) if start is not None else ()) + (limit + 1,)).fetchall()
        return [Job.from_row(r) for r in rows[:limit]], len(rows) > limit

    def delete(self, job_id: str) -> Job | None:
        def tx(db):
            row = db.execute("SELECT * FROM jobs WHERE id = ? AND deleted = 0", (job_id,)).fetchone()
            if row is not None:
                db.execute("UPDATE jobs SET deleted = 1 WHERE id = ?", (job_id,))
            return row

        row = self._tx(tx)
        return Job.from_row(row) if row else None

    def counts(self) -> dict[str, int]:
        with self._lock:
            rows = self._db.execute("SELECT status, COUNT(*) FROM jobs WHERE deleted = 0 GROUP BY status").fetchall()
        return {s: 0 for s in ("queued", "in_progress", "completed", "failed")} | {r[0]: r[1] for r in rows}

    # ------------------------------------------------------------------ the worker side
    def recover(self) -> int:
        """At start: jobs a killed server left running go back to the queue. Returns how many."""
        return self._tx(lambda db: db.execute(
            "UPDATE jobs SET status = 'queued', progress = 0 WHERE status = 'in_progress'").rowcount)

    def claim(self, max_batch: int) -> list[Job]:
        """The oldest queued job and up to ``max_batch - 1`` more of its batch key (oldest first), marked
        ``in_progress``; [] when none is queued."""
        def tx(db):
            first = db.execute("SELECT * FROM jobs WHERE status = 'queued' AND deleted = 0 ORDER BY seq LIMIT 1"
                               ).fetchone()
            if first is None:
                return []
            rows = [first]
            if first["batch_key"] is not None and max_batch > 1:
                rows += db.execute("SELECT * FROM jobs WHERE status = 'queued' AND deleted = 0 AND batch_key = ? "
                                   "AND seq > ? ORDER BY seq LIMIT ?",
                                   (first["batch_key"], first["seq"], max_batch - 1)).fetchall()
            ids = [r["id"] for r in rows]
            db.execute(f"UPDATE jobs SET status = 'in_progress', progress = 0, attempts = attempts + 1 "
                       f"WHERE id IN ({','.join('?' * len(ids))})", ids)
            return db.execute(f"SELECT * FROM jobs WHERE id IN ({','.join('?' * len(ids))}) ORDER BY seq",
                              ids).fetchall()

        return [Job.from_row(r) for r in self._tx(tx)]

    def set_progress(self, job_ids: list[str], progress: int) -> None:
        self._tx(lambda db: db.execute(
            f"UPDATE jobs SET progress = ? WHERE status = 'in_progress' AND id IN ({','.join('?' * len(job_ids))})",
            [progress, *job_ids]))

    def finish(self, job: Job, error: dict | None = None) -> bool:
        """Mark a claimed job completed (``error`` None) or failed, if it is still this attempt's; False if
        not (it was deleted: the caller removes its outputs)."""
        status = "failed" if error else "completed"

        def tx(db):
            return db.execute(
                "UPDATE jobs SET status = ?, progress = ?, error = ?, completed_at = ?, completions = completions + 1 "
                "WHERE id = ? AND status = 'in_progress' AND attempts = ? AND deleted = 0",
                (status, 0 if error else 100, json.dumps(error) if error else None, int(time.time()), job.id,
                 job.attempts)).rowcount

        return bool(self._tx(tx))


def new_id() -> str:
    return f"video_{uuid.uuid4().hex}"


def public(job: Job, model: str, extra: dict[str, Any] | None = None) -> dict:
    """The OpenAI video object of a job (Wan's settings beside it under ``wan``)."""
    r = job.request
    return {
        "id": job.id, "object": "video", "model": model, "status": job.status, "progress": job.progress,
        "created_at": job.created_at, "completed_at": job.completed_at, "expires_at": None, "prompt": r["prompt"],
        "seconds": r["seconds"], "size": f"{r['settings']['width']}x{r['settings']['height']}",
        "remixed_from_video_id": None, "error": job.error, **(extra or {}),
    }
