"""Export a results store's score tables to CSV or Parquet, in long format.

One file per table (heads, pairs, model), one row per stored score, the columns of
``EXPORT_COLUMNS``. Rows stream from the store a chunk at a time, so an export of any
size runs in bounded memory; that is why export reads the store's tables rather than a
`jaxinduct.results.run_view.RunView` (which holds whole runs), at the same probe hash the
view reads (a run's latest, `ResultStore.resolve_probe_hash`). Pure Python (pyarrow for
Parquet), no JAX.
"""

from __future__ import annotations

import csv
import dataclasses
import os
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Literal

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


def _export_chunks(store: ResultStore, table: str, run: str | None, probe_hash: str | None) -> Iterator[list[tuple]]:
    """Rows of ``table`` in export column order, run by run, each run at its chosen probe hash."""
    runs = [run] if run is not None else [r.name for r in store.runs()]
    for name in runs:
        if run is None and probe_hash is not None and probe_hash not in store.probe_hashes(name):
            continue  # exporting one probe hash across runs: runs without it contribute nothing
        # The hash every reader reads a run at (the run view too): the given one, else its latest.
        resolved = store.resolve_probe_hash(name, probe_hash)
        if resolved is None:
            continue
        yield from store.score_rows(_SOURCE[table], EXPORT_COLUMNS[table], name, resolved)


def _write_csv(path: Path, columns: Sequence[str], chunks: Iterable[list[tuple]]) -> int:
    n = 0
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(columns)
        for chunk in chunks:
            writer.writerows(chunk)
            n += len(chunk)
    return n


def _write_parquet(path: Path, columns: Sequence[str], chunks: Iterable[list[tuple]]) -> int:
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError as e:
        raise StoreError("Parquet export needs pyarrow. Fix: pip install pyarrow==26.0.1, or export --format csv.") from e
    types = {"value": pa.float64(), **{c: pa.string() for c in _TEXT_COLUMNS}}
    schema = pa.schema([(c, types.get(c, pa.int64())) for c in columns])
    n = 0
    with pq.ParquetWriter(path, schema) as writer:
        for chunk in chunks:
            arrays = [pa.array(list(values), type=field.type) for values, field in zip(zip(*chunk), schema)]
            writer.write_batch(pa.record_batch(arrays, schema=schema))
            n += len(chunk)
    return n


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
    """output file"""
    run: str | None = None
    """only this run (default: all)"""


def export(
    store: ResultStore,
    table: ExportTable,
    fmt: ExportFormat,
    out_path: str | os.PathLike[str],
    run: str | None = ExportConfig.run,
    *,
    probe_hash: str | None = None,
) -> int:
    """Write one table to CSV or Parquet with the columns of ``EXPORT_COLUMNS[table]``, in order.

    Every run unless ``run`` is given. A run scanned with several probe configurations is
    exported at its latest probe hash (that of its most recently written done checkpoint)
    unless ``probe_hash`` picks one. The file appears whole or not at all (written beside it,
    then renamed). Returns the number of rows written.
    """
    if table not in EXPORT_COLUMNS:
        raise StoreError(f"unknown export table {table!r}; choose one of {', '.join(EXPORT_COLUMNS)}.")
    writers = {"csv": _write_csv, "parquet": _write_parquet}
    if fmt not in writers:
        raise StoreError(f"unknown export format {fmt!r}; choose one of {', '.join(writers)}.")
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    chunks = _export_chunks(store, table, run, probe_hash)
    # A plain sibling name rather than mkstemp: the export gets the usual (umask) permissions.
    tmp_path = out_path.with_name(f".{out_path.name}.{os.getpid()}.tmp")
    try:
        n = writers[fmt](tmp_path, EXPORT_COLUMNS[table], chunks)
        os.replace(tmp_path, out_path)
    except BaseException:
        tmp_path.unlink(missing_ok=True)
        raise
    return n
