"""`scope record`: one forward pass per batch feeds every SAE; state is checkpointed so a killed
run resumes to exactly the same result; the store is written atomically."""

from __future__ import annotations

import fcntl
import hashlib
import re
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import torch
from safetensors.torch import load_file, save_file

from scope.corpus import CorpusSpec, Windows, build_windows
from scope.errors import ScopeError
from scope.fit import check_fit
from scope.record.state import HIST_EDGES, SAMPLE_EDGES, FeatureState
from scope.record.loop import ProgressFn, StopFn, run_batches
from scope.sae import sae_info, sae_keys
from scope.store.files import FORMAT, VersionBuilder, next_version, read_manifest, write_json_atomic
from scope.store.files import write_parquet_atomic as write_parquet


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
    """(i, N): record only windows whose id % N == i; `scope merge` combines the N stores."""
    checkpoint_seconds: float = 60.0
    """Save resumable state at most this often (and at the end)."""

    def __post_init__(self) -> None:
        i, n = self.shard
        if not (n >= 1 and 0 <= i < n):
            raise ScopeError(f"--shard {i}/{n} is not valid: use i/N with 0 <= i < N, e.g. 0/4")
        if self.k < 1 or self.samples < 1:
            raise ScopeError("--k and --samples must be at least 1")
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
    skipped: dict[str, int] = field(default_factory=dict)


def model_identity(model: Any) -> dict[str, Any]:
    """Name, sizes and a weights fingerprint (bf16-rounded, so dtype does not change it)."""
    cfg = model.cfg
    h = hashlib.sha256()
    for t in (model.W_E[:256], model.blocks[0].attn.W_Q, model.blocks[-1].mlp.W_out):
        h.update(t.detach().to(torch.bfloat16).view(torch.int16).cpu().numpy().tobytes())
    return {
        "name": getattr(model, "scope_source", cfg.model_name),
        "n_layers": cfg.n_layers,
        "d_model": cfg.d_model,
        "d_vocab": cfg.d_vocab,
        "fingerprint": h.hexdigest()[:16],
    }


