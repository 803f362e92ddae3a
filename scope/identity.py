"""Who an SAE is: its hook and site, its short key, and the hash of its weights as stored.

The one place that names SAEs: recording, steering, sweeps, the store and the app all take
keys and identities from here. A key (``L12.res.16k``) addresses features (``L12.res.16k/1234``);
the sha256 ties a store's records to the weights, whatever dtype or device they run in.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING, Any

import torch

from scope.codec import codec_of
from scope.errors import ScopeError

if TYPE_CHECKING:
    from sae_lens import SAE, HookedSAETransformer

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

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> SAEInfo:
        """An identity as a store's manifest holds it. Stores written before transcoders and
        codecs read as what they were: JumpReLU SAEs writing the hook they read."""
        names = {f.name for f in fields(cls)}
        known = {k: v for k, v in data.items() if k in names}
        known["hook_out"] = known.get("hook_out") or known.get("hook_name", "")
        return cls(**known)


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


def recorded_key(sae: SAE, recorded: Mapping[str, SAEInfo]) -> str | None:
    """The key a store gave this SAE (the same weights at the same hook), or None if it was not
    recorded. ``recorded`` is the store's key -> identity map."""
    sha, hook = sae_sha256(sae), sae.cfg.metadata.hook_name
    return next(
        (key for key, ident in recorded.items() if ident.sha256 == sha and ident.hook_name == hook),
        None,
    )


def sae_key(sae: SAE, recorded: Mapping[str, SAEInfo] | None = None) -> str:
    """The key to file results about ``sae`` under: the store's own key when the store recorded
    it (so sweeps join with ``features``), else its short key."""
    found = recorded_key(sae, recorded) if recorded else None
    return found or sae_info(sae).key


# ---------------------------------------------------------------- the model

FINGERPRINT_SAMPLE = 1 << 14
"""Weights the fingerprint reads per weight matrix: all of a smaller one."""
FINGERPRINT_TILES = 16
"""Tiles (of up to 32 rows) those weights are read in from a larger one."""
FINGERPRINT_SCHEME = "w2-"
"""How fingerprints taken on the device begin; a store's older fingerprint (16 hex digits, no
prefix) is the host hash ``legacy_fingerprint`` computes."""

COMPUTED_WEIGHTS = frozenset({"embed.W_E"})
"""Matrices the loader computes in the dtype the model runs in (Gemma's embedding, scaled by
sqrt(d_model)), so their bf16 rounding depends on it: named and shaped in the fingerprint but
not sampled (the unembedding holds Gemma's tied embedding as stored). Vectors are not sampled
either: the norm weights are 1 + w, rounded the same way."""

_GOLDEN = 0x9E3779B97F4A7C15 - (1 << 64)
_MIX1 = 0xBF58476D1CE4E5B9 - (1 << 64)
_MIX2 = 0x94D049BB133111EB - (1 << 64)


def splitmix64(x: torch.Tensor) -> torch.Tensor:
    """splitmix64 of int64 ``x``: a pseudo-random int64 per value (wrapping arithmetic, the
    same bits on every device)."""
    x = x + _GOLDEN
    x = (x ^ (x >> 30)) * _MIX1
    x = (x ^ (x >> 27)) * _MIX2
    return x ^ (x >> 31)


