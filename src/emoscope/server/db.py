"""Conversation log in SQLite: every request, its reply, per-token scores and alerts.

One writer thread owns the only writing connection and commits each change as it arrives, in
order; readers open their own short-lived connections, which WAL mode lets run beside the
writer. A reply is committed (``synchronous=FULL``) before the client sees its end, so a
response a client has received survives ``kill -9`` of the server. A row still marked
``in_progress`` when the store opens belonged to a server that died mid-reply: it is marked
``incomplete`` then.
"""

from __future__ import annotations

import json
import queue
import sqlite3
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future
from contextlib import closing
from pathlib import Path
from typing import IO, Any

from emoscope.errors import EmoscopeError

SCHEMA = """
CREATE TABLE IF NOT EXISTS conversations (
    id TEXT PRIMARY KEY,
    created REAL NOT NULL,
    finished REAL,
    status TEXT NOT NULL,
    model TEXT NOT NULL,
    messages TEXT NOT NULL,
    reply TEXT,
    finish_reason TEXT,
    steering TEXT,
    emotions TEXT NOT NULL,
    rules TEXT NOT NULL,
    sampling TEXT NOT NULL,
    prompt_tokens INTEGER,
    completion_tokens INTEGER
);
CREATE TABLE IF NOT EXISTS tokens (
    conversation_id TEXT NOT NULL REFERENCES conversations(id),
    idx INTEGER NOT NULL,
    token_id INTEGER NOT NULL,
    text TEXT NOT NULL,
    scores TEXT NOT NULL,
    top TEXT NOT NULL,
    PRIMARY KEY (conversation_id, idx)
);
CREATE TABLE IF NOT EXISTS alerts (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    conversation_id TEXT NOT NULL REFERENCES conversations(id),
    token_index INTEGER NOT NULL,
    rule TEXT NOT NULL,
    emotion TEXT NOT NULL,
    value REAL NOT NULL,
    time REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS alerts_by_emotion ON alerts (emotion, time);
CREATE INDEX IF NOT EXISTS alerts_by_time ON alerts (time);
CREATE INDEX IF NOT EXISTS conversations_by_time ON conversations (created);
"""

STATUSES = ("in_progress", "complete", "incomplete")
_STOP = object()


def _dumps(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, allow_nan=False)


def _connect(path: Path, readonly: bool = False) -> sqlite3.Connection:
    if readonly:
        connection = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=10)
    else:
        connection = sqlite3.connect(path, timeout=10, check_same_thread=False)
    connection.row_factory = sqlite3.Row
    return connection


