"""Corpus -> BOS-first token windows, with the source document and offset of every window.

Documents come from ``scope.documents`` (text, .jsonl, .parquet, saved datasets) in a fixed
order, so the same corpus and settings always give the same windows.

Each document is tokenized on its own and cut into chunks of ``ctx - 1`` tokens; each window
is BOS + one chunk, so no window mixes documents. A final short chunk makes a shorter window
(padded in the batch; padding is never counted).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np

from scope.documents import ReadReport, iter_documents
from scope.errors import ScopeError

T = TypeVar("T")
TOKENIZE_BATCH = 256  # documents per tokenizer call


@dataclass(frozen=True, kw_only=True)
class CorpusSpec:
    """What to read and how to cut it."""

    paths: tuple[str, ...]
    """Files or folders; folders are read recursively in sorted order."""
    field: str = "text"
    """The .jsonl field / .parquet or dataset column holding the text."""
    ctx: int = 128
    """Window length in tokens, BOS included."""
    max_tokens: int | None = None
    """Stop once this many corpus tokens (BOS and padding not counted) are windowed."""

    def __post_init__(self) -> None:
        if not self.paths:
            raise ScopeError("no corpus given: pass --corpus FILE_OR_FOLDER")
        if self.ctx < 2:
            raise ScopeError(f"--ctx {self.ctx} is too small: a window needs BOS and a token")
        if self.max_tokens is not None and self.max_tokens <= 0:
            raise ScopeError(f"--tokens {self.max_tokens} must be positive")


@dataclass(frozen=True)
class Windows:
    """Token windows [n, ctx] (right-padded), with provenance."""

    tokens: np.ndarray  # [n, ctx] int32, BOS first, pad after `lengths`
    lengths: np.ndarray  # [n] int32, BOS included
    doc: np.ndarray  # [n] int32, index into `doc_names`
    offset: np.ndarray  # [n] int32, token offset of the window's first text token in its doc
    doc_names: list[str]
    report: ReadReport
    ids: np.ndarray  # [n] int64, window ids: window_id(document index, chunk), increasing

    def __len__(self) -> int:
        return len(self.lengths)

    @property
    def n_tokens(self) -> int:
        """Corpus tokens covered (BOS and padding excluded)."""
        return int(self.lengths.sum() - len(self.lengths))

    def fingerprint(self) -> str:
        """sha256 of the settings and of every document's text up to the --tokens cut: the same
        corpus and settings give the same value, whichever shard computes it."""
        return str(self.report.text_hash.hexdigest())


def _batches(items: Iterable[T], size: int) -> Iterator[list[T]]:
    batch: list[T] = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


CHUNK_BITS = 20
"""A window's id is (document index << CHUNK_BITS) | its chunk in the document: known from the
document's place in the corpus alone, so a shard can number its windows without tokenizing
anyone else's documents, and ids still increase in reading order."""


