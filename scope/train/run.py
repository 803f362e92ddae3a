"""One training run from start to saved releases: cache -> train -> fold -> save -> evaluate
on held-out text -> card. ``scope train`` and the demo both call ``train_saes``."""

from __future__ import annotations

import hashlib
import json
import os
import platform
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from scope.corpus import CorpusSpec, ReadReport, Windows, iter_windows
from scope.errors import ScopeError
from scope.identity import gemma_scope_id, hook_site
from scope.model import model_source
from scope.train import export, loop
from scope.train.cache import ActivationCache, CacheProgress, build_cache, cache_spec
from scope.train.settings import TrainSettings

if TYPE_CHECKING:
    from sae_lens import HookedSAETransformer

EVAL_BATCH = 8


def default_cache_root() -> Path:
    """Where activation caches (and prepared demo files) go unless told: $SCOPE_CACHE_DIR,
    else ~/.cache/gemma-scope-workbench."""
    if env := os.environ.get("SCOPE_CACHE_DIR"):
        return Path(env).expanduser()
    return Path.home() / ".cache" / "gemma-scope-workbench"


@dataclass(frozen=True, kw_only=True)
class TrainedSAE:
    """One SAE a run saved."""

    release: str
    """The release folder's name (``load_sae(release, sae_id)`` when it is under saes/)."""
    sae_id: str
    """``layer_L/width_W/average_l0_N``."""
    folder: Path
    """Where params.npz, cfg.json and card.json are."""
    card: dict[str, Any]
    """The card.json contents."""
    trained: Any
    """The sae-lens ``JumpReLUTrainingSAE`` (or ``scope.train.losses.TrainingTranscoder``) as
    trained, with its scaling folded in (float32; the saved file holds the same weights in the
    raw-activation convention)."""


def machine() -> str:
    """The hardware a run used, in words: "NVIDIA H100 80GB HBM3" or "2-core CPU"."""
    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    return f"{os.cpu_count()}-core CPU ({platform.machine()})"


def held_out_windows(corpus: CorpusSpec, tokenizer: Any, train_tokens: int, tokens: int) -> Windows:
    """The ``tokens`` corpus tokens that come right after the first ``train_tokens`` (which
    training used): the held-out slice when no separate evaluation corpus is given."""
    spec = replace(corpus, max_tokens=train_tokens + tokens)
    report = ReadReport()
    blocks = list(iter_windows(spec, tokenizer, report))
    names: list[str] = []
    parts: dict[str, list[np.ndarray]] = {
        k: [] for k in ("tokens", "lengths", "doc", "offset", "ids")
    }
    seen = 0
    for block in blocks:
        before = seen + np.concatenate([[0], np.cumsum(block.lengths - 1)[:-1]])
        seen += int((block.lengths - 1).sum())
        keep = before >= train_tokens
        for k in parts:
            parts[k].append(getattr(block, k)[keep])
        parts["doc"][-1] = parts["doc"][-1] + len(names)
        names += block.doc_names
    n = sum(len(p) for p in parts["lengths"])
    if n == 0:
        raise ScopeError(
            f"the corpus has no text after the {train_tokens:,} training tokens to evaluate on: "
            "give --eval-corpus, or fewer --tokens"
        )
    return Windows(
        tokens=np.concatenate(parts["tokens"]),
        lengths=np.concatenate(parts["lengths"]),
        doc=np.concatenate(parts["doc"]),
        offset=np.concatenate(parts["offset"]),
        doc_names=names,
        report=report,
        ids=np.concatenate(parts["ids"]),
    )


def default_cache_folder(
    model: HookedSAETransformer, hooks: tuple[str, ...], corpus: CorpusSpec
) -> Path:
    """A cache folder named by a hash of what it holds, under ``default_cache_root()``."""
    spec = cache_spec(model, hooks, corpus)
    digest = hashlib.sha256(json.dumps(asdict(spec), sort_keys=True).encode()).hexdigest()[:16]
    return default_cache_root() / "activations" / digest


def check_layout(settings: TrainSettings, out: Path) -> None:
    """One SAE (or transcoder) per layer in a release (Gemma Scope's layout names folders by
    layer only)."""
    layers: dict[int, str] = {}
    for hook in settings.hooks:
        layer, _ = hook_site(hook)
        if layer is None:
            raise ScopeError(
                f"--hook {hook} is not inside a block: give blocks.L.hook_resid_post, "
                "blocks.L.hook_mlp_out or blocks.L.attn.hook_z"
            )
        if layer in layers:
            raise ScopeError(
                f"{layers[layer]} and {hook} are both layer {layer}: a release holds one SAE per "
                "layer (layer_L/...), so train other sites into another --out release"
            )
        layers[layer] = hook
    if out.exists() and not out.is_dir():
        raise ScopeError(f"--out {out} is a file: name a folder for the release")


