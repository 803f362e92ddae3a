"""A recording session: ``open`` checks the run against the store and takes the store's lock,
``record`` feeds the batches (checkpointing, asking whether to stop), ``finish`` writes the
tables readers query. `scope record`, the Ray workers and `scope record --serve` (the explorer
shown while the recording goes on) all record through it; ``scope.record.record`` is the three
steps in a row.

While it runs, the session says how far it is in the store's progress file
(``scope.store.progress``), which the explorer's overview reads. With
``RecordSettings.snapshots`` every checkpoint is also a snapshot readers can open, so the
explorer serves the recording from its first minute."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from importlib import metadata
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any

from scope.corpus import CorpusSpec
from scope.errors import ScopeError
from scope.fit import check_fit
from scope.identity import ModelIdentity, sae_info, sae_keys
from scope.interrupt import StopFn
from scope.record.finalize import finalize
from scope.record.loop import ProgressFn, RecordProgress, run_batches
from scope.record.parts import open_part, part_first_doc
from scope.record.settings import RecordSettings, RecordSummary
from scope.record.spec import RunSpec, check_same
from scope.record.state import HIST_EDGES, SAMPLE_EDGES, FeatureState, load_states, save_states
from scope.record.tables import sae_summary, vocab_table
from scope.record.windows import PartWindows, write_windows
from scope.store.files import VersionBuilder
from scope.store.manifest import Manifest, Part, StoreSettings
from scope.store.progress import (
    PROGRESS,
    RecordingStatus,
    read_status,
    this_process,
    write_status,
)
from scope.store.writer import StoreWriter, current_part

if TYPE_CHECKING:
    from sae_lens import SAE, HookedSAETransformer

FIRST_SNAPSHOT_SECONDS = 15.0
"""With ``snapshots``, the first snapshot readers can open comes after this much recording (then
one every ``checkpoint_seconds``): what the explorer waits for."""
STATUS_SECONDS = 2.0
"""The progress file is rewritten at most this often."""

SnapshotFn = Callable[[str], None]
"""Told the name of every snapshot readers can open, once it is in place."""


def versions() -> dict[str, str]:
    out = {}
    for pkg in ("gemma-scope-workbench", "torch", "transformer-lens", "sae-lens", "transformers"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            out[pkg] = "?"
    return out


def new_manifest(spec: RunSpec) -> Manifest:
    """The manifest a new store of the run ``spec`` starts with."""
    assert spec.model is not None and spec.saes is not None
    s = spec.settings
    return Manifest(
        model=spec.model,
        saes=dict(spec.saes),
        settings=StoreSettings(
            ctx=s.ctx, k=s.k, samples=s.samples, dense_threshold=s.dense_threshold
        ),  # fmt: skip
        shard=list(s.shard),
        hist_edges=HIST_EDGES.tolist(),
        sample_edges=SAMPLE_EDGES.tolist(),
        versions=versions(),
    )


@dataclass
class _Run:
    """What an open session records with (absent when there is nothing to record)."""

    part: Part
    windows: PartWindows
    states: dict[str, FeatureState]


class RecordingSession:
    """One recording of one corpus into one store, holding the store's lock from ``open`` to
    ``finish`` (or ``close``): ``with RecordingSession.open(...) as s: s.record(); s.finish()``.

    ``spec`` is the run; ``progress`` the last batch's ``RecordProgress``; ``already_recorded``
    is True when ``--resume`` found this corpus recorded already (``record`` then does nothing).
    """

    def __init__(self, writer: StoreWriter, spec: RunSpec, model: HookedSAETransformer,
                 saes: dict[str, SAE], on_snapshot: SnapshotFn | None) -> None:  # fmt: skip
        self.writer, self.spec, self.model, self.saes = writer, spec, model, saes
        self.root = writer.root
        self.on_snapshot = on_snapshot
        self.progress: RecordProgress | None = None
        self._run: _Run | None = None
        self._skipped = ""
        self._tokens = 0  # counted by this session
        self._seconds = 0.0
        self._started = time.time()
        self._said = 0.0  # when the progress file was last written
        self._snapshot: tuple[str, int] | None = None  # newest readable: (name, part tokens)
        self._since_snapshot = time.perf_counter()
        self._stopping = False
        self._open = True

    # ------------------------------------------------------------ open

    @classmethod
    def open(
        cls,
        model: HookedSAETransformer,
        saes: list[SAE],
        corpus: CorpusSpec,
        store: str | Path,
        settings: RecordSettings | None = None,
        *,
        resume: bool = False,
        on_snapshot: SnapshotFn | None = None,
    ) -> RecordingSession:
        """Check the run (SAEs fit the model, the store holds the same run), take the store's
        lock, create the store or check it, window the corpus and load or start the state.
        ``on_snapshot`` is told each snapshot readers can open."""
        settings = settings or RecordSettings()
        if not saes:
            raise ScopeError("no SAEs given: pass --sae at least once")
        infos = [sae_info(s) for s in saes]
        keys = sae_keys(infos)
        for s in saes:
            check_fit(model, s)
        if settings.ctx > model.cfg.n_ctx:
            raise ScopeError(
                f"--ctx {settings.ctx} is longer than the context of {model.cfg.model_name} "
                f"({model.cfg.n_ctx} tokens): use --ctx {model.cfg.n_ctx} or less"
            )
        if settings.overlap is None:
            settings = replace(settings, overlap=_device(model).type == "cuda")
        writer = StoreWriter(store).__enter__()
        try:
            spec = RunSpec(model=None, saes=dict(zip(keys, infos, strict=True)), corpus=corpus,
                           settings=settings)  # fmt: skip
            session = cls(writer, spec, model, dict(zip(keys, saes, strict=True)), on_snapshot)
            session._start(resume)
        except BaseException:
            writer.__exit__(None, None, None)
            raise
        return session

    def _start(self, resume: bool) -> None:
        writer, root, model, settings = self.writer, self.root, self.model, self.spec.settings
        if writer.manifest is not None and writer.manifest.state_version is None:
            (root / PROGRESS).unlink(missing_ok=True)
            writer.start_over()  # its first run stopped before any checkpoint: nothing to keep
        sharded = writer.manifest.sharded if writer.manifest is not None else None
        if sharded is not None and not sharded.done:
            raise ScopeError(
                f"{root} holds a run recorded as {sharded.shards} shards, {len(sharded.merged)} "
                "merged so far: continue it with `scope record --ray ... --resume`"
            )
        like = writer.manifest.model if writer.manifest is not None else None
        self.spec = replace(self.spec, model=ModelIdentity.of(model, like=like))
        if writer.manifest is None:
            if read_status(root) is not None:  # a first run's, stopped before its checkpoint
                (root / PROGRESS).unlink()
            writer.create(new_manifest(self.spec),
                          lambda: vocab_table(model.tokenizer, model.cfg.d_vocab))  # fmt: skip
        else:
            check_same(RunSpec.of_store(writer.manifest), self.spec, where=str(root))
        manifest = writer.manifest
        assert manifest is not None and self.spec.corpus is not None
        saes = list(self.saes.values())
        batch = settings.batch_size or fit_batch_size(model, saes, settings.ctx,
                                                      bool(settings.overlap))  # fmt: skip
        index = len(manifest.parts) - (current_part(manifest) is not None)
        written = write_windows(
            self.spec.corpus, model.tokenizer, root / "windows", index, shard=settings.shard,
            first_doc=part_first_doc(manifest, root),
        )  # fmt: skip
        self._skipped = written.report.summary()
        finished = [p.fingerprint for p in manifest.parts if p is not current_part(manifest)]
        if resume and current_part(manifest) is None and written.fingerprint in finished:
            written.path.unlink()  # a retried job: this corpus is in the store already
            return
        try:
            part, windows = open_part(writer, written, self.spec, resume, batch)
        except BaseException:
            written.path.unlink(missing_ok=True)  # refused: the part's windows are not kept
            raise
        device = _device(model)
        states = (
            load_states(root / manifest.state_version, list(self.saes), device)
            if manifest.state_version
            else {}
        )
        for key, s in self.saes.items():
            states.setdefault(key, FeatureState.empty(
                s.cfg.d_sae, k=settings.k, ctx=settings.ctx, m=settings.samples, device=device
            ))  # fmt: skip
        self._run = _Run(part, windows, states)
        self.spec = replace(self.spec, windows=tuple(p.fingerprint for p in manifest.parts))
        shown = manifest.tables_version
        if shown is not None and shown == manifest.state_version and part.next > 0:
            self._snapshot = (shown, self._part_tokens(part.next))  # a snapshot of this part
        done = self._part_tokens(part.next)
        self.progress = RecordProgress(done, windows.n_tokens, 0.0, part.next, len(windows))
        self._say("recording")

    # ------------------------------------------------------------ record

    @property
    def already_recorded(self) -> bool:
        return self._run is None

    def record(
        self, on_progress: ProgressFn | None = None, should_stop: StopFn | None = None
    ) -> int:
        """Feed the part's remaining windows; return the tokens counted. ``on_progress`` is
        called after every batch; ``should_stop`` is asked between batches and, when it gives a
        reason, the state is checkpointed and a ScopeError raised that says how to resume."""
        if self._run is None:
            return 0
        run, settings = self._run, self.spec.settings

        def progress(p: RecordProgress) -> None:
            self.progress = p
            if time.monotonic() - self._said >= STATUS_SECONDS:
                self._say("recording")
            if on_progress is not None:
                on_progress(p)

        def stop() -> str | None:
            reason = should_stop() if should_stop is not None else None
            self._stopping = bool(reason)
            return reason

        asked = settings
        if settings.snapshots:  # asked more often; ``_checkpoint`` writes when one is due
            asked = replace(settings, checkpoint_seconds=min(
                FIRST_SNAPSHOT_SECONDS, settings.checkpoint_seconds))  # fmt: skip
        started = time.perf_counter()
        tokens = run_batches(self.model, list(self.saes.values()), list(self.saes), run.states,
                             run.windows, run.part, asked, self._checkpoint, progress, stop)  # fmt: skip
        self._tokens += tokens
        self._seconds += time.perf_counter() - started
        return tokens

    def _checkpoint(self, final: bool) -> None:
        """Save the state (the loop calls this between whole batches); with ``snapshots``, or
        at the end, as a snapshot readers can open."""
        assert self._run is not None
        run, settings, writer = self._run, self.spec.settings, self.writer
        manifest = writer.manifest
        assert manifest is not None
        since = time.perf_counter() - self._since_snapshot
        due = self._snapshot is None or since >= settings.checkpoint_seconds
        if not final and settings.snapshots and not (due or self._stopping):
            return
        readable = final or settings.snapshots

        def fill(builder: VersionBuilder) -> None:
            save_states(builder, run.states)
            if readable:
                finalize(builder, manifest, run.states, self.saes, self.model, self.root,
                         tables=settings.tables)  # fmt: skip

        if readable:
            self._say("recording", writing=True)
        name = writer.commit(fill, final=readable, complete=final)
        self._since_snapshot = time.perf_counter()
        if readable and settings.tables:
            self._snapshot = (name, self._part_tokens(run.part.next))
            self._say("complete" if final else "recording")
            if self.on_snapshot is not None:
                self.on_snapshot(name)

    # ------------------------------------------------------------ finish

    def finish(self) -> RecordSummary:
        """Write the tables readers query, mark the store complete, release it; what was
        recorded."""
        root = str(self.root)
        try:
            if self._run is None:
                return RecordSummary(store=root, tokens=0, windows=0, seconds=0.0,
                                     skipped=self._skipped, already_recorded=True)  # fmt: skip
            run, manifest = self._run, self.writer.manifest
            assert manifest is not None
            if run.part.next < len(run.windows):
                raise ScopeError(
                    f"the recording into {root} is at window {run.part.next:,} of "
                    f"{len(run.windows):,}: record() to the end before finish()"
                )
            manifest.tokens_recorded += self._tokens
            manifest.seconds += self._seconds
            self._checkpoint(final=True)
            dense = self.spec.settings.dense_threshold
            return RecordSummary(
                store=root,
                tokens=self._tokens,
                windows=len(self._run.windows),
                seconds=self._seconds,
                saes=[sae_summary(k, st, dense) for k, st in self._run.states.items()],
                skipped=self._skipped,
            )
        finally:
            self.close()

    def close(self) -> None:
        """Release the store (a session not finished stays resumable from its checkpoint)."""
        if not self._open:
            return
        self._open = False
        try:
            if self._run is not None:
                complete = (
                    self.writer.manifest is not None and self.writer.manifest.state == "complete"
                )
                self._say("complete" if complete else "stopped")
        finally:
            self.writer.__exit__(None, None, None)

    def __enter__(self) -> RecordingSession:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, err: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    # ------------------------------------------------------------ progress

    def _part_tokens(self, windows: int) -> int:
        """Counted tokens in the part's first ``windows`` windows (BOS excluded)."""
        assert self._run is not None
        return int(self._run.windows.lengths[:windows].sum()) - windows

    def _say(self, state: str, writing: bool = False) -> None:
        """Rewrite the progress file (what the explorer's overview shows)."""
        p = self.progress
        if p is None:
            return
        pid, host = this_process()
        name, tokens = self._snapshot if self._snapshot is not None else (None, None)
        write_status(self.root, RecordingStatus(
            state=state, tokens=p.tokens, total=p.total, tokens_per_s=p.tokens_per_s,
            snapshot=name, snapshot_tokens=tokens, started=self._started, updated=time.time(),
            pid=pid, host=host, writing=writing,
        ))  # fmt: skip
        self._said = time.monotonic()


def _device(model: Any) -> Any:
    return next(model.parameters()).device


def fit_batch_size(
    model: HookedSAETransformer, saes: list[SAE], ctx: int, overlap: bool = False
) -> int:
    """Windows per batch that fit in about half the free memory (GPU) or 2 GiB (CPU); with
    ``overlap`` two batches' codes are alive at once (``RecordSettings.overlap``)."""
    import torch

    cfg = model.cfg
    device = _device(model)
    if device.type == "cuda":
        budget = torch.cuda.mem_get_info(device)[0] * 0.5
    else:
        budget = 2 * 2**30
    act_bytes = 4 if cfg.dtype == torch.float32 else 2
    forward = ctx * act_bytes * (6 * cfg.d_model + 3 * (cfg.d_mlp or 0) + cfg.n_heads * ctx)
    codes = ctx * 4 * sum(4 * s.cfg.d_sae for s in saes)
    held = ctx * 4 * sum(s.cfg.d_sae for s in saes) if overlap else 0  # the previous batch's
    return int(max(1, min(256, budget // (forward + codes + held))))


__all__ = ["FIRST_SNAPSHOT_SECONDS", "RecordingSession", "fit_batch_size", "new_manifest"]
