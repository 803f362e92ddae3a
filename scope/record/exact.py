"""Sums that do not depend on the order of their terms, so shards merge bit for bit.

A float sum rounds after every addition, so adding the same values in another order (one pass
vs shards merged, or shards merged in the order they finish) moves the last bits. Here each
value is rounded once, to a multiple of 2^-FRAC_BITS, and added as an integer held in two
int64 limbs: integer addition is exact and associative, so any grouping of the same values
gives the same limbs, and the float read back from them is the same to the bit.

Resolution is 2^-40 (about 9e-13) per value, finer than a float32 activation above 1e-5 can
express; totals up to about 2^54 (1.8e16) fit.
"""

from __future__ import annotations

import torch
from jaxtyping import Float, Int
from torch import Tensor

FRAC_BITS = 40
"""Each value is rounded to a multiple of 2^-FRAC_BITS."""
LIMB_BITS = 32
"""The low limb holds the lowest LIMB_BITS bits of the fixed-point integer."""
_LOW_MASK = (1 << LIMB_BITS) - 1


def fixed_zeros(n: int, device: torch.device | str) -> Int[Tensor, "n 2"]:
    """n sums of nothing: [n, 2] int64 (high limb, low limb)."""
    return torch.zeros(n, 2, dtype=torch.int64, device=device)


def to_limbs(x: Float[Tensor, " k"]) -> Int[Tensor, "k 2"]:
    """Values as fixed-point [k, 2] int64 limbs (high, low), low in [0, 2^LIMB_BITS].

    Scaling by a power of two, floor and the subtraction are exact in floating point, so the
    only rounding is of the bits below 2^-FRAC_BITS, and it depends on the value alone."""
    scaled = x * 2.0**FRAC_BITS
    high = torch.floor(scaled * 2.0**-LIMB_BITS)
    low = torch.round(scaled - high * 2.0**LIMB_BITS)
    return torch.stack([high, low], dim=1).to(torch.int64)


def add_at(total: Int[Tensor, "n 2"], index: Int[Tensor, " k"], x: Float[Tensor, " k"]) -> None:
    """total[index[j]] += x[j] for every j, exactly, in place."""
    total.index_add_(0, index, to_limbs(x))
    carry(total)


def carry(total: Int[Tensor, "n 2"]) -> None:
    """Move the low limb's overflow into the high limb, so equal sums have equal limbs."""
    total[:, 0] += total[:, 1] >> LIMB_BITS
    total[:, 1] &= _LOW_MASK


def added(a: Int[Tensor, "n 2"], b: Int[Tensor, "n 2"]) -> Int[Tensor, "n 2"]:
    """The sums of both, exactly."""
    out = a + b
    carry(out)
    return out


def to_float(total: Int[Tensor, "n 2"]) -> Float[Tensor, " n"]:
    """The sums as float64 on the CPU (the same limbs always give the same floats)."""
    t = total.cpu()
    high = t[:, 0].to(torch.float64) * 2.0 ** (LIMB_BITS - FRAC_BITS)
    return high + t[:, 1].to(torch.float64) * 2.0**-FRAC_BITS
