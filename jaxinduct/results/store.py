"""The results store: one SQLite file (stdlib ``sqlite3``) holding every score of a scan.

Pure Python and numpy, no JAX: reports, exports and other tools read a store without
an accelerator stack.

Schema (version ``SCHEMA_VERSION``; SQLite header fields ``user_version`` = schema
version and ``application_id`` = ``APPLICATION_ID`` mark a jaxinduct store)::

    meta          (key PK, value)                         created_by, created
    runs          (name PK, source, spec JSON, created)
    probe_configs (hash PK, config JSON, created)
    checkpoints   (seq, run, step, probe_hash, status 'done'|'failed', error, seconds,
                   tokens_seen, written)              UNIQUE (run, probe_hash, step); seq
                                                      (AUTOINCREMENT) is the write order
    head_scores   (run, step, probe_hash, metric, layer, head, value)
                  PK (run, probe_hash, step, metric, layer, head)
    pair_arrays   (run, step, probe_hash, kind, layers, heads, dtype, packed)
                  UNIQUE (run, probe_hash, step, kind); packed is the [src_layer, src_head,
                  dst_layer, dst_head] array, NaN where undefined, little-endian float32
                  ('<f4') or float64 ('<f8') when float32 cannot hold every value exactly
    model_scores  (run, step, probe_hash, metric, value)  PK (run, probe_hash, step, metric)
    curves        (run, step, probe_hash, metric, layer, head, length, values_f32)
                  PK (run, probe_hash, step, metric, layer, head); layer = head = -1 for a
                  model-level curve; values_f32 is little-endian float32, NaN kept inside

Score rows reference their ``checkpoints`` row (foreign key), and only checkpoints with
status ``done`` have score rows. Pair scores are packed, one array per (checkpoint, kind):
a Pythia-1.4B-shaped checkpoint's 424k pair values take 3.5 MB there instead of 31 MB as
rows (bench/store.py); readers (``pair_scores``, ``score_rows``, ``export``) still give one
record per defined pair. A store of schema version 1 (pairs as rows) is migrated in place,
value for value, the first time it is opened. NaN means "not defined for this head/model", so no row
is stored for it; readers give NaN back for a missing row where they return dense arrays.
A checkpoint is identified by (run, step, probe hash): scanning again with other probes
adds results beside the old ones, and readers and ``export`` use a run's latest probe
hash (the one of its most recently written ``done`` checkpoint, by ``seq``, so not by
the clock) unless told otherwise.

Crash safety. Each ``write_batch`` is one SQLite transaction: it deletes whatever the
store held for those checkpoints and inserts their ``done`` row and every score row
before COMMIT. SQLite's commit is atomic, so a process killed at any instant (SIGKILL,
OOM killer, preemption) leaves each batch all or nothing: before the commit point the
rollback journal holds the original pages and the next writer that opens the file rolls
the half-written batch back. So "status done" always means "every row is there", and a
resumed scan skips exactly the done checkpoints (``done_steps``). ``synchronous=FULL``
extends the guarantee to power loss, at the price of a few fsyncs per batch.

Journal mode: the default rollback journal (DELETE), not WAL, because a store is often
written on a cluster's network file system, where WAL's shared-memory index does not
work; because the store stays one self-contained file (no -wal/-shm sidecars to lose
when it is copied); and because a ``readonly`` open then never creates or touches any
file. WAL's advantage, readers never waiting for the writer, buys little here: the
writer commits once per batch of checkpoints, and readers wait out a commit through
the busy timeout. A reader that finds an unfinished transaction of a killed writer
cannot roll it back without writing, so a ``readonly`` open then fails with a clear
message; any writable open repairs the file.

One writer. In a multi-process job only process 0 writes (the scan engine enforces it);
the other processes do not open the store at all, or open it with ``readonly=True``,
which opens SQLite read-only (``mode=ro``, ``query_only``) and never writes. Two writers
by mistake would still not corrupt the file (SQLite locks serialise their transactions),
but they would race on which checkpoints to compute.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import sqlite3
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from datetime import UTC, datetime
from itertools import repeat
from pathlib import Path
from typing import Any, Literal

import numpy as np
from numpy.typing import ArrayLike

from jaxinduct import __version__
from jaxinduct.errors import JaxInductError

SCHEMA_VERSION = 2
# Versions an open migrates in place (one transaction): 1 stored one row per pair value.
_MIGRATES_FROM = (1,)
APPLICATION_ID = 0x4A494E44  # b"JIND" in the SQLite header: marks a jaxinduct store
BUSY_TIMEOUT_MS = 60_000  # how long a reader waits out the writer's commit (and vice versa)
_SQLITE_MAGIC = b"SQLite format 3\x00"
_CURVE_DTYPE = np.dtype("<f4")  # fixed byte order: a store copied between machines stays readable
_READ_CHUNK = 100_000  # rows per fetch where a reader streams a table, so memory stays bounded

ScoreTable = Literal["head_scores", "pair_scores", "model_scores"]


class StoreError(JaxInductError):
    """A results store cannot be opened, written or read as asked."""


# --- the unit the scan engine hands over, and what readers return --------------------------


@dataclasses.dataclass(frozen=True)
class CheckpointScores:
    """Every score of one checkpoint, by public name (docs/scores.md); NaN = not defined.

    head: name -> [layer, head]; pair: kind -> [src_layer, src_head, dst_layer, dst_head];
    model: name -> scalar; curve: name -> [seq] (model-level) or [layer, head, seq] (per head).
    """

    step: int
    tokens_seen: int | None = None
    seconds: float = 0.0  # time spent scoring this checkpoint
    head: Mapping[str, ArrayLike] = dataclasses.field(default_factory=dict)
    pair: Mapping[str, ArrayLike] = dataclasses.field(default_factory=dict)
    model: Mapping[str, ArrayLike] = dataclasses.field(default_factory=dict)
    curve: Mapping[str, ArrayLike] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class RunRecord:
    name: str
    source: str
    spec: str  # JSON text, as given to ensure_run
    created: str  # ISO 8601, UTC


@dataclasses.dataclass(frozen=True)
class CheckpointRecord:
    run: str
    step: int
    probe_hash: str
    status: Literal["done", "failed"]
    error: str | None
    seconds: float | None
    tokens_seen: int | None
    written: str  # ISO 8601, UTC


@dataclasses.dataclass(frozen=True)
class CurveRecord:
    step: int
    metric: str
    layer: int  # -1 for a model-level curve
    head: int  # -1 for a model-level curve
    values: np.ndarray  # float32 [length], NaN where undefined


# --- schema ----------------------------------------------------------------------------------

_SCHEMA = (
    "CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL) WITHOUT ROWID",
    """CREATE TABLE runs (
        name TEXT PRIMARY KEY,
        source TEXT NOT NULL,
        spec TEXT NOT NULL,
        created TEXT NOT NULL
    ) WITHOUT ROWID""",
    """CREATE TABLE probe_configs (
        hash TEXT PRIMARY KEY,
        config TEXT NOT NULL,
        created TEXT NOT NULL
    ) WITHOUT ROWID""",
    """CREATE TABLE checkpoints (
        seq INTEGER PRIMARY KEY AUTOINCREMENT,
        run TEXT NOT NULL REFERENCES runs(name),
        step INTEGER NOT NULL CHECK (step >= 0),
        probe_hash TEXT NOT NULL REFERENCES probe_configs(hash),
        status TEXT NOT NULL CHECK (status IN ('done', 'failed')),
        error TEXT CHECK ((status = 'failed') = (error IS NOT NULL)),
        seconds REAL,
        tokens_seen INTEGER,
        written TEXT NOT NULL,
        UNIQUE (run, probe_hash, step)
    )""",
    # Score keys start with (run, probe_hash, step): replacing a checkpoint's rows and
    # reading one run's results are range scans of the clustered (WITHOUT ROWID) key.
    """CREATE TABLE head_scores (
        run TEXT NOT NULL,
        step INTEGER NOT NULL,
        probe_hash TEXT NOT NULL,
        metric TEXT NOT NULL,
        layer INTEGER NOT NULL,
        head INTEGER NOT NULL,
        value REAL NOT NULL,
        PRIMARY KEY (run, probe_hash, step, metric, layer, head),
        FOREIGN KEY (run, probe_hash, step) REFERENCES checkpoints(run, probe_hash, step)
    ) WITHOUT ROWID""",
    # One packed array per (checkpoint, kind): [src_layer, src_head, dst_layer, dst_head], NaN
    # where undefined, little-endian float32 ('<f4', what a scan writes) or float64 ('<f8', for
    # values float32 cannot hold exactly). A rowid table: WITHOUT ROWID suits small rows only.
    """CREATE TABLE pair_arrays (
        run TEXT NOT NULL,
        step INTEGER NOT NULL,
        probe_hash TEXT NOT NULL,
        kind TEXT NOT NULL,
        layers INTEGER NOT NULL CHECK (layers > 0),
        heads INTEGER NOT NULL CHECK (heads > 0),
        dtype TEXT NOT NULL CHECK (dtype IN ('<f4', '<f8')),
        packed BLOB NOT NULL
            CHECK (length(packed) = (CASE dtype WHEN '<f4' THEN 4 ELSE 8 END) * layers * heads * layers * heads),
        UNIQUE (run, probe_hash, step, kind),
        FOREIGN KEY (run, probe_hash, step) REFERENCES checkpoints(run, probe_hash, step)
    )""",
    """CREATE TABLE model_scores (
        run TEXT NOT NULL,
        step INTEGER NOT NULL,
        probe_hash TEXT NOT NULL,
        metric TEXT NOT NULL,
        value REAL NOT NULL,
        PRIMARY KEY (run, probe_hash, step, metric),
        FOREIGN KEY (run, probe_hash, step) REFERENCES checkpoints(run, probe_hash, step)
    ) WITHOUT ROWID""",
    """CREATE TABLE curves (
        run TEXT NOT NULL,
        step INTEGER NOT NULL,
        probe_hash TEXT NOT NULL,
        metric TEXT NOT NULL,
        layer INTEGER NOT NULL,
        head INTEGER NOT NULL,
        length INTEGER NOT NULL,
        values_f32 BLOB NOT NULL CHECK (length(values_f32) = 4 * length),
        PRIMARY KEY (run, probe_hash, step, metric, layer, head),
        FOREIGN KEY (run, probe_hash, step) REFERENCES checkpoints(run, probe_hash, step)
    ) WITHOUT ROWID""",
)
_SCORE_TABLES = ("head_scores", "pair_arrays", "model_scores", "curves")
# Each score table's key after (run, probe_hash): the order its rows are read in. pair_scores
# is read from the packed pair_arrays, one row per defined value, in the same order.
_SCORE_KEYS: dict[str, tuple[str, ...]] = {
    "head_scores": ("step", "metric", "layer", "head"),
    "pair_scores": ("step", "kind", "src_layer", "src_head", "dst_layer", "dst_head"),
    "model_scores": ("step", "metric"),
}


# --- opening: refuse anything that is not a store of this schema, without touching it -------


def _now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def _version_fix(path: Path, found: int) -> str:
    if found > SCHEMA_VERSION:
        who = "a newer jaxinduct"
    else:
        who = f"an older jaxinduct (there is no migration from schema version {found})"
    return (
        f"{path}: results store schema version {found}, but jaxinduct {__version__} reads version "
        f"{SCHEMA_VERSION}; it was written by {who}. Fix: write to a new store (--store NEW_PATH), "
        "or read this one with the jaxinduct version that wrote it."
    )


def _not_a_store(path: Path, why: str) -> StoreError:
    return StoreError(
        f"{path}: not a jaxinduct results store ({why}). Fix: pass the path of a store, or a new "
        "path (--store NEW_PATH) to create one; this file was left unchanged."
    )


def _check_identity(path: Path, application_id: int, user_version: int, *, migratable: bool = False) -> None:
    if application_id != APPLICATION_ID:
        raise _not_a_store(path, f"SQLite file with application_id {application_id:#x}, schema version {user_version}")
    if user_version != SCHEMA_VERSION and not (migratable and user_version in _MIGRATES_FROM):
        raise StoreError(_version_fix(path, user_version))


def _header_version(path: Path) -> int:
    with open(path, "rb") as f:
        return int.from_bytes(f.read(100)[60:64], "big", signed=True)


def _check_header(path: Path) -> bool:
    """Check the SQLite header with plain file reads; True when the file is empty (a new store).

    Plain reads, because even a read-only SQLite connection is more than we want to do to a
    file that turns out to be someone else's.
    """
    try:
        with open(path, "rb") as f:
            header = f.read(100)
    except OSError as e:
        fix = "Fix: check the path and its permissions."
        raise StoreError(f"{path}: cannot read the results store ({e.strerror}). {fix}") from e
    if not header:
        return True
    if len(header) < 100 or header[:16] != _SQLITE_MAGIC:
        raise _not_a_store(path, "not an SQLite file")
    user_version = int.from_bytes(header[60:64], "big", signed=True)
    application_id = int.from_bytes(header[68:72], "big", signed=True)
    _check_identity(path, application_id, user_version, migratable=True)
    return False


def _connect(path: Path, *, readonly: bool) -> sqlite3.Connection:
    mode = "ro" if readonly else "rwc"
    try:
        # isolation_level=None: no implicit transactions; every write opens its own below.
        # check_same_thread off: the scan engine writes from its writer thread; a store is
        # still used by one thread at a time (see ResultStore).
        conn = sqlite3.connect(
            f"{path.resolve().as_uri()}?mode={mode}", uri=True, isolation_level=None, check_same_thread=False
        )
    except sqlite3.Error as e:
        raise StoreError(f"{path}: cannot open the results store ({e}). Fix: check the path and its permissions.") from e
    conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
    conn.execute("PRAGMA foreign_keys = ON")
    if readonly:
        conn.execute("PRAGMA query_only = ON")
    else:
        conn.execute("PRAGMA journal_mode = DELETE")
        conn.execute("PRAGMA synchronous = FULL")
    return conn


def _identity(conn: sqlite3.Connection, path: Path, *, readonly: bool) -> tuple[int, int, int]:
    try:
        app_id = conn.execute("PRAGMA application_id").fetchone()[0]
        version = conn.execute("PRAGMA user_version").fetchone()[0]
        n_objects = conn.execute("SELECT count(*) FROM sqlite_master").fetchone()[0]
    except sqlite3.Error as e:
        if readonly and getattr(e, "sqlite_errorname", "") == "SQLITE_READONLY_ROLLBACK":
            raise StoreError(
                f"{path}: the results store holds an unfinished batch of a writer that was killed; a "
                "read-only open cannot roll it back. Fix: open it once for writing (e.g. rerun the "
                "scan, which resumes), then read it."
            ) from e
        raise _not_a_store(path, f"SQLite cannot read it: {e}") from e
    return app_id, version, n_objects


def _initialize(conn: sqlite3.Connection) -> None:
    conn.execute("BEGIN IMMEDIATE")
    try:
        # Checked again under the write lock: another process may have created it meanwhile.
        if conn.execute("SELECT count(*) FROM sqlite_master").fetchone()[0] == 0:
            for statement in _SCHEMA:
                conn.execute(statement)
            meta = [("created_by", f"jaxinduct {__version__}"), ("created", _now_iso())]
            conn.executemany("INSERT INTO meta VALUES (?, ?)", meta)
            # Header pragmas are transactional: a crash here leaves an empty file, not a half store.
            conn.execute(f"PRAGMA application_id = {APPLICATION_ID}")
            conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise


def _migrate(conn: sqlite3.Connection, path: Path) -> None:
    """Bring a store of an older schema (`_MIGRATES_FROM`) to this one, in one transaction.

    Version 1 -> 2: each (checkpoint, kind)'s pair_scores rows become one packed array of
    pair_arrays (the model's layers and heads from its run's spec), float32 where every
    value is a float32 (as every scan wrote them), float64 otherwise: value for value the
    same. A crash leaves version 1 whole; the next writable open migrates again.
    """
    conn.execute("BEGIN IMMEDIATE")
    try:
        version = conn.execute("PRAGMA user_version").fetchone()[0]  # under the lock: maybe migrated meanwhile
        if version == 1:
            conn.execute(next(statement for statement in _SCHEMA if "TABLE pair_arrays" in statement))
            sizes = {name: json.loads(spec) for name, spec in conn.execute("SELECT name, spec FROM runs")}
            groups = conn.execute(
                "SELECT run, probe_hash, step, kind, max(src_layer), max(dst_layer), max(src_head), max(dst_head) "
                "FROM pair_scores GROUP BY run, probe_hash, step, kind"
            ).fetchall()
            for run, probe_hash, step, kind, *extent in groups:
                spec = sizes.get(run, {})
                layers = int(spec.get("n_layers", max(extent[0], extent[1]) + 1))
                heads = int(spec.get("n_heads", max(extent[2], extent[3]) + 1))
                array = np.full((layers, heads, layers, heads), np.nan)
                rows = conn.execute(
                    "SELECT src_layer, src_head, dst_layer, dst_head, value FROM pair_scores "
                    "WHERE run = ? AND probe_hash = ? AND step = ? AND kind = ?",
                    (run, probe_hash, step, kind),
                ).fetchall()
                index = np.array([row[:4] for row in rows], dtype=np.int64).T
                array[tuple(index)] = [row[4] for row in rows]
                conn.execute(
                    "INSERT INTO pair_arrays (run, probe_hash, step, kind, layers, heads, dtype, packed) "
                    "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                    (run, probe_hash, step, kind, layers, heads, *_packed(array)),
                )
            conn.execute("DROP TABLE pair_scores")
            conn.execute("INSERT OR REPLACE INTO meta VALUES (?, ?)", ("migrated_from_1", _now_iso()))
            conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
        conn.execute("COMMIT")
    except sqlite3.Error as e:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise StoreError(f"{path}: cannot migrate the results store to schema version {SCHEMA_VERSION} ({e}); "
                         "it was left unchanged. Fix: check free disk space and the file's permissions.") from e
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise
    try:
        conn.execute("VACUUM")  # give the row table's pages back: the file shrinks to the packed size
    except sqlite3.Error:
        pass  # migrated all the same; the file keeps its free pages (no room to rewrite it now)


def _environmental(error: sqlite3.Error) -> bool:
    """An error of the file's surroundings (lock, disk, permissions), not of the code."""
    name = getattr(error, "sqlite_errorname", "")
    return name.startswith(("SQLITE_BUSY", "SQLITE_LOCKED", "SQLITE_FULL", "SQLITE_IOERR", "SQLITE_READONLY", "SQLITE_CANTOPEN"))


