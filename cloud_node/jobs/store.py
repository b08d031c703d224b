"""The job store: SQLite (WAL) for jobs, uploads and artifact records; files under one directory.

Layout under ``root``::

    jobs.sqlite3        jobs, artifacts, uploads
    uploads/<id>.<ext>  uploaded models and datasets
    artifacts/<job>/    one directory per finished job
    tmp/                work in progress; emptied at start-up

Files only ever appear under ``uploads/`` and ``artifacts/`` by :func:`publish` (fsync the file,
rename it into place, fsync the directory), and the database row that points at a file is committed
after the rename, so a crash at any moment leaves either no record or a complete, hashed file.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sqlite3
import threading
import time
import uuid
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

QUEUED, RUNNING, SUCCEEDED, FAILED, CANCELLED = "QUEUED", "RUNNING", "SUCCEEDED", "FAILED", "CANCELLED"
TERMINAL = frozenset({SUCCEEDED, FAILED, CANCELLED})

_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    id TEXT PRIMARY KEY, seq INTEGER NOT NULL, state TEXT NOT NULL, spec BLOB NOT NULL, engine TEXT NOT NULL,
    progress REAL NOT NULL DEFAULT 0, stage TEXT NOT NULL DEFAULT '', message TEXT NOT NULL DEFAULT '',
    report TEXT NOT NULL DEFAULT '', attempts INTEGER NOT NULL DEFAULT 0,
    created_at REAL NOT NULL, started_at REAL NOT NULL DEFAULT 0, finished_at REAL NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS jobs_state ON jobs(state, seq);
CREATE TABLE IF NOT EXISTS artifacts (
    job_id TEXT NOT NULL, name TEXT NOT NULL, path TEXT NOT NULL, size INTEGER NOT NULL,
    sha256 TEXT NOT NULL, media_type TEXT NOT NULL, PRIMARY KEY (job_id, name)
);
CREATE TABLE IF NOT EXISTS uploads (
    id TEXT PRIMARY KEY, name TEXT NOT NULL, format TEXT NOT NULL, kind TEXT NOT NULL, path TEXT NOT NULL,
    size INTEGER NOT NULL, sha256 TEXT NOT NULL, meta TEXT NOT NULL, created_at REAL NOT NULL
);
"""


@dataclass
class ArtifactRecord:
    name: str
    path: Path
    size: int
    sha256: str
    media_type: str


@dataclass
class JobRecord:
    id: str
    state: str
    spec: bytes  # serialized cleave.v1.JobSpec
    engine: str
    progress: float = 0.0
    stage: str = ""
    message: str = ""
    report: str = ""
    attempts: int = 0
    created_at: float = 0.0
    started_at: float = 0.0
    finished_at: float = 0.0
    artifacts: list[ArtifactRecord] = field(default_factory=list)


@dataclass
class UploadRecord:
    id: str
    name: str
    format: str
    kind: str
    path: Path
    size: int
    sha256: str
    meta: dict[str, Any]
    created_at: float


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def publish(src: Path, dst: Path) -> str:
    """Move a finished file into place atomically and durably; returns its sha256."""
    with open(src, "rb+") as f:
        os.fsync(f.fileno())
    digest = sha256_file(src)
    dst.parent.mkdir(parents=True, exist_ok=True)
    os.replace(src, dst)
    fsync_dir(dst.parent)
    return digest


