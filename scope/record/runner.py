"""`scope record`: one forward pass per batch feeds every SAE; state is checkpointed so a killed
run resumes to exactly the same result; the store is written atomically."""

from __future__ import annotations

import time
from dataclasses import replace
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from scope.corpus import CHUNK_BITS, CorpusSpec
from scope.errors import ScopeError
from scope.fit import check_fit
from scope.identity import ModelIdentity, SAEInfo, sae_info, sae_keys
from scope.interrupt import StopFn
from scope.record.finalize import finalize
from scope.record.loop import ProgressFn, run_batches
from scope.record.settings import RecordSettings, RecordSummary
from scope.record.state import HIST_EDGES, SAMPLE_EDGES, FeatureState, load_states, save_states
from scope.record.tables import sae_summary, vocab_table
from scope.record.windows import PartWindows, write_windows
from scope.store.files import VersionBuilder
from scope.store.manifest import Manifest, Part, StoreSettings
from scope.store.writer import StoreWriter, current_part

if TYPE_CHECKING:
    from sae_lens import SAE, HookedSAETransformer


def versions() -> dict[str, str]:
    out = {}
    for pkg in ("gemma-scope-workbench", "torch", "transformer-lens", "sae-lens", "transformers"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            out[pkg] = "?"
    return out


def fit_batch_size(
    model: HookedSAETransformer, saes: list[SAE], ctx: int, overlap: bool = False
) -> int:
    """Windows per batch that fit in about half the free memory (GPU) or 2 GiB (CPU); with
    ``overlap`` two batches' codes are alive at once (``RecordSettings.overlap``)."""
    cfg = model.cfg
    device = next(model.parameters()).device
    if device.type == "cuda":
        budget = torch.cuda.mem_get_info(device)[0] * 0.5
    else:
        budget = 2 * 2**30
    act_bytes = 4 if cfg.dtype == torch.float32 else 2
    forward = ctx * act_bytes * (6 * cfg.d_model + 3 * (cfg.d_mlp or 0) + cfg.n_heads * ctx)
    codes = ctx * 4 * sum(4 * s.cfg.d_sae for s in saes)
    held = ctx * 4 * sum(s.cfg.d_sae for s in saes) if overlap else 0  # the previous batch's
    return int(max(1, min(256, budget // (forward + codes + held))))


def check_same(manifest: Manifest, new: Manifest, root: Path) -> None:
    """Refuse to add to a store recorded with another model, other SAEs or settings."""
    old_model, model = manifest.model, new.model
    if old_model.fingerprint != model.fingerprint or old_model.d_model != model.d_model:
        raise ScopeError(
            f"{root} was recorded with model {old_model.name} (fingerprint "
            f"{old_model.fingerprint}), not {model.name} ({model.fingerprint}): "
            "record into a new --store, or load the same model"
        )
    old, given = manifest.saes, new.saes
    if set(old) != set(given) or any(old[k].sha256 != given[k].sha256 for k in old):
        raise ScopeError(
            f"{root} holds SAEs {', '.join(sorted(old))}, which differ from the ones given "
            f"({', '.join(sorted(given))}): pass the same --sae list, or record into a new --store"
        )
    for name in ("ctx", "k", "samples"):
        was, now = getattr(manifest.settings, name), getattr(new.settings, name)
        if was != now:
            raise ScopeError(
                f"{root} was recorded with --{name} {was}, not {now}: use the same value, "
                "or a new --store"
            )
    if manifest.shard != new.shard:
        raise ScopeError(f"{root} is shard {manifest.shard}, not {new.shard}")


def new_manifest(
    model: Any,
    sae_ids: dict[str, SAEInfo],
    settings: RecordSettings,
    like: Manifest | None = None,
) -> Manifest:
    """The manifest a new store would start with (its model fingerprint taken as the store
    ``like``'s was, to compare with it)."""
    return Manifest(
        model=ModelIdentity.of(model, like=like.model if like is not None else None),
        saes=sae_ids,
        settings=StoreSettings(
            ctx=settings.ctx,
            k=settings.k,
            samples=settings.samples,
            dense_threshold=settings.dense_threshold,
        ),
        shard=list(settings.shard),
        hist_edges=HIST_EDGES.tolist(),
        sample_edges=SAMPLE_EDGES.tolist(),
        versions=versions(),
    )


def open_part(
    writer: StoreWriter,
    windows: PartWindows,
    corpus: CorpusSpec,
    resume: bool,
    batch_size: int,
) -> tuple[Part, PartWindows]:
    """The corpus part to record: the interrupted one (with --resume), or a new one appended.
    ``windows`` were written for it beside the store; they are moved into place."""
    manifest, root = writer.manifest, writer.root
    assert manifest is not None
    interrupted = current_part(manifest)
    if interrupted is not None:
        if not resume:
            raise ScopeError(
                f"{root} holds an interrupted run of {', '.join(interrupted.corpus)} "
                f"({interrupted.next:,} windows recorded and kept): add --resume to continue it"
            )
        if interrupted.fingerprint != windows.fingerprint:
            raise ScopeError(
                f"--resume needs the same corpus and --tokens as the interrupted run of {root} "
                f"(its corpus was {', '.join(interrupted.corpus)})"
            )
    elif any(p.fingerprint == windows.fingerprint for p in manifest.parts):
        raise ScopeError(
            f"{root} already holds this corpus (same windows): adding it again would count it twice"
        )
    else:
        manifest.parts.append(
            Part(
                corpus=list(corpus.paths),
                field=corpus.field,
                max_tokens=corpus.max_tokens,
                fingerprint=windows.fingerprint,
                first_doc=next_doc(manifest),
                docs=windows.report.read,
                windows=len(windows),
                tokens=windows.n_tokens,
                documents=windows.report.documents,
                skipped=windows.report.skipped,
                next=0,
                batch_size=batch_size,
            )
        )
        manifest.state = "recording"
    path = writer.place_windows(len(manifest.parts) - 1, windows.path)
    writer.save()
    return manifest.parts[-1], replace(windows, path=path)


def next_doc(manifest: Manifest) -> int:
    """The document index a new part starts at: after every part's documents (and, for parts
    of older stores with dense window ids, after all of their ids)."""
    end = 0
    for p in manifest.parts:
        if p.first_doc is not None and p.docs is not None:
            end = max(end, p.first_doc + p.docs)
        else:
            last_id = (p.first_window or 0) + p.windows - 1
            end = max(end, (last_id >> CHUNK_BITS) + 1)
    return end


def part_first_doc(manifest: Manifest, root: Path) -> int:
    """Where the windows of the part to record are numbered from."""
    interrupted = current_part(manifest)
    if interrupted is None:
        return next_doc(manifest)
    if interrupted.first_doc is None:
        raise ScopeError(
            f"{root} holds a run interrupted under an older version of the workbench, which "
            "numbered windows differently: record that corpus into a new --store"
        )
    return interrupted.first_doc


def record(
    model: HookedSAETransformer,
    saes: list[SAE],
    corpus: CorpusSpec,
    store: str | Path,
    settings: RecordSettings | None = None,
    *,
    resume: bool = False,
    on_progress: ProgressFn | None = None,
    should_stop: StopFn | None = None,
) -> RecordSummary:
    """Record every feature of ``saes`` over ``corpus`` into the store at ``store``.

    ``on_progress`` is called after every batch with a ``RecordProgress``; ``should_stop`` is
    asked between batches and, when it returns a reason, the run checkpoints and raises a
    ScopeError that says how to resume (``stop_on_signals`` makes one from Ctrl-C/SIGTERM)."""
    settings = settings or RecordSettings()
    corpus = replace(corpus, ctx=settings.ctx)  # the settings' window length wins
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
    device = next(model.parameters()).device
    if settings.overlap is None:
        settings = replace(settings, overlap=device.type == "cuda")
    by_key = dict(zip(keys, saes, strict=True))
    with StoreWriter(store) as writer:
        root = writer.root
        if writer.manifest is not None and writer.manifest.state_version is None:
            writer.start_over()  # its first run stopped before any checkpoint: nothing to keep
        sharded = writer.manifest.sharded if writer.manifest is not None else None
        if sharded is not None and not sharded.done:
            raise ScopeError(
                f"{root} holds a run recorded as {sharded.shards} shards, {len(sharded.merged)} "
                "merged so far: continue it with `scope record --ray ... --resume`"
            )
        ids = dict(zip(keys, infos, strict=True))
        wanted = new_manifest(model, ids, settings, like=writer.manifest)
        if writer.manifest is None:
            writer.create(wanted, lambda: vocab_table(model.tokenizer, model.cfg.d_vocab))
        else:
            check_same(writer.manifest, wanted, root)
        manifest = writer.manifest
        assert manifest is not None
        batch = settings.batch_size or fit_batch_size(
            model, saes, settings.ctx, bool(settings.overlap)
        )
        index = len(manifest.parts) - (current_part(manifest) is not None)
        written = write_windows(
            corpus, model.tokenizer, root / "windows", index, shard=settings.shard,
            first_doc=part_first_doc(manifest, root),
        )  # fmt: skip
        finished = [p.fingerprint for p in manifest.parts if p is not current_part(manifest)]
        if resume and current_part(manifest) is None and written.fingerprint in finished:
            written.path.unlink()  # a retried job: this corpus is in the store already
            return RecordSummary(store=str(root), tokens=0, windows=0, seconds=0.0,
                                 skipped=written.report.summary(), already_recorded=True)  # fmt: skip
        try:
            part, windows = open_part(writer, written, corpus, resume, batch)
        except BaseException:
            written.path.unlink(missing_ok=True)  # refused: the part's windows are not kept
            raise
        states = (
            load_states(root / manifest.state_version, keys, device)
            if manifest.state_version
            else {}
        )
        for key, s in by_key.items():
            states.setdefault(
                key,
                FeatureState.empty(
                    s.cfg.d_sae, k=settings.k, ctx=settings.ctx, m=settings.samples, device=device
                ),
            )

        def checkpoint(final: bool) -> None:
            def fill(builder: VersionBuilder) -> None:
                save_states(builder, states)
                if final:
                    finalize(builder, manifest, states, by_key, model, root, tables=settings.tables)

            writer.commit(fill, final=final)

        started = time.perf_counter()
        done_tokens = run_batches(
            model, saes, keys, states, windows, part, settings, checkpoint, on_progress, should_stop
        )
        elapsed = time.perf_counter() - started
        manifest.tokens_recorded += done_tokens
        manifest.seconds += elapsed
        checkpoint(final=True)
    return RecordSummary(
        store=str(root),
        tokens=done_tokens,
        windows=len(windows),
        seconds=elapsed,
        saes=[sae_summary(k, st, settings.dense_threshold) for k, st in states.items()],
        skipped=windows.report.summary(),
    )