def train_saes(
    model: HookedSAETransformer,
    settings: TrainSettings,
    corpus: CorpusSpec,
    out: Path,
    *,
    cache: Path | None = None,
    eval_corpus: CorpusSpec | None = None,
    eval_tokens: int = 20_000,
    save_dtype: str = "float32",
    forward_batch: int = 8,
    notes: dict[str, str] | None = None,
    on_cache: Callable[[CacheProgress], None] | None = None,
    on_step: Callable[[loop.StepReport], None] | None = None,
) -> list[TrainedSAE]:
    """Train one JumpReLU SAE per hook of ``settings`` on ``corpus`` (its ``max_tokens`` are
    the tokens cached), or with ``settings.outputs`` one JumpReLU transcoder per hook pair, and
    save them as the Gemma Scope release ``out`` (``out/layer_L/width_W/average_l0_N/``; a
    transcoder as sae-lens saves one, see ``scope.train.export``), each with a card, and a row
    per SAE in ``out.parent/README.md``. A transcoder's card measures FVU on the hook it
    writes, and, with several, the delta loss with all of them spliced in at once
    (``eval.all_spliced``). Activations are cached in ``cache`` (default: a folder under
    ``default_cache_root()`` named by what it holds); an interrupted run resumes from the cache
    and the latest checkpoint. L0, FVU and delta loss are measured on ``eval_tokens`` tokens of
    ``eval_corpus``, or of ``corpus`` right after the cached tokens. ``notes`` (e.g. where the
    model and corpus came from, and their licences) are copied into every card."""
    from scope.evals import evaluate, splice_all
    from scope.sae import load_sae

    check_layout(settings, out)
    if corpus.max_tokens is None:
        raise ScopeError("give --tokens: how many corpus tokens to cache and train on, e.g. 1M")
    if eval_tokens <= 0:
        raise ScopeError(f"--eval-tokens {eval_tokens} must be positive")
    export.storage_dtypes({}, save_dtype)  # a wrong dtype fails now, not after training
    folder = cache or default_cache_folder(model, settings.cached, corpus)
    acts: ActivationCache = build_cache(
        model, settings.cached, corpus, folder, batch_size=forward_batch, on_batch=on_cache
    )
    device = str(next(model.parameters()).device)
    training = loop.start(settings, acts, folder / f"train-{settings.fingerprint()}", device)
    loop.run(training, on_step=on_step)
    finished = loop.finish(training)
    train_seconds = training.seconds

    t_eval = time.perf_counter()
    held_out: CorpusSpec | Windows = (
        replace(eval_corpus, max_tokens=eval_tokens)
        if eval_corpus is not None
        else held_out_windows(corpus, model.tokenizer, corpus.max_tokens, eval_tokens)
    )
    staging = out / ".staging"
    shutil.rmtree(staging, ignore_errors=True)
    model_name = model_source(model)
    loaded, dtypes = [], {}
    for hook in settings.hooks:
        raw = export.raw_params(finished[hook].sae)
        dtypes[hook] = export.storage_dtypes(raw, save_dtype)
        where = staging / gemma_scope_id(hook, settings.width, 0)
        d_in = acts.spec.d_in[hook]
        if settings.transcoders:
            out_hook = settings.target(hook)
            cfg = export.transcoder_cfg(hook, out_hook, d_in, settings.width,
                                        acts.spec.d_in[out_hook], settings.skip, model_name,
                                        corpus.ctx)  # fmt: skip
            export.write_transcoder(where, raw, dtypes[hook], cfg)
        else:
            cfg = export.sae_cfg(hook, d_in, settings.width, model_name, corpus.ctx)
            export.write_sae(where, raw, dtypes[hook], cfg)
        loaded.append(load_sae(where, device=device, dtype="float32"))
    report = evaluate(model, loaded, held_out, batch_size=EVAL_BATCH)
    together = None
    if settings.transcoders and len(loaded) > 1:  # the replacement model attribution explains
        together = splice_all(model, loaded, held_out, batch_size=EVAL_BATCH)
    eval_seconds = time.perf_counter() - t_eval

    results = []
    for hook, sae, row in zip(settings.hooks, loaded, report.rows, strict=True):
        sid = gemma_scope_id(hook, settings.width, row.l0)
        final = out / sid
        if final.exists():
            shutil.rmtree(final)
        final.parent.mkdir(parents=True, exist_ok=True)
        os.replace(staging / gemma_scope_id(hook, settings.width, 0), final)
        card = {
            "release": out.name,
            "sae_id": sid,
            "model": model_name
            if "/" in model_name and not Path(model_name).is_dir()
            else model.cfg.model_name,
            "hook": hook,
            **(
                {"hook_out": settings.target(hook), "d_out": int(sae.W_dec.shape[-1])}
                if settings.transcoders
                else {}
            ),
            "d_in": acts.spec.d_in[hook],
            "d_sae": settings.width,
            "architecture": str(sae.cfg.architecture()),
            "convention": TRANSCODER_CONVENTION if settings.transcoders else SAE_CONVENTION,
            "dtypes": dtypes[hook],
            "sha256": sae.cfg.metadata["scope_sha256"],
            "corpus": {
                "files": [Path(p).name for p in acts.spec.corpus],
                "field": corpus.field,
                "ctx": corpus.ctx,
                "tokens_cached": acts.state.rows,
            },
            "training": {
                **{
                    k: v
                    for k, v in asdict(settings).items()
                    if k not in _NOT_ON_CARD[settings.transcoders]
                },
                "steps": training.step,
                "tokens_seen": training.step * settings.batch_size,
                "trainer": _trainer(settings),
                "dead_window_steps": loop.dead_window(settings, training.steps),
                "sae_lens_version": _sae_lens_version(),
                "scaling_factor_folded": finished[hook].scaling_factor,
                **(
                    {"target_scaling_factor_folded": finished[hook].target_factor}
                    if settings.transcoders
                    else {}
                ),
            },
            "eval": {
                "held_out": "eval corpus"
                if eval_corpus is not None
                else "the corpus tokens right after the cached ones",
                **{
                    k: v
                    for k, v in asdict(row).items()
                    if k not in ("sae", "hook", "sha256", "d_sae")
                },
                "dead_fraction": row.dead / row.d_sae,
                **({"all_spliced": asdict(together)} if together is not None else {}),
            },
            "time": {
                "cache_seconds": acts.state.seconds,
                "train_seconds": train_seconds,
                "eval_seconds": eval_seconds,
                "total_seconds": acts.state.seconds + train_seconds + eval_seconds,
                "shared_by": len(settings.hooks),
                "machine": machine(),
            },
            "notes": notes or {},
            "created": datetime.now(UTC).isoformat(timespec="seconds"),
        }
        export.write_json(final / "card.json", card)
        export.append_readme(
            out.parent / "README.md", export.card_line(out.name, sid, card), f"{out.name}/{sid}"
        )
        results.append(
            TrainedSAE(
                release=out.name, sae_id=sid, folder=final, card=card, trained=finished[hook].sae
            )
        )
    shutil.rmtree(staging, ignore_errors=True)
    return results