# --- rows: numpy arrays -> SQL parameters ------------------------------------------------------


def _as_float_array(values: ArrayLike, ndim: int | tuple[int, ...], what: str) -> np.ndarray:
    try:
        array = np.asarray(values, dtype=np.float64)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{what}: not a float array ({e})") from e
    allowed = (ndim,) if isinstance(ndim, int) else ndim
    if array.ndim not in allowed:
        raise ValueError(f"{what}: expected {' or '.join(map(str, allowed))} dimensions, got shape {array.shape}")
    return array


def _prepared(scores: CheckpointScores) -> CheckpointScores:
    """The same scores as float64 numpy arrays of checked shapes, before anything is written."""
    where = f"step {scores.step}"
    if isinstance(scores.step, bool) or not isinstance(scores.step, int | np.integer) or scores.step < 0:
        raise ValueError(f"{where}: step must be a non-negative int")
    return dataclasses.replace(
        scores,
        step=int(scores.step),
        tokens_seen=None if scores.tokens_seen is None else int(scores.tokens_seen),
        seconds=float(scores.seconds),
        head={str(k): _as_float_array(v, 2, f"{where}, head score {k!r}") for k, v in scores.head.items()},
        pair={str(k): _as_float_array(v, 4, f"{where}, pair score {k!r}") for k, v in scores.pair.items()},
        model={str(k): _as_float_array(v, 0, f"{where}, model score {k!r}") for k, v in scores.model.items()},
        curve={str(k): _as_float_array(v, (1, 3), f"{where}, curve {k!r}") for k, v in scores.curve.items()},
    )


