"""Mostly-empty tensors saved compactly and losslessly: a bit per entry saying whether its bits
differ from the tensor's fill value, and the values of those that do.

Recording state is mostly fill: a top-k window's per-token activations are zero wherever the
feature did not fire (about 90% of them), and most (feature, bin) sample slots and histogram
bins are empty. Entries are compared bit for bit (not by value), so -0.0 and NaN come back as
they went in and a loaded state is the saved one to the bit. The comparison and the selection run on
the tensor's device; the mask is packed on the host (its bools cross, a byte an entry).

A tensor ``name`` is saved as ``name`` when that is smaller, else as ``name.mask`` (uint8, the
bits, first entry in the lowest bit), ``name.values``, ``name.shape`` and ``name.fill``.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

PARTS = ("mask", "values", "shape", "fill")
OVERHEAD = 512
"""Bytes that three more entries cost a file (their header and small tensors), about."""
_BITS = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def bits(t: Tensor) -> Tensor:
    """``t`` as integers of the same width (its bit patterns)."""
    return t.view(_BITS[t.element_size()]) if t.is_floating_point() else t


def packbits(keep: Tensor) -> Tensor:
    """A flat bool tensor as bytes on the host, eight entries a byte, the first in the lowest
    bit."""
    return torch.from_numpy(np.packbits(keep.cpu().numpy(), bitorder="little"))


def unpackbits(packed: Tensor, n: int, device: torch.device | None = None) -> Tensor:
    """The first ``n`` entries of ``packbits``' bools (on ``device``)."""
    keep = np.unpackbits(packed.cpu().numpy(), count=n, bitorder="little").view(np.bool_)
    return torch.from_numpy(keep).to(device or packed.device)


def pack(name: str, t: Tensor, fill: float) -> dict[str, Tensor]:
    """``t`` under ``name``, as the entries that are not ``fill`` where that is smaller."""
    t = t.contiguous()
    full = torch.tensor([fill], dtype=t.dtype, device=t.device)
    keep = bits(t).reshape(-1) != bits(full)
    values = t.reshape(-1)[keep]
    dense = t.numel() * t.element_size()
    if -(-t.numel() // 8) + values.numel() * t.element_size() + OVERHEAD >= dense:
        return {name: t}
    return {
        f"{name}.mask": packbits(keep),
        f"{name}.values": values,
        f"{name}.shape": torch.tensor(t.shape, dtype=torch.int64),
        f"{name}.fill": full,
    }


def unpack(tensors: dict[str, Tensor]) -> dict[str, Tensor]:
    """Packed tensors (``pack``'s parts, any mix of names) as whole tensors again."""
    out = {n: t for n, t in tensors.items() if n.rpartition(".")[2] not in PARTS}
    for name in {n.rpartition(".")[0] for n in tensors if n.endswith(".mask")}:
        shape = torch.Size(int(s) for s in tensors[f"{name}.shape"].tolist())
        whole = tensors[f"{name}.fill"].repeat(shape.numel())
        keep = unpackbits(tensors[f"{name}.mask"], shape.numel(), whole.device)
        whole[keep] = tensors[f"{name}.values"]
        out[name] = whole.view(shape)
    return out


__all__ = ["bits", "pack", "packbits", "unpack", "unpackbits"]