_NOT_ON_CARD = {False: ("hooks", "outputs", "skip"), True: ("hooks", "outputs")}
"""Settings the card's training section leaves out (its hooks are the card's own)."""
SAE_CONVENTION = (
    "raw activations: pre = x @ W_enc + b_enc; acts = relu(pre) * (pre > threshold); "
    "x_hat = acts @ W_dec + b_dec; no input normalisation, no b_dec subtracted at the input"
)
TRANSCODER_CONVENTION = (
    "raw activations: x read at hook, y written at hook_out; pre = x @ W_enc + b_enc; acts = "
    "relu(pre) * (pre > threshold); y_hat = acts @ W_dec + b_dec (+ x @ W_skip.T with a skip "
    "connection); no input normalisation"
)


def _trainer(settings: TrainSettings) -> str:
    """The card's one-line account of what trained it."""
    module = (
        "scope.train.losses.TrainingTranscoder (sae_lens JumpReLUTrainingSAE's encoder and "
        "losses" + (", affine skip connection" if settings.skip else "") + ")"
        if settings.transcoders
        else "sae_lens JumpReLUTrainingSAE"
    )
    return (
        f"{module} + SAETrainer, {settings.sparsity_loss} L0 penalty"
        + (", pre-activation loss" if settings.pre_act_loss else "")
        + (", frequency penalty (scope.train.losses)" if settings.freq_penalty else "")
        + (", per-dimension standardisation (scope.train.standardize)" if settings.standardize
           else "")
    )  # fmt: skip


def _sae_lens_version() -> str:
    from sae_lens import __version__

    return str(__version__)


__all__ = ["TrainedSAE", "default_cache_root", "held_out_windows", "machine", "train_saes"]