def _defined(array: np.ndarray) -> tuple[list[list[int]], list[float]]:
    """Indices (one list per axis) and values of the non-NaN entries."""
    index = np.nonzero(~np.isnan(array))
    return [axis.tolist() for axis in index], array[index].tolist()


def _head_rows(run: str, probe_hash: str, batch: Sequence[CheckpointScores]) -> Iterator[tuple]:
    for scores in batch:
        for metric, array in scores.head.items():
            (layer, head), values = _defined(array)
            yield from zip(repeat(run), repeat(probe_hash), repeat(scores.step), repeat(metric), layer, head, values)


def _packed(array: np.ndarray) -> tuple[str, bytes]:
    """(dtype, bytes) of a float64 array: float32 when that holds every value exactly."""
    narrow = array.astype(_CURVE_DTYPE)
    if np.array_equal(narrow.astype(np.float64), array, equal_nan=True):
        return _CURVE_DTYPE.str, narrow.tobytes()
    return "<f8", array.astype("<f8").tobytes()


def _pair_array_rows(run: str, probe_hash: str, batch: Sequence[CheckpointScores]) -> Iterator[tuple]:
    for scores in batch:
        for kind, array in scores.pair.items():
            if np.isnan(array).all():  # not defined anywhere (a one-layer model): nothing stored
                continue
            layers, heads = array.shape[:2]
            if array.shape != (layers, heads, layers, heads):
                raise ValueError(f"step {scores.step}, pair score {kind!r}: expected shape [l, h, l, h], got {array.shape}")
            yield (run, probe_hash, scores.step, kind, layers, heads, *_packed(array))


