"""A corpus part's windows on disk: written block by block as the corpus is tokenized, read back
batch by batch by the recording loop. The whole corpus is never in memory at once; only each
window's length (4 bytes a window) is kept.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from scope.corpus import CorpusSpec, ReadReport, Windows, iter_windows
from scope.store.files import as_created

READ_ROWS = 4096
"""Windows read from disk at a time."""


def windows_table(w: Windows, first: int, part: int) -> pa.Table:
    """One row per window: its global id, part, document, offset and tokens (BOS first)."""
    n = w.lengths
    flat = w.tokens[np.arange(w.tokens.shape[1]) < n[:, None]]
    offsets = np.concatenate([[0], np.cumsum(n)]).astype(np.int32)
    return pa.table(
        {
            "window_id": np.arange(first, first + len(w), dtype=np.int64),
            "part": np.full(len(w), part, dtype=np.int32),
            "doc": pa.array([w.doc_names[d] for d in w.doc], pa.string()),
            "offset": w.offset,
            "n_tokens": n,
            "tokens": pa.ListArray.from_arrays(pa.array(offsets), pa.array(flat, pa.int32())),
        }
    )


@dataclass(frozen=True)
class PartWindows:
    """A corpus part's windows, written to ``path``."""

    path: Path
    lengths: np.ndarray
    """[n] int32, BOS included, in window order."""
    fingerprint: str
    """sha256 of the lengths, then of every window's tokens: the same corpus and settings
    always give the same value (``Windows.fingerprint`` of the same windows)."""
    report: ReadReport
    pad: int
    """The token id batches are padded with (never counted)."""

    def __len__(self) -> int:
        return len(self.lengths)

    @property
    def n_tokens(self) -> int:
        """Corpus tokens (BOS and padding excluded)."""
        return int(self.lengths.sum() - len(self.lengths))


def write_windows(
    spec: CorpusSpec, tokenizer: Any, folder: Path, first_window: int, part: int
) -> PartWindows:
    """Tokenize the corpus into a hidden file in ``folder`` (``rename`` it into place once the
    part is accepted); the fingerprint is read back from the file, a block at a time."""
    folder.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".windows-", suffix=".parquet")
    os.close(fd)
    as_created(tmp)
    report = ReadReport()
    lengths: list[np.ndarray] = []
    writer: pq.ParquetWriter | None = None
    try:
        for block in iter_windows(spec, tokenizer, report):
            table = windows_table(block, first_window + sum(map(len, lengths)), part)
            if writer is None:
                writer = pq.ParquetWriter(tmp, table.schema, compression="zstd")
            writer.write_table(table, row_group_size=READ_ROWS)
            lengths.append(block.lengths)
    except BaseException:
        if writer is not None:
            writer.close()
        Path(tmp).unlink(missing_ok=True)
        raise
    assert writer is not None  # iter_windows refuses an empty corpus
    writer.close()
    all_lengths = np.concatenate(lengths)
    h = hashlib.sha256(all_lengths.tobytes())
    for batch in pq.ParquetFile(tmp).iter_batches(batch_size=READ_ROWS, columns=["tokens"]):
        h.update(batch.column(0).values.to_numpy().astype(np.int32).tobytes())
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    return PartWindows(Path(tmp), all_lengths, h.hexdigest(), report, pad)


class Batch(NamedTuple):
    """Windows for one forward pass."""

    ids: np.ndarray
    """[batch] int64 global window ids."""
    tokens: np.ndarray
    """[batch, width] int32, right-padded to the longest window of the batch."""
    lengths: np.ndarray
    """[batch] int32."""


def read_batches(
    path: Path, pad: int, shard: tuple[int, int], batch: int, start: int
) -> Iterator[Batch]:
    """This shard's windows (id % N == i) of the part file, ``batch`` at a time, skipping the
    first ``start`` of them (already recorded). Batches are the same whatever the read size."""
    shard_i, shard_n = shard
    seen = 0
    pending: list[tuple[np.ndarray, np.ndarray, list[np.ndarray]]] = []
    count = 0
    columns = ["window_id", "n_tokens", "tokens"]
    for rb in pq.ParquetFile(path).iter_batches(batch_size=READ_ROWS, columns=columns):
        ids = rb.column(0).to_numpy()
        lengths = rb.column(1).to_numpy()
        offsets = rb.column(2).offsets.to_numpy()
        values = rb.column(2).values.to_numpy()
        mine = np.nonzero(ids % shard_n == shard_i)[0]
        skip = min(len(mine), max(0, start - seen))
        seen += len(mine)
        mine = mine[skip:]
        rows = [values[offsets[j] : offsets[j + 1]] for j in mine]
        pending.append((ids[mine], lengths[mine], rows))
        count += len(mine)
        while count >= batch:
            yield _take(pending, batch, pad)
            count -= batch
    if count:
        yield _take(pending, count, pad)


def _take(
    pending: list[tuple[np.ndarray, np.ndarray, list[np.ndarray]]], n: int, pad: int
) -> Batch:
    """The first ``n`` windows of ``pending`` as a padded batch (removed from it)."""
    ids, lengths, rows = (
        np.concatenate([p[0] for p in pending]),
        np.concatenate([p[1] for p in pending]),
        [r for p in pending for r in p[2]],
    )
    pending.clear()
    if len(ids) > n:
        pending.append((ids[n:], lengths[n:], rows[n:]))
    lengths = lengths[:n]
    tokens = np.full((n, int(lengths.max())), pad, dtype=np.int32)
    tokens[np.arange(tokens.shape[1]) < lengths[:, None]] = np.concatenate(rows[:n])
    return Batch(ids[:n], tokens, lengths)
