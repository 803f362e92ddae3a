"""Write a finished snapshot's tables from the recording state, in the format
``scope.store.schema`` declares (each table conformed to its columns before it is written)."""

from __future__ import annotations

import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from scope.record import tables
from scope.record.state import FeatureState
from scope.record.tables import WindowLengths
from scope.store.files import VersionBuilder
from scope.store.manifest import Manifest
from scope.store.schema import (
    ACTIVATING,
    FEATURES,
    HIST,
    L0,
    LENS,
    SAES,
    SAMPLES,
    TOPK,
    VOCAB,
    WINDOWS,
    WINDOWS_GLOB,
    Table,
    activating_query,
    lens_file,
    sql_files,
    sql_string,
)

if TYPE_CHECKING:
    from sae_lens import SAE, HookedSAETransformer


def window_lengths(root: Path) -> WindowLengths:
    """n_tokens of every window recorded in the store, by window id."""
    parts = sorted((root / WINDOWS.name).glob(WINDOWS_GLOB))
    t = pa.concat_tables([pq.read_table(p, columns=["window_id", "n_tokens"]) for p in parts])
    ids = t["window_id"].to_numpy()
    order = np.argsort(ids, kind="stable")
    return WindowLengths(ids[order], t["n_tokens"].to_numpy()[order])


ROW_GROUP = 4096
"""Rows per Parquet row group of the per-feature tables. Rows are in (sae, feature) order, so
a reader's ``where sae = ? and feature = ?`` skips every other group by its min/max statistics:
a feature page reads a few kilobytes instead of the whole table."""


WRITERS = 4
"""Parquet files written at once (threads: encoding and compression release the GIL)."""


def write_sorted(table: pa.Table, path: Path) -> None:
    """A per-feature table in small row groups (see ROW_GROUP)."""
    pq.write_table(table, path, compression="zstd", row_group_size=ROW_GROUP)


def write_activating(builder: VersionBuilder, root: Path) -> None:
    """The ``activating`` table (each top example's activating token and the text before it),
    which makes search by token a filter instead of a join over every window."""
    topk = sql_string(str(builder.path(TOPK.file)))
    windows = sql_files(root / WINDOWS.name, WINDOWS_GLOB)
    vocab = sql_string(str(root / VOCAB.file))
    with duckdb.connect() as con:
        query = activating_query(
            f"read_parquet({topk})", f"read_parquet({windows})", f"read_parquet({vocab})"
        )
        table = con.sql(query).to_arrow_table()
    write_sorted(ACTIVATING.conform(table), builder.path(ACTIVATING.file))


def finalize(
    builder: VersionBuilder,
    manifest: Manifest,
    states: dict[str, FeatureState],
    saes: dict[str, SAE],
    model: HookedSAETransformer | None,
    root: Path,
    lens_from: Path | None = None,
    *,
    tables: bool = True,
) -> None:
    """Tables of every SAE into ``builder`` (none without ``tables``). Lens tables are copied
    from the previous snapshot (or ``lens_from``, a folder holding ``lens/``) when there, else
    computed."""
    if tables:
        write_tables(builder, manifest, states, root)
        write_lens(builder, manifest, states, saes, model, root, lens_from)


def write_tables(
    builder: VersionBuilder, manifest: Manifest, states: dict[str, FeatureState], root: Path
) -> None:
    """The tables made from the state: features, topk, samples, hist, l0, saes, activating."""
    dense = manifest.settings.dense_threshold
    lengths = window_lengths(root)
    parts: dict[Table, list[pa.Table]] = {t: [] for t in (FEATURES, TOPK, SAMPLES, HIST, L0)}
    summaries = []
    for key, st in states.items():
        parts[FEATURES].append(tables.feature_table(key, st, dense))
        parts[TOPK].append(tables.topk_table(key, st, lengths))
        parts[SAMPLES].append(tables.samples_table(key, st))
        parts[HIST].append(tables.hist_table(key, st))
        parts[L0].append(tables.l0_table(key, st))
        summaries.append(tables.sae_summary(key, st, dense))
    with ThreadPoolExecutor(max_workers=WRITERS) as pool:  # pyarrow encodes without the GIL
        written = [
            pool.submit(write_sorted, t.conform(pa.concat_tables(ts)), builder.path(t.file))
            for t, ts in parts.items()
        ]
        saes = SAES.from_rows(summaries)
        written.append(pool.submit(pq.write_table, saes, builder.path(SAES.file)))
        for done in written:
            done.result()
    write_activating(builder, root)


def write_lens(
    builder: VersionBuilder,
    manifest: Manifest,
    states: dict[str, FeatureState],
    saes: dict[str, SAE],
    model: HookedSAETransformer | None,
    root: Path,
    lens_from: Path | None,
) -> None:
    """Logit lens and neighbours: they depend only on the SAEs and the model, so they are
    computed once per store and copied into every later snapshot."""
    previous = manifest.tables_version
    sources = [root / previous if previous else None, lens_from]
    for key in states:
        old = next(
            (
                p / lens_file(key)
                for p in sources
                if p is not None and (p / lens_file(key)).is_file()
            ),
            None,
        )
        if old is not None:
            shutil.copyfile(old, builder.path(lens_file(key)))
        else:
            assert model is not None, "lens tables need the model unless copied"
            table = LENS.conform(tables.lens_table(key, saes[key], model))
            pq.write_table(table, builder.path(lens_file(key)))
