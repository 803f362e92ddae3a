"""What each Ray worker of `scope record --ray` runs: the model and SAEs loaded once, then one
shard after another recorded by a ``RecordingSession``, exactly as a local ``--shard i/N`` run
records it, into a folder of its own. The files a merge needs go back to the driver.

Nothing here imports Ray: the driver (``scope.record.distributed``) wraps ``ShardWorker`` as an
actor and hands it a queue for progress reports.
"""

from __future__ import annotations

import contextlib
import math
import os
import socket
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import torch

from scope.corpus import CorpusSpec
from scope.fit import check_fit
from scope.identity import sae_info, sae_keys
from scope.record import tables
from scope.record.loop import RecordProgress
from scope.record.merge import shard_files
from scope.record.session import RecordingSession
from scope.record.settings import RecordSettings
from scope.store.schema import LENS, lens_file

PROGRESS_SECONDS = 0.5
"""A worker reports a shard's progress at most this often."""

LoadFn = Callable[[str], tuple[Any, list[Any]]]
"""Given the device ("cuda" or "cpu"), the model and its SAEs; called once per worker process
(again after a restart). It travels to the workers pickled, so module-level functions and
dataclasses such as ``Loader`` work."""


@dataclass(frozen=True)
class Loader:
    """Load the model and SAEs by the names a local run takes: hub names (each node downloads
    or reads its own cache) or folders at the same path on every node."""

    model: str
    """Hub name or checkpoint folder (``--model``)."""
    saes: tuple[str, ...]
    """RELEASE/ID or folders (``--sae``), in order; one given twice is loaded once."""
    dtype: str | None = None
    """float32 or bfloat16 (default: bf16 on a GPU)."""
    hook: str | None = None
    """The hook an SAE folder reads, when its path does not say."""

    def __call__(self, device: str) -> tuple[Any, list[Any]]:
        from scope.model import load_model
        from scope.sae import load_sae

        model = load_model(self.model, device=device, dtype=self.dtype)
        loaded: dict[str, Any] = {}
        for spec in self.saes:
            if spec not in loaded:
                loaded[spec] = load_sae(spec, device=device, dtype=self.dtype, hook=self.hook)
        return model, [loaded[spec] for spec in self.saes]


@dataclass(frozen=True)
class WorkerInfo:
    """Where a worker runs."""

    node: str
    """Host name."""
    pid: int
    device: str
    threads: int
    """torch's CPU threads."""


@dataclass(frozen=True)
class Report:
    """A worker's progress on a shard, sent while it records."""

    worker: int
    shard: int
    pid: int
    """The worker's process: a new one means the worker was restarted."""
    tokens: int
    """Counted tokens of the shard recorded so far."""
    total: int | None
    """Counted tokens of the shard, once its windows are known."""


@dataclass(frozen=True)
class ShardResult:
    """A finished shard: the files of its store a merge reads, and what it cost."""

    shard: int
    files: dict[str, bytes]
    """Path relative to the shard store -> contents (``scope.record.merge.shard_files``)."""
    tokens: int
    windows: int
    seconds: float
    pid: int


class ShardWorker:
    """The body of one Ray actor. The model and SAEs are loaded on first use and kept for
    every later shard; ``threads`` fixes torch's CPU threads (CPU workers)."""

    def __init__(self, load: LoadFn, device: str, threads: int | None) -> None:
        if threads is not None:
            torch.set_num_threads(threads)
        self._load, self._device = load, device
        self._loaded: tuple[Any, list[Any]] | None = None

    def _models(self) -> tuple[Any, list[Any]]:
        if self._loaded is None:
            model, saes = self._load(self._device)
            for sae in saes:
                check_fit(model, sae)  # a misfit fails here, before any shard starts
            self._loaded = model, saes
        return self._loaded

    def start(self) -> WorkerInfo:
        """Load the model and SAEs; say where this worker runs."""
        self._models()
        return WorkerInfo(socket.gethostname(), os.getpid(), self._device, torch.get_num_threads())

    def lens(self) -> dict[str, bytes]:
        """The lens tables (logit lens, decoder neighbours) of every SAE, as a store keeps
        them: ``lens/<key>.parquet`` -> contents. They depend only on the model and the SAEs,
        so the driver asks one worker once."""
        model, saes = self._models()
        keys = sae_keys([sae_info(s) for s in saes])
        files = {}
        for key, sae in dict(zip(keys, saes, strict=True)).items():
            sink = pa.BufferOutputStream()
            pq.write_table(LENS.conform(tables.lens_table(key, sae, model)), sink)
            files[lens_file(key)] = sink.getvalue().to_pybytes()
        return files

    def record_shard(
        self,
        worker: int,
        shard: int,
        shards: int,
        corpus: CorpusSpec,
        settings: RecordSettings,
        reports: Any,
    ) -> ShardResult:
        """Record shard ``shard``/``shards`` of ``corpus`` into a temporary store, putting a
        ``Report`` on the ``reports`` queue now and then; return the files a merge reads."""
        model, saes = self._models()
        pid = os.getpid()
        tell = _teller(reports)
        tell(Report(worker, shard, pid, 0, None))
        last = time.monotonic()

        def on_progress(p: RecordProgress) -> None:
            nonlocal last
            if time.monotonic() - last >= PROGRESS_SECONDS:
                last = time.monotonic()
                tell(Report(worker, shard, pid, p.tokens, p.total))

        # a shard is short and its folder goes with the process: checkpoints would be lost;
        # the driver writes the tables readers query, from the merged state and ``lens()``
        one = replace(settings, shard=(shard, shards), checkpoint_seconds=math.inf, tables=False,
                      snapshots=False)  # fmt: skip
        started = time.perf_counter()
        with tempfile.TemporaryDirectory(prefix="scope-shard-") as tmp:
            root = Path(tmp) / "store"
            with RecordingSession.open(model, saes, corpus, root, one) as session:
                session.record(on_progress)
                summary = session.finish()
            files = {rel: (root / rel).read_bytes() for rel in shard_files(root)}
        seconds = time.perf_counter() - started
        return ShardResult(shard, files, summary.tokens, summary.windows, seconds, pid)


def _teller(reports: Any) -> Callable[[Report], None]:
    """Put reports on the queue, giving up quietly while it is unreachable: a lost report
    costs a progress update, never the shard."""

    def tell(report: Report) -> None:
        with contextlib.suppress(Exception):  # Ray's errors, a restarting queue: progress only
            reports.put(report, timeout=PROGRESS_SECONDS)

    return tell
