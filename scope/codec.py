"""How an SAE turns an activation into feature codes and back, chosen once per SAE at load.

Every activation the workbench computes goes through here. Two paths give codes equal to
sae-lens' own ``sae.encode``:

- ``fused``: Gemma Scope's JumpReLU written out (``pre = x @ W_enc + b_enc``, kept where
  ``pre > threshold``), in two passes instead of sae-lens' four. Taken only where it is equal to
  ``sae.encode`` bit for bit: a JumpReLU SAE or transcoder with no ``b_dec`` at the input and no
  run-time activation normalisation.
- ``sae-lens``: ``sae.encode`` / ``sae.decode`` themselves, for standard (ReLU), TopK, gated and
  JumpReLU SAEs with input processing (BatchTopK and Matryoshka SAEs are saved by sae-lens as
  JumpReLU), and plain and skip transcoders.

Architectures whose codes the workbench cannot record or steer exactly are refused at load:
``abstopk`` (codes can be negative), ``temporal`` (codes depend on earlier tokens),
``matching_pursuit`` (codes are found by an iterative search, not a linear read-out).

Transcoders read one hook and write another: ``Codec.read_hook`` is what recording, the
inspector and search see; ``Codec.write_hook`` is where steering, clamping, splicing and
attribution act. For an SAE both are its one hook.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from jaxtyping import Float

from scope.errors import ScopeError

if TYPE_CHECKING:
    from sae_lens import SAE

TRANSCODERS = ("transcoder", "skip_transcoder", "jumprelu_transcoder", "jumprelu_skip_transcoder")
SUPPORTED = ("jumprelu", "standard", "topk", "gated", *TRANSCODERS)
REFUSED = {
    "abstopk": "its codes can be negative, which feature statistics and steering do not model",
    "temporal": "its codes depend on earlier tokens, so a token's features are not its own",
    "matching_pursuit": "its codes come from an iterative search, not one read-out per token",
}
REFUSED_RELEASES = {
    "temporal": REFUSED["temporal"],
    "mntss_clt_layer_transcoder": "a cross-layer transcoder's layer with its decoders summed "
    "(sae-lens: for reading activations only), so steering and splicing it would not be exact",
}
"""sae-lens loaders (a release's ``conversion_func``) whose SAEs are refused, and why."""
_JUMPRELU = ("jumprelu", "jumprelu_transcoder", "jumprelu_skip_transcoder")
# run-time normalisations sae-lens' encode applies; "expected_average_only_in" is folded into
# the weights at load (sae-lens) and is the identity at run time
_OUT_SCALED = ("constant_norm_rescale", "layer_norm")
_NORMS = ("none", "expected_average_only_in", *_OUT_SCALED)


@dataclass(frozen=True, kw_only=True)
class Codec:
    """How one SAE encodes and decodes; part of its identity (``SAEInfo.codec``)."""

    architecture: str
    """sae-lens' architecture name, e.g. ``jumprelu``, ``topk``, ``jumprelu_skip_transcoder``."""
    fused: bool
    """True: the fused JumpReLU path (bitwise ``sae.encode``); False: sae-lens' own calls."""
    read_hook: str
    """The hook whose activation is encoded."""
    write_hook: str
    """The hook the decoder writes to: steering and splicing act here."""
    skip: bool
    """A skip transcoder: its output adds ``x @ W_skip.T`` of the input."""
    out_norm: str
    """sae-lens' run-time normalisation: decoding scales by the input's norm (or std)."""
    unit_rows: bool
    """TopK with ``rescale_acts_by_decoder_norm``: codes decode through unit-norm rows."""

    @property
    def name(self) -> str:
        """``fused-jumprelu`` or ``sae-lens:<architecture>``, as the store records it."""
        return "fused-jumprelu" if self.fused else f"sae-lens:{self.architecture}"

    @property
    def transcoder(self) -> bool:
        return self.architecture in TRANSCODERS


_CODECS: weakref.WeakKeyDictionary[torch.nn.Module, Codec] = weakref.WeakKeyDictionary()


def choose_codec(sae: SAE) -> Codec:
    """The codec for ``sae`` from its config, or a ScopeError naming the architecture."""
    cfg = sae.cfg
    arch = str(cfg.architecture())
    if arch in REFUSED:
        raise ScopeError(
            f"SAE architecture {arch!r} is not supported: {REFUSED[arch]}. Supported: "
            f"{', '.join(SUPPORTED)} (BatchTopK and Matryoshka as sae-lens saves them, JumpReLU)"
        )
    if arch not in SUPPORTED:
        raise ScopeError(
            f"SAE architecture {arch!r} is unknown to the workbench: supported are "
            f"{', '.join(SUPPORTED)}"
        )
    norm = str(cfg.normalize_activations)
    if norm not in _NORMS:
        raise ScopeError(
            f"SAE normalize_activations {norm!r} is not supported at inference: fold it into the "
            f"weights (sae-lens' fold_activation_norm_scaling_factor / fold_activation_whitening) "
            f"or use one of {', '.join(_NORMS)}"
        )
    read = str(cfg.metadata.hook_name or "")
    write = str(getattr(cfg.metadata, "hook_name_out", None) or read)
    if arch in TRANSCODERS and write == read:
        raise ScopeError(
            f"transcoder at {read} names no output hook (metadata.hook_name_out): set it to "
            "the hook it writes, e.g. blocks.L.hook_mlp_out"
        )
    apply_b_dec = bool(cfg.apply_b_dec_to_input)
    out_norm = norm if norm in _OUT_SCALED and arch not in TRANSCODERS else "none"
    return Codec(
        architecture=arch,
        fused=arch in _JUMPRELU
        and not apply_b_dec
        and norm in ("none", "expected_average_only_in"),
        read_hook=read,
        write_hook=write,
        skip=hasattr(sae, "W_skip"),
        out_norm=out_norm,
        unit_rows=bool(getattr(cfg, "rescale_acts_by_decoder_norm", False)),
    )


def codec_of(sae: SAE) -> Codec:
    """The codec chosen for ``sae`` (at load by ``load_sae``; else the first time asked)."""
    codec = _CODECS.get(sae)
    if codec is None:
        codec = _CODECS[sae] = choose_codec(sae)
        if not codec.fused and getattr(sae, "hook_z_reshaping_mode", False):
            # the workbench hands every SAE hook_z with its heads flattened (``site_input``)
            sae.turn_off_forward_pass_hook_z_reshaping()
    return codec


def prepare(sae: SAE, dtype: torch.dtype) -> Codec:
    """Choose ``sae``'s codec and put its weights in ``dtype``, JumpReLU thresholds in fp32
    (bf16 would round them and move features across them); no gradients."""
    codec = codec_of(sae)
    for name, param in sae.named_parameters():
        param.requires_grad_(False)
        param.data = param.data.to(torch.float32 if name == "threshold" else dtype)
    sae.dtype = dtype
    sae.cfg.dtype = str(dtype).removeprefix("torch.")
    return codec


def encode(sae: SAE, x: Float[torch.Tensor, "... d_in"]) -> Float[torch.Tensor, "... d_sae"]:
    """Feature codes of ``x`` (the read hook's activation, hook_z heads flattened), equal to
    ``sae.encode(x)``: bitwise on the fused path."""
    if codec_of(sae).fused:
        # relu(pre) where pre > threshold; the threshold clamped at 0 folds the relu in
        pre = x.to(sae.W_enc.dtype) @ sae.W_enc + sae.b_enc
        return pre.masked_fill_(pre <= sae.threshold.clamp(min=0), 0)
    return sae.encode(x)


def reconstruct(
    sae: SAE, x: Float[torch.Tensor, "... d_in"]
) -> tuple[Float[torch.Tensor, "... d_sae"], Float[torch.Tensor, "... d_out"]]:
    """(codes, output) for input ``x``: what the SAE puts at its write hook, as sae-lens'
    forward computes it (a skip transcoder's skip term included)."""
    codes = encode(sae, x)
    return codes, decode(sae, codes, x)


def decode(
    sae: SAE, codes: Float[torch.Tensor, "... d_sae"], x: Float[torch.Tensor, "... d_in"]
) -> Float[torch.Tensor, "... d_out"]:
    """What the SAE puts at its write hook for ``codes`` read from ``x`` (a skip transcoder's
    skip term included); ``encode(sae, x)`` must have run on ``x`` first (sae-lens' run-time
    normalisation state). Attribution passes codes it holds apart from ``x``."""
    codec = codec_of(sae)
    if codec.fused:
        out = codes @ sae.W_dec + sae.b_dec
    else:
        out = sae.decode(codes)  # after encode: sae-lens' run-time normalisation state is set
    if codec.skip:
        out = out + x.to(sae.W_skip.dtype) @ sae.W_skip.T
    return out


def feature_write(
    sae: SAE, feature: int, x: Float[torch.Tensor, "... d_in"] | None = None
) -> Float[torch.Tensor, "... d_out"]:
    """What one unit of ``feature``'s code adds at the write hook: its decoder row (unit norm
    for TopK SAEs that rescale by decoder norm), times the input's norm (or std) for SAEs with
    run-time normalisation, which then needs the read hook's ``x``. Decoding is linear in the
    codes, so setting a code from a to b adds exactly (b - a) x this."""
    codec = codec_of(sae)
    row = sae.W_dec[feature]
    if codec.unit_rows:
        row = row * (1 / sae.W_dec[feature].norm())
    if codec.out_norm == "none":
        return row
    if x is None:
        raise ScopeError(
            f"{codec.architecture} SAE with {codec.out_norm} normalisation: its write depends on "
            "the activation it reads; pass it"
        )
    xs = x.to(row.dtype)
    if codec.out_norm == "constant_norm_rescale":
        scale = xs.norm(dim=-1, keepdim=True) / sae.cfg.d_in**0.5
    else:  # layer_norm: decode multiplies by the input's std (sae-lens' run_time_activation_ln)
        scale = (xs - xs.mean(dim=-1, keepdim=True)).std(dim=-1, keepdim=True)
    return scale * row


def needs_input(sae: SAE) -> bool:
    """True when ``feature_write`` depends on the activation read (run-time normalisation)."""
    return codec_of(sae).out_norm != "none"


__all__ = [
    "REFUSED",
    "REFUSED_RELEASES",
    "SUPPORTED",
    "TRANSCODERS",
    "Codec",
    "choose_codec",
    "codec_of",
    "decode",
    "encode",
    "feature_write",
    "needs_input",
    "prepare",
    "reconstruct",
]
