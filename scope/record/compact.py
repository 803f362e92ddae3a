"""Mostly-empty tensors saved compactly and losslessly: a bit per entry saying whether its bits
differ from the tensor's fill value, and the values of those that do.

Recording state is mostly fill: a top-k window's per-token activations are zero wherever the
feature did not fire (about 90% of them), and most (feature, bin) sample slots and histogram
bins are empty. Entries are compared bit for bit (not by value), so -0.0 and NaN come back as
they went in and a loaded state is the saved one to the bit. Comparing and selecting run on the
tensor's device (with numpy on a CPU); the mask is packed on the host.

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


def unpackbits(packed: Tensor, n: int, device: torch.device | None = None) -> Tensor:
    """The first ``n`` bools of a mask ``pack`` made (eight a byte, the first in the lowest bit),
    on ``device``."""
    keep = np.unpackbits(packed.cpu().numpy(), count=n, bitorder="little").view(np.bool_)
    return torch.from_numpy(keep).to(device or packed.device)


def pack(name: str, t: Tensor, fill: float) -> dict[str, Tensor]:
    """``t`` under ``name``, as the entries that are not ``fill`` where that is smaller."""
    t = t.contiguous()
    full = torch.tensor([fill], dtype=t.dtype, device=t.device)
    if t.device.type == "cpu":  # numpy compares and selects several times faster there
        keep = bits(t).reshape(-1).numpy() != bits(full).numpy()
        values = torch.from_numpy(t.reshape(-1).numpy()[keep])
    else:
        on_device = bits(t).reshape(-1) != bits(full)
        values, keep = t.reshape(-1)[on_device], on_device.cpu().numpy()
    dense = t.numel() * t.element_size()
    if -(-t.numel() // 8) + values.numel() * t.element_size() + OVERHEAD >= dense:
        return {name: t}
    return {
        f"{name}.mask": torch.from_numpy(np.packbits(keep, bitorder="little")),
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
        values = tensors[f"{name}.values"]
        if whole.device.type == "cpu":  # numpy's assignment, several times faster there
            bits(whole).numpy()[keep.numpy()] = bits(values).numpy()
        else:
            whole[keep] = values
        out[name] = whole.view(shape)
    return out


__all__ = ["bits", "pack", "unpack", "unpackbits"]
