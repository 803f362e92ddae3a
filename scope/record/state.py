"""Per-feature recording state for one SAE: updated on the device from each batch's codes, and
mergeable, so shards recorded anywhere combine into exactly what one pass gives.

What is kept per feature (F = d_sae, k = top-k, T = ctx, m = samples per bin):
- count, sum, sum of squares and max of its activations over counted tokens (the sums exact
  and order-free, ``scope.record.exact``, so a merge equals one pass to the bit);
- a histogram over fixed log-spaced bins (fixed, so histograms of shards add);
- the exact top-k windows by the window's max activation (ties: lower window id first),
  with the activation at every token of the window;
- a stratified random sample of activating windows: per log-spaced bin of the window's max,
  the m windows with the smallest hash of (window, feature). A bottom-m hash sample is
  uniform within the bin and merges exactly (the union's m smallest keys).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, fields
from pathlib import Path

import torch
from jaxtyping import Bool, Float, Int
from safetensors.torch import load_file, save_file
from torch import Tensor

from scope.errors import ScopeError
from scope.identity import splitmix64
from scope.record import compact, exact
from scope.store.files import VersionBuilder, as_created

# Activation histogram: 16 bins a decade over [1e-3, 1e4), plus under/overflow bins.
HIST_EDGES = torch.logspace(-3, 4, 16 * 7 + 1, dtype=torch.float64)
# Interval samples: 4 bins a decade over the same range.
SAMPLE_EDGES = HIST_EDGES[::4].clone()
EMPTY_KEY = torch.iinfo(torch.int64).max
FILL = {"top_act": float("-inf"), "top_win": -1, "smp_key": EMPTY_KEY, "smp_win": -1}
"""What an empty slot holds, by field (0 where not named): ``empty`` fills with it, and saved
states keep only what differs from it (``scope.record.compact``)."""


def sample_key(window: Int[Tensor, " n"], feature: Int[Tensor, " n"]) -> Int[Tensor, " n"]:
    """A deterministic pseudo-random int64 per (window, feature): splitmix64 of the pair."""
    return splitmix64(window.to(torch.int64) * 1_048_583 + feature.to(torch.int64))


def lexsort(*keys: Tensor) -> Int[Tensor, " n"]:
    """Indices sorting by keys[0], then keys[1], ... (all ascending, stable)."""
    order = torch.argsort(keys[-1], stable=True)
    for key in reversed(keys[:-1]):
        order = order[torch.argsort(key[order], stable=True)]
    return order


def rank_within(groups: Int[Tensor, " n"]) -> Int[Tensor, " n"]:
    """For a sorted 1-D tensor of group ids, each element's position within its group."""
    n = groups.numel()
    idx = torch.arange(n, device=groups.device)
    starts = torch.ones(n, dtype=torch.bool, device=groups.device)
    starts[1:] = groups[1:] != groups[:-1]
    first = torch.cummax(torch.where(starts, idx, torch.zeros_like(idx)), dim=0).values
    return idx - first


