"""A corpus part's windows on disk: written block by block as the corpus is tokenized, read back
batch by batch by the recording loop. The whole corpus is never in memory at once; only each
window's length (4 bytes a window) is kept.
"""

from __future__ import annotations

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
from scope.store.schema import WINDOWS

READ_ROWS = 4096
"""Windows read from disk at a time."""


def windows_table(w: Windows, part: int) -> pa.Table:
    """One row per window: its global id, part, document, offset and tokens (BOS first)."""
    n = w.lengths
    flat = w.tokens[np.arange(w.tokens.shape[1]) < n[:, None]]
    offsets = np.concatenate([[0], np.cumsum(n)]).astype(np.int32)
    return pa.table(
        {
            "window_id": w.ids,
            "part": np.full(len(w), part, dtype=np.int32),
            "doc": pa.array([w.doc_names[d] for d in w.doc], pa.string()),
            "offset": w.offset,
            "n_tokens": n,
            "tokens": pa.ListArray.from_arrays(pa.array(offsets), pa.array(flat, pa.int32())),
        }
    )


@dataclass(frozen=True)
class PartWindows:
    """A corpus part's windows (this shard's), written to ``path``."""

    path: Path
    lengths: np.ndarray
    """[n] int32, BOS included, in window order."""
    report: ReadReport
    """What was read; its fingerprint is the corpus's (the same for every shard)."""
    pad: int
    """The token id batches are padded with (never counted)."""

    def __len__(self) -> int:
        return len(self.lengths)

    @property
    def n_tokens(self) -> int:
        """Corpus tokens (BOS and padding excluded)."""
        return int(self.lengths.sum() - len(self.lengths))

    @property
    def fingerprint(self) -> str:
        return str(self.report.text_hash.hexdigest())


def write_windows(
    spec: CorpusSpec,
    tokenizer: Any,
    folder: Path,
    part: int,
    *,
    shard: tuple[int, int] = (0, 1),
    first_doc: int = 0,
) -> PartWindows:
    """Tokenize this shard's documents of the corpus into a hidden file in ``folder`` (moved
    into place once the part is accepted), a block at a time."""
    folder.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".windows-", suffix=".parquet")
    os.close(fd)
    as_created(tmp)
    report = ReadReport()
    lengths: list[np.ndarray] = [np.zeros(0, np.int32)]
    try:
        with pq.ParquetWriter(tmp, WINDOWS.columns, compression="zstd") as writer:
            for block in iter_windows(spec, tokenizer, report, shard=shard, first_doc=first_doc):
                table = WINDOWS.conform(windows_table(block, part))
                writer.write_table(table, row_group_size=READ_ROWS)
                lengths.append(block.lengths)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    return PartWindows(Path(tmp), np.concatenate(lengths), report, pad)


class Batch(NamedTuple):
    """Windows for one forward pass."""

    ids: np.ndarray
    """[batch] int64 global window ids."""
    tokens: np.ndarray
    """[batch, width] int32, right-padded to the longest window of the batch."""
    lengths: np.ndarray
    """[batch] int32."""


def read_batches(path: Path, pad: int, batch: int, start: int) -> Iterator[Batch]:
    """The part file's windows, ``batch`` at a time, skipping the first ``start`` (already
    recorded). Batches are the same whatever the read size."""
    seen = 0
    pending: list[tuple[np.ndarray, np.ndarray, list[np.ndarray]]] = []
    count = 0
    columns = ["window_id", "n_tokens", "tokens"]
    for rb in pq.ParquetFile(path).iter_batches(batch_size=READ_ROWS, columns=columns):
        ids = rb.column(0).to_numpy()
        lengths = rb.column(1).to_numpy()
        offsets = rb.column(2).offsets.to_numpy()
        values = rb.column(2).values.to_numpy()
        skip = min(len(ids), max(0, start - seen))
        seen += len(ids)
        rows = [values[offsets[j] : offsets[j + 1]] for j in range(skip, len(ids))]
        pending.append((ids[skip:], lengths[skip:], rows))
        count += len(ids) - skip
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
