"""Activations cached once to disk, for training SAEs and transcoders over several epochs.

The forward pass is what training costs on a CPU, so the hooked activations of every counted
token (not BOS, padding or special tokens: ``scope.acts.counted_mask``) are written once, as
half-precision rows, one raw file per hook, all hooks from the same forward pass
(``scope.acts.capture`` stops after the deepest one). Row i of every hook's file is the same
token, so a transcoder's input and target hooks pair up row by row (``load_rows`` reads them
side by side). A folder holds:

    manifest.json      settings, rows written, windows done, complete or not
    <hook>.bf16        [rows, d_in] bfloat16 bits as uint16, C order (np.memmap)

bfloat16, not float16: Gemma's residual stream has outlier dimensions past float16's range
(65504; Gemma 3 270M reaches 62k by layer 15), and bfloat16's 8-bit mantissa costs the
reconstruction nothing measurable (relative rounding 2^-9 per value).

Writing appends and then replaces the manifest atomically; a killed run resumes after the
last window the manifest counts (bytes beyond it are cut off), and a finished cache with the
same settings is reused as it is.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

import numpy as np
import torch

from scope.acts import capture, counted_mask, site_input
from scope.corpus import CorpusSpec, ReadReport, Windows, iter_windows
from scope.errors import ScopeError
from scope.identity import hook_site
from scope.model import model_source

if TYPE_CHECKING:
    from sae_lens import HookedSAETransformer

CACHE_VERSION = 1
MANIFEST = "manifest.json"


@dataclass(frozen=True, kw_only=True)
class CacheSpec:
    """What a cache holds; a cache is reused only when this matches exactly."""

    model: str
    """The model's source (hub name or checkpoint folder)."""
    hooks: tuple[str, ...]
    """Hooks cached, sorted."""
    d_in: dict[str, int]
    """Row width per hook (attn.hook_z's heads flattened)."""
    corpus: tuple[str, ...]
    field: str
    ctx: int
    max_tokens: int | None


@dataclass(frozen=True, kw_only=True)
class CacheState:
    """How far a cache got."""

    rows: int
    """Counted tokens written: the rows of every hook's file."""
    windows: int
    """Corpus windows done, in corpus order."""
    complete: bool
    seconds: float
    """Forward-pass time spent so far, over every run that wrote it."""


class ActivationCache:
    """An activation cache folder: its spec, its state and its rows as memmaps."""

    def __init__(self, folder: Path, spec: CacheSpec, state: CacheState) -> None:
        self.folder = folder
        self.spec = spec
        self.state = state

    @staticmethod
    def file_name(hook: str) -> str:
        return f"{hook}.bf16"

    def rows(self, hook: str) -> np.memmap:
        """The cached rows of ``hook``, [rows, d_in] bfloat16 bits (uint16), read-only;
        ``as_tensor`` turns a slice of them into a tensor."""
        d = self.spec.d_in[hook]
        if self.state.rows == 0:
            raise ScopeError(f"the activation cache {self.folder} has no rows")
        return np.memmap(
            self.folder / self.file_name(hook), np.uint16, "r", shape=(self.state.rows, d)
        )

    @classmethod
    def open(cls, folder: Path) -> ActivationCache | None:
        """The cache in ``folder``, or None when there is none."""
        path = folder / MANIFEST
        if not path.is_file():
            return None
        try:
            data = json.loads(path.read_text())
            if data.get("version") != CACHE_VERSION:
                raise ValueError(f"version {data.get('version')}")
            spec = data["spec"]
            spec["hooks"] = tuple(spec["hooks"])
            spec["corpus"] = tuple(spec["corpus"])
            return cls(folder, CacheSpec(**spec), CacheState(**data["state"]))
        except (ValueError, KeyError, TypeError) as err:
            raise ScopeError(
                f"{path} is not an activation cache manifest ({err}): remove {folder} or name "
                "another --cache folder"
            ) from err

    def save_state(self, state: CacheState) -> None:
        self.state = state
        data = {"version": CACHE_VERSION, "spec": asdict(self.spec), "state": asdict(state)}
        tmp = self.folder / (MANIFEST + ".tmp")
        tmp.write_text(json.dumps(data, indent=2))
        os.replace(tmp, self.folder / MANIFEST)


def as_tensor(rows: np.ndarray) -> torch.Tensor:
    """Cached rows (bfloat16 bits as uint16) as a float32 tensor."""
    bits = np.ascontiguousarray(rows).view(np.int16)
    if not bits.flags.writeable:  # torch wants a buffer it may write
        bits = bits.copy()
    return torch.from_numpy(bits).view(torch.bfloat16).float()


def load_rows(cache: ActivationCache, hooks: Sequence[str], rows: np.ndarray) -> torch.Tensor:
    """Cache rows ``rows`` (sorted indices) of ``hooks`` side by side as one float32 tensor
    [len(rows), sum of the hooks' widths]: for one hook an SAE's batch, for an input and a
    target hook a transcoder's paired batch (the same tokens: see the module docstring)."""
    parts = [as_tensor(cache.rows(hook)[rows]) for hook in hooks]
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=-1)


def to_bits(x: torch.Tensor) -> bytes:
    """A float tensor as the cache stores it: bfloat16 bits, C order."""
    return x.to(torch.bfloat16).contiguous().view(torch.int16).cpu().numpy().tobytes()


