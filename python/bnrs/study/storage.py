"""The study's results database: one SQLite file, one row per finished run.

Design, so that a study can be interrupted, resumed and shared:

* A run's key is a hash of its configuration (:class:`bnrs.study.train.RunConfig`,
  which includes the protocol version and the data fingerprint) and its seed. Questions
  that need the same configuration look up the same key and share the run.
* A run is written once it has finished, in one short transaction
  (``INSERT OR IGNORE``): a killed process leaves either the whole row or nothing, and a
  second writer that finished the same run meanwhile is simply ignored.
* WAL journal mode and a busy timeout let several processes (two studies, or a study
  and ``--report-only``) read and write one file at the same time.

Each row keeps the configuration and the metrics as JSON, the per-epoch curves as JSON,
the bnrs version, the host and SIMD level the run trained on, and timestamps; a few
columns are copied out of the JSON for queries by hand
(``sqlite3 results.sqlite "select architecture, avg(test_acc) ..."``). The SIMD level
matters: the kernels' sums are blocked by register width, so runs at another level give
other bits. A database written before the ``simd`` column existed gets it at its next
write, empty for the runs already stored (their level was not recorded).
"""

from __future__ import annotations

import hashlib
import json
import math
import socket
import sqlite3
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

__all__ = ["DB_NAME", "ResultStore", "ResultStoreError", "run_key"]

DB_NAME = "results.sqlite"
_BUSY_TIMEOUT_MS = 60_000

_SCHEMA = """
CREATE TABLE IF NOT EXISTS runs (
    run_key       TEXT PRIMARY KEY,
    config        TEXT NOT NULL,
    seed          INTEGER NOT NULL,
    status        TEXT NOT NULL,
    metrics       TEXT NOT NULL,
    curves        TEXT NOT NULL,
    dataset       TEXT,
    architecture  TEXT,
    batch_size    INTEGER,
    lr            REAL,
    init_scale    REAL,
    epochs        INTEGER,
    n_train       INTEGER,
    test_acc      REAL,
    train_seconds REAL,
    bnrs_version  TEXT,
    host          TEXT,
    finished_at   TEXT NOT NULL,
    simd          TEXT
);
"""


_COLUMNS = tuple(line.split()[0] for line in _SCHEMA.strip().splitlines()[1:-1])
# The layout before the SIMD level was recorded: read as it is, given the column at the
# next write.
_COLUMNS_WITHOUT_SIMD = _COLUMNS[:-1]


class ResultStoreError(ValueError):
    """The output directory or its database cannot be used; the message names the file."""


def run_key(config: dict, seed: int) -> str:
    """The hex SHA-256 of the canonical JSON of ``config`` and ``seed``."""
    text = json.dumps({"config": config, "seed": int(seed)}, sort_keys=True,
                      separators=(",", ":"), allow_nan=False)
    return hashlib.sha256(text.encode()).hexdigest()


def _json(value) -> str:
    """JSON with NaN and infinities as null (strict JSON for other tools)."""
    return json.dumps(_finite_or_none(value), sort_keys=True, allow_nan=False)