def _unpacked(layers: int, heads: int, dtype: str, packed: bytes) -> np.ndarray:
    return np.frombuffer(packed, np.dtype(dtype)).astype(np.float64).reshape(layers, heads, layers, heads)


def _pair_records(rows: Iterable[tuple]) -> np.ndarray:
    """pair_arrays rows (step, kind, layers, heads, dtype, packed) -> structured (step, kind,
    src_layer, src_head, dst_layer, dst_head, value), one record per defined value, in key order."""
    parts = []
    for step, kind, layers, heads, dtype, packed in rows:
        values = _unpacked(layers, heads, dtype, packed)
        index = np.nonzero(~np.isnan(values))
        parts.append((step, kind, index, values[index]))
    width = max((len(kind) for _, kind, _, _ in parts), default=1)
    dtype = [("step", "i8"), ("kind", f"U{width}"), *[(name, "i8") for name in _PAIR_AXES], ("value", "f8")]
    out = np.empty(sum(len(v) for *_, v in parts), dtype)
    at = 0
    for step, kind, index, values in parts:
        chunk = out[at : at + len(values)]
        chunk["step"], chunk["kind"], chunk["value"] = step, kind, values
        for name, axis in zip(_PAIR_AXES, index):
            chunk[name] = axis
        at += len(values)
    return out


_PAIR_AXES = ("src_layer", "src_head", "dst_layer", "dst_head")


def _model_rows(run: str, probe_hash: str, batch: Sequence[CheckpointScores]) -> Iterator[tuple]:
    for scores in batch:
        for metric, array in scores.model.items():
            if not np.isnan(array):
                yield run, probe_hash, scores.step, metric, float(array)


