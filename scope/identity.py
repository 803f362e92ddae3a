"""Who an SAE is: its hook and site, its short key, and the hash of its weights as stored.

The one place that names SAEs: recording, steering, sweeps, the store and the app all take
keys and identities from here. A key (``L12.res.16k``) addresses features (``L12.res.16k/1234``);
the sha256 ties a store's records to the weights, whatever dtype or device they run in.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from scope.codec import codec_of
from scope.errors import ScopeError

if TYPE_CHECKING:
    from sae_lens import SAE

MLP_INPUT = "blocks.{layer}.ln2.hook_out"
"""The MLP's input: the pre-MLP RMSNorm's output, its weight applied (Hugging Face's
``model.layers.L.pre_feedforward_layernorm`` output). Gemma Scope's transcoders read this.
transformer-lens has no hook there (``hook_mlp_in`` is before the norm, ``ln2.hook_normalized``
before its weight); ``scope.load_model`` adds ``ln2.hook_out``."""

SITE_HOOKS = {
    "res": "blocks.{layer}.hook_resid_post",
    "mlp": "blocks.{layer}.hook_mlp_out",
    "att": "blocks.{layer}.attn.hook_z",
}
_HOOK_SITES = [
    (re.compile(r"^blocks\.(\d+)\.hook_resid_post$"), "res"),
    (re.compile(r"^blocks\.(\d+)\.hook_mlp_out$"), "mlp"),
    (re.compile(r"^blocks\.(\d+)\.attn\.hook_z$"), "att"),
]


def hook_site(hook_name: str) -> tuple[int | None, str]:
    """(layer, site) of a hook: ``blocks.12.hook_resid_post`` -> (12, "res")."""
    for pattern, site in _HOOK_SITES:
        if m := pattern.match(hook_name):
            return int(m.group(1)), site
    m = re.match(r"^blocks\.(\d+)\.", hook_name)
    return (int(m.group(1)) if m else None), hook_name.rsplit(".", 1)[-1]


def width_label(d_sae: int) -> str:
    """16384 -> "16k", 65536 -> "65k", 262144 -> "262k", 1048576 -> "1m": as Gemma Scope names
    its widths (thousands, rounded down; millions at powers of two past 2**20)."""
    if d_sae % (1 << 20) == 0:
        return f"{d_sae >> 20}m"
    return f"{d_sae // 1000}k" if d_sae % 1024 == 0 else str(d_sae)


def gemma_scope_id(hook_name: str, d_sae: int, l0: float) -> str:
    """Gemma Scope's id for an SAE within its release: ``layer_9/width_4k/average_l0_57``
    (the mean L0 rounded), as ``scope train`` names what it saves."""
    layer, _ = hook_site(hook_name)
    if layer is None:
        raise ScopeError(f"hook {hook_name} is not inside a block: give blocks.L.<hook>")
    return f"layer_{layer}/width_{width_label(d_sae)}/average_l0_{round(l0)}"


@dataclass(frozen=True, kw_only=True)
class SAEInfo:
    """Who an SAE is and where it attaches: everything a store records about it."""

    key: str
    """Short name for feature addresses, e.g. ``L12.res.16k`` (a store may add ``.l0_71``
    when it holds several SAEs of one layer, site and width; see ``sae_keys``)."""
    release: str | None
    sae_id: str | None
    source: str
    """Where the weights came from: a file path or ``hub:<repo>/<folder>``."""
    hook_name: str
    """The hook the SAE reads (a transcoder's input)."""
    layer: int | None
    site: str
    """``res``, ``mlp``, ``att``, ``tc`` (a transcoder) or the hook's own name."""
    d_in: int
    d_sae: int
    dtype: str
    """The dtype the weights run in now (the identity does not depend on it)."""
    neuronpedia_id: str | None
    model_name: str | None
    sha256: str
    """sha256 of the weights as stored (fp32 arrays of the file), taken once at load: the same
    SAE in bf16 on a GPU and in fp32 on a laptop has the same hash."""
    hook_out: str = ""
    """The hook the SAE writes: steering and splicing act here (a transcoder's output; for an
    SAE its one hook)."""
    architecture: str = "jumprelu"
    """sae-lens' architecture name."""
    codec: str = "fused-jumprelu"
    """How codes are computed (``scope.codec.Codec.name``)."""
    folded: bool = False
    """Decoder norms folded into the encoder at load (``fold_dec_norm``): codes as
    Neuronpedia shows them, and a different sha256."""


def weights_sha256(state: dict[str, torch.Tensor]) -> str:
    """sha256 of an SAE's tensors by name, each as fp32 bytes (a stable format since v1)."""
    h = hashlib.sha256()
    for name, t in sorted(state.items()):
        h.update(name.encode())
        h.update(t.detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def sae_sha256(sae: SAE) -> str:
    """The SAE's identity hash. ``load_sae`` takes it from the weights as loaded, before any
    dtype cast; an SAE built elsewhere is hashed from its weights the first time it is asked."""
    meta = sae.cfg.metadata
    sha = meta.get("scope_sha256")
    if not sha:
        sha = weights_sha256(sae.state_dict())
        meta["scope_sha256"] = sha
    return str(sha)


def sae_info(sae: SAE) -> SAEInfo:
    meta = sae.cfg.metadata
    codec = codec_of(sae)
    hook = codec.read_hook
    layer, site = hook_site(hook)
    if codec.transcoder:
        site = "tc"
    return SAEInfo(
        key=f"L{layer}.{site}.{width_label(sae.cfg.d_sae)}",
        release=meta.get("release"),
        sae_id=meta.get("sae_id"),
        source=meta.get("scope_source") or "",
        hook_name=hook,
        layer=layer,
        site=site,
        d_in=sae.cfg.d_in,
        d_sae=sae.cfg.d_sae,
        dtype=str(sae.W_enc.dtype).removeprefix("torch."),
        neuronpedia_id=meta.get("neuronpedia_id"),
        model_name=meta.get("model_name"),
        sha256=sae_sha256(sae),
        hook_out=codec.write_hook,
        architecture=codec.architecture,
        codec=codec.name,
        folded=bool(meta.get("scope_folded")),
    )


def _l0_variant(names: str) -> str | None:
    """The L0 variant an SAE's id or path names: Gemma Scope 2's ``l0_medium`` (with what
    follows it: ``l0_small_affine``, ``l0_medium_seed_1``), Gemma Scope's ``average_l0_71`` ->
    ``l0_71``; None if neither."""
    if m := re.search(r"_(l0_(?:small|medium|big)(?:_[A-Za-z0-9]+)*)(?![A-Za-z0-9_])", names):
        return m.group(1)
    m = re.search(r"average_l0_(\d+)", names)
    return f"l0_{m.group(1)}" if m else None


def sae_keys(infos: Sequence[SAEInfo]) -> list[str]:
    """The key of each SAE among SAEs recorded together: ``L12.res.16k``, or, when several share
    a layer, site and width, the L0 variant named by its id or path (``L12.res.16k.l0_71``,
    ``L9.res.16k.l0_medium``), else ``L12.res.16k.<hash prefix>``. Keys depend only on the
    SAEs, never on their order; the same weights twice are refused."""
    if len({(i.sha256, i.hook_name) for i in infos}) != len(infos):
        raise ScopeError("the same SAE is given twice: give each --sae once")
    base = [i.key for i in infos]
    out = []
    for info in infos:
        if base.count(info.key) == 1:
            out.append(info.key)
            continue
        variant = _l0_variant(f"{info.sae_id} {info.source}")
        out.append(f"{info.key}.{variant}" if variant else f"{info.key}.{info.sha256[:8]}")
    if len(set(out)) != len(out):  # two L0 variants with the same number: tell them by hash
        out = [
            f"{i.key}.{i.sha256[:8]}" if out.count(k) > 1 else k
            for i, k in zip(infos, out, strict=True)
        ]
    return out


def recorded_key(sae: SAE, recorded: Mapping[str, Mapping[str, Any]]) -> str | None:
    """The key a store gave this SAE (the same weights at the same hook), or None if it was not
    recorded. ``recorded`` is the store's key -> identity map."""
    sha, hook = sae_sha256(sae), sae.cfg.metadata.hook_name
    return next(
        (
            key
            for key, ident in recorded.items()
            if ident.get("sha256") == sha and ident.get("hook_name") == hook
        ),
        None,
    )


def sae_key(sae: SAE, recorded: Mapping[str, Mapping[str, Any]] | None = None) -> str:
    """The key to file results about ``sae`` under: the store's own key when the store recorded
    it (so sweeps join with ``features``), else its short key."""
    found = recorded_key(sae, recorded) if recorded else None
    return found or sae_info(sae).key


# ---------------------------------------------------------------- loading


__all__ = [
    "MLP_INPUT",
    "SITE_HOOKS",
    "SAEInfo",
    "gemma_scope_id",
    "hook_site",
    "recorded_key",
    "sae_info",
    "sae_key",
    "sae_keys",
    "sae_sha256",
    "weights_sha256",
    "width_label",
]