def _finite_or_none(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite_or_none(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite_or_none(v) for v in value]
    return value


class ResultStore:
    """The results database in ``directory`` (created if needed).

    Connections are opened per operation, so a store can be used from several threads
    and processes, and pickled.
    """

    def __init__(self, directory):
        self.directory = Path(directory)
        self.path = self.directory / DB_NAME
        if self.directory.exists() and not self.directory.is_dir():
            raise ResultStoreError(f"{self.directory}: is a file, not a directory (--out "
                                   "names the directory to write the study to)")
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise ResultStoreError(f"{self.directory}: cannot create the output directory "
                                   f"({error.strerror or error})") from None
        try:
            self._initialise()
        except sqlite3.DatabaseError as error:   # incl. OperationalError
            raise ResultStoreError(self._explain(error)) from None

    def _explain(self, error: sqlite3.DatabaseError) -> str:
        text = str(error)
        if "not a database" in text or "malformed" in text:
            return (f"{self.path}: not an SQLite database ({text}); move it away or choose "
                    "another --out")
        if "readonly" in text or "unable to open" in text or "permission" in text.lower():
            return f"{self.path}: cannot write the results database ({text}); is " \
                   f"{self.directory} writable?"
        return f"{self.path}: {text}"

    def _initialise(self) -> None:
        # Switching to WAL needs an exclusive lock, and SQLite does not call the busy
        # handler for it while another process creates the same file: retry with backoff.
        deadline = time.monotonic() + _BUSY_TIMEOUT_MS / 1000
        delay = 0.01
        while True:
            try:
                with self._connect() as connection:
                    self._check_schema(connection)
                    if connection.execute("PRAGMA journal_mode").fetchone()[0] != "wal":
                        connection.execute("PRAGMA journal_mode=WAL")
                    connection.executescript(_SCHEMA)
                return
            except sqlite3.OperationalError as error:
                if "locked" not in str(error) or time.monotonic() > deadline:
                    raise
                time.sleep(delay)
                delay = min(delay * 2, 0.5)

    def _check_schema(self, connection: sqlite3.Connection) -> None:
        """Refuse, before writing anything to it, a database that another program made."""
        tables = {row[0] for row in connection.execute(
            "SELECT name FROM sqlite_master WHERE type = 'table'")}
        if not tables:
            return
        columns = _columns(connection)
        if columns not in (_COLUMNS, _COLUMNS_WITHOUT_SIMD):
            found = (f"a table 'runs' with columns {', '.join(columns)}" if columns
                     else f"tables {', '.join(sorted(tables))}")
            raise ResultStoreError(f"{self.path}: not a bnrs results database (it has "
                                   f"{found}); move it away or choose another --out")

    @contextmanager
    def _connect(self) -> Iterator[sqlite3.Connection]:
        connection = sqlite3.connect(self.path, timeout=_BUSY_TIMEOUT_MS / 1000,
                                     isolation_level=None)
        try:
            connection.execute(f"PRAGMA busy_timeout={_BUSY_TIMEOUT_MS}")
            yield connection
        finally:
            connection.close()

    def finished_keys(self, keys: Iterable[str] | None = None) -> set[str]:
        """The keys (of ``keys``, or all) that have a stored run."""
        with self._connect() as connection:
            stored = {row[0] for row in connection.execute("SELECT run_key FROM runs")}
        return stored if keys is None else stored & set(keys)

    def put(self, key: str, config: dict, seed: int, result: dict,
            bnrs_version: str) -> bool:
        """Store one finished run in one transaction; False if the key was already there.

        ``result`` may name the ``host`` and ``simd`` level the run trained on (a
        worker's, which may not be this process's); the host defaults to this one's."""
        metrics = result["metrics"]
        row = (key, _json(config), int(seed), result["status"], _json(metrics),
               _json(result["curves"]), config.get("dataset"), config.get("architecture"),
               config.get("batch_size"), config.get("lr"), config.get("init_scale"),
               config.get("epochs"), config.get("n_train"),
               _finite_or_none(metrics.get("test_acc")),
               _finite_or_none(metrics.get("train_seconds")), bnrs_version,
               result.get("host") or socket.gethostname(),
               time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), result.get("simd"))
        with self._connect() as connection:
            connection.execute("BEGIN IMMEDIATE")
            try:
                if _columns(connection) == _COLUMNS_WITHOUT_SIMD:
                    connection.execute("ALTER TABLE runs ADD COLUMN simd TEXT")
                cursor = connection.execute(
                    f"INSERT OR IGNORE INTO runs VALUES ({', '.join('?' * len(row))})", row)
                connection.execute("COMMIT")
            except BaseException:
                # An interrupt can land after COMMIT finished: then there is nothing to
                # roll back, and the KeyboardInterrupt must not become an OperationalError.
                if connection.in_transaction:
                    connection.execute("ROLLBACK")
                raise
        return cursor.rowcount == 1

    def get(self, keys: Iterable[str] | None = None) -> dict[str, dict]:
        """Stored runs by key: ``{"config", "seed", "status", "metrics", "curves", ...}``."""
        wanted = None if keys is None else set(keys)
        runs = {}
        with self._connect() as connection:
            connection.row_factory = sqlite3.Row
            simd = "simd" if "simd" in _columns(connection) else "NULL AS simd"
            for row in connection.execute(
                    "SELECT run_key, config, seed, status, metrics, curves, bnrs_version, "
                    f"host, finished_at, {simd} FROM runs"):
                if wanted is not None and row["run_key"] not in wanted:
                    continue
                runs[row["run_key"]] = {
                    "config": json.loads(row["config"]), "seed": row["seed"],
                    "status": row["status"], "metrics": _nan_for_none(json.loads(
                        row["metrics"])), "curves": _nan_for_none(json.loads(row["curves"])),
                    "bnrs_version": row["bnrs_version"], "host": row["host"],
                    "simd": row["simd"], "finished_at": row["finished_at"]}
        return runs

    def __len__(self) -> int:
        with self._connect() as connection:
            return connection.execute("SELECT COUNT(*) FROM runs").fetchone()[0]


def _columns(connection: sqlite3.Connection) -> tuple[str, ...]:
    """The columns of the table ``runs`` (none if there is no such table)."""
    return tuple(row[1] for row in connection.execute("PRAGMA table_info(runs)"))


_KEEP_NONE = {"epochs_to_target", "steps_to_target", "seconds_to_target",
              "val_loss_min_epoch", "diverged_reason"}


def _nan_for_none(value):
    """Inverse of :func:`_finite_or_none` for numbers (the metrics that may be None stay)."""
    if isinstance(value, dict):
        return {k: (v if k in _KEEP_NONE else _nan_for_none(v)) for k, v in value.items()}
    if isinstance(value, list):
        return [_nan_for_none(v) for v in value]
    return math.nan if value is None else value