def _curve_rows(run: str, probe_hash: str, batch: Sequence[CheckpointScores]) -> Iterator[tuple]:
    for scores in batch:
        for metric, array in scores.curve.items():
            if array.ndim == 1:
                yield run, probe_hash, scores.step, metric, -1, -1, array.shape[0], array.astype(_CURVE_DTYPE).tobytes()
                continue
            for layer, head in np.ndindex(*array.shape[:2]):
                curve = array[layer, head]
                if not np.isnan(curve).all():  # an all-NaN per-head curve: not defined for that head
                    yield run, probe_hash, scores.step, metric, layer, head, curve.shape[0], curve.astype(_CURVE_DTYPE).tobytes()


_INSERTS: tuple[tuple[str, Callable[[str, str, Sequence[CheckpointScores]], Iterator[tuple]]], ...] = (
    ("INSERT INTO head_scores (run, probe_hash, step, metric, layer, head, value) VALUES (?, ?, ?, ?, ?, ?, ?)", _head_rows),
    (
        "INSERT INTO pair_arrays (run, probe_hash, step, kind, layers, heads, dtype, packed) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
        _pair_array_rows,
    ),
    ("INSERT INTO model_scores (run, probe_hash, step, metric, value) VALUES (?, ?, ?, ?, ?)", _model_rows),
    (
        "INSERT INTO curves (run, probe_hash, step, metric, layer, head, length, values_f32) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
        _curve_rows,
    ),
)


def _structured(rows: list[tuple], fields: Sequence[tuple[str, str]]) -> np.ndarray:
    """Rows as a structured array; text fields ('U') sized to their longest value."""
    dtype = []
    for i, (name, kind) in enumerate(fields):
        if kind == "U":
            kind = f"U{max((len(row[i]) for row in rows), default=1)}"
        dtype.append((name, kind))
    return np.array(rows, dtype=dtype)


_HEAD_FIELDS = (("step", "i8"), ("metric", "U"), ("layer", "i8"), ("head", "i8"), ("value", "f8"))
_MODEL_FIELDS = (("step", "i8"), ("metric", "U"), ("value", "f8"))


# --- the store -----------------------------------------------------------------------------