class JobStore:
    """Thread-safe access to the database and the directories; no policy (that is the manager's)."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        self.uploads_dir = self.root / "uploads"
        self.artifacts_dir = self.root / "artifacts"
        self.tmp_dir = self.root / "tmp"
        for d in (self.root, self.uploads_dir, self.artifacts_dir):
            d.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(self.tmp_dir, ignore_errors=True)  # leftovers of a crash: never published
        self.tmp_dir.mkdir()
        self._lock = threading.RLock()
        self._db = sqlite3.connect(self.root / "jobs.sqlite3", check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.executescript(_SCHEMA)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    def temp_path(self, suffix: str = "") -> Path:
        return self.tmp_dir / f"{uuid.uuid4().hex}{suffix}"

    # Jobs.

    def insert_job(self, spec: bytes, engine: str) -> JobRecord:
        job = JobRecord(uuid.uuid4().hex[:16], QUEUED, spec, engine, created_at=time.time())
        with self._tx() as db:
            seq = db.execute("SELECT COALESCE(MAX(seq), 0) + 1 FROM jobs").fetchone()[0]
            db.execute(
                "INSERT INTO jobs (id, seq, state, spec, engine, created_at) VALUES (?, ?, ?, ?, ?, ?)",
                (job.id, seq, job.state, job.spec, job.engine, job.created_at),
            )
        return job

    def count(self, states: Iterable[str]) -> int:
        states = list(states)
        with self._lock:
            q = f"SELECT COUNT(*) FROM jobs WHERE state IN ({','.join('?' * len(states))})"
            return self._db.execute(q, states).fetchone()[0]

    def get_job(self, job_id: str) -> JobRecord | None:
        with self._lock:
            row = self._db.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
            return self._job(row) if row else None

    def list_jobs(self, states: Iterable[str] = (), limit: int = 100) -> list[JobRecord]:
        states = list(states)
        where = f"WHERE state IN ({','.join('?' * len(states))})" if states else ""
        with self._lock:
            rows = self._db.execute(f"SELECT * FROM jobs {where} ORDER BY seq DESC LIMIT ?", (*states, limit))
            return [self._job(r) for r in rows.fetchall()]

    def claim_next(self) -> JobRecord | None:
        """Atomically move the oldest QUEUED job to RUNNING (attempts + 1)."""
        with self._tx() as db:
            row = db.execute("SELECT id FROM jobs WHERE state = ? ORDER BY seq LIMIT 1", (QUEUED,)).fetchone()
            if row is None:
                return None
            db.execute(
                "UPDATE jobs SET state = ?, attempts = attempts + 1, started_at = ?, progress = 0, stage = ?"
                " WHERE id = ?",
                (RUNNING, time.time(), "starting", row[0]),
            )
        return self.get_job(row[0])

    def update(self, job_id: str, *, only_if: Iterable[str] | None = None, **values: Any) -> bool:
        """Set columns of a job; with ``only_if``, only while its state is one of those. True if updated."""
        cols = ", ".join(f"{k} = ?" for k in values)
        params: list[Any] = [*values.values(), job_id]
        q = f"UPDATE jobs SET {cols} WHERE id = ?"
        if only_if is not None:
            only = list(only_if)
            q += f" AND state IN ({','.join('?' * len(only))})"
            params += only
        with self._tx() as db:
            return db.execute(q, params).rowcount > 0

    def finish(self, job_id: str, artifacts: list[ArtifactRecord], report: str) -> bool:
        """SUCCEEDED with its artifacts, in one transaction, unless the job was cancelled meanwhile."""
        with self._tx() as db:
            row = db.execute("SELECT state FROM jobs WHERE id = ?", (job_id,)).fetchone()
            if row is None or row[0] != RUNNING:
                return False
            for a in artifacts:
                db.execute(
                    "INSERT OR REPLACE INTO artifacts VALUES (?, ?, ?, ?, ?, ?)",
                    (job_id, a.name, str(a.path.relative_to(self.root)), a.size, a.sha256, a.media_type),
                )
            db.execute(
                "UPDATE jobs SET state = ?, progress = 1, stage = 'done', report = ?, finished_at = ? WHERE id = ?",
                (SUCCEEDED, report, time.time(), job_id),
            )
        return True

    def _job(self, row: tuple) -> JobRecord:
        cols = [d[0] for d in self._db.execute("SELECT * FROM jobs LIMIT 0").description]
        data = dict(zip(cols, row, strict=True))
        data.pop("seq")
        job = JobRecord(**data)
        rows = self._db.execute(
            "SELECT name, path, size, sha256, media_type FROM artifacts WHERE job_id = ? ORDER BY rowid", (job.id,)
        ).fetchall()
        job.artifacts = [ArtifactRecord(n, self.root / p, s, h, m) for n, p, s, h, m in rows]
        return job

    # Uploads.

    def insert_upload(self, record: UploadRecord) -> None:
        with self._tx() as db:
            db.execute(
                "INSERT INTO uploads VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    record.id,
                    record.name,
                    record.format,
                    record.kind,
                    str(record.path.relative_to(self.root)),
                    record.size,
                    record.sha256,
                    json.dumps(record.meta),
                    record.created_at,
                ),
            )

    def get_upload(self, upload_id: str) -> UploadRecord | None:
        with self._lock:
            row = self._db.execute("SELECT * FROM uploads WHERE id = ?", (upload_id,)).fetchone()
        if row is None:
            return None
        uid, name, fmt, kind, path, size, digest, meta, created = row
        return UploadRecord(uid, name, fmt, kind, self.root / path, size, digest, json.loads(meta), created)

    def count_uploads(self) -> int:
        with self._lock:
            return self._db.execute("SELECT COUNT(*) FROM uploads").fetchone()[0]
