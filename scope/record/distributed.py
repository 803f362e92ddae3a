"""`scope record --ray`: one recording spread over the workers of a Ray cluster.

The corpus is cut into many more shards than workers (shard i/N holds the documents whose
index % N == i), so a slow or lost worker costs one shard. Each worker is a Ray actor that loads
the model and SAEs once and records shard after shard the way a local ``--shard i/N`` run does
(``scope.record.shard_worker``); the files a merge needs come back through Ray's object store,
and this driver folds each shard into the store as it arrives (``ShardMerger``), so the store
is readable all along and ends equal to one pass, to the bit.

Faults: a worker process that dies (killed, out of host memory, its node lost) is restarted by
Ray and the call recording its shard retried from the shard's start. A driver that dies leaves
a store whose manifest lists the shards merged; ``resume=True`` records only the others.

Ray is an optional dependency (``pip install 'gemma-scope-workbench[ray]'``), imported only
when a run starts.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from scope.corpus import CorpusSpec
from scope.errors import ScopeError
from scope.record.merge import ShardMerger
from scope.record.scale_report import (
    ScaleProgress,
    ScaleSummary,
    Timing,
    WorkerSummary,
    progress,
    seen,
    summary,
    tally,
)
from scope.record.settings import RecordSettings, RecordSummary
from scope.record.shard_worker import LoadFn, Report, ShardResult, ShardWorker, WorkerInfo
from scope.record.spec import SAME_CORPUS, RunSpec, check_same
from scope.store.manifest import Manifest, read_manifest
from scope.store.writer import StoreWriter

TICK_SECONDS = 0.25
"""How often the driver looks at progress reports while waiting for shards."""


@dataclass(frozen=True, kw_only=True)
class RayOptions:
    """Where a `scope record --ray` run goes and how wide."""

    address: str = "auto"
    """"auto" (the cluster `ray start --head` started, or RAY_ADDRESS), "local" (a cluster
    started on this machine for the run) or an address ("10.0.0.1:6379", "ray://head:10001").
    A Ray this process is already connected to (``ray.init`` in a notebook) is used as it is."""
    workers: int | None = None
    """Workers, each with its own model: default one per GPU, else one per ``threads`` CPUs."""
    shards: int | None = None
    """Shards the corpus is cut into: default 4 per worker, so a lost worker costs little."""
    threads: int | None = None
    """CPU threads per worker (torch.set_num_threads): default the cluster's CPUs shared out."""
    device: str | None = None
    """cuda or cpu: default cuda where the cluster has GPUs."""
    retries: int = 3
    """Times a worker process that dies is restarted and its shard recorded again."""

    def __post_init__(self) -> None:
        for name in ("workers", "shards", "threads"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ScopeError(f"--{name} {value} must be at least 1")
        if self.device not in (None, "cuda", "cpu"):
            raise ScopeError(f"--device {self.device} with --ray: use cuda or cpu")
        if self.retries < 0:
            raise ScopeError(f"retries {self.retries} must be 0 or more")


ProgressFn = Callable[[ScaleProgress], None]


def record_on_ray(
    load: LoadFn,
    corpus: CorpusSpec,
    store: str | Path,
    settings: RecordSettings | None = None,
    options: RayOptions | None = None,
    *,
    resume: bool = False,
    on_progress: ProgressFn | None = None,
) -> ScaleSummary:
    """Record ``corpus`` into a new store at ``store`` on a Ray cluster: what ``record`` does
    in one process, spread over ``options.workers`` workers that each call ``load`` once.
    With ``resume``, continue a run that stopped part-way (only shards not merged run).
    Nothing is written until the workers have loaded the model and SAEs."""
    settings, options = settings or RecordSettings(), options or RayOptions()
    if settings.shard != (0, 1):
        raise ScopeError("--shard does not go with --ray: --ray cuts the corpus into --shards")
    windowed = RunSpec(model=None, saes=None, corpus=corpus, settings=settings).corpus
    assert windowed is not None
    corpus = windowed  # cut at the settings' ctx, the run's one window length
    root = Path(store)
    ray = _import_ray()
    if root.exists() and not root.is_dir():
        raise ScopeError(f"store {root} is a file, not a folder: pick a folder path")
    before = read_manifest(root) if root.is_dir() else None
    if before is None and root.is_dir():
        StoreWriter(root).check_new()
    done = _check_store(before, root, corpus, settings, options, resume)
    if done is not None:
        return done
    started_here = _connect(ray, options.address)
    try:
        return _run(ray, root, load, corpus, settings, options, resume, on_progress)
    except KeyboardInterrupt:
        after = read_manifest(root) if root.is_dir() else None
        merged = after.sharded.merged if after and after.sharded else []
        raise ScopeError(
            f"stopped by Ctrl-C with {len(merged)} shards merged into {root}: run the same "
            "command with --resume to record the others"
        ) from None
    finally:
        if started_here:
            ray.shutdown()


def _import_ray() -> Any:
    try:
        import ray
    except ImportError:
        raise ScopeError(
            "--ray needs Ray: pip install 'gemma-scope-workbench[ray]' (or pip install ray)"
        ) from None
    return ray


def _check_store(
    m: Manifest | None,
    root: Path,
    corpus: CorpusSpec,
    settings: RecordSettings,
    options: RayOptions,
    resume: bool,
) -> ScaleSummary | None:
    """Refuse a store (with manifest ``m``) this run cannot go into; a finished run resumed
    gives its summary."""
    if m is None:
        return None
    sharded = m.sharded
    if sharded is not None and not sharded.done and not resume:
        raise ScopeError(
            f"{root} holds an interrupted --ray run ({len(sharded.merged)} of {sharded.shards} "
            "shards merged): add --resume to continue it"
        )
    if sharded is None or not resume:
        raise ScopeError(
            f"{root} is a store already: --ray records into a new --store (add corpus to this "
            "one with a plain `scope record`)"
        )
    if options.shards is not None and options.shards != sharded.shards:
        raise ScopeError(
            f"{root} is being recorded as {sharded.shards} shards, not {options.shards}: "
            f"use --shards {sharded.shards} (or leave it out) to continue it"
        )
    asked = RunSpec(model=None, saes=None, corpus=corpus, settings=settings)
    check_same(RunSpec.of_store(m), asked, where=str(root), compare=SAME_CORPUS)
    if not sharded.done:
        return None
    record = RecordSummary(store=str(root), tokens=0, windows=0, seconds=0.0, already_recorded=True)
    return ScaleSummary(record=record, shards=sharded.shards, shards_recorded=0)


def _connect(ray: Any, address: str) -> bool:
    """Connect to (or, for "local", start) the cluster; True when this call connected."""
    if ray.is_initialized():
        return False
    local = {"include_dashboard": False} if address == "local" else {}
    try:
        ray.init(address=address, logging_level=logging.ERROR, log_to_driver=False, **local)
    except (ConnectionError, RuntimeError, ValueError) as err:
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ScopeError(
            f"--ray {address}: no Ray cluster to connect to ({reason}); start one with "
            "`ray start --head`, give its address, or use --ray local"
        ) from None
    return True


@dataclass(frozen=True)
class WorkerPlan:
    """How many workers, on what, and what each asks Ray for."""

    device: str
    workers: int
    threads: int | None
    resources: dict[str, float]


def plan_workers(resources: dict[str, float], options: RayOptions) -> WorkerPlan:
    """Workers, threads and what each asks Ray for, from the cluster's size."""
    gpus, cpus = int(resources.get("GPU", 0)), int(resources.get("CPU", 0))
    device = options.device or ("cuda" if gpus else "cpu")
    if device == "cuda":
        workers = options.workers or gpus
        if workers > gpus:
            raise ScopeError(
                f"--workers {workers} needs {workers} GPUs but the Ray cluster has {gpus}: "
                f"use --workers {gpus} or fewer{', or --device cpu' if not gpus else ''}"
            )
        return WorkerPlan(device, workers, options.threads, {"num_gpus": 1, "num_cpus": 1})
    threads = options.threads or max(1, cpus // (options.workers or cpus or 1))
    workers = options.workers or max(1, cpus // threads)
    if workers * threads > cpus:
        raise ScopeError(
            f"--workers {workers} x --threads {threads} needs {workers * threads} CPUs but the "
            f"Ray cluster has {cpus}: lower --workers or --threads"
        )
    return WorkerPlan(device, workers, threads, {"num_cpus": threads})


def _get(ray: Any, refs: Any, what: str, retries: int) -> Any:
    """``ray.get``, with what went wrong in a worker told as a local run tells it."""
    try:
        return ray.get(refs)
    except ray.exceptions.RayTaskError as err:
        cause = err.cause
        if isinstance(cause, ScopeError):
            raise ScopeError(str(cause)) from None
        if isinstance(cause, torch.cuda.OutOfMemoryError):
            raise ScopeError(f"{what} ran out of GPU memory: pass a smaller --batch-size") from None
        raise
    except ray.exceptions.OutOfMemoryError:
        raise ScopeError(
            f"{what}: Ray stopped its worker {retries + 1} times for lack of host memory: use "
            "fewer --workers or a smaller --batch-size (or free memory on the node); the shards "
            "merged so far are kept: run the same command with --resume"
        ) from None
    except (ray.exceptions.RayActorError, ray.exceptions.WorkerCrashedError):
        raise ScopeError(
            f"{what}: its worker process died {retries + 1} times (killed, or out of host "
            "memory: `ray logs` on its node says which); the shards merged so far are kept: "
            "run the same command with --resume"
        ) from None


def _drain(ray: Any, reports: Any) -> list[Report]:
    """The progress reports waiting; none when the queue is being restarted (they are only
    progress: the shards' results come back on their own)."""
    try:
        return list(reports.get_nowait_batch(reports.qsize()))
    except ray.exceptions.RayError:
        return []


def _run(
    ray: Any,
    root: Path,
    load: LoadFn,
    corpus: CorpusSpec,
    settings: RecordSettings,
    options: RayOptions,
    resume: bool,
    on_progress: ProgressFn | None,
) -> ScaleSummary:
    """Start the workers; once they have loaded, take the store's lock and drive the run."""
    from ray.util.queue import Queue

    plan = plan_workers(ray.cluster_resources(), options)
    before = read_manifest(root) if root.is_dir() else None
    sharded = before.sharded if before else None
    n = sharded.shards if sharded else options.shards or 4 * plan.workers
    n_workers = min(plan.workers, n - len(sharded.merged if sharded else []))
    actor = ray.remote(ShardWorker).options(
        max_restarts=options.retries, max_task_retries=options.retries, **plan.resources
    )
    # a queue killed (e.g. by Ray's memory monitor) comes back; reports in it are only progress
    reports = Queue(actor_options={"num_cpus": 0, "max_restarts": -1, "max_task_retries": -1})
    actors = [actor.remote(load, plan.device, plan.threads) for _ in range(n_workers)]
    try:
        starts = [a.start.remote() for a in actors]
        infos: list[WorkerInfo] = _get(ray, starts, "a worker starting", options.retries)
        with StoreWriter(root) as writer:
            if writer.manifest is None:
                writer.check_new()
            _check_store(writer.manifest, root, corpus, settings, options, resume)  # locked now
            pool = _Pool(actors, infos, reports)
            return _drive(ray, writer, pool, corpus, settings, options.retries, n, on_progress)
    finally:
        for a in actors:
            ray.kill(a)
        ray.kill(reports.actor, no_restart=True)


@dataclass(frozen=True)
class _Pool:
    actors: list[Any]
    infos: list[WorkerInfo]
    reports: Any
    """The queue workers put ``Report``s on."""


def _drive(
    ray: Any,
    writer: StoreWriter,
    pool: _Pool,
    corpus: CorpusSpec,
    settings: RecordSettings,
    retries: int,
    n: int,
    on_progress: ProgressFn | None,
) -> ScaleSummary:
    """Hand shards to idle workers and fold each finished one into the store at once."""
    merger = ShardMerger(writer, n)
    todo = deque(i for i in range(n) if i not in merger.merged)
    tokens_before = writer.manifest.tokens_recorded if writer.manifest else 0
    workers = [
        WorkerSummary(w, i.node, i.device, i.threads, pids={i.pid})
        for w, i in enumerate(pool.infos)
    ]
    running: dict[Any, tuple[int, int]] = {}  # the call recording a shard -> (worker, shard)

    def assign(w: int) -> None:
        if todo:
            shard = todo.popleft()
            call = pool.actors[w].record_shard.remote(w, shard, n, corpus, settings, pool.reports)
            running[call] = (w, shard)

    for w in range(len(pool.actors)):
        assign(w)
    lens = pool.actors[0].lens.remote() if merger.needs_lens else None  # once, before its shard
    live: dict[int, Report] = {}
    results: list[ShardResult] = []
    timing = Timing()
    started = last_snapshot = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="scope-shards-") as staging:
        try:
            while running:
                ready, _ = ray.wait(list(running), num_returns=1, timeout=TICK_SECONDS)
                for r in _drain(ray, pool.reports):
                    if r.shard in {s for _, s in running.values()}:
                        live[r.shard] = r
                        seen(workers[r.worker], r.pid)
                for ref in ready:
                    w, shard = running.pop(ref)
                    what = f"shard {shard}/{n} on worker {w} ({workers[w].node})"
                    result: ShardResult = _get(ray, ref, what, retries)
                    assign(w)  # the worker goes on while this shard merges
                    live.pop(shard, None)
                    with timing.fold:
                        _fold(merger, result, Path(staging), n)
                    results.append(result)
                    tally(workers[w], result)
                since = time.perf_counter() - last_snapshot
                if merger.pending and (not running or since >= settings.checkpoint_seconds):
                    if merger.needs_lens:
                        _lens(merger, _get(ray, lens, "the lens tables", retries), Path(staging))
                    with timing.snapshot:
                        _snapshot(merger, Path(staging))
                    last_snapshot = time.perf_counter()
                if on_progress is not None:
                    on_progress(progress(results, live, tokens_before, started, n, merger))
        finally:
            if merger.pending and not merger.needs_lens:  # stopped: keep what is merged
                _snapshot(merger, Path(staging))
    seconds = time.perf_counter() - started
    return summary(
        writer, merger, results, workers, n, seconds, timing.fold.each, timing.snapshot.each
    )


def _unpack(files: dict[str, bytes], root: Path) -> Path:
    """Write files sent from a worker (relative path -> contents) under ``root``."""
    for rel, data in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    return root


def _fold(merger: ShardMerger, result: ShardResult, staging: Path, n: int) -> None:
    """Write the shard's files to a folder here (kept until the next snapshot) and fold the
    shard into the merged state."""
    root = _unpack(result.files, staging / f"shard-{result.shard:04d}")
    merger.add(root, name=f"shard {result.shard}/{n}")


def _lens(merger: ShardMerger, files: dict[str, bytes], staging: Path) -> None:
    """Keep the lens tables a worker computed for the store's first snapshot."""
    merger.use_lens(_unpack(files, staging / "lens-tables"))


def _snapshot(merger: ShardMerger, staging: Path) -> None:
    """Write what is merged as a snapshot readers see (and a resumed run starts from)."""
    merger.commit()
    for folder in staging.iterdir():
        shutil.rmtree(folder)
