"""The answer store: every answer the service gave, on disk (SQLite), keyed by input hash.

Each answer is committed as soon as it arrives, with the number of inputs paid for, so a run
that is interrupted, killed or out of budget loses nothing it paid for, and a rerun asks only
for what is missing. An answer that came back unusable (a NaN / Inf row, or a batch's answer
unusable as a whole: the wrong shape, a body that cannot be decoded) is recorded as such for
each of its inputs, with the reason, so a rerun does not pay for it again. One store belongs
to one service and one of its outputs: opening it for another is an error.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import sqlite3
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

__all__ = ["AnswerStore", "StoreError", "input_key"]

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS answers (key BLOB PRIMARY KEY, answer BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS unusable (key BLOB PRIMARY KEY, reason TEXT NOT NULL);
"""
_CHUNK = 500  # keys per SELECT (SQLite's default limit on host parameters is 32766)


class StoreError(RuntimeError):
    """The store cannot be used (another service's, unreadable, inconsistent)."""


#: A URL's ``user:password@`` (an earlier version recorded it in the service's name).
_USERINFO = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*://)[^/?#\s]*@")
_SCHEME = r"\1"


def input_key(row: np.ndarray) -> bytes:
    """16-byte BLAKE2b of one input exactly as sent (dtype, shape and bytes)."""
    h = hashlib.blake2b(digest_size=16)
    h.update(f"{row.dtype.str}{row.shape}".encode())
    h.update(np.ascontiguousarray(row).tobytes())
    return h.digest()


