"""Export a results store's score tables to CSV or Parquet, in long format.

One file per table (heads, pairs, model), one row per stored score, the columns of
``EXPORT_COLUMNS``. Rows stream from the store a chunk at a time, so an export of any
size runs in bounded memory; that is why export reads the store's tables rather than a
`jaxinduct.results.run_view.RunView` (which holds whole runs), at the same probe hash the
view reads (a run's latest, `ResultStore.resolve_probe_hash`). pyarrow writes both
formats; no JAX.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import urllib.parse
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np

from jaxinduct.results.store import ResultStore, ScoreTable, StoreError

ExportTable = Literal["heads", "pairs", "model"]
ExportFormat = Literal["csv", "parquet"]

EXPORT_COLUMNS: dict[str, tuple[str, ...]] = {
    "heads": ("run", "step", "layer", "head", "metric", "value"),
    "pairs": ("run", "step", "kind", "src_layer", "src_head", "dst_layer", "dst_head", "value"),
    "model": ("run", "step", "metric", "value"),
}
_SOURCE: dict[str, ScoreTable] = {"heads": "head_scores", "pairs": "pair_scores", "model": "model_scores"}
_TEXT_COLUMNS = {"run", "metric", "kind"}


def _export_runs(store: ResultStore, run: str | None, probe_hash: str | None) -> Iterator[tuple[str, str]]:
    """(run, probe hash) of every run to export, each at its chosen probe hash."""
    runs = [run] if run is not None else [r.name for r in store.runs()]
    for name in runs:
        if run is None and probe_hash is not None and probe_hash not in store.probe_hashes(name):
            continue  # exporting one probe hash across runs: runs without it contribute nothing
        # The hash every reader reads a run at (the run view too): the given one, else its latest.
        resolved = store.resolve_probe_hash(name, probe_hash)
        if resolved is not None:
            yield name, resolved


# A column chunk: column name -> values (a sequence) or one value for every row (a scalar).
Columns = dict[str, Any]


def _export_columns(store: ResultStore, table: str, run: str | None, probe_hash: str | None) -> Iterator[Columns]:
    """Rows of ``table`` in export column order, run by run, each run at its chosen probe hash,
    as column chunks; pairs straight from the packed arrays (no tuple per value)."""
    columns = EXPORT_COLUMNS[table]
    for name, resolved in _export_runs(store, run, probe_hash):
        if table == "pairs":
            for chunk in store.pair_score_columns(name, resolved):
                yield {"run": name, **chunk}
        else:
            for rows in store.score_rows(_SOURCE[table], columns, name, resolved):
                yield dict(zip(columns, zip(*rows)))


def _rows_in(chunk: Columns) -> int:
    return max((len(v) for v in chunk.values() if not isinstance(v, str | int)), default=0)


def _arrow_column(values: Any, n: int, type_: Any) -> Any:
    import pyarrow as pa

    if isinstance(values, str | int):
        return pa.repeat(pa.scalar(values, type=type_), n)
    return pa.array(values if isinstance(values, np.ndarray) else list(values), type=type_)


def _write_csv(path: Path, columns: Sequence[str], chunks: Iterable[Columns], *, quote_text: bool = False) -> int:
    # Arrow's CSV writer formats the column chunks in C++: 65M pair rows of 154 Pythia-1.4B
    # checkpoints in 30 s, where Python's csv module took two minutes. Numbers are written in
    # their shortest round-trip form (2, not 2.0). Text is unquoted, as the csv module writes
    # names without a comma, quote or line break; with quote_text (a run name that has one)
    # every text value is quoted, which Arrow's writer can only do for a whole column.
    pa, _ = _pyarrow()
    import pyarrow.csv as pa_csv

    schema = _schema(pa, columns)
    options = pa_csv.WriteOptions(include_header=False, quoting_style="needed" if quote_text else "none")
    n = 0
    with open(path, "wb") as f:
        f.write((",".join(columns) + "\n").encode())  # unquoted, as the csv module writes it
        with pa_csv.CSVWriter(f, schema, write_options=options) as writer:
            for chunk in chunks:
                rows = _rows_in(chunk)
                writer.write_batch(pa.record_batch([_arrow_column(chunk[c.name], rows, c.type) for c in schema], schema=schema))
                n += rows
    return n


def _write_parquet(path: Path, columns: Sequence[str], chunks: Iterable[Columns]) -> int:
    pa, pq = _pyarrow()
    schema = _schema(pa, columns)
    n = 0
    with pq.ParquetWriter(path, schema) as writer:
        for chunk in chunks:
            rows = _rows_in(chunk)
            arrays = [_arrow_column(chunk[field.name], rows, field.type) for field in schema]
            writer.write_batch(pa.record_batch(arrays, schema=schema))
            n += rows
    return n


def _pyarrow() -> tuple[Any, Any]:
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError as e:
        # A dependency of jaxinduct, so missing only from a broken install.
        raise StoreError("export needs pyarrow, which is not installed. Fix: pip install pyarrow==26.0.1.") from e
    return pa, pq


def _schema(pa: Any, columns: Sequence[str]) -> Any:
    types = {"value": pa.float64(), **{c: pa.string() for c in _TEXT_COLUMNS}}
    return pa.schema([(c, types.get(c, pa.int64())) for c in columns])


PARTITION_COLUMNS = ("run", "step")


def _write_parquet_dataset(directory: Path, columns: Sequence[str], chunks: Iterable[Columns]) -> int:
    """A Hive-partitioned Parquet dataset: ``run=NAME/step=N/part-0.parquet``, one file per
    checkpoint, the partition columns in the paths (DuckDB, Polars, Spark and pyarrow read
    them back as columns). Chunks arrive ordered by run, then step, so one file is open at a time."""
    pa, pq = _pyarrow()
    schema = _schema(pa, [c for c in columns if c not in PARTITION_COLUMNS])
    directory.mkdir(parents=True)
    n, writer, current = 0, None, None
    try:
        for chunk in chunks:
            rows = _rows_in(chunk)
            if rows == 0:
                continue
            steps = np.broadcast_to(np.asarray(chunk["step"]), (rows,))
            runs = [chunk["run"]] * rows if isinstance(chunk["run"], str) else list(chunk["run"])
            cuts = [0, *(i for i in range(1, rows) if steps[i] != steps[i - 1] or runs[i] != runs[i - 1]), rows]
            for start, stop in zip(cuts[:-1], cuts[1:]):
                key = (runs[start], int(steps[start]))
                if key != current:
                    if writer is not None:
                        writer.close()
                    # Percent-encoded run names: any name is one path segment (readers decode them).
                    part = directory / f"run={urllib.parse.quote(key[0], safe='')}" / f"step={key[1]}"
                    part.mkdir(parents=True, exist_ok=True)
                    writer, current = pq.ParquetWriter(part / "part-0.parquet", schema), key
                arrays = [_arrow_column(_slice(chunk[f.name], start, stop), stop - start, f.type) for f in schema]
                writer.write_batch(pa.record_batch(arrays, schema=schema))
                n += stop - start
    finally:
        if writer is not None:
            writer.close()
    return n


def _slice(values: Any, start: int, stop: int) -> Any:
    return values if isinstance(values, str | int) else values[start:stop]


@dataclasses.dataclass(frozen=True)
class ExportConfig:
    """Write a store's scores as CSV or Parquet."""

    store: str
    """results store (SQLite file)"""
    table: ExportTable
    """which scores"""
    format: ExportFormat
    """file format"""
    out: str
    """output file (a directory with --partition)"""
    run: str | None = None
    """only this run (default: all)"""
    partition: bool = False
    """parquet only: a dataset directory partitioned by run and step (run=NAME/step=N/part-0.parquet)"""


