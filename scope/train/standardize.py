"""Per-dimension standardisation of what an SAE trains on (``TrainSettings.standardize``),
folded into the weights when training ends.

Gemma 3's residual stream carries most of its variance in a handful of dimensions (at layer 9
of Gemma 3 270M one dimension holds 58% of it, and the mean 93% of the squared norm). An SAE
trained on raw activations, or on activations scaled by one factor (sae-lens'
``expected_average_only_in``), spends its features and its reconstruction loss on those few
dimensions: FVU looks low while the rest of the stream, which the next layers read, is
reconstructed poorly and the delta LM loss is high. Standardising each dimension (mean 0,
variance 1 over the run's first batches) weighs every dimension alike. This is the
workbench's own option, not sae-lens'.

The map is affine, so the trained SAE folds back exactly into Gemma Scope's raw-activation
arrays (``fold``): with ``z = (x - m_in) / s_in`` and ``x_hat = z_hat * s_out + m_out``,

    W_enc' = W_enc / s_in[:, None]          b_enc' = b_enc - (m_in / s_in) @ W_enc
    W_dec' = W_dec * s_out[None, :]         b_dec' = b_dec * s_out + m_out
    W_skip' = W_skip * s_out[:, None] / s_in[None, :]
    b_dec' -= ((m_in / s_in) @ W_skip.T) * s_out     (a skip transcoder's affine path)

(an SAE's ``out`` is its ``inp``). The statistics are a function of the run's settings and
cache (the same first batches sae-lens' scaling factor is estimated from), so a resumed run
recomputes them bitwise and checkpoints need not hold them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from scope.train.losses import TrainingSAE

STD_FLOOR = 1e-2
"""A dimension's standard deviation is taken as at least this fraction of the median one's,
so a (near-)constant dimension is not blown up into noise."""


@dataclass(frozen=True)
class Moments:
    """Per-dimension mean and standard deviation of one hook's rows (float32)."""

    mean: torch.Tensor
    std: torch.Tensor

    @classmethod
    def of(cls, rows: torch.Tensor) -> Moments:
        x = rows.double()
        std = x.std(0)
        std = std.clamp(min=float(std.median()) * STD_FLOOR)
        return cls(x.mean(0).float(), std.float())

    def apply(self, rows: torch.Tensor) -> torch.Tensor:
        return (rows - self.mean.to(rows)) / self.std.to(rows)


@dataclass(frozen=True)
class Standardizer:
    """The standardisation of one module's batches: its input, and a transcoder's target
    (``out``; None for an SAE, whose target is its input)."""

    inp: Moments
    out: Moments | None = None

    @classmethod
    def of(cls, batch: torch.Tensor, d_in: int, paired: bool) -> Standardizer:
        """From a module's raw batch: ``[rows, d_in]``, or a transcoder's ``[input | target]``."""
        if not paired:
            return cls(Moments.of(batch))
        return cls(Moments.of(batch[:, :d_in]), Moments.of(batch[:, d_in:]))

    def apply(self, batch: torch.Tensor) -> torch.Tensor:
        if self.out is None:
            return self.inp.apply(batch)
        d_in = self.inp.mean.numel()
        return torch.cat([self.inp.apply(batch[:, :d_in]), self.out.apply(batch[:, d_in:])], 1)

    @torch.no_grad()
    def fold(self, sae: TrainingSAE) -> None:
        """Fold the standardisation into ``sae``'s weights (after sae-lens' scaling is folded),
        so it reads and writes raw activations (computed in float64)."""
        out = self.out or self.inp
        m_in, s_in = self.inp.mean.double(), self.inp.std.double()
        m_out, s_out = out.mean.double(), out.std.double()
        w_enc, w_dec = sae.W_enc.double(), sae.W_dec.double()
        b_enc, b_dec = sae.b_enc.double(), sae.b_dec.double()
        shift = m_in / s_in
        b_enc = b_enc - shift @ w_enc
        b_dec = b_dec * s_out + m_out
        skip = getattr(sae, "W_skip", None)
        if skip is not None:
            w_skip = skip.double()
            b_dec = b_dec - (shift @ w_skip.T) * s_out
            skip.data.copy_(w_skip * s_out[:, None] / s_in[None, :])
        sae.W_enc.data.copy_(w_enc / s_in[:, None])
        sae.W_dec.data.copy_(w_dec * s_out[None, :])
        sae.b_enc.data.copy_(b_enc)
        sae.b_dec.data.copy_(b_dec)


__all__ = ["STD_FLOOR", "Moments", "Standardizer"]