def versions() -> dict[str, str]:
    out = {}
    for pkg in ("gemma-scope-workbench", "torch", "transformer-lens", "sae-lens", "transformers"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            out[pkg] = "?"
    return out


@contextmanager
def writer_lock(root: Path) -> Iterator[None]:
    root.mkdir(parents=True, exist_ok=True)
    with (root / ".lock").open("w") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ScopeError(
                f"another `scope record` is writing {root}: wait for it to end"
            ) from None
        yield


def fit_batch_size(model: Any, saes: list[Any], ctx: int) -> int:
    """Windows per batch that fit in about half the free memory (GPU) or 2 GiB (CPU)."""
    cfg = model.cfg
    device = next(model.parameters()).device
    if device.type == "cuda":
        budget = torch.cuda.mem_get_info(device)[0] * 0.5
    else:
        budget = 2 * 2**30
    act_bytes = 4 if cfg.dtype == torch.float32 else 2
    forward = ctx * act_bytes * (6 * cfg.d_model + 3 * (cfg.d_mlp or 0) + cfg.n_heads * ctx)
    codes = ctx * 4 * sum(4 * s.cfg.d_sae for s in saes)
    return int(max(1, min(256, budget // (forward + codes))))


def _check_same(
    manifest: dict[str, Any], model_id: dict, sae_ids: dict, settings: RecordSettings, root: Path
) -> None:
    old_model = manifest["model"]
    if (
        old_model["fingerprint"] != model_id["fingerprint"]
        or old_model["d_model"] != model_id["d_model"]
    ):
        raise ScopeError(
            f"{root} was recorded with model {old_model['name']} (fingerprint "
            f"{old_model['fingerprint']}), not {model_id['name']} ({model_id['fingerprint']}): "
            "record into a new --store, or load the same model"
        )
    old, new = manifest["saes"], sae_ids
    if set(old) != set(new) or any(old[k]["sha256"] != new[k]["sha256"] for k in old):
        raise ScopeError(
            f"{root} holds SAEs {', '.join(sorted(old))}, which differ from the ones given "
            f"({', '.join(sorted(new))}): pass the same --sae list, or record into a new --store"
        )
    for name in ("ctx", "k", "samples"):
        if manifest["settings"][name] != getattr(settings, name):
            raise ScopeError(
                f"{root} was recorded with --{name} {manifest['settings'][name]}, not "
                f"{getattr(settings, name)}: use the same value, or a new --store"
            )
    if tuple(manifest["shard"]) != settings.shard:
        raise ScopeError(f"{root} is shard {manifest['shard']}, not {list(settings.shard)}")


def windows_table(w: Windows, first: int, part: int) -> pa.Table:
    n = w.lengths
    flat = np.concatenate([row[:k] for row, k in zip(w.tokens, n, strict=True)])
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


def vocab_table(tokenizer: Any, d_vocab: int) -> pa.Table:
    """Every token id's piece and its text, so readers need no tokenizer."""
    ids = list(range(d_vocab))
    fast = getattr(tokenizer, "backend_tokenizer", None)
    if fast is not None:  # the Rust tokenizer decodes 256k single tokens in parallel
        pieces = [fast.id_to_token(i) for i in ids]
        texts = fast.decode_batch([[i] for i in ids], skip_special_tokens=False)
    else:
        pieces = tokenizer.convert_ids_to_tokens(ids)
        texts = tokenizer.batch_decode([[i] for i in ids])
    return pa.table(
        {
            "token": np.arange(d_vocab, dtype=np.int32),
            "piece": pa.array([p if p is not None else "" for p in pieces], pa.string()),
            "text": pa.array(texts, pa.string()),
        }
    )


def load_states(
    root: Path, manifest: dict[str, Any], device: torch.device
) -> dict[str, FeatureState]:
    version = manifest.get("state_version")
    if version is None:
        return {}
    out = {}
    for key in manifest["saes"]:
        path = root / version / "state" / f"{key}.safetensors"
        try:
            out[key] = FeatureState.from_tensors(load_file(path, device=str(device)))
        except Exception as err:  # safetensors raises several types for damaged files
            raise ScopeError(f"{path} is damaged ({err}); the store cannot be resumed") from err
    return out


def save_states(builder: VersionBuilder, states: dict[str, FeatureState]) -> None:
    for key, st in states.items():
        tensors = {n: t.contiguous() for n, t in st.tensors().items()}
        save_file(tensors, builder.path(f"state/{key}.safetensors"))


def open_manifest(
    root: Path, model: Any, sae_ids: dict[str, Any], settings: RecordSettings
) -> dict[str, Any]:
    """The store's manifest, checked against this model, these SAEs and settings; or a new
    one (and the vocabulary) for a new store."""
    model_id = model_identity(model)
    manifest = read_manifest(root)
    if manifest is not None:
        _check_same(manifest, model_id, sae_ids, settings, root)
        return manifest
    extra = [p.name for p in root.iterdir() if p.name not in {".lock", "windows", "vocab.parquet"}]
    if extra:
        raise ScopeError(
            f"{root} exists and is not a store (it holds {', '.join(sorted(extra)[:5])}): "
            "pick an empty or new --store folder"
        )
    write_parquet(root / "vocab.parquet", vocab_table(model.tokenizer, model.cfg.d_vocab))
    return {
        "format": FORMAT,
        "model": model_id,
        "saes": sae_ids,
        "settings": {
            "ctx": settings.ctx,
            "k": settings.k,
            "samples": settings.samples,
            "dense_threshold": settings.dense_threshold,
        },  # fmt: skip
        "shard": list(settings.shard),
        "parts": [],
        "state": "recording",
        "hist_edges": HIST_EDGES.tolist(),
        "sample_edges": SAMPLE_EDGES.tolist(),
        "versions": versions(),
        "tokens_recorded": 0,
        "seconds": 0.0,
    }


def open_part(
    root: Path,
    manifest: dict[str, Any],
    windows: Windows,
    corpus: CorpusSpec,
    resume: bool,
    settings: RecordSettings,
    model: Any,
    saes: list[Any],
) -> dict[str, Any]:
    """The corpus part to record: the interrupted one (with --resume), or a new one appended."""
    parts = manifest["parts"]
    fingerprint = windows.fingerprint()
    resuming = manifest["state"] == "recording" and bool(parts)
    if resuming:
        if not resume:
            raise ScopeError(
                f"{root} holds an interrupted run: add --resume to continue it (nothing recorded is lost)"
            )
        if parts[-1]["fingerprint"] != fingerprint:
            raise ScopeError(
                f"--resume needs the same corpus and --tokens as the interrupted run of {root} "
                f"(its corpus was {', '.join(parts[-1]['corpus'])})"
            )
    else:
        if any(p["fingerprint"] == fingerprint for p in parts):
            raise ScopeError(
                f"{root} already holds this corpus (same windows): adding it again would count it twice"
            )
        parts.append(
            {
                "corpus": list(corpus.paths),
                "field": corpus.field,
                "max_tokens": corpus.max_tokens,
                "fingerprint": fingerprint,
                "first_window": sum(p["windows"] for p in parts),
                "windows": len(windows),
                "tokens": windows.n_tokens,
                "documents": windows.report.documents,
                "skipped": windows.report.skipped,
                "next": 0,
                "batch_size": settings.batch_size or fit_batch_size(model, saes, settings.ctx),
            }
        )
        manifest["state"] = "recording"
    part_file = root / "windows" / f"part-{len(parts) - 1:03d}.parquet"
    if not resuming or not part_file.is_file():  # a killed run may have left another corpus's
        write_parquet(part_file, windows_table(windows, parts[-1]["first_window"], len(parts) - 1))
    write_json_atomic(root / "manifest.json", manifest)
    return parts[-1]


def record(
    model: Any,
    saes: list[Any],
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
    from scope.record.finalize import finalize

    settings = settings or RecordSettings()
    corpus = replace(corpus, ctx=settings.ctx)  # the settings' window length wins
    root = Path(store)
    if not saes:
        raise ScopeError("no SAEs given: pass --sae at least once")
    infos = [sae_info(s) for s in saes]
    keys = sae_keys(infos)
    for s in saes:
        check_fit(model, s)
    device = next(model.parameters()).device
    with writer_lock(root):
        windows = build_windows(corpus, model.tokenizer)
        sae_ids = {k: asdict(i) for k, i in zip(keys, infos, strict=True)}
        manifest = open_manifest(root, model, sae_ids, settings)
        part = open_part(root, manifest, windows, corpus, resume, settings, model, saes)
        states = load_states(root, manifest, device)
        for key, s in zip(keys, saes, strict=True):
            if key not in states:
                states[key] = FeatureState.empty(
                    s.cfg.d_sae, k=settings.k, ctx=settings.ctx, m=settings.samples, device=device
                )

        def checkpoint(final: bool) -> None:
            builder = VersionBuilder(root, next_version(root))
            save_states(builder, states)
            manifest["state_version"] = builder.name
            if final:
                finalize(builder, manifest, states, dict(zip(keys, saes, strict=True)), model, root)
                manifest["tables_version"] = builder.name
                manifest["state"] = "complete"
            builder.commit(manifest)

        started = time.perf_counter()
        done_tokens = run_batches(
            model, saes, keys, states, windows, part, settings, checkpoint, on_progress, should_stop
        )
        elapsed = time.perf_counter() - started
        manifest["tokens_recorded"] += done_tokens
        manifest["seconds"] += elapsed
        checkpoint(final=True)
    from scope.record.tables import sae_summary

    return RecordSummary(
        store=str(root),
        tokens=done_tokens,
        windows=len(windows),
        seconds=elapsed,
        saes=[sae_summary(k, st, settings.dense_threshold) for k, st in states.items()],
        skipped=windows.report.skipped,
    )