def export(
    store: ResultStore,
    table: ExportTable,
    fmt: ExportFormat,
    out_path: str | os.PathLike[str],
    run: str | None = ExportConfig.run,
    *,
    probe_hash: str | None = None,
    partition: bool = False,
) -> int:
    """Write one table to CSV or Parquet with the columns of ``EXPORT_COLUMNS[table]``, in order.

    Every run unless ``run`` is given. A run scanned with several probe configurations is
    exported at its latest probe hash (that of its most recently written done checkpoint)
    unless ``probe_hash`` picks one. The file appears whole or not at all (written beside it,
    then renamed). Returns the number of rows written.

    partition (Parquet only): ``out_path`` is a directory, a dataset partitioned by run and
    step (`_write_parquet_dataset`); it too appears whole, and replaces a dataset there.
    """
    if table not in EXPORT_COLUMNS:
        raise StoreError(f"unknown export table {table!r}; choose one of {', '.join(EXPORT_COLUMNS)}.")
    writers = {"csv": _write_csv, "parquet": _write_parquet}
    if fmt not in writers:
        raise StoreError(f"unknown export format {fmt!r}; choose one of {', '.join(writers)}.")
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    if partition:
        if fmt != "parquet":
            raise StoreError("--partition writes a Parquet dataset; use it with --format parquet.")
        return _export_dataset(out_path, EXPORT_COLUMNS[table], _export_columns(store, table, run, probe_hash))
    chunks = _export_columns(store, table, run, probe_hash)  # pairs without a tuple per value
    # A plain sibling name rather than mkstemp: the export gets the usual (umask) permissions.
    tmp_path = out_path.with_name(f".{out_path.name}.{os.getpid()}.tmp")
    # Metric and kind names are identifiers; only a run name can need quotes in CSV.
    options = {"quote_text": any(set(name) & set(',"\r\n') for name, _ in _export_runs(store, run, probe_hash))} if fmt == "csv" else {}
    try:
        n = writers[fmt](tmp_path, EXPORT_COLUMNS[table], chunks, **options)
        os.replace(tmp_path, out_path)
    except BaseException:
        tmp_path.unlink(missing_ok=True)
        raise
    return n


def _export_dataset(out_path: Path, columns: Sequence[str], chunks: Iterable[Columns]) -> int:
    if out_path.exists() and not out_path.is_dir():
        raise StoreError(f"{out_path} is a file; --partition writes a directory. Fix: choose another --out.")
    tmp_path = out_path.with_name(f".{out_path.name}.{os.getpid()}.tmp")
    old_path = out_path.with_name(f".{out_path.name}.{os.getpid()}.old")
    try:
        n = _write_parquet_dataset(tmp_path, columns, chunks)
        if out_path.exists():  # the previous dataset goes only once the new one is whole
            os.replace(out_path, old_path)
        os.replace(tmp_path, out_path)
    except BaseException:
        shutil.rmtree(tmp_path, ignore_errors=True)
        raise
    shutil.rmtree(old_path, ignore_errors=True)
    return n
