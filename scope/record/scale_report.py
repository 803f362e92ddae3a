"""What a recording on Ray reports: its progress while it runs (all workers together) and, at
the end, what each worker did."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from scope.record.merge import ShardMerger
from scope.record.settings import RecordSummary
from scope.record.shard_worker import Report, ShardResult
from scope.record.tables import sae_summary
from scope.store.writer import StoreWriter


@dataclass(frozen=True)
class ScaleProgress:
    """Where a run on Ray stands, given to ``on_progress`` a few times a second."""

    tokens: int
    """Counted tokens recorded (shards merged before a resume included)."""
    total: int | None
    """Counted tokens of the corpus, estimated from the shards measured so far (None: none)."""
    tokens_per_s: float
    """This run's rate over all workers."""
    shards_done: int
    shards: int
    running: dict[int, Report] = field(default_factory=dict)
    """Shard -> its latest report, for the shards being recorded."""


@dataclass
class WorkerSummary:
    """What one worker did."""

    worker: int
    node: str
    device: str
    threads: int
    shards: int = 0
    tokens: int = 0
    seconds: float = 0.0
    """Time spent recording its shards."""
    restarts: int = 0
    """Times its process died and Ray started another."""
    pids: set[int] = field(default_factory=set)


@dataclass
class ScaleSummary:
    """The end of a run on Ray: what a local run prints, and the workers."""

    record: RecordSummary
    shards: int
    shards_recorded: int
    """Shards this run recorded (a resumed run records only those not yet merged)."""
    workers: list[WorkerSummary] = field(default_factory=list)
    fold_seconds: list[float] = field(default_factory=list)
    """Seconds the driver took to fold in each shard (unpack its files, merge its state)."""
    snapshot_seconds: list[float] = field(default_factory=list)
    """Seconds each snapshot took to write (state and tables, at most every
    ``checkpoint_seconds`` and at the end)."""


def seen(worker: WorkerSummary, pid: int) -> None:
    """Note the process a worker's report came from: a new one is a restart."""
    if pid not in worker.pids:
        worker.pids.add(pid)
        worker.restarts = len(worker.pids) - 1


def tally(worker: WorkerSummary, result: ShardResult) -> None:
    """Count a finished shard to the worker that recorded it."""
    seen(worker, result.pid)
    worker.shards += 1
    worker.tokens += result.tokens
    worker.seconds += result.seconds


def progress(
    results: list[ShardResult],
    live: dict[int, Report],
    tokens_before: int,
    started: float,
    n: int,
    merger: ShardMerger,
) -> ScaleProgress:
    """Tokens so far and the corpus size estimated from the shards measured (each shard's
    size is known once a worker has cut it into windows)."""
    now_tokens = sum(r.tokens for r in results) + sum(r.tokens for r in live.values())
    sizes = [r.tokens for r in results] + [r.total for r in live.values() if r.total is not None]
    total = None
    if sizes:
        unknown = n - len(merger.merged) - len(sizes) + len(results)
        total = tokens_before + sum(sizes) + round(sum(sizes) / len(sizes) * unknown)
    rate = now_tokens / max(time.perf_counter() - started, 1e-9)
    return ScaleProgress(tokens_before + now_tokens, total, rate, len(merger.merged), n, dict(live))


def summary(
    writer: StoreWriter,
    merger: ShardMerger,
    results: list[ShardResult],
    workers: list[WorkerSummary],
    n: int,
    seconds: float,
    fold_seconds: list[float],
    snapshot_seconds: list[float],
) -> ScaleSummary:
    """What the run did: a local run's summary of the store, and the workers'."""
    m = writer.manifest
    assert m is not None
    dense = m.settings.dense_threshold
    part = m.parts[-1]
    record = RecordSummary(
        store=str(writer.root),
        tokens=sum(r.tokens for r in results),
        windows=sum(r.windows for r in results),
        seconds=seconds,
        saes=[sae_summary(k, st, dense) for k, st in merger.states.items()],
        skipped="; ".join(f"{count} {why}" for why, count in part.skipped.items()),
    )
    return ScaleSummary(record, n, len(results), workers, fold_seconds, snapshot_seconds)


class Clock:
    """Seconds of each timed block: ``with clock: ...``."""

    def __init__(self) -> None:
        self.each: list[float] = []

    def __enter__(self) -> None:
        self._start = time.perf_counter()

    def __exit__(self, *exc: object) -> None:
        self.each.append(time.perf_counter() - self._start)


@dataclass
class Timing:
    """Where the driver's own time went."""

    fold: Clock = field(default_factory=Clock)
    snapshot: Clock = field(default_factory=Clock)