class AnswerStore:
    """Answers of one service. Not thread-safe: the query client writes from one thread."""

    def __init__(self, path: Path, service_id: str, *, legacy_ids: Iterable[str] = ()) -> None:
        """``legacy_ids``: what a store made by an earlier version recorded for this service
        (its identity without the output): adopted, and re-recorded as ``service_id``."""
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            self._db = sqlite3.connect(path, isolation_level=None)  # explicit transactions
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")  # an answer committed is on disk
            self._db.executescript(_SCHEMA)
        except sqlite3.DatabaseError as exc:
            raise StoreError(f"{path}: not a usable answer store ({exc})") from exc
        recorded = self.meta("service")
        if recorded is None or recorded in set(legacy_ids):
            if recorded is not None:
                log.warning(
                    "%s names this service as an earlier version of the kit did (before stores "
                    "named the output they read, or with the URL's user info); taken as the "
                    "answers of %s",
                    path,
                    service_id,
                )
            self.set_meta("service", service_id)
        elif recorded != service_id:
            raise StoreError(
                f"{path} holds the answers of {_USERINFO.sub(_SCHEME, recorded)}, not of "
                f"{service_id}: give another "
                "--answers file (answers from one service are no use for another)"
            )

    def close(self) -> None:
        self._db.close()

    # -- metadata ---------------------------------------------------------------------

    def meta(self, key: str) -> str | None:
        row = self._db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return None if row is None else str(row[0])

    def set_meta(self, key: str, value: str) -> None:
        self._db.execute("INSERT OR REPLACE INTO meta VALUES (?, ?)", (key, value))

    def update_meta(self, values: dict[str, str | None]) -> None:
        """Set (None: delete) several metadata keys in one transaction."""
        with self._transaction():
            for key, value in values.items():
                if value is None:
                    self._db.execute("DELETE FROM meta WHERE key = ?", (key,))
                else:
                    self.set_meta(key, value)

    def meta_json(self, key: str) -> Any:
        raw = self.meta(key)
        return None if raw is None else json.loads(raw)

    @property
    def spent(self) -> int:
        """Inputs paid for (sent and answered), over every run with this store."""
        return int(self.meta("spent") or 0)

    def abandon(self) -> None:
        """Roll back a write transaction an interrupt left open (one that landed inside a
        rollback), so that what is read next is what is committed."""
        if self._db.in_transaction:
            self._db.execute("ROLLBACK")

    def _begin(self) -> None:
        """Start a write transaction; one left open by a write that an interrupt cut short
        (between its BEGIN and its error handling) never committed, and is rolled back."""
        if self._db.in_transaction:
            self._db.execute("ROLLBACK")
        self._db.execute("BEGIN IMMEDIATE")

    @contextmanager
    def _transaction(self) -> Iterator[None]:
        """One write transaction: committed whole, or rolled back on any error or interrupt."""
        self._begin()
        try:
            yield
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        self._db.execute("COMMIT")

    def add_spent(self, n: int, meta: dict[str, str] | None = None) -> None:
        """``n`` more inputs paid for, with ``meta`` keys set in the same transaction."""
        with self._transaction():
            self.set_meta("spent", str(self.spent + n))
            for key, value in (meta or {}).items():
                self.set_meta(key, value)

    def __len__(self) -> int:
        return int(self._db.execute("SELECT COUNT(*) FROM answers").fetchone()[0])

    # -- answers ----------------------------------------------------------------------

    def layout(self) -> tuple[np.dtype[Any], tuple[int, ...]] | None:
        """The recorded answers' dtype and row shape (None: none recorded yet)."""
        layout = self.meta_json("layout")
        if layout is None:
            return None
        return np.dtype(str(layout["dtype"])), tuple(int(d) for d in layout["shape"])

    def _layout(self, answer: np.ndarray) -> tuple[str, tuple[int, ...]]:
        """The answers' dtype and row shape, fixed by the first answer stored."""
        layout = self.meta_json("layout")
        if layout is None:
            layout = {"dtype": answer.dtype.str, "shape": list(answer.shape[1:])}
            self.set_meta("layout", json.dumps(layout))
        dtype, shape = str(layout["dtype"]), tuple(int(d) for d in layout["shape"])
        if answer.dtype.str != dtype or answer.shape[1:] != shape:
            raise StoreError(
                f"the service answered {answer.dtype} {list(answer.shape[1:])} per input, but "
                f"earlier answers in {self.path} are {np.dtype(dtype)} {list(shape)}"
            )
        return dtype, shape

    def put(
        self,
        keys: list[bytes],
        answers: np.ndarray,
        paid: int,
        unusable: dict[bytes, str] | None = None,
    ) -> None:
        """Record ``answers`` ([n, ...]) for ``keys``, the ``unusable`` answers (key ->
        why) and ``paid`` more inputs paid for, in one transaction."""
        with self._transaction():
            if len(keys):
                self._layout(answers)
            self._db.executemany(
                "INSERT OR REPLACE INTO answers VALUES (?, ?)",
                (
                    (k, np.ascontiguousarray(a).tobytes())
                    for k, a in zip(keys, answers, strict=True)
                ),
            )
            self._db.executemany(
                "INSERT OR REPLACE INTO unusable VALUES (?, ?)", (unusable or {}).items()
            )
            self.set_meta("spent", str(self.spent + paid))

    def put_unusable(self, unusable: dict[bytes, str], paid: int) -> None:
        """Record a batch answered unusably as a whole: each of its inputs as unusable (key ->
        why) and ``paid`` more inputs paid for, in one transaction."""
        self.put([], np.empty((0,)), paid, unusable)

    def _select(self, table: str, column: str, keys: list[bytes]) -> Iterable[tuple[bytes, Any]]:
        """(key, ``column``) of the rows of ``table`` among ``keys``, in chunks."""
        for i in range(0, len(keys), _CHUNK):
            part = keys[i : i + _CHUNK]
            marks = ",".join("?" * len(part))
            query = f"SELECT key, {column} FROM {table} WHERE key IN ({marks})"
            for k, value in self._db.execute(query, part):
                yield bytes(k), value

    def unusable(self, keys: Iterable[bytes]) -> dict[bytes, str]:
        """The inputs among ``keys`` whose answer came back unusable, and why."""
        return {k: str(reason) for k, reason in self._select("unusable", "reason", list(keys))}

    def forget_unusable(self) -> int:
        """Drop every unusable record (they will be asked for again); how many there were."""
        with self._transaction():
            n = int(self._db.execute("SELECT COUNT(*) FROM unusable").fetchone()[0])
            self._db.execute("DELETE FROM unusable")
        return n

    def get(self, keys: Iterable[bytes]) -> dict[bytes, np.ndarray]:
        """The recorded answers among ``keys``."""
        layout = self.meta_json("layout")
        if layout is None:
            return {}
        dtype, shape = np.dtype(str(layout["dtype"])), tuple(int(d) for d in layout["shape"])
        return {
            k: np.frombuffer(blob, dtype=dtype).reshape(shape)
            for k, blob in self._select("answers", "answer", list(keys))
        }