class ConversationStore:
    """The server's log. Writes go through one thread; reads may come from any thread.

    Example:
        >>> store = ConversationStore("emoscope.db")
        >>> store.begin({...}).result()        # a Future: wait for the commit where it matters
        >>> store.conversation(conversation_id)
    """

    def __init__(self, path: Path | str) -> None:
        self.path = Path(path).expanduser()
        if self.path.is_dir():
            raise EmoscopeError(f"{self.path} is a folder; --db names the database file.")
        if not self.path.parent.is_dir():
            raise EmoscopeError(f"No such folder for the database: {self.path.parent}")
        try:
            self._writer = _connect(self.path)
            self._writer.execute("PRAGMA journal_mode=WAL")
            self._writer.execute("PRAGMA synchronous=FULL")
            self._writer.executescript(SCHEMA)
            self.recovered = self._recover()
        except sqlite3.DatabaseError as exc:
            raise EmoscopeError(f"Cannot use {self.path} as the conversation log: {exc}") from None
        self._jobs: queue.Queue[Any] = queue.Queue()
        self._thread = threading.Thread(target=self._run, name="emoscope-db", daemon=True)
        self._thread.start()

    def _recover(self) -> int:
        """Mark what a previous server left in progress as incomplete; returns how many."""
        with self._writer:
            cursor = self._writer.execute(
                "UPDATE conversations SET status = 'incomplete', finished = ? "
                "WHERE status = 'in_progress'",
                (time.time(),),
            )
        return cursor.rowcount

    # ----- writing (on the writer thread) ----------------------------------------------------

    def _run(self) -> None:
        while True:
            job = self._jobs.get()
            if job is _STOP:
                break
            work, future = job
            if not future.set_running_or_notify_cancel():
                continue
            try:
                with self._writer:  # one transaction per job, committed here
                    result = work(self._writer)
            except Exception as exc:
                print(f"emoscope serve: could not write the log: {exc}", file=sys.stderr)
                future.set_exception(exc)
            else:
                future.set_result(result)
        self._writer.close()

    def _submit(self, work: Callable[[sqlite3.Connection], Any]) -> Future[Any]:
        future: Future[Any] = Future()
        if not self._thread.is_alive():
            future.set_exception(EmoscopeError("The conversation log is closed."))
            return future
        self._jobs.put((work, future))
        return future

    def begin(self, record: dict[str, Any]) -> Future[None]:
        """Record a request as ``in_progress`` before its reply exists."""
        row = (
            record["id"],
            record["created"],
            "in_progress",
            record["model"],
            _dumps(record["messages"]),
            _dumps(record.get("steering")),
            _dumps(record["emotions"]),
            _dumps(record["rules"]),
            _dumps(record["sampling"]),
            record.get("prompt_tokens"),
        )

        def work(db: sqlite3.Connection) -> None:
            db.execute(
                "INSERT INTO conversations (id, created, status, model, messages, steering, "
                "emotions, rules, sampling, prompt_tokens) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                row,
            )

        return self._submit(work)

    def finish(
        self,
        conversation_id: str,
        *,
        status: str,
        reply: str,
        finish_reason: str | None,
        tokens: Sequence[dict[str, Any]],
        alerts: Sequence[dict[str, Any]],
        prompt_tokens: int | None = None,
    ) -> Future[None]:
        """Store a reply with its tokens and alerts and set its status, in one transaction."""
        if status not in STATUSES[1:]:
            raise EmoscopeError(f"status must be complete or incomplete (got {status!r}).")
        token_rows = [
            (
                conversation_id,
                t["index"],
                t["token_id"],
                t["text"],
                _dumps(t["scores"]),
                _dumps(t["top"]),
            )
            for t in tokens
        ]
        alert_rows = [
            (conversation_id, a["token_index"], a["rule"], a["emotion"], a["value"], a["time"])
            for a in alerts
        ]
        finished = time.time()

        def work(db: sqlite3.Connection) -> None:
            db.execute(
                "UPDATE conversations SET status = ?, finished = ?, reply = ?, finish_reason = ?, "
                "completion_tokens = ?, prompt_tokens = COALESCE(?, prompt_tokens) WHERE id = ?",
                (
                    status,
                    finished,
                    reply,
                    finish_reason,
                    len(token_rows),
                    prompt_tokens,
                    conversation_id,
                ),
            )
            db.executemany(
                "INSERT OR REPLACE INTO tokens (conversation_id, idx, token_id, text, scores, top) "
                "VALUES (?, ?, ?, ?, ?, ?)",
                token_rows,
            )
            db.executemany(
                "INSERT INTO alerts (conversation_id, token_index, rule, emotion, value, time) "
                "VALUES (?, ?, ?, ?, ?, ?)",
                alert_rows,
            )

        return self._submit(work)

    def close(self, timeout: float = 10.0) -> None:
        """Write what is queued, then close the writing connection."""
        if self._thread.is_alive():
            self._jobs.put(_STOP)
            self._thread.join(timeout)

    # ----- reading (any thread) ---------------------------------------------------------------

    def conversation(self, conversation_id: str) -> dict[str, Any] | None:
        with closing(_connect(self.path)) as db:
            return read_conversation(db, conversation_id)

    def conversations(self, limit: int = 50) -> list[dict[str, Any]]:
        """The latest conversations, newest first, without their tokens."""
        with closing(_connect(self.path)) as db:
            rows = db.execute(
                "SELECT * FROM conversations ORDER BY created DESC LIMIT ?", (limit,)
            ).fetchall()
            return [_summary(row) for row in rows]

    def alerts(
        self, emotion: str | None = None, since: float | None = None, limit: int = 100
    ) -> list[dict[str, Any]]:
        """Alerts fired at or after ``since`` (seconds since the epoch), oldest first."""
        clauses, values = [], []
        if emotion is not None:
            clauses.append("emotion = ?")
            values.append(emotion)
        if since is not None:
            clauses.append("time >= ?")
            values.append(since)
        where = f"WHERE {' AND '.join(clauses)}" if clauses else ""
        with closing(_connect(self.path)) as db:
            rows = db.execute(
                f"SELECT * FROM alerts {where} ORDER BY time, id LIMIT ?", (*values, limit)
            ).fetchall()
        return [_alert(row, with_conversation=True) for row in rows]


