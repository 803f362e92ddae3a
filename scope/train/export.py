"""Trained SAEs saved as Gemma Scope releases: ``<out>/layer_L/width_W/average_l0_N/`` with
params.npz (the raw-activation convention), cfg.json (the hook) and card.json (how it was
made and how well it does), plus one line per SAE in the library's README.md.

Transcoders go in the same layout as sae-lens saves one (``SAE.load_from_disk`` reads it back
as its ``JumpReLUTranscoder`` or ``JumpReLUSkipTranscoder``): sae_weights.safetensors
(``W_enc``, ``W_dec`` [d_sae, d_out], ``b_enc``, ``b_dec``, ``threshold``, and ``W_skip``
[d_out, d_in] with a skip connection) and a cfg.json naming the hook read (``hook_name``) and
the hook written (``hook_name_out``), beside the same card.json.

Raw-activation convention, as Gemma Scope released its SAEs: ``pre = x @ W_enc + b_enc``,
``acts = relu(pre) * (pre > threshold)``, ``x_hat = acts @ W_dec + b_dec``, with no input
normalisation and no b_dec subtracted at the input. Training's normalisation is folded in by
``loop.finish``; a b_dec applied at the input (sae-lens' ``apply_b_dec_to_input``) is folded
into b_enc here: ``(x - b_dec) @ W_enc + b_enc = x @ W_enc + (b_enc - b_dec @ W_enc)``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from scope.errors import ScopeError
from scope.params import GEMMA_SCOPE_KEYS

if TYPE_CHECKING:
    from sae_lens import SAE

HALF_TOLERANCE = 1e-3
"""An array is stored in float16 only if that moves no value by more than this fraction of
the array's largest magnitude (and nothing overflows)."""
ALWAYS_FP32 = ("b_enc", "threshold")
"""Kept in float32 whatever the dtype asked: which features fire depends on them exactly."""


@torch.no_grad()
def raw_params(sae: SAE) -> dict[str, np.ndarray]:
    """The five Gemma Scope arrays (float32) of a trained sae-lens JumpReLU SAE (and a skip
    transcoder's ``W_skip``), in the raw-activation convention. Refuses an SAE whose
    normalisation is not folded yet."""
    if sae.cfg.normalize_activations != "none":
        raise ScopeError(
            f"the SAE still normalises its input ({sae.cfg.normalize_activations}): fold it "
            "first (scope.train.loop.finish does)"
        )
    w_enc = sae.W_enc.detach().float()
    b_enc = sae.b_enc.detach().float()
    b_dec = sae.b_dec.detach().float()
    if sae.cfg.apply_b_dec_to_input:
        b_enc = b_enc - b_dec @ w_enc
    arrays = {
        "W_enc": w_enc,
        "W_dec": sae.W_dec.detach().float(),
        "b_enc": b_enc,
        "b_dec": b_dec,
        "threshold": sae.threshold.detach().float(),
    }
    if isinstance(getattr(sae, "W_skip", None), torch.Tensor):
        arrays["W_skip"] = sae.W_skip.detach().float()
    return {k: np.ascontiguousarray(v.cpu().numpy()) for k, v in arrays.items()}


def storage_dtypes(arrays: dict[str, np.ndarray], dtype: str) -> dict[str, str]:
    """Per array, the dtype it is stored in: float32, or with ``dtype="float16"`` float16
    wherever that keeps it within ``HALF_TOLERANCE`` (an encoder reading Gemma 3's huge
    residual stream has entries below float16's normal range and stays float32)."""
    if dtype not in ("float32", "float16"):
        raise ScopeError(f"--save-dtype {dtype!r} is not float32 or float16")
    out = {}
    for key, arr in arrays.items():
        keep = "float32"
        if dtype == "float16" and key not in ALWAYS_FP32:
            with np.errstate(over="ignore"):  # an overflow is what the check below looks for
                half = arr.astype(np.float16)
            scale = float(np.abs(arr).max())
            ok = bool(np.isfinite(half).all())
            if ok and scale > 0:
                ok = float(np.abs(half.astype(np.float32) - arr).max()) <= HALF_TOLERANCE * scale
            keep = "float16" if ok else "float32"
        out[key] = keep
    return out


def write_sae(
    folder: Path, arrays: dict[str, np.ndarray], dtypes: dict[str, str], cfg: dict[str, Any]
) -> None:
    """params.npz and cfg.json into ``folder`` (each written to a temporary name first)."""
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / "params.tmp.npz"
    stored: dict[str, Any] = {k: arrays[k].astype(dtypes[k]) for k in GEMMA_SCOPE_KEYS}
    np.savez(tmp, **stored)
    os.replace(tmp, folder / "params.npz")
    write_json(folder / "cfg.json", cfg)