def _weight_sample(p: torch.Tensor) -> torch.Tensor:
    """The weights of ``p`` the fingerprint reads, as int16 bit patterns of their bf16
    rounding: all of a small parameter; of a larger one (seen as a matrix of its last dimension's
    rows), FINGERPRINT_TILES tiles of up to 32 rows spread over it. A tile is read as short
    runs of memory in a matrix stored either way round, so the sample is cheap on a CPU too,
    and it is taken by logical position, so the memory layout does not change it."""
    if p.numel() <= FINGERPRINT_SAMPLE:
        return p.reshape(-1).to(torch.bfloat16).view(torch.int16)
    m = p.reshape(-1, p.shape[-1]) if p.dim() > 1 else p.view(1, -1)
    (n_rows, n_cols), n = m.shape, FINGERPRINT_TILES
    high = min(n_rows, 32)
    wide = min(n_cols, FINGERPRINT_SAMPLE // (n * high))
    k = torch.arange(n, device=p.device)
    rows = (k * (n_rows - high) // (n - 1))[:, None] + torch.arange(high, device=p.device)
    cols = (k * 5 % n * (n_cols - wide) // (n - 1))[:, None] + torch.arange(wide, device=p.device)
    tiles = m[rows[:, :, None], cols[:, None, :]]  # [tile, row, col]
    return tiles.reshape(-1).to(torch.bfloat16).view(torch.int16)


def model_fingerprint(model: HookedSAETransformer) -> str:
    """A fingerprint of the model's weights, taken on their device: every parameter's name and
    shape, and a sample of every weight matrix as loaded (``_weight_sample``, bf16-rounded, so
    the dtype the model runs in does not change it; see ``COMPUTED_WEIGHTS``) folded into one sum mod 2^64, each weight times a
    pseudo-random int64 of its position. Nothing is copied to the host but that sum (one
    sync). Weights that differ at any sampled position give another value."""
    h = hashlib.sha256()
    samples = []
    with torch.no_grad():
        for name, p in sorted(model.named_parameters(), key=lambda item: item[0]):
            h.update(f"{name}{tuple(p.shape)};".encode())
            if p.dim() > 1 and name not in COMPUTED_WEIGHTS:
                samples.append(_weight_sample(p.detach()))
        v = torch.cat(samples).to(torch.int64)
        total = (v * splitmix64(torch.arange(v.numel(), device=v.device))).sum()
    h.update(str(total.item()).encode())
    return FINGERPRINT_SCHEME + h.hexdigest()[:16]


def legacy_fingerprint(model: HookedSAETransformer) -> str:
    """The fingerprint stores written before ``model_fingerprint`` hold: a host sha256 of
    three weight tensors rounded to bf16 (copies them to the host; asked only of such stores)."""
    h = hashlib.sha256()
    for t in (model.W_E[:256], model.blocks[0].attn.W_Q, model.blocks[-1].mlp.W_out):
        h.update(t.detach().to(torch.bfloat16).view(torch.int16).cpu().numpy().tobytes())
    return h.hexdigest()[:16]


@dataclass(kw_only=True)
class ModelIdentity:
    """The model a store was recorded with."""

    name: str
    """Hub name or local folder."""
    n_layers: int
    d_model: int
    d_vocab: int
    fingerprint: str
    """``model_fingerprint`` of its weights (``legacy_fingerprint`` in older stores)."""

    @classmethod
    def of(cls, model: HookedSAETransformer, like: ModelIdentity | None = None) -> ModelIdentity:
        """The identity of a loaded model; with ``like`` (a store's), its fingerprint is taken
        the way ``like``'s was, so the two compare (a store's older host fingerprint too)."""
        from scope.model import model_source

        cfg = model.cfg
        legacy = like is not None and not like.fingerprint.startswith(FINGERPRINT_SCHEME)
        return cls(
            name=model_source(model),
            n_layers=cfg.n_layers,
            d_model=cfg.d_model,
            d_vocab=cfg.d_vocab,
            fingerprint=legacy_fingerprint(model) if legacy else model_fingerprint(model),
        )


# ---------------------------------------------------------------- loading


__all__ = [
    "FINGERPRINT_SAMPLE",
    "FINGERPRINT_TILES",
    "MLP_INPUT",
    "SITE_HOOKS",
    "ModelIdentity",
    "SAEInfo",
    "gemma_scope_id",
    "hook_site",
    "legacy_fingerprint",
    "model_fingerprint",
    "recorded_key",
    "sae_info",
    "sae_key",
    "sae_keys",
    "sae_sha256",
    "splitmix64",
    "weights_sha256",
    "width_label",
]