def _summary(row: sqlite3.Row) -> dict[str, Any]:
    return {
        "id": row["id"],
        "created": row["created"],
        "finished": row["finished"],
        "status": row["status"],
        "model": row["model"],
        "messages": json.loads(row["messages"]),
        "reply": row["reply"],
        "finish_reason": row["finish_reason"],
        "steering": json.loads(row["steering"]) if row["steering"] else None,
        "emotions": json.loads(row["emotions"]),
        "alert_rules": json.loads(row["rules"]),
        "sampling": json.loads(row["sampling"]),
        "usage": {
            "prompt_tokens": row["prompt_tokens"],
            "completion_tokens": row["completion_tokens"],
        },
    }


def _alert(row: sqlite3.Row, with_conversation: bool = False) -> dict[str, Any]:
    out = {
        "token_index": row["token_index"],
        "rule": row["rule"],
        "emotion": row["emotion"],
        "value": row["value"],
        "time": row["time"],
    }
    if with_conversation:
        out = {"conversation_id": row["conversation_id"], **out}
    return out


def read_conversation(db: sqlite3.Connection, conversation_id: str) -> dict[str, Any] | None:
    """One conversation with its tokens and alerts, or None."""
    row = db.execute("SELECT * FROM conversations WHERE id = ?", (conversation_id,)).fetchone()
    if row is None:
        return None
    out = _summary(row)
    out["tokens"] = [
        {
            "index": t["idx"],
            "token_id": t["token_id"],
            "text": t["text"],
            "scores": json.loads(t["scores"]),
            "top": json.loads(t["top"]),
        }
        for t in db.execute(
            "SELECT * FROM tokens WHERE conversation_id = ? ORDER BY idx", (conversation_id,)
        )
    ]
    out["alerts"] = [
        _alert(a)
        for a in db.execute(
            "SELECT * FROM alerts WHERE conversation_id = ? ORDER BY token_index, id",
            (conversation_id,),
        )
    ]
    return out


def iter_conversations(path: Path | str) -> Iterator[dict[str, Any]]:
    """Every conversation of a log, oldest first, read-only (a running server may share it)."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise EmoscopeError(f"No such database file: {path}")
    try:
        with closing(_connect(path, readonly=True)) as db:
            ids = [r["id"] for r in db.execute("SELECT id FROM conversations ORDER BY created")]
            for conversation_id in ids:
                record = read_conversation(db, conversation_id)
                if record is not None:
                    yield record
    except sqlite3.DatabaseError as exc:
        raise EmoscopeError(f"{path} is not an emoscope conversation log: {exc}") from None


def export_jsonl(path: Path | str, out: IO[str]) -> int:
    """Write every conversation of the log at ``path`` to ``out``, one JSON object a line."""
    count = 0
    for record in iter_conversations(path):
        out.write(_dumps(record) + "\n")
        count += 1
    return count