def write_transcoder(
    folder: Path, arrays: dict[str, np.ndarray], dtypes: dict[str, str], cfg: dict[str, Any]
) -> None:
    """sae_weights.safetensors and cfg.json into ``folder``, as sae-lens' ``save_model`` writes
    a transcoder (each written to a temporary name first)."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / "sae_weights.tmp.safetensors"
    save_file({k: torch.from_numpy(v.astype(dtypes[k])) for k, v in arrays.items()}, str(tmp))
    os.replace(tmp, folder / "sae_weights.safetensors")
    write_json(folder / "cfg.json", cfg)


def write_json(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(tmp, path)


def sae_cfg(hook: str, d_in: int, d_sae: int, model_name: str, ctx: int) -> dict[str, Any]:
    """cfg.json beside params.npz: what ``scope.sae`` reads (the hook), in sae-lens' keys."""
    return {
        "architecture": "jumprelu",
        "d_in": d_in,
        "d_sae": d_sae,
        "hook_name": hook,
        "apply_b_dec_to_input": False,
        "normalize_activations": "none",
        "metadata": {"hook_name": hook, "model_name": model_name, "context_size": ctx},
    }


def transcoder_cfg(
    hook: str,
    hook_out: str,
    d_in: int,
    d_sae: int,
    d_out: int,
    skip: bool,
    model_name: str,
    ctx: int,
) -> dict[str, Any]:
    """cfg.json of a transcoder: sae-lens' own config of a JumpReLU (skip) transcoder reading
    ``hook`` and writing ``hook_out`` in the raw-activation convention, as its ``save_model``
    writes it."""
    from sae_lens.registry import get_sae_class
    from sae_lens.saes.sae import SAEMetadata

    _, cfg_cls = get_sae_class("jumprelu_skip_transcoder" if skip else "jumprelu_transcoder")
    meta = SAEMetadata(hook_name=hook, hook_name_out=hook_out, model_name=model_name,
                       context_size=ctx)  # fmt: skip
    cfg = cfg_cls(d_in=d_in, d_sae=d_sae, d_out=d_out, dtype="float32", device="cpu",
                  apply_b_dec_to_input=False, normalize_activations="none", metadata=meta)  # fmt: skip
    return dict(cfg.to_dict())


def card_line(release: str, sae_id: str, card: dict[str, Any]) -> str:
    """One Markdown table row of the SAE library's README (a transcoder's hook: in -> out)."""
    ev = card["eval"]
    minutes = card["time"]["total_seconds"] / 60
    hook = (
        f"`{card['hook']}` -> `{card['hook_out']}`" if "hook_out" in card else f"`{card['hook']}`"
    )
    return (
        f"| `{release}/{sae_id}` | {card['model']} | {hook} | {card['d_sae']} "
        f"| {ev['l0']:.1f} | {ev['fvu']:.3f} | {ev['delta_loss']:.3f} "
        f"| {card['training']['tokens_seen']:,} | {minutes:.0f} min, {card['time']['machine']} |"
    )


README_HEADER = (
    "\n## SAEs trained here\n\n"
    "Trained with `scope train`; L0, FVU and delta loss (next-token cross-entropy with the SAE "
    "spliced in, minus without) measured on held-out text, as each SAE's card.json records; a "
    "transcoder's (hooks `in -> out`) FVU is of the hook it writes.\n\n"
    "| SAE | model | hook | width | L0 | FVU | delta loss | tokens seen | time |\n"
    "|---|---|---|---|---|---|---|---|---|\n"
)


def append_readme(readme: Path, line: str, key: str) -> None:
    """Add ``line`` to the README's table of trained SAEs (replacing the row of the same SAE
    ``key``, so retraining does not duplicate it); the table is made on first use."""
    text = readme.read_text() if readme.is_file() else "# SAE library\n"
    if "## SAEs trained here" not in text:
        text = text.rstrip("\n") + "\n" + README_HEADER
    lines = [ln for ln in text.splitlines() if not ln.startswith(f"| `{key}` |")]
    text = "\n".join(lines).rstrip("\n") + "\n" + line + "\n"
    tmp = readme.with_suffix(".tmp")
    tmp.write_text(text)
    os.replace(tmp, readme)


__all__ = [
    "append_readme",
    "card_line",
    "raw_params",
    "sae_cfg",
    "storage_dtypes",
    "transcoder_cfg",
    "write_sae",
    "write_transcoder",
]
