"""What a recording is asked to do, and what it reports at the end."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from scope.errors import ScopeError


@dataclass(frozen=True, kw_only=True)
class RecordSettings:
    """How to record. ctx, k and samples must match when adding to or resuming a store."""

    ctx: int = 128
    """Window length in tokens, BOS included."""
    k: int = 20
    """Top windows kept per feature."""
    samples: int = 5
    """Random windows kept per feature per log-spaced activation bin (interval examples)."""
    dense_threshold: float = 0.1
    """A feature firing on more than this fraction of tokens is counted as dense."""
    batch_size: int | None = None
    """Windows per forward pass; None fits it to free memory."""
    shard: tuple[int, int] = (0, 1)
    """(i, N): record only documents whose index % N == i (only those are tokenized, unless
    a --tokens budget needs every document counted); `scope merge` combines the N stores."""
    checkpoint_seconds: float = 60.0
    """Save resumable state at most this often (and at the end)."""
    overlap: bool | None = None
    """Fold each batch into the state while the next batch's forward runs (on a GPU: pinned
    uploads and a side stream), so the host's waits in the bookkeeping hide behind device
    work. The same store to the bit; two batches' codes are held at once. None: on where it
    helps, on a GPU (on a CPU the steps run one after another either way)."""

    tables: bool = True
    """Write the tables readers query (lens included) when the run ends. False for a shard
    recorded only to be merged (what `scope record --ray` workers record): the merge writes
    them from the merged state, so the shard's store keeps its state and windows alone
    (``Store`` cannot read it; a merge given the lens tables can)."""
    snapshots: bool = False
    """Make every checkpoint a snapshot readers can open (its tables written, as at the end),
    the first within ``FIRST_SNAPSHOT_SECONDS`` of recording: the explorer shows the recording
    as it goes (`scope record --serve`, `./dev demo`). Each costs the time the tables take."""

    def __post_init__(self) -> None:
        i, n = self.shard
        if not (n >= 1 and 0 <= i < n):
            raise ScopeError(f"--shard {i}/{n} is not valid: use i/N with 0 <= i < N, e.g. 0/4")
        if self.k < 1 or self.samples < 1:
            raise ScopeError("--k and --samples must be at least 1")
        if self.snapshots and not self.tables:
            raise ScopeError("snapshots need the tables: a recording without tables has none")
        if self.batch_size is not None and self.batch_size < 1:
            raise ScopeError(f"--batch-size {self.batch_size} must be at least 1")


@dataclass
class RecordSummary:
    """What `scope record` prints at the end."""

    store: str
    tokens: int
    windows: int
    seconds: float
    saes: list[dict[str, Any]] = field(default_factory=list)
    skipped: str = ""
    """What the corpus reader skipped, with the first few files or rows named."""
    already_recorded: bool = False
    """``--resume`` of a run that had finished: nothing was done."""