def cache_spec(model: HookedSAETransformer, hooks: Sequence[str], corpus: CorpusSpec) -> CacheSpec:
    """The spec of a cache of ``hooks`` of ``model`` over ``corpus``; a wrong hook is an error."""
    from scope.fit import hook_size
    from scope.sae import check_hook_name

    for hook in hooks:
        check_hook_name(hook)
        hook_size(model, hook)  # raises with close names for a hook the model lacks
    names = tuple(sorted(set(hooks)))
    return CacheSpec(
        model=model_source(model),
        hooks=names,
        d_in={h: hook_size(model, h) for h in names},
        corpus=tuple(str(Path(p).expanduser().resolve()) for p in corpus.paths),
        field=corpus.field,
        ctx=corpus.ctx,
        max_tokens=corpus.max_tokens,
    )


class CacheProgress(NamedTuple):
    """What ``build_cache`` reports after each batch."""

    rows: int
    """Counted tokens cached so far."""
    windows: int
    """Corpus windows done."""
    seconds: float
    """Forward-pass time so far."""


def _length_batches(block: Windows, batch_size: int) -> Iterator[tuple[np.ndarray, int]]:
    """A block's windows in batches of similar length, each trimmed to its longest window and
    holding up to ``batch_size`` full windows' worth of positions (so short windows go many
    to a batch): right padding past every window's end changes no earlier position of a
    causal model, so trimming gives the same activations for less compute."""
    order = np.argsort(block.lengths, kind="stable")
    budget = batch_size * block.tokens.shape[1]
    start = 0
    while start < len(order):
        end = start + 1
        while end < len(order) and (end + 1 - start) * int(block.lengths[order[end]]) <= budget:
            end += 1
        idx = np.sort(order[start:end])
        yield idx, int(block.lengths[idx].max())
        start = end


def build_cache(
    model: HookedSAETransformer,
    hooks: Sequence[str],
    corpus: CorpusSpec,
    folder: Path,
    *,
    batch_size: int = 8,
    on_batch: Callable[[CacheProgress], None] | None = None,
) -> ActivationCache:
    """Cache the activations at ``hooks`` for every counted token of ``corpus`` in ``folder``,
    one forward pass per batch for all hooks; resume a partial cache with the same spec, reuse
    a complete one, refuse one with other settings."""
    spec = cache_spec(model, hooks, corpus)
    folder.mkdir(parents=True, exist_ok=True)
    cache = ActivationCache.open(folder)
    if cache is not None and cache.spec != spec:
        differs = [k for k, v in asdict(spec).items() if asdict(cache.spec)[k] != v]
        raise ScopeError(
            f"the activation cache {folder} was made with other settings ({', '.join(differs)}): "
            "name another --cache folder, or remove this one to rebuild it"
        )
    if cache is None:
        cache = ActivationCache(
            folder, spec, CacheState(rows=0, windows=0, complete=False, seconds=0)
        )
        for hook in spec.hooks:
            (folder / ActivationCache.file_name(hook)).write_bytes(b"")
        cache.save_state(cache.state)
    if cache.state.complete:
        return cache
    state = cache.state
    files = {}
    for hook in spec.hooks:  # cut off rows written after the last manifest update
        f = (folder / ActivationCache.file_name(hook)).open("r+b")
        f.truncate(state.rows * spec.d_in[hook] * 2)
        f.seek(0, os.SEEK_END)
        files[hook] = f
    stop = max(hook_site(h)[0] or 0 for h in spec.hooks) + 1
    device = next(model.parameters()).device
    rows, seconds = state.rows, state.seconds
    before = 0  # windows of the blocks before this one
    try:
        for block in iter_windows(corpus, model.tokenizer, ReadReport()):
            done_here = 0  # windows of this block done, in batch order
            for idx, length in _length_batches(block, batch_size):
                done_here += len(idx)
                if before + done_here <= state.windows:  # cached by an earlier run
                    continue
                t0 = time.perf_counter()
                tokens = torch.from_numpy(block.tokens[idx, :length]).long().to(device)
                lengths = torch.from_numpy(block.lengths[idx]).long().to(device)
                with torch.no_grad():
                    acts = capture(model, tokens, spec.hooks, stop)
                counted = counted_mask(model, tokens, lengths)
                for hook in spec.hooks:
                    files[hook].write(to_bits(site_input(acts[hook])[counted]))
                    files[hook].flush()
                rows += int(counted.sum())
                seconds += time.perf_counter() - t0
                cache.save_state(
                    CacheState(
                        rows=rows, windows=before + done_here, complete=False, seconds=seconds
                    )
                )
                if on_batch is not None:
                    on_batch(CacheProgress(rows=rows, windows=before + done_here, seconds=seconds))
            before += len(block)
    finally:
        for f in files.values():
            f.close()
    if rows == 0:
        raise ScopeError(
            f"the corpus {', '.join(corpus.paths)} gave no counted tokens (only BOS, padding or "
            "special tokens): give it text"
        )
    cache.save_state(CacheState(rows=rows, windows=before, complete=True, seconds=seconds))
    return cache


__all__ = [
    "ActivationCache",
    "CacheProgress",
    "CacheSpec",
    "CacheState",
    "as_tensor",
    "build_cache",
    "cache_spec",
    "load_rows",
]