def iter_windows(
    spec: CorpusSpec,
    tokenizer: Any,
    report: ReadReport,
    *,
    shard: tuple[int, int] = (0, 1),
    first_doc: int = 0,
) -> Iterator[Windows]:
    """The corpus as BOS-first windows of ``spec.ctx`` tokens, a block at a time (one block per
    tokenizer call of up to TOKENIZE_BATCH documents), so no caller needs the whole corpus in
    memory. ``shard=(i, N)`` keeps documents whose index % N == i and tokenizes only those
    (with a --tokens budget every document is tokenized, to find where the budget ends).
    Documents are numbered from ``first_doc``. ``report`` counts and fingerprints as it goes;
    a corpus with no text is an error."""
    bos = tokenizer.bos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    if bos is None:
        raise ScopeError("the model's tokenizer has no BOS token; Gemma's always does")
    step = spec.ctx - 1
    budget = spec.max_tokens
    shard_i, shard_n = shard
    report.text_hash.update(f"ctx={spec.ctx};tokens={budget};".encode())
    total = 0
    for batch in _batches(
        enumerate(iter_documents(spec.paths, spec.field, report)), TOKENIZE_BATCH
    ):
        # with a budget every document counts towards it; without, only ours are tokenized
        wanted = [d for d in batch if budget is not None or d[0] % shard_n == shard_i]
        # one call per batch of documents: the fast tokenizer spreads it over all cores
        texts = [text for _, (_, text) in wanted]
        encoded = tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else []
        by_index = dict(zip((i for i, _ in wanted), encoded, strict=True))
        chunks: list[list[int]] = []
        docs: list[int] = []
        offsets: list[int] = []
        ids: list[int] = []
        names: list[str] = []
        for index, (name, text) in batch:
            if budget is not None and total >= budget:
                break
            report.read += 1
            report.text_hash.update(text.encode("utf-8", "surrogatepass") + b"\0")
            mine = index % shard_n == shard_i
            tokens = by_index.get(index)
            if tokens is None:  # another shard's document, not tokenized
                continue
            if not tokens:
                if mine:
                    report.skip("documents with no tokens", name)
                continue
            if mine:
                report.documents += 1
                names.append(name)
            if len(tokens) > step << CHUNK_BITS:
                raise ScopeError(
                    f"{name} is {len(tokens):,} tokens: split documents longer than "
                    f"{step << CHUNK_BITS:,} tokens (at --ctx {spec.ctx})"
                )
            for n_chunk, start in enumerate(range(0, len(tokens), step)):
                chunk = tokens[start : start + step]
                if budget is not None:
                    chunk = chunk[: budget - total]
                total += len(chunk)
                if mine:
                    chunks.append(chunk)
                    docs.append(len(names) - 1)
                    offsets.append(start)
                    ids.append(((first_doc + index) << CHUNK_BITS) | n_chunk)
                if budget is not None and total >= budget:
                    break
        if chunks:
            yield _block(chunks, docs, offsets, ids, names, report, spec.ctx, bos, pad)
        if budget is not None and total >= budget:
            break
    if report.read == 0:
        skipped = report.summary() or "no files"
        raise ScopeError(
            f"the corpus {', '.join(spec.paths)} has no text to record ({skipped}): give UTF-8 "
            "text files, .jsonl, .parquet or a saved dataset, and --field for their text"
        )


def _block(
    chunks: list[list[int]],
    docs: list[int],
    offsets: list[int],
    ids: list[int],
    names: list[str],
    report: ReadReport,
    ctx: int,
    bos: int,
    pad: int,
) -> Windows:
    """Chunks of token ids as BOS-first windows, right-padded to ``ctx``."""
    lengths = np.asarray([1 + len(c) for c in chunks], dtype=np.int32)
    tokens = np.full((len(chunks), ctx), pad, dtype=np.int32)
    tokens[:, 0] = bos
    inside = np.arange(ctx) < lengths[:, None]
    inside[:, 0] = False
    tokens[inside] = np.fromiter(
        (t for c in chunks for t in c), np.int32, lengths.sum() - len(chunks)
    )
    return Windows(
        tokens=tokens,
        lengths=lengths,
        doc=np.asarray(docs, dtype=np.int32),
        offset=np.asarray(offsets, dtype=np.int32),
        doc_names=names,
        report=report,
        ids=np.asarray(ids, dtype=np.int64),
    )


def build_windows(spec: CorpusSpec, tokenizer: Any) -> Windows:
    """The whole corpus as one set of windows (``iter_windows`` streams it instead)."""
    report = ReadReport()
    blocks = list(iter_windows(spec, tokenizer, report))
    if not blocks:
        raise ScopeError(
            f"the corpus {', '.join(spec.paths)} has no text to record ({report.summary()})"
        )
    names: list[str] = []
    docs = []
    for block in blocks:
        docs.append(block.doc + len(names))
        names += block.doc_names
    return Windows(
        tokens=np.concatenate([b.tokens for b in blocks]),
        lengths=np.concatenate([b.lengths for b in blocks]),
        doc=np.concatenate(docs),
        offset=np.concatenate([b.offset for b in blocks]),
        doc_names=names,
        report=report,
        ids=np.concatenate([b.ids for b in blocks]),
    )


def parse_tokens(text: str | None) -> int | None:
    """``2M`` -> 2_000_000, ``500k`` -> 500_000, ``123`` -> 123."""
    if text is None:
        return None
    scale = {"k": 1_000, "m": 1_000_000, "b": 1_000_000_000}
    t = text.strip().lower().replace("_", "")
    try:
        if t and t[-1] in scale:
            return int(float(t[:-1]) * scale[t[-1]])
        return int(t)
    except ValueError:
        raise ScopeError(f"--tokens {text!r} is not a count: use e.g. 2M, 500k or 100000") from None


__all__ = [
    "CHUNK_BITS",
    "CorpusSpec",
    "ReadReport",
    "Windows",
    "build_windows",
    "iter_windows",
    "parse_tokens",
]
