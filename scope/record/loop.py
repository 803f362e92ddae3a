"""The hot loop: batches of windows -> one forward pass (``scope.acts``) -> every SAE's codes ->
state updates (the SAEs of one width as one stack, ``stack_states``). Everything per batch is
tensor work on the model's device. Progress and stop requests are callbacks, so a UI or the
CLI drives a recording the same way. With
``RecordSettings.overlap`` the state updates of one batch overlap the next batch's forward
(``Feed``)."""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np
import torch

from scope.acts import SAEActs, sae_acts
from scope.errors import ScopeError
from scope.interrupt import StopFn
from scope.record.state import FeatureState, stack_states
from scope.record.windows import Batch, PartWindows, read_batches

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


class Forwarded(NamedTuple):
    """A batch whose forward pass is queued and whose state updates are not yet applied."""

    windows: int
    """Windows in the batch."""
    tokens: int
    """Counted tokens in the batch (BOS and padding excluded)."""
    ids: torch.Tensor
    """[batch] int64 global window ids, on the device."""
    out: SAEActs
    """The forward pass's codes and counted mask, on the device."""
    ready: Any
    """A CUDA event recorded after the forward pass was queued; None off the GPU or plain."""


class Stack(NamedTuple):
    """SAEs of one width whose states are updated as one (``stack_states``)."""

    members: list[int]
    """Their positions in the SAE list (and in each batch's codes)."""
    state: FeatureState
    """The stacked state (the SAE's own state when it is alone)."""

    def update(self, batch: Forwarded) -> None:
        codes = [batch.out.codes[i] for i in self.members]
        acts = codes[0] if len(codes) == 1 else torch.cat(codes, dim=-1)
        self.state.update(acts, batch.out.counted, batch.ids)


def stack_by_width(
    saes: list[SAE], keys: list[str], states: dict[str, FeatureState]
) -> list[Stack]:
    """The SAEs grouped by width, each group's states stacked (the states in ``states`` become
    views of their stack), so the kernels per batch do not grow with the number of SAEs."""
    groups: dict[int, list[int]] = {}
    for i, sae in enumerate(saes):
        groups.setdefault(int(sae.cfg.d_sae), []).append(i)
    return [
        Stack(members, stack_states([states[keys[i]] for i in members]))
        for members in groups.values()
    ]


class Feed:
    """How batches reach the device and the state, plainly or overlapped.

    Overlapped (``RecordSettings.overlap``), the state updates of batch i run after the forward
    pass of batch i + 1 is queued, so the host waits in the updates (their nonzero and unique
    need sizes on the host) while the device already computes the next forward. On a GPU the
    windows go up from pinned memory without waiting and the updates run on a side stream; on
    a CPU the same steps run in the same order, one after another. Either way every update
    sees the same tensors in the same order, so the state is the same to the bit."""

    def __init__(self, device: torch.device, overlap: bool) -> None:
        self.device = device
        self.depth = 1 if overlap else 0
        """Batches forwarded ahead of the state updates."""
        gpu = overlap and device.type == "cuda"
        self.side = torch.cuda.Stream(device) if gpu else None
        """The stream the updates run on (GPU, overlapped)."""

    def upload(self, array: np.ndarray, dtype: torch.dtype | None = None) -> torch.Tensor:
        """A host array on the device; from pinned memory without waiting when overlapped."""
        t = torch.from_numpy(array)
        if self.side is not None:
            return t.pin_memory().to(self.device, dtype, non_blocking=True)
        return t.to(self.device, dtype)

    def forward(self, model: HookedSAETransformer, saes: list[SAE], chunk: Batch) -> Forwarded:
        """Queue the forward pass of ``chunk`` (and every SAE's encode)."""
        tokens = self.upload(chunk.tokens, torch.long)
        out = sae_acts(model, saes, tokens, self.upload(chunk.lengths))
        ready = None
        if self.side is not None:
            ready = torch.cuda.Event()
            ready.record(torch.cuda.current_stream(self.device))
        n = int(chunk.lengths.sum()) - len(chunk.ids)
        return Forwarded(len(chunk.ids), n, self.upload(chunk.ids), out, ready)

    def apply(self, batch: Forwarded, stacks: list[Stack]) -> None:
        """Fold ``batch`` into the states (queued on the side stream after its own forward)."""
        if self.side is None:
            for stack in stacks:
                stack.update(batch)
            return
        self.side.wait_event(batch.ready)  # its forward, not the one queued after it
        for t in (*batch.out.codes, batch.out.counted, batch.ids):
            t.record_stream(self.side)  # freed memory is reused only once the side stream is done
        with torch.cuda.stream(self.side):
            for stack in stacks:
                stack.update(batch)

    def settle(self) -> None:
        """Order everything after the queued updates, before the state is read (checkpoints)."""
        if self.side is not None:
            torch.cuda.current_stream(self.device).wait_stream(self.side)


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
    request is honoured between batches: the state is checkpointed and a ScopeError raised.
    ``part.next`` counts the windows whose updates are applied, so a checkpoint is always of
    whole batches (overlapped, a batch already forwarded is dropped and redone on --resume)."""
    feed = Feed(next(model.parameters()).device, bool(settings.overlap))
    stacks = stack_by_width(saes, keys, states)
    n_windows = len(windows)  # this shard's windows of the part
    total = windows.n_tokens
    done = int(windows.lengths[: part.next].sum() - part.next)
    counted_tokens = 0
    last = started = time.perf_counter()
    queued: deque[Forwarded] = deque()

    def fold(batch: Forwarded) -> None:
        nonlocal counted_tokens, done, last
        feed.apply(batch, stacks)
        part.next += batch.windows
        counted_tokens += batch.tokens
        done += batch.tokens
        if on_progress is not None:
            rate = counted_tokens / max(time.perf_counter() - started, 1e-9)
            on_progress(RecordProgress(done, total, rate, part.next, n_windows))
        if part.next >= n_windows:
            feed.settle()
            return
        reason = should_stop() if should_stop is not None else None
        if reason:
            feed.settle()
            checkpoint(False)  # the batch is complete, so the state is consistent
            raise ScopeError(
                f"stopped by {reason} after {part.next}/{n_windows} windows; "
                "everything so far is saved: run the same command with --resume to continue"
            )
        if time.perf_counter() - last >= settings.checkpoint_seconds:
            feed.settle()
            checkpoint(False)
            last = time.perf_counter()

    for chunk in read_batches(windows.path, windows.pad, int(part.batch_size), part.next):
        queued.append(feed.forward(model, saes, chunk))
        while len(queued) > feed.depth:
            fold(queued.popleft())
    while queued:
        fold(queued.popleft())
    return counted_tokens
