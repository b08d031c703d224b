"""The job store: SQLite (WAL) for jobs, uploads and artifact records; files under one directory.

Layout under ``root``::

    jobs.sqlite3        jobs, artifacts, uploads
    uploads/<id>.<ext>  uploaded models and datasets
    artifacts/<job>/    one directory per finished job
    tmp/                work in progress; emptied at start-up

Artifacts appear under ``artifacts/`` by :func:`publish` (fsync the file, rename it into place,
fsync the directory), and the job row that points at them is committed after the rename. An upload
is committed the other way round (:meth:`JobStore.commit_upload`: its row first, then the rename),
so quotas are checked and taken in the same transaction. Either way :meth:`JobStore.reconcile`, at
start-up, drops rows whose file is missing and files (and artifact folders) that no row names, so a
crash at any moment leaves either no record or a complete, hashed file, never an orphan.
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
    created_at REAL NOT NULL, started_at REAL NOT NULL DEFAULT 0, finished_at REAL NOT NULL DEFAULT 0,
    client TEXT NOT NULL DEFAULT ''
);
CREATE INDEX IF NOT EXISTS jobs_state ON jobs(state, seq);
CREATE TABLE IF NOT EXISTS artifacts (
    job_id TEXT NOT NULL, name TEXT NOT NULL, path TEXT NOT NULL, size INTEGER NOT NULL,
    sha256 TEXT NOT NULL, media_type TEXT NOT NULL, PRIMARY KEY (job_id, name)
);
CREATE TABLE IF NOT EXISTS uploads (
    id TEXT PRIMARY KEY, name TEXT NOT NULL, format TEXT NOT NULL, kind TEXT NOT NULL, path TEXT NOT NULL,
    size INTEGER NOT NULL, sha256 TEXT NOT NULL, meta TEXT NOT NULL, created_at REAL NOT NULL,
    client TEXT NOT NULL DEFAULT ''
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
    client: str = ""  # who submitted it (a token's hash or a peer address), for per-client quotas
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
    client: str = ""


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

    def __init__(self, root: str | Path, artifacts_dir: str | Path | None = None) -> None:
        self.root = Path(root)
        self.uploads_dir = self.root / "uploads"
        # Elsewhere (a directory every node of a Ray cluster mounts) when Ray tasks run the jobs.
        self.artifacts_dir = Path(artifacts_dir) if artifacts_dir else self.root / "artifacts"
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
        for table in ("jobs", "uploads"):  # stores from before per-client quotas
            cols = [r[1] for r in self._db.execute(f"PRAGMA table_info({table})")]
            if "client" not in cols:
                self._db.execute(f"ALTER TABLE {table} ADD COLUMN client TEXT NOT NULL DEFAULT ''")

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

    def insert_job(self, spec: bytes, engine: str, client: str = "") -> JobRecord:
        job = JobRecord(uuid.uuid4().hex[:16], QUEUED, spec, engine, created_at=time.time(), client=client)
        with self._tx() as db:
            seq = db.execute("SELECT COALESCE(MAX(seq), 0) + 1 FROM jobs").fetchone()[0]
            db.execute(
                "INSERT INTO jobs (id, seq, state, spec, engine, created_at, client) VALUES (?, ?, ?, ?, ?, ?, ?)",
                (job.id, seq, job.state, job.spec, job.engine, job.created_at, client),
            )
        return job

    def count(self, states: Iterable[str], client: str | None = None) -> int:
        """Jobs in ``states`` (of ``client`` only, when given)."""
        states = list(states)
        q = f"SELECT COUNT(*) FROM jobs WHERE state IN ({','.join('?' * len(states))})"
        params: list[Any] = states
        if client is not None:
            q += " AND client = ?"
            params = [*states, client]
        with self._lock:
            return self._db.execute(q, params).fetchone()[0]

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
                    (job_id, a.name, self._stored_path(a.path), a.size, a.sha256, a.media_type),
                )
            db.execute(
                "UPDATE jobs SET state = ?, progress = 1, stage = 'done', report = ?, finished_at = ? WHERE id = ?",
                (SUCCEEDED, report, time.time(), job_id),
            )
        return True

    def _stored_path(self, path: Path) -> str:
        """Relative to the store's root when inside it (the store can move), else absolute."""
        try:
            return str(path.relative_to(self.root))
        except ValueError:
            return str(path.absolute())

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

    def delete_job(self, job_id: str) -> None:
        """Its rows, then its artifact folder (a crash in between leaves a folder reconcile removes)."""
        with self._tx() as db:
            rows = db.execute("SELECT path FROM artifacts WHERE job_id = ?", (job_id,)).fetchall()
            db.execute("DELETE FROM artifacts WHERE job_id = ?", (job_id,))
            db.execute("DELETE FROM jobs WHERE id = ?", (job_id,))
        # Its folder here, and where its artifacts were written when that was elsewhere (Ray jobs).
        for folder in {self.artifacts_dir / job_id, *((self.root / p).parent for (p,) in rows)}:
            if folder.name == job_id:
                shutil.rmtree(folder, ignore_errors=True)

    def finished_jobs(self) -> list[tuple[str, float]]:
        """(id, finished_at) of every finished job, newest first."""
        with self._lock:
            q = f"SELECT id, finished_at FROM jobs WHERE state IN ({','.join('?' * len(TERMINAL))}) ORDER BY seq DESC"
            return [(r[0], r[1]) for r in self._db.execute(q, sorted(TERMINAL)).fetchall()]

    # Uploads.

    def commit_upload(self, tmp: Path, record: UploadRecord, admit: Any = None) -> None:
        """Publish a checked upload: fsync it, commit its row (``admit()`` inside the transaction
        may refuse it), rename it into place, fsync the folder. The row is removed again if the
        rename fails; a crash before the rename leaves a row that :meth:`reconcile` drops."""
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        with self._tx() as db:
            if admit is not None:
                admit()
            self._insert_upload(db, record)
        try:
            os.replace(tmp, record.path)
            fsync_dir(record.path.parent)
        except BaseException:
            self.delete_upload(record.id)
            raise

    def delete_upload(self, upload_id: str) -> None:
        record = self.get_upload(upload_id)
        with self._tx() as db:
            db.execute("DELETE FROM uploads WHERE id = ?", (upload_id,))
        if record is not None:
            record.path.unlink(missing_ok=True)

    def uploads(self) -> list[UploadRecord]:
        """Every upload, newest first."""
        with self._lock:
            rows = self._db.execute("SELECT id FROM uploads ORDER BY created_at DESC").fetchall()
        return [u for (uid,) in rows if (u := self.get_upload(uid)) is not None]

    def upload_usage(self, client: str | None = None) -> tuple[int, int]:
        """(count, bytes) of stored uploads (of ``client`` only, when given)."""
        q, params = "SELECT COUNT(*), COALESCE(SUM(size), 0) FROM uploads", []
        if client is not None:
            q, params = q + " WHERE client = ?", [client]
        with self._lock:
            count, size = self._db.execute(q, params).fetchone()
        return count, size

    def reconcile(self) -> list[str]:
        """Start-up: drop upload rows without their file, and files and artifact folders no row names."""
        removed = []
        for up in self.uploads():
            if not up.path.is_file():
                with self._tx() as db:
                    db.execute("DELETE FROM uploads WHERE id = ?", (up.id,))
                removed.append(f"upload row {up.id} (file missing)")
        with self._lock:
            named = {r[0] for r in self._db.execute("SELECT path FROM uploads").fetchall()}
            jobs = {r[0] for r in self._db.execute("SELECT id FROM jobs").fetchall()}
        for path in self.uploads_dir.iterdir():
            if str(path.relative_to(self.root)) not in named:
                path.unlink(missing_ok=True) if not path.is_dir() else shutil.rmtree(path, ignore_errors=True)
                removed.append(f"upload file {path.name} (no row)")
        for path in self.artifacts_dir.iterdir():
            if path.name not in jobs:
                shutil.rmtree(path, ignore_errors=True)
                removed.append(f"artifacts {path.name} (no job)")
        return removed

    def insert_upload(self, record: UploadRecord) -> None:
        with self._tx() as db:
            self._insert_upload(db, record)

    def _insert_upload(self, db: sqlite3.Connection, record: UploadRecord) -> None:
        db.execute(
            "INSERT INTO uploads VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
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
                record.client,
            ),
        )

    def get_upload(self, upload_id: str) -> UploadRecord | None:
        with self._lock:
            row = self._db.execute("SELECT * FROM uploads WHERE id = ?", (upload_id,)).fetchone()
        if row is None:
            return None
        uid, name, fmt, kind, path, size, digest, meta, created, client = row
        return UploadRecord(uid, name, fmt, kind, self.root / path, size, digest, json.loads(meta), created, client)

    def count_uploads(self) -> int:
        with self._lock:
            return self._db.execute("SELECT COUNT(*) FROM uploads").fetchone()[0]