class ResultStore:
    """A results store file; open with ``ResultStore.open`` and use as a context manager.

    One thread at a time: it may be handed to another thread (the scan engine's writer),
    never used from two at once.
    """

    def __init__(self, conn: sqlite3.Connection, path: Path, readonly: bool) -> None:
        self._conn = conn
        self.path = path
        self.readonly = readonly

    @classmethod
    def open(cls, path: str | os.PathLike[str], *, create: bool = True, readonly: bool = False) -> ResultStore:
        """Open the store at ``path``; create it if missing and ``create`` (never when ``readonly``).

        Raises StoreError, leaving the file byte-identical, when it is not a jaxinduct store or
        has another schema version.
        """
        path = Path(path)
        if path.exists():
            is_new = _check_header(path)
            if not is_new and _header_version(path) in _MIGRATES_FROM:
                cls._migrate_in_place(path)
        elif readonly or not create:
            raise StoreError(f"{path}: no results store there. Fix: check the path, or scan first to create it.")
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            is_new = True
        if is_new and (readonly or not create):
            raise _not_a_store(path, "empty file")
        conn = _connect(path, readonly=readonly)
        try:
            cls._verify_or_initialize(conn, path, readonly=readonly)
        except BaseException:
            conn.close()
            raise
        return cls(conn, path, readonly)

    @staticmethod
    def _migrate_in_place(path: Path) -> None:
        """Migrate an older store, even for a read-only open (the file must be writable once)."""
        try:
            conn = _connect(path, readonly=False)
        except StoreError as e:
            raise StoreError(f"{e} The store has an older schema and must be migrated once where it can be written.") from None
        try:
            _identity(conn, path, readonly=False)  # rolls back a killed writer's batch first
            _migrate(conn, path)
        finally:
            conn.close()

    @staticmethod
    def _verify_or_initialize(conn: sqlite3.Connection, path: Path, *, readonly: bool) -> None:
        # Authoritative check through SQLite: the header read above may predate a rolled-back batch.
        app_id, version, n_objects = _identity(conn, path, readonly=readonly)
        if app_id == 0 and version == 0 and n_objects == 0 and not readonly:
            _initialize(conn)  # an empty file, or a store whose creating transaction was rolled back
        else:
            _check_identity(path, app_id, version)

    def close(self) -> None:
        self._conn.close()

    def __enter__(self) -> ResultStore:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # --- writing -----------------------------------------------------------------------------

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        """One write transaction: committed whole, or rolled back whole on any exception."""
        if self.readonly:
            raise StoreError(f"{self.path}: this results store was opened read-only (only process 0 of a job writes).")
        try:
            # IMMEDIATE: take the write lock now, so a second writer waits here, not mid-batch.
            self._conn.execute("BEGIN IMMEDIATE")
        except sqlite3.OperationalError as e:
            raise self._locked(e) from e
        try:
            yield self._conn
            self._conn.execute("COMMIT")
        except BaseException as e:
            if self._conn.in_transaction:  # some errors (disk full) end the transaction themselves
                self._conn.execute("ROLLBACK")
            if isinstance(e, sqlite3.Error) and _environmental(e):
                raise self._locked(e) from e
            raise

    def _locked(self, error: sqlite3.Error) -> StoreError:
        if "locked" in str(error) or "busy" in str(error):
            fix = "make sure only one process writes it (another scan on the same --store?)"
        else:
            fix = "check free disk space and the permissions of the store and its directory"
        return StoreError(f"{self.path}: cannot write the results store ({error}); nothing of this write was kept. Fix: {fix}.")

    def ensure_run(self, name: str, source: str, spec_json: str) -> None:
        """Record a run; again with the same source and spec is a no-op, with others an error."""
        spec = json.loads(spec_json)  # fail before writing if it is not JSON
        with self._transaction() as conn:
            row = conn.execute("SELECT source, spec FROM runs WHERE name = ?", (name,)).fetchone()
            if row is None:
                conn.execute("INSERT INTO runs VALUES (?, ?, ?, ?)", (name, source, spec_json, _now_iso()))
            elif row[0] != source or json.loads(row[1]) != spec:
                raise StoreError(
                    f"{self.path}: run {name!r} is already in the store with another source or model spec "
                    f"(stored source {row[0]!r}, now {source!r}). Fix: pick another run name, or another --store."
                )

    def record_probe_config(self, probe_hash: str, config_json: str) -> None:
        """Record a probe configuration under its hash (idempotent)."""
        config = json.loads(config_json)
        with self._transaction() as conn:
            row = conn.execute("SELECT config FROM probe_configs WHERE hash = ?", (probe_hash,)).fetchone()
            if row is None:
                conn.execute("INSERT INTO probe_configs VALUES (?, ?, ?)", (probe_hash, config_json, _now_iso()))
            elif json.loads(row[0]) != config:
                raise StoreError(f"{self.path}: probe hash {probe_hash!r} is already recorded with another configuration.")

    def _require_known(self, conn: sqlite3.Connection, run: str, probe_hash: str) -> None:
        if conn.execute("SELECT 1 FROM runs WHERE name = ?", (run,)).fetchone() is None:
            raise StoreError(f"{self.path}: unknown run {run!r}; call ensure_run before writing its checkpoints.")
        if conn.execute("SELECT 1 FROM probe_configs WHERE hash = ?", (probe_hash,)).fetchone() is None:
            raise StoreError(f"{self.path}: unknown probe hash {probe_hash!r}; call record_probe_config first.")

    @staticmethod
    def _delete_steps(conn: sqlite3.Connection, run: str, probe_hash: str, steps: Iterable[int]) -> None:
        keys = [(run, probe_hash, step) for step in steps]
        for table in (*_SCORE_TABLES, "checkpoints"):  # children first: foreign keys
            conn.executemany(f"DELETE FROM {table} WHERE run = ? AND probe_hash = ? AND step = ?", keys)

    def write_batch(self, run: str, probe_hash: str, batch: Sequence[CheckpointScores]) -> None:
        """Write the checkpoints of ``batch`` as done, in one transaction.

        Idempotent: a checkpoint written before (done or failed) has its rows replaced, and a
        failed one becomes done with its error cleared. NaN scores are not stored.
        """
        prepared = [_prepared(scores) for scores in batch]  # every check before any write
        steps = [scores.step for scores in prepared]
        if len(set(steps)) != len(steps):
            raise ValueError(f"a batch holds the same step twice: {sorted(steps)}")
        written = _now_iso()
        with self._transaction() as conn:
            self._require_known(conn, run, probe_hash)
            self._delete_steps(conn, run, probe_hash, steps)
            conn.executemany(
                "INSERT INTO checkpoints (run, step, probe_hash, status, error, seconds, tokens_seen, written) "
                "VALUES (?, ?, ?, 'done', NULL, ?, ?, ?)",
                [(run, s.step, probe_hash, s.seconds, s.tokens_seen, written) for s in prepared],
            )
            for sql, rows in _INSERTS:
                conn.executemany(sql, rows(run, probe_hash, prepared))

    def mark_failed(
        self, run: str, probe_hash: str, steps: int | Iterable[int], error: str, *, seconds: float | None = None
    ) -> list[int]:
        """Record that scoring ``steps`` failed; a rescan retries them. Returns the steps marked.

        A step already done keeps its complete results (a failed recompute does not make
        them wrong) and is not marked.
        """
        wanted = {int(steps)} if isinstance(steps, int | np.integer) else {int(step) for step in steps}
        with self._transaction() as conn:
            self._require_known(conn, run, probe_hash)
            to_mark = sorted(wanted - self._done_steps(conn, run, probe_hash))
            self._delete_steps(conn, run, probe_hash, to_mark)
            conn.executemany(
                "INSERT INTO checkpoints (run, step, probe_hash, status, error, seconds, tokens_seen, written) "
                "VALUES (?, ?, ?, 'failed', ?, ?, NULL, ?)",
                [(run, step, probe_hash, str(error), seconds, _now_iso()) for step in to_mark],
            )
        return to_mark

    def replace_run_results(
        self, run: str, probe_hash: str, step: int, metrics: Sequence[str], values: Mapping[str, float]
    ) -> None:
        """Replace a run's analysis results (model-level rows about the whole run, such as the
        detected phase change): every row of ``metrics`` goes, ``values`` are written at ``step``.

        ``step`` is the last step the analysis saw, a done checkpoint; ``values`` may be empty
        (the analysis found nothing, so nothing stale remains).
        """
        unknown = set(values) - set(metrics)
        if unknown:
            raise ValueError(f"values for metrics not being replaced: {sorted(unknown)}")
        with self._transaction() as conn:
            self._require_known(conn, run, probe_hash)
            if values and step not in self._done_steps(conn, run, probe_hash):
                raise StoreError(f"{self.path}: step {step} of run {run!r} is not a done checkpoint.")
            conn.executemany(
                "DELETE FROM model_scores WHERE run = ? AND probe_hash = ? AND metric = ?",
                [(run, probe_hash, m) for m in metrics],
            )
            conn.executemany(
                "INSERT INTO model_scores (run, probe_hash, step, metric, value) VALUES (?, ?, ?, ?, ?)",
                [(run, probe_hash, step, m, float(v)) for m, v in values.items()],
            )

    # --- reading -----------------------------------------------------------------------------

    @staticmethod
    def _done_steps(conn: sqlite3.Connection, run: str, probe_hash: str) -> set[int]:
        rows = conn.execute(
            "SELECT step FROM checkpoints WHERE run = ? AND probe_hash = ? AND status = 'done'", (run, probe_hash)
        )
        return {step for (step,) in rows}

    def done_steps(self, run: str, probe_hash: str) -> set[int]:
        """Steps whose scores are complete for these probes (failed steps are not: they are retried)."""
        return self._done_steps(self._conn, run, probe_hash)

    def runs(self) -> list[RunRecord]:
        """Every run in the store, by name."""
        return [RunRecord(*row) for row in self._conn.execute("SELECT name, source, spec, created FROM runs ORDER BY name")]

    def probe_config(self, probe_hash: str) -> str | None:
        """The JSON recorded for ``probe_hash``, or None."""
        row = self._conn.execute("SELECT config FROM probe_configs WHERE hash = ?", (probe_hash,)).fetchone()
        return None if row is None else row[0]

    def probe_hashes(self, run: str) -> list[str]:
        """Probe hashes with checkpoints (done or failed) in ``run``, least recently written first."""
        rows = self._conn.execute(
            "SELECT probe_hash FROM checkpoints WHERE run = ? GROUP BY probe_hash ORDER BY max(seq)", (run,)
        )
        return [h for (h,) in rows]

    def latest_probe_hash(self, run: str) -> str | None:
        """The probe hash of the run's most recently written done checkpoint; None without one."""
        row = self._conn.execute(
            "SELECT probe_hash FROM checkpoints WHERE run = ? AND status = 'done' ORDER BY seq DESC LIMIT 1",
            (run,),
        ).fetchone()
        return None if row is None else row[0]

    def steps(self, run: str, probe_hash: str | None = None) -> list[CheckpointRecord]:
        """Checkpoint records of ``run`` (every probe hash unless one is given), by step."""
        sql = "SELECT run, step, probe_hash, status, error, seconds, tokens_seen, written FROM checkpoints WHERE run = ?"
        params: list[Any] = [run]
        if probe_hash is not None:
            sql += " AND probe_hash = ?"
            params.append(probe_hash)
        return [CheckpointRecord(*row) for row in self._conn.execute(sql + " ORDER BY step, seq", params)]

    def resolve_probe_hash(self, run: str, probe_hash: str | None = None) -> str | None:
        """``probe_hash`` checked against the run, or the run's latest; None when it has no results."""
        if self._conn.execute("SELECT 1 FROM runs WHERE name = ?", (run,)).fetchone() is None:
            known = ", ".join(repr(r.name) for r in self.runs()) or "none"
            raise StoreError(f"{self.path}: no run {run!r} in the results store (runs: {known}).")
        if probe_hash is None:
            return self.latest_probe_hash(run)
        if probe_hash not in self.probe_hashes(run):
            known = ", ".join(self.probe_hashes(run)) or "none"
            raise StoreError(f"{self.path}: run {run!r} has no results for probe hash {probe_hash!r} (it has: {known}).")
        return probe_hash

    def _select(
        self, table: str, key: str, value: str, run: str, probe_hash: str | None, filters: Mapping[str, object]
    ) -> list[tuple]:
        """Rows (key columns..., value column) of one run at one probe hash, ordered by key."""
        resolved = self.resolve_probe_hash(run, probe_hash)
        if resolved is None:
            return []
        sql = f"SELECT {key}, {value} FROM {table} WHERE run = ? AND probe_hash = ?"
        params: list[object] = [run, resolved]
        for column, wanted in filters.items():
            if wanted is not None:
                sql += f" AND {column} = ?"
                params.append(wanted)
        return self._conn.execute(f"{sql} ORDER BY {key}", params).fetchall()

    def head_scores(
        self, run: str, metric: str | None = None, step: int | None = None, *, probe_hash: str | None = None
    ) -> np.ndarray:
        """Structured array (step, metric, layer, head, value), ordered; latest probe hash by default."""
        filters = {"metric": metric, "step": step}
        rows = self._select("head_scores", "step, metric, layer, head", "value", run, probe_hash, filters)
        return _structured(rows, _HEAD_FIELDS)

    def pair_scores(
        self, run: str, kind: str | None = None, step: int | None = None, *, probe_hash: str | None = None
    ) -> np.ndarray:
        """Structured array (step, kind, src_layer, src_head, dst_layer, dst_head, value)."""
        rows = self._select("pair_arrays", "step, kind", "layers, heads, dtype, packed", run, probe_hash,
                            {"kind": kind, "step": step})  # fmt: skip
        return _pair_records(rows)

    def model_scores(
        self, run: str, metric: str | None = None, step: int | None = None, *, probe_hash: str | None = None
    ) -> np.ndarray:
        """Structured array (step, metric, value)."""
        filters = {"metric": metric, "step": step}
        return _structured(self._select("model_scores", "step, metric", "value", run, probe_hash, filters), _MODEL_FIELDS)

    def curves(
        self, run: str, metric: str | None = None, step: int | None = None, *, probe_hash: str | None = None
    ) -> list[CurveRecord]:
        """Curves as float32 arrays (NaN kept); layer = head = -1 for model-level curves."""
        filters = {"metric": metric, "step": step}
        rows = self._select("curves", "step, metric, layer, head", "values_f32", run, probe_hash, filters)
        return [CurveRecord(*key, np.frombuffer(blob, _CURVE_DTYPE).astype(np.float32)) for *key, blob in rows]

    def head_score_grid(self, run: str, metric: str, *, probe_hash: str | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(steps [n], values [n, layer, head]) over the done steps; NaN where nothing is stored.

        The layer and head extents are those of every head score of the run at that probe
        hash, so a layer where ``metric`` is undefined throughout still has its NaN slice.
        """
        steps, grids = self.head_score_grids(run, [metric], probe_hash=probe_hash)
        return steps, grids[metric]

    def head_score_grids(
        self,
        run: str,
        metrics: Sequence[str] | None = None,
        *,
        probe_hash: str | None = None,
        steps: Sequence[int] | None = None,
        whole: Sequence[str] = (),
    ) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """`head_score_grid` of several metrics, or of every metric the run has (by name) when
        ``metrics`` is None. The steps and extents are read once, and the rows in one pass,
        a chunk at a time, so memory holds the grids and one chunk, never every row.

        steps: read the metrics at these steps only (NaN at the other done steps), except
        those named in ``whole``, read at every step: what `show` needs of a 154-checkpoint
        run (every score at one step, two at all) without reading every row. The extents
        are then those of the rows read.
        """
        resolved = self.resolve_probe_hash(run, probe_hash)
        if resolved is None:
            return np.zeros(0, np.int64), {metric: np.zeros((0, 0, 0)) for metric in metrics or ()}
        done = self._done_step_array(run, resolved)
        where, params = "WHERE run = ? AND probe_hash = ?", [run, resolved]
        if steps is not None:
            where += f" AND (step IN ({', '.join('?' * len(steps))}) OR metric IN ({', '.join('?' * len(whole))}))"
            params += [*map(int, steps), *whole]
        # The extents of every head score read (any metric), so that a layer where one metric is
        # undefined throughout still has its NaN slice.
        extents = self._conn.execute(f"SELECT max(layer), max(head) FROM head_scores {where}", params).fetchone()
        n_layers, n_heads = (0 if extent is None else extent + 1 for extent in extents)
        if metrics is None:
            listed = self._conn.execute("SELECT DISTINCT metric FROM head_scores WHERE run = ? AND probe_hash = ?", (run, resolved))
            names = sorted(name for (name,) in listed)
        else:
            names = list(dict.fromkeys(metrics))
        where += f" AND metric IN ({', '.join('?' * len(names))})"
        params += names
        stack = np.full((len(names), len(done), n_layers, n_heads), np.nan)
        index = {name: i for i, name in enumerate(names)}
        cursor = self._conn.execute(f"SELECT metric, step, layer, head, value FROM head_scores {where}", params)
        while chunk := cursor.fetchmany(_READ_CHUNK):
            metric, step, layer, head, value = zip(*chunk)
            at = np.searchsorted(done, np.asarray(step, np.int64))
            stack[[index[m] for m in metric], at, np.asarray(layer, np.int64), np.asarray(head, np.int64)] = value
        return done, {name: stack[i] for i, name in enumerate(names)}

    def model_score_series(
        self, run: str, metrics: Sequence[str] | None = None, *, probe_hash: str | None = None
    ) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """(steps [n], metric -> values [n]) over the done steps, NaN where nothing is stored;
        every model metric the run has (by name) when ``metrics`` is None."""
        resolved = self.resolve_probe_hash(run, probe_hash)
        if resolved is None:
            return np.zeros(0, np.int64), {metric: np.zeros(0) for metric in metrics or ()}
        steps = self._done_step_array(run, resolved)
        rows = self.model_scores(run, probe_hash=resolved)
        wanted = sorted(set(rows["metric"].tolist())) if metrics is None else metrics
        series = {}
        for name in wanted:
            mine = rows[rows["metric"] == name]
            values = np.full(len(steps), np.nan)
            values[np.searchsorted(steps, mine["step"])] = mine["value"]  # score rows exist for done steps only
            series[name] = values
        return steps, series

    def _done_step_array(self, run: str, probe_hash: str) -> np.ndarray:
        return np.array(sorted(self.done_steps(run, probe_hash)), dtype=np.int64)

    def score_rows(
        self, table: ScoreTable, columns: Sequence[str], run: str, probe_hash: str
    ) -> Iterator[list[tuple]]:
        """The rows of one run at one probe hash in a score table, ``columns`` in that order,
        ordered by the table's key, in chunks (so a reader streams them in bounded memory)."""
        key = _SCORE_KEYS[table]
        unknown = set(columns) - {"run", "probe_hash", *key, "value"}
        if unknown:
            raise ValueError(f"{table} has no columns {sorted(unknown)}")
        if table == "pair_scores":
            yield from self._pair_score_rows(columns, run, probe_hash)
            return
        cursor = self._conn.execute(
            f"SELECT {', '.join(columns)} FROM {table} WHERE run = ? AND probe_hash = ? ORDER BY {', '.join(key)}",
            (run, probe_hash),
        )
        while chunk := cursor.fetchmany(_READ_CHUNK):
            yield chunk

    def pair_score_columns(self, run: str, probe_hash: str) -> Iterator[dict[str, Any]]:
        """The pair scores of one run at one probe hash as columns, one packed array at a time
        (key order): step and kind as scalars, src_layer..dst_head and value as numpy arrays.
        What a columnar writer (Parquet) reads without building a tuple per value."""
        cursor = self._conn.execute(
            "SELECT step, kind, layers, heads, dtype, packed FROM pair_arrays WHERE run = ? AND probe_hash = ? "
            "ORDER BY step, kind",
            (run, probe_hash),
        )
        for step, kind, layers, heads, dtype, packed in cursor:
            values = _unpacked(layers, heads, dtype, packed)
            index = np.nonzero(~np.isnan(values))
            yield {"step": step, "kind": kind, **dict(zip(_PAIR_AXES, index)), "value": values[index]}

    def _pair_score_rows(self, columns: Sequence[str], run: str, probe_hash: str) -> Iterator[list[tuple]]:
        # `pair_score_columns` as row tuples: memory bounded by one checkpoint's pairs of one kind.
        pending: list[tuple] = []
        for chunk in self.pair_score_columns(run, probe_hash):
            n = len(chunk["value"])
            scalars = {"run": run, "probe_hash": probe_hash, "step": chunk["step"], "kind": chunk["kind"]}
            fields = [repeat(scalars[c], n) if c in scalars else chunk[c].tolist() for c in columns]
            pending.extend(zip(*fields))
            while len(pending) >= _READ_CHUNK:
                yield pending[:_READ_CHUNK]
                pending = pending[_READ_CHUNK:]
        if pending:
            yield pending
