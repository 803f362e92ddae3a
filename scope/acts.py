"""The one activation path: one forward pass that stops after the deepest hook any SAE reads,
every SAE's codes from it (through its codec, ``scope.codec``), and the mask of tokens that
count.

Everything that needs feature activations goes through here: recording, sweep metrics, the
prompt inspector, evals, training and the scripts. BOS, padding and every other special token
never count (Gemma Scope was trained without them; their norms are huge).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, NamedTuple

import torch
from jaxtyping import Bool, Float, Int

from scope.codec import codec_of
from scope.codec import encode as encode
from scope.identity import hook_site

if TYPE_CHECKING:
    from sae_lens import SAE, HookedSAETransformer


class SAEActs(NamedTuple):
    """What one forward pass gives for a batch of token windows."""

    codes: list[Float[torch.Tensor, "batch pos d_sae"]]
    """Each SAE's feature activations, in the order the SAEs were given, zero where a token
    does not count."""
    counted: Bool[torch.Tensor, "batch pos"]
    """True where a token counts: inside the window's length, not BOS, padding or special."""
    hooks: dict[str, torch.Tensor]
    """The raw activation at each hook read ([batch, pos, d] or [batch, pos, heads, d_head])."""


def hook_names(saes: Sequence[SAE]) -> list[str]:
    """The distinct hooks the SAEs read (a transcoder's input hook), sorted."""
    return sorted({codec_of(s).read_hook for s in saes})


def enable_hooks(model: HookedSAETransformer, hooks: Sequence[str]) -> None:
    """Turn on the hook points transformer-lens leaves off by default that ``hooks`` name
    (``hook_mlp_in``, which transcoders read)."""
    if any(h.endswith(".hook_mlp_in") for h in hooks) and not model.cfg.use_hook_mlp_in:
        model.set_use_hook_mlp_in(True)


def deepest_layer(saes: Sequence[SAE]) -> int:
    """The last block any SAE reads; the forward pass can stop after it."""
    layers = [hook_site(h)[0] for h in hook_names(saes)]
    return max(layer if layer is not None else 0 for layer in layers)


def capture(
    model: HookedSAETransformer,
    tokens: Int[torch.Tensor, "batch pos"],
    hooks: Sequence[str],
    stop_at_layer: int,
) -> dict[str, torch.Tensor]:
    """Run the model up to ``stop_at_layer`` and return the activations at ``hooks``."""
    out: dict[str, torch.Tensor] = {}
    enable_hooks(model, hooks)

    def grab(act: torch.Tensor, hook: Any) -> None:
        out[hook.name] = act

    model.run_with_hooks(
        tokens, return_type=None, stop_at_layer=stop_at_layer, fwd_hooks=[(h, grab) for h in hooks]
    )
    return out


def site_input(act: torch.Tensor) -> Float[torch.Tensor, "batch pos d_in"]:
    """A hook's activation as an SAE reads it: attn.hook_z [batch, pos, heads, d_head] with the
    heads flattened; others as they are. For a non-contiguous hook_z this is a copy: a hook
    that edits it must return ``x.reshape(act.shape)``, not ``act``."""
    return act.flatten(-2) if act.dim() == 4 else act


def counted_mask(
    model: HookedSAETransformer,
    tokens: Int[torch.Tensor, "batch pos"],
    lengths: Int[torch.Tensor, " batch"] | None = None,
) -> Bool[torch.Tensor, "batch pos"]:
    """True where a token counts: before ``lengths`` (right padding) and not a special token."""
    special = torch.tensor(sorted(set(model.tokenizer.all_special_ids)))
    if tokens.is_cuda:  # up from pinned memory, so the host does not wait for queued work
        special = special.pin_memory()
    counted = ~torch.isin(tokens, special.to(tokens.device, non_blocking=True))
    if lengths is not None:
        counted &= torch.arange(tokens.shape[1], device=tokens.device) < lengths[:, None]
    return counted


@torch.no_grad()
def sae_acts(
    model: HookedSAETransformer,
    saes: Sequence[SAE],
    tokens: Int[torch.Tensor, "batch pos"],
    lengths: Int[torch.Tensor, " batch"] | None = None,
) -> SAEActs:
    """One forward pass, stopped after the deepest SAE's layer, and every SAE's codes from it,
    zeroed where a token does not count (``counted_mask``)."""
    hooks = hook_names(saes)
    acts = capture(model, tokens, hooks, deepest_layer(saes) + 1)
    counted = counted_mask(model, tokens, lengths)
    skip = ~counted
    codes = []
    for sae in saes:
        c = encode(sae, site_input(acts[codec_of(sae).read_hook]))
        if c.is_cuda:  # a boolean index needs its size on the host: a wait for the device
            c.masked_fill_(skip[..., None], 0)
        else:
            c[skip] = 0  # only the uncounted rows are touched
        codes.append(c)
    return SAEActs(codes=codes, counted=counted, hooks=acts)


__all__ = [
    "SAEActs",
    "capture",
    "counted_mask",
    "deepest_layer",
    "enable_hooks",
    "encode",
    "hook_names",
    "sae_acts",
    "site_input",
]
