"""The hot loop: batches of windows -> one forward pass -> every SAE's codes -> state updates.
Everything per batch is tensor work on the model's device."""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from scope.corpus import Windows
from scope.errors import ScopeError
from scope.record.state import FeatureState
from scope.sae import hook_site


def capture(
    model: Any, tokens: torch.Tensor, hooks: list[str], stop_at_layer: int
) -> dict[str, torch.Tensor]:
    """Run the model up to ``stop_at_layer`` and return the activations at ``hooks``."""
    out: dict[str, torch.Tensor] = {}

    def grab(act: torch.Tensor, hook: Any) -> None:
        out[hook.name] = act

    model.run_with_hooks(
        tokens, return_type=None, stop_at_layer=stop_at_layer, fwd_hooks=[(h, grab) for h in hooks]
    )
    return out


def encode(sae: Any, x: torch.Tensor, threshold: torch.Tensor) -> torch.Tensor:
    """JumpReLU codes exactly as ``sae.encode`` computes them (relu(pre) where pre > threshold),
    in two passes over [batch, pos, d_sae]: ``threshold`` is the SAE's, clamped at 0, which
    folds the relu into the mask."""
    if x.dim() == 4:  # attn.hook_z: [batch, pos, heads, d_head] -> heads flattened
        x = x.flatten(-2)
    pre = x.to(sae.W_enc.dtype) @ sae.W_enc + sae.b_enc
    return pre.masked_fill_(pre <= threshold, 0)


def deepest_layer(saes: list[Any]) -> int:
    layers = [hook_site(s.cfg.metadata.hook_name)[0] for s in saes]
    return max(layer if layer is not None else 0 for layer in layers)


def run_batches(
    model: Any,
    saes: list[Any],
    keys: list[str],
    states: dict[str, FeatureState],
    windows: Windows,
    part: dict[str, Any],
    settings: Any,
    checkpoint: Callable[[bool], None],
    progress: bool,
) -> int:
    """Feed this shard's remaining windows of ``part``; return the tokens counted."""
    device = next(model.parameters()).device
    shard_i, shard_n = settings.shard
    first = part["first_window"]
    mine = np.nonzero((np.arange(first, first + len(windows)) % shard_n) == shard_i)[0]
    hooks = sorted({s.cfg.metadata.hook_name for s in saes})
    stop = deepest_layer(saes) + 1
    special = torch.tensor(sorted(set(model.tokenizer.all_special_ids)), device=device)
    batch = int(part["batch_size"])
    thresholds = [s.threshold.detach().float().clamp(min=0) for s in saes]
    total = int(windows.lengths[mine].sum() - len(mine))
    done_before = int(windows.lengths[mine[: part["next"]]].sum() - part["next"])
    counted_tokens = 0
    last = time.perf_counter()
    bar = Progress(
        TextColumn("recording"),
        BarColumn(),
        TextColumn("{task.completed:,.0f}/{task.total:,.0f} tokens"),
        TextColumn("{task.fields[rate]} tok/s"),
        TimeElapsedColumn(),
        TextColumn("ETA"),
        TimeRemainingColumn(),
        disable=not progress,
        transient=False,
    )
    with bar, deferred_stop() as stop_requested:
        task = bar.add_task("record", total=total, completed=done_before, rate="-")
        started = time.perf_counter()
        for pos in range(int(part["next"]), len(mine), batch):
            idx = mine[pos : pos + batch]
            lengths = torch.from_numpy(windows.lengths[idx]).to(device)
            width = int(lengths.max())
            tokens = torch.from_numpy(windows.tokens[idx, :width]).to(
                device=device, dtype=torch.long
            )
            counted = (torch.arange(width, device=device) < lengths[:, None]) & ~torch.isin(
                tokens, special
            )
            ids = torch.from_numpy(idx + first).to(device)
            with torch.no_grad():
                acts = capture(model, tokens, hooks, stop)
                for key, sae, thr in zip(keys, saes, thresholds, strict=True):
                    codes = encode(sae, acts[sae.cfg.metadata.hook_name], thr)
                    states[key].update(codes, counted, ids)
            part["next"] = pos + len(idx)
            n = int(lengths.sum()) - len(idx)
            counted_tokens += n
            rate = counted_tokens / max(time.perf_counter() - started, 1e-9)
            bar.update(task, advance=n, rate=f"{rate:,.0f}")
            if stop_requested and part["next"] < len(mine):
                checkpoint(False)  # the batch is complete, so the state is consistent
                raise ScopeError(
                    f"stopped by {stop_requested[0]} after {part['next']}/{len(mine)} windows; "
                    "everything so far is saved: run the same command with --resume to continue"
                )
            if time.perf_counter() - last >= settings.checkpoint_seconds and part["next"] < len(
                mine
            ):
                checkpoint(False)
                last = time.perf_counter()
    return counted_tokens


@contextmanager
def deferred_stop() -> Iterator[list[str]]:
    """Turn Ctrl-C and SIGTERM into a request honoured between batches: a batch is never
    half-applied, and the caller saves a checkpoint before stopping."""
    requested: list[str] = []
    if threading.current_thread() is not threading.main_thread():
        yield requested
        return

    def ask(signum: int, _frame: Any) -> None:
        requested.append(signal.Signals(signum).name)

    previous = {sig: signal.signal(sig, ask) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield requested
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