@dataclass
class FeatureState:
    """The mergeable state of one SAE. Create with ``FeatureState.empty``."""

    count: torch.Tensor  # [F] int64, counted tokens where the feature fired
    act_sum_fx: torch.Tensor  # [F, 2] int64, sum of activations in fixed point (exact.py)
    act_sumsq_fx: torch.Tensor  # [F, 2] int64, sum of squares, the same way
    act_max: torch.Tensor  # [F] float32, 0 if never fired
    hist: torch.Tensor  # [F, len(HIST_EDGES) + 1] int64
    l0_hist: torch.Tensor  # [F + 1] int64, counted tokens by number of firing features
    tokens: torch.Tensor  # [] int64, counted tokens
    top_act: torch.Tensor  # [F, k] float32, -inf where empty; slots in no particular order
    top_win: torch.Tensor  # [F, k] int64, -1 where empty
    top_pos: torch.Tensor  # [F, k] int64, position of the max in the window
    top_acts: torch.Tensor  # [F, k, T] float32, the feature at every token of the window
    smp_key: torch.Tensor  # [F, S, m] int64, EMPTY_KEY where empty
    smp_win: torch.Tensor  # [F, S, m] int64
    smp_pos: torch.Tensor  # [F, S, m] int64
    smp_act: torch.Tensor  # [F, S, m] float32, the window's max

    @classmethod
    def empty(cls, d_sae: int, *, k: int, ctx: int, m: int, device: torch.device) -> FeatureState:
        f, s = d_sae, len(SAMPLE_EDGES) + 1

        def z(name: str, *shape: int, dtype: torch.dtype = torch.int64) -> torch.Tensor:
            return torch.full(shape, FILL.get(name, 0), dtype=dtype, device=device)

        f32 = torch.float32
        return cls(
            count=z("count", f),
            act_sum_fx=exact.fixed_zeros(f, device),
            act_sumsq_fx=exact.fixed_zeros(f, device),
            act_max=z("act_max", f, dtype=f32),
            hist=z("hist", f, len(HIST_EDGES) + 1),
            l0_hist=z("l0_hist", f + 1),
            tokens=z("tokens"),
            top_act=z("top_act", f, k, dtype=f32),
            top_win=z("top_win", f, k),
            top_pos=z("top_pos", f, k),
            top_acts=z("top_acts", f, k, ctx, dtype=f32),
            smp_key=z("smp_key", f, s, m),
            smp_win=z("smp_win", f, s, m),
            smp_pos=z("smp_pos", f, s, m),
            smp_act=z("smp_act", f, s, m, dtype=f32),
        )

    @property
    def d_sae(self) -> int:
        return self.count.shape[0]

    @property
    def k(self) -> int:
        return self.top_act.shape[1]

    @property
    def act_sum(self) -> Float[Tensor, " d_sae"]:
        """Sum of each feature's activations, float64 on the CPU."""
        return exact.to_float(self.act_sum_fx)

    @property
    def act_sumsq(self) -> Float[Tensor, " d_sae"]:
        """Sum of each feature's squared activations, float64 on the CPU."""
        return exact.to_float(self.act_sumsq_fx)

    def tensors(self) -> dict[str, torch.Tensor]:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor]) -> FeatureState:
        tensors = dict(tensors)
        for name in ("act_sum", "act_sumsq"):  # states saved before the sums were exact
            if name in tensors and f"{name}_fx" not in tensors:
                tensors[f"{name}_fx"] = exact.to_limbs(tensors.pop(name))
        return cls(**{f.name: tensors[f.name] for f in fields(cls)})

    def to(self, device: torch.device | str) -> FeatureState:
        return FeatureState(**{n: t.to(device) for n, t in self.tensors().items()})

    # ------------------------------------------------------------ one batch

    @torch.no_grad()
    def update(
        self,
        acts: Float[Tensor, "batch pos d_sae"],
        counted: Bool[Tensor, "batch pos"],
        windows: Int[Tensor, " batch"],
    ) -> None:
        """Fold one batch in.

        acts: [batch, pos, d_sae] codes, zero where a token does not count (as
        ``scope.acts.sae_acts`` gives them); counted: [batch, pos] bool, False at BOS, padding
        and special tokens; windows: [batch] int64 global window ids, increasing across calls.
        One dense pass finds the firing entries; all else works on those sparse entries, on
        the device. For a stack (``stack_states``) acts are the SAEs' codes side by side,
        [batch, pos, saes x d_sae], and every SAE is updated by the same kernels.
        """
        n_b, n_t, n_f = acts.shape
        n_saes = self.l0_hist.shape[0] if self.l0_hist.dim() == 2 else 1
        width = n_f // n_saes  # each SAE's d_sae
        b, t, f = acts.nonzero(as_tuple=True)
        v = acts[b, t, f].float()
        acc = _wide(v.device)
        self.count += torch.bincount(f, minlength=n_f)
        exact.add_at(self.act_sum_fx, f, v.to(acc))
        exact.add_at(self.act_sumsq_fx, f, v.to(acc) ** 2)  # exact in float64
        self.act_max.scatter_reduce_(0, f, v, reduce="amax")
        n_bins = self.hist.shape[1]
        bins = torch.bucketize(v.to(acc), HIST_EDGES.to(v.device, acc), right=True)
        self.hist.view(-1).add_(torch.bincount(f * n_bins + bins, minlength=self.hist.numel()))
        # firing features per counted token, per SAE: [saes, counted tokens]
        at = (f // width * n_b + b) * n_t + t
        l0 = torch.bincount(at, minlength=n_saes * n_b * n_t).view(n_saes, n_b, n_t)[:, counted]
        l0 += torch.arange(n_saes, device=l0.device)[:, None] * (width + 1)
        self.l0_hist.view(-1).add_(torch.bincount(l0.view(-1), minlength=self.l0_hist.numel()))
        self.tokens += counted.sum()
        # each window's max per feature, and the first position reaching it
        bf = b * n_f + f
        wmax = torch.zeros(n_b * n_f, device=v.device).scatter_reduce_(0, bf, v, reduce="amax")
        at_max = v == wmax[bf]
        wpos = torch.full((n_b * n_f,), n_t, device=v.device, dtype=torch.int64)
        wpos.scatter_reduce_(0, bf[at_max], t[at_max], reduce="amin")
        wmax, wpos = wmax.view(n_b, n_f), wpos.view(n_b, n_f)
        self._update_topk(acts, wmax, wpos, windows)
        self._update_samples(wmax, wpos, windows, width)

    def _update_topk(
        self,
        acts: Float[Tensor, "batch pos d_sae"],
        wmax: Float[Tensor, "batch d_sae"],
        wpos: Int[Tensor, "batch d_sae"],
        windows: Int[Tensor, " batch"],
    ) -> None:
        """Slots are unordered (tables sort them). A window enters only above a feature's worst
        kept one (a tie keeps the older, lower id) and takes over an evicted slot, so kept rows
        never move: per batch only the entering windows' rows are written."""
        cand = (wmax > self.top_act.min(dim=1).values) & (wmax > 0)
        cb, cf = cand.nonzero(as_tuple=True)
        if cb.numel() == 0:
            return
        touched = torch.unique(cf)
        k = self.k
        of = touched.repeat_interleave(k)  # every slot of each touched feature, empties too
        oj = torch.arange(k, device=of.device).repeat(touched.numel())
        n_old = of.numel()
        feat = torch.cat([of, cf])
        order = lexsort(
            feat,
            -torch.cat([self.top_act[of, oj], wmax[cb, cf]]),  # empty slots hold -inf: last
            torch.cat([self.top_win[of, oj], windows[cb]]),
        )
        kept = torch.zeros(feat.numel(), dtype=torch.bool, device=feat.device)
        kept[order[rank_within(feat[order]) < k]] = True
        evicted = (~kept[:n_old]).nonzero().squeeze(1)  # grouped by feature, as `of` is
        entering = kept[n_old:].nonzero().squeeze(1)
        entering = entering[torch.argsort(cf[entering], stable=True)]  # grouped the same way
        ef, ej = of[evicted], oj[evicted]  # per feature, as many evicted as entering
        nb, nf = cb[entering], cf[entering]
        self.top_act[ef, ej] = wmax[nb, nf]
        self.top_win[ef, ej] = windows[nb]
        self.top_pos[ef, ej] = wpos[nb, nf]
        rows = torch.zeros(nb.numel(), self.top_acts.shape[2], device=acts.device)
        rows[:, : acts.shape[1]] = acts[nb, :, nf].float()
        self.top_acts[ef, ej] = rows

    def _update_samples(
        self,
        wmax: Float[Tensor, "batch d_sae"],
        wpos: Int[Tensor, "batch d_sae"],
        windows: Int[Tensor, " batch"],
        width: int,
    ) -> None:
        """Per (feature, log bin of the window's max), keep the m windows of smallest key (keyed
        by the feature's index within its SAE, ``width`` features wide)."""
        pb, pf = (wmax > 0).nonzero(as_tuple=True)
        if pb.numel() == 0:
            return
        val = wmax[pb, pf]
        key = sample_key(windows[pb], pf % width)
        acc = _wide(val.device)
        sbin = torch.bucketize(val.to(acc), SAMPLE_EDGES.to(val.device, acc), right=True)
        go = key < self.smp_key[pf, sbin, -1]
        pb, pf, val, key, sbin = pb[go], pf[go], val[go], key[go], sbin[go]
        if pb.numel() == 0:
            return
        n_s, m = self.smp_key.shape[1], self.smp_key.shape[2]
        slot = pf * n_s + sbin
        touched = torch.unique(slot)
        flat_key = self.smp_key.view(-1, m)
        flat_win, flat_pos, flat_act = (
            x.view(-1, m) for x in (self.smp_win, self.smp_pos, self.smp_act)
        )
        os_ = touched.repeat_interleave(m)
        oj = torch.arange(m, device=os_.device).repeat(touched.numel())
        keep_old = flat_key[os_, oj] != EMPTY_KEY
        os_, oj = os_[keep_old], oj[keep_old]
        slots = torch.cat([os_, slot])
        keys = torch.cat([flat_key[os_, oj], key])
        wins = torch.cat([flat_win[os_, oj], windows[pb]])
        poss = torch.cat([flat_pos[os_, oj], wpos[pb, pf]])
        acts = torch.cat([flat_act[os_, oj], val])
        order = lexsort(slots, keys)
        rank = rank_within(slots[order])
        sel, rank = order[rank < m], rank[rank < m]
        flat_key[touched] = EMPTY_KEY
        flat_win[touched] = -1
        dest = slots[sel]
        flat_key[dest, rank] = keys[sel]
        flat_win[dest, rank] = wins[sel]
        flat_pos[dest, rank] = poss[sel]
        flat_act[dest, rank] = acts[sel]

    # ------------------------------------------------------------ merging

    @torch.no_grad()
    def merge(self, other: FeatureState) -> FeatureState:
        """The state of both inputs recorded together (windows must not overlap)."""
        if self.top_acts.shape != other.top_acts.shape or self.smp_key.shape != other.smp_key.shape:
            raise ValueError(
                f"cannot merge states of different shapes: {tuple(self.top_acts.shape)} "
                f"vs {tuple(other.top_acts.shape)}; record shards with the same --k and --ctx"
            )
        o = other.to(self.count.device)
        top = _merge_rows(
            sort_keys=(
                -torch.cat([self.top_act, o.top_act], 1),
                torch.cat([self.top_win, o.top_win], 1),
            ),
            carry=[
                torch.cat([self.top_act, o.top_act], 1),
                torch.cat([self.top_win, o.top_win], 1),
                torch.cat([self.top_pos, o.top_pos], 1),
                torch.cat([self.top_acts, o.top_acts], 1),
            ],
            keep=self.k,
            empty=torch.cat([self.top_win, o.top_win], 1) < 0,
        )
        shape = self.smp_key.shape
        m = shape[2]

        def flat(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
            return torch.cat([a.reshape(-1, m), b.reshape(-1, m)], 1)

        smp = _merge_rows(
            sort_keys=(flat(self.smp_key, o.smp_key),),
            carry=[
                flat(getattr(self, n), getattr(o, n))
                for n in ("smp_key", "smp_win", "smp_pos", "smp_act")
            ],
            keep=m,
            empty=flat(self.smp_key, o.smp_key) == EMPTY_KEY,
        )
        return FeatureState(
            count=self.count + o.count,
            act_sum_fx=exact.added(self.act_sum_fx, o.act_sum_fx),
            act_sumsq_fx=exact.added(self.act_sumsq_fx, o.act_sumsq_fx),
            act_max=torch.maximum(self.act_max, o.act_max),
            hist=self.hist + o.hist,
            l0_hist=self.l0_hist + o.l0_hist,
            tokens=self.tokens + o.tokens,
            top_act=top[0],
            top_win=top[1],
            top_pos=top[2],
            top_acts=top[3],
            smp_key=smp[0].reshape(shape),
            smp_win=smp[1].reshape(shape),
            smp_pos=smp[2].reshape(shape),
            smp_act=smp[3].reshape(shape),
        )


STACKED = ("l0_hist", "tokens")
"""Fields a stack holds per SAE (a new first dimension); the others per feature, side by side."""


def stack_states(states: Sequence[FeatureState]) -> FeatureState:
    """One state for SAEs of one width (and the same k, ctx and samples), updated as one: their
    features side by side (the i-th SAE's are features i x d_sae to (i + 1) x d_sae - 1),
    ``l0_hist`` [saes, d_sae + 1] and ``tokens`` [saes]. So a batch costs the same kernels
    for any number of SAEs. Each given state is re-pointed at its slice of the stack (views),
    so it still reads as that SAE's own state (checkpoints, tables) while updates go to the
    stack; every feature's state is what updating it alone gives, to the bit."""
    if len(states) == 1:
        return states[0]
    whole = {}
    for f in fields(FeatureState):
        parts = [getattr(s, f.name) for s in states]
        whole[f.name] = torch.stack(parts) if f.name in STACKED else torch.cat(parts)
        views = whole[f.name].unbind(0) if f.name in STACKED else whole[f.name].split(len(parts[0]))
        for st, view in zip(states, views, strict=True):
            setattr(st, f.name, view)
    return FeatureState(**whole)


def _wide(device: torch.device) -> torch.dtype:
    """float64 where the device has it (MPS has not)."""
    return torch.float32 if device.type == "mps" else torch.float64


def _merge_rows(
    sort_keys: tuple[torch.Tensor, ...], carry: list[torch.Tensor], keep: int, empty: torch.Tensor
) -> list[torch.Tensor]:
    """Row-wise: sort each row by sort_keys (empties last), keep the first ``keep`` columns."""
    order = torch.argsort(sort_keys[-1], dim=1, stable=True)
    for key in reversed(sort_keys[:-1]):
        order = order.gather(1, torch.argsort(key.gather(1, order), dim=1, stable=True))
    order = order.gather(
        1, torch.argsort(empty.gather(1, order).to(torch.int8), dim=1, stable=True)
    )
    order = order[:, :keep]
    out = []
    for x in carry:
        idx = order
        if x.dim() == 3:
            idx = order.unsqueeze(-1).expand(-1, -1, x.shape[2])
        out.append(x.gather(1, idx))
    return out


def load_states(
    version: Path, keys: Iterable[str], device: torch.device
) -> dict[str, FeatureState]:
    """The resumable state of each SAE key saved in the version folder ``version`` (compact,
    as ``save_states`` writes it, or every tensor whole, as stores recorded before did)."""
    out = {}
    for key in keys:
        path = version / "state" / f"{key}.safetensors"
        try:
            tensors = compact.unpack(load_file(path, device=str(device)))
            out[key] = FeatureState.from_tensors(tensors)
        except Exception as err:  # safetensors raises several types for damaged files
            raise ScopeError(f"{path} is damaged ({err}); the store cannot be resumed") from err
    return out


def save_states(builder: VersionBuilder, states: dict[str, FeatureState]) -> None:
    """Each SAE's state as ``state/<key>.safetensors`` in a version being built: each tensor
    as the entries that differ from its empty value (``FILL``), where that is smaller, to the
    bit (most top-k activations are zero and most sample slots empty: a sixth of the size)."""
    for key, st in states.items():
        tensors: dict[str, torch.Tensor] = {}
        for name, t in st.tensors().items():
            tensors.update(compact.pack(name, t, FILL.get(name, 0)))
        path = builder.path(f"state/{key}.safetensors")
        save_file(tensors, path)
        as_created(path)  # safetensors writes 0600
