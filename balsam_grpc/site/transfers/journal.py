"""The transfer service's journal: every task, its items and its submission id, written
BEFORE the task is started, in a SQLite file of the site (stdlib sqlite3).

Why: after a crash or kill -9 the daemon finds every task it may have started. A task
whose submission may or may not have reached Globus is submitted again with the same
submission id (Globus accepts a submission id once: the repeat answers with the task
it already made), so a retry cannot start a second task; a local copy resumes and skips
the files already in place. Items merely queued (no task yet) are not journaled: the
server offers them again after a reconnect.
"""

from __future__ import annotations

import json
import sqlite3
import time
from pathlib import Path

from balsam_grpc.site.transfers.model import DONE, ERROR, OPEN_TASK_STATES, Item, ItemOutcome, Task

_SCHEMA = """
CREATE TABLE IF NOT EXISTS tasks (
    key TEXT PRIMARY KEY, location TEXT NOT NULL, direction TEXT NOT NULL, state TEXT NOT NULL,
    submission_id TEXT NOT NULL DEFAULT '', task_id TEXT NOT NULL DEFAULT '', error TEXT NOT NULL DEFAULT '',
    created REAL NOT NULL, submitted REAL NOT NULL DEFAULT 0, finished REAL NOT NULL DEFAULT 0,
    attempts INTEGER NOT NULL DEFAULT 0, bytes INTEGER NOT NULL DEFAULT 0, files INTEGER NOT NULL DEFAULT 0);
CREATE TABLE IF NOT EXISTS items (
    id INTEGER PRIMARY KEY, task_key TEXT NOT NULL REFERENCES tasks(key) ON DELETE CASCADE,
    job_id INTEGER NOT NULL, direction TEXT NOT NULL, location TEXT NOT NULL, remote TEXT NOT NULL,
    local TEXT NOT NULL, recursive INTEGER NOT NULL, slot TEXT NOT NULL DEFAULT '',
    outcome TEXT NOT NULL DEFAULT '');
CREATE INDEX IF NOT EXISTS ix_items_task ON items(task_key);
CREATE INDEX IF NOT EXISTS ix_tasks_state ON tasks(state);
"""


class TransferJournal:
    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self.db = sqlite3.connect(str(path), isolation_level=None, check_same_thread=False)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=FULL")  # a task recorded is on disk before it starts
        self.db.execute("PRAGMA foreign_keys=ON")
        self.db.executescript(_SCHEMA)

    def close(self) -> None:
        self.db.close()

    # ----- writes ---------------------------------------------------------------------
    def add_task(self, task: Task) -> None:
        """Record a new task with its items (one transaction). An item already in another
        task moves to this one (a retry after a failed task)."""
        with self.db:
            self.db.execute(
                "INSERT INTO tasks (key, location, direction, state, submission_id, task_id, created, submitted) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (task.key, task.location, task.direction, task.state, task.submission_id, task.task_id,
                 task.created or time.time(), task.submitted))
            self.db.executemany(
                "INSERT OR REPLACE INTO items (id, task_key, job_id, direction, location, remote, local, recursive, "
                "slot) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                [(i.id, task.key, i.job_id, i.direction, i.location, i.remote, str(i.local), int(i.recursive), i.slot)
                 for i in task.items])

    def add_task_item(self, task: Task, item: Item) -> None:
        with self.db:
            self.db.execute(
                "INSERT OR REPLACE INTO items (id, task_key, job_id, direction, location, remote, local, recursive, "
                "slot) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (item.id, task.key, item.job_id, item.direction, item.location, item.remote, str(item.local),
                 int(item.recursive), item.slot))

    def update_task(self, task: Task, **values: object) -> None:
        for k, v in values.items():
            setattr(task, k, v)
        cols = ", ".join(f"{k} = ?" for k in values)
        with self.db:
            self.db.execute(f"UPDATE tasks SET {cols} WHERE key = ?", (*values.values(), task.key))

    def finish_task(self, task: Task, state: str, outcomes: dict[int, ItemOutcome], *, error: str = "",
                    bytes_: int = 0, files: int = 0, finished: float | None = None) -> None:
        task.state, task.error, task.bytes, task.files = state, error, bytes_, files
        task.finished = finished or time.time()
        task.outcomes = outcomes
        with self.db:
            self.db.execute("UPDATE tasks SET state = ?, error = ?, bytes = ?, files = ?, finished = ? WHERE key = ?",
                            (state, error, bytes_, files, task.finished, task.key))
            self.db.executemany("UPDATE items SET outcome = ? WHERE id = ? AND task_key = ?",
                                [(json.dumps(o.__dict__), item_id, task.key) for item_id, o in outcomes.items()])

    def prune(self, older_than_s: float) -> int:
        """Forget finished tasks older than this (the server has long applied them)."""
        cutoff = time.time() - older_than_s
        with self.db:
            cur = self.db.execute("DELETE FROM tasks WHERE state IN (?, ?) AND finished > 0 AND finished < ?",
                                  (DONE, ERROR, cutoff))
        return cur.rowcount

    # ----- reads ----------------------------------------------------------------------
    def _task(self, row: tuple) -> Task:
        key, location, direction, state, submission_id, task_id, error, created, submitted, finished, attempts, \
            bytes_, files = row
        items, outcomes = [], {}
        for r in self.db.execute("SELECT id, job_id, direction, location, remote, local, recursive, slot, outcome "
                                 "FROM items WHERE task_key = ? ORDER BY id", (key,)):
            items.append(Item(id=r[0], job_id=r[1], direction=r[2], location=r[3], remote=r[4], local=Path(r[5]),
                              recursive=bool(r[6]), slot=r[7]))
            if r[8]:
                outcomes[r[0]] = ItemOutcome(**json.loads(r[8]))
        return Task(key=key, location=location, direction=direction, items=items, state=state,
                    submission_id=submission_id, task_id=task_id, error=error, created=created, submitted=submitted,
                    finished=finished, attempts=attempts, bytes=bytes_, files=files, outcomes=outcomes)

    _COLUMNS = ("key, location, direction, state, submission_id, task_id, error, created, submitted, finished, "
                "attempts, bytes, files")

    def open_tasks(self) -> list[Task]:
        rows = self.db.execute(f"SELECT {self._COLUMNS} FROM tasks WHERE state IN (?, ?) ORDER BY created",
                               OPEN_TASK_STATES).fetchall()
        return [self._task(r) for r in rows]

    def task_of_item(self, item_id: int) -> Task | None:
        row = self.db.execute(f"SELECT {', '.join('t.' + c.strip() for c in self._COLUMNS.split(','))} "
                              "FROM tasks t JOIN items i ON i.task_key = t.key WHERE i.id = ?", (item_id,)).fetchone()
        return self._task(row) if row else None

    def task_by_backend_id(self, location: str, task_id: str) -> Task | None:
        row = self.db.execute(f"SELECT {self._COLUMNS} FROM tasks WHERE location = ? AND task_id = ?",
                              (location, task_id)).fetchone()
        return self._task(row) if row else None

    def count_items(self) -> int:
        return self.db.execute("SELECT COUNT(*) FROM items").fetchone()[0]
