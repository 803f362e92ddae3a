"""The hot loop: batches of windows -> one forward pass (``scope.acts``) -> every SAE's codes ->
state updates. Everything per batch is tensor work on the model's device. Progress and stop
requests are callbacks, so a UI or the CLI drives a recording the same way."""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from scope.acts import sae_acts
from scope.errors import ScopeError
from scope.record.state import FeatureState
from scope.record.windows import PartWindows, read_batches

if TYPE_CHECKING:
    from sae_lens import SAE, HookedSAETransformer

    from scope.record.settings import RecordSettings
    from scope.store.manifest import Part


@dataclass(frozen=True)
class RecordProgress:
    """Where a recording stands, given to ``on_progress`` after every batch."""

    tokens: int
    """Counted tokens of this corpus part recorded so far (earlier sessions included)."""
    total: int
    """Counted tokens of this corpus part (this shard's windows)."""
    tokens_per_s: float
    """Rate over this session."""
    windows: int
    """Windows recorded so far of this part's ``windows_total``."""
    windows_total: int


ProgressFn = Callable[[RecordProgress], None]
StopFn = Callable[[], str | None]
"""Asked between batches: a reason to stop (e.g. "SIGINT"), or None to go on."""


def run_batches(
    model: HookedSAETransformer,
    saes: list[SAE],
    keys: list[str],
    states: dict[str, FeatureState],
    windows: PartWindows,
    part: Part,
    settings: RecordSettings,
    checkpoint: Callable[[bool], None],
    on_progress: ProgressFn | None = None,
    should_stop: StopFn | None = None,
) -> int:
    """Feed this shard's remaining windows of ``part``; return the tokens counted. A stop
    request is honoured between batches: the state is checkpointed and a ScopeError raised."""
    device = next(model.parameters()).device
    n_windows = len(windows)  # this shard's windows of the part
    total = windows.n_tokens
    done = int(windows.lengths[: part.next].sum() - part.next)
    counted_tokens = 0
    last = started = time.perf_counter()
    for chunk in read_batches(windows.path, windows.pad, int(part.batch_size), part.next):
        lengths = torch.from_numpy(chunk.lengths).to(device)
        tokens = torch.from_numpy(chunk.tokens).to(device=device, dtype=torch.long)
        ids = torch.from_numpy(chunk.ids).to(device)
        out = sae_acts(model, saes, tokens, lengths)
        for key, codes in zip(keys, out.codes, strict=True):
            states[key].update(codes, out.counted, ids)
        part.next += len(chunk.ids)
        n = int(chunk.lengths.sum()) - len(chunk.ids)
        counted_tokens += n
        done += n
        if on_progress is not None:
            rate = counted_tokens / max(time.perf_counter() - started, 1e-9)
            on_progress(RecordProgress(done, total, rate, part.next, n_windows))
        if part.next >= n_windows:
            break
        reason = should_stop() if should_stop is not None else None
        if reason:
            checkpoint(False)  # the batch is complete, so the state is consistent
            raise ScopeError(
                f"stopped by {reason} after {part.next}/{n_windows} windows; "
                "everything so far is saved: run the same command with --resume to continue"
            )
        if time.perf_counter() - last >= settings.checkpoint_seconds:
            checkpoint(False)
            last = time.perf_counter()
    return counted_tokens


@contextmanager
def stop_on_signals() -> Iterator[StopFn]:
    """Turn Ctrl-C and SIGTERM into a stop request that ``record`` honours between batches (a
    batch is never half-applied; a checkpoint is saved). For command-line programs: yields the
    ``should_stop`` function to pass to ``record``. Off the main thread, nothing is installed."""
    requested: list[str] = []

    def should_stop() -> str | None:
        return requested[0] if requested else None

    if threading.current_thread() is not threading.main_thread():
        yield should_stop
        return

    def ask(signum: int, _frame: Any) -> None:
        requested.append(signal.Signals(signum).name)

    previous = {sig: signal.signal(sig, ask) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield should_stop
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
