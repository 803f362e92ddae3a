"""Build test artifacts at test time: tiny Gemma 2 and 3 checkpoints with random weights and an
offline tokenizer, and SAE files in Gemma Scope's layouts (params.npz; Gemma Scope 2's
params.safetensors + config.json).

Used by the tests, the benchmarks and anyone trying the CLI without downloads:

    python -m scope.testing OUT_DIR    # a tiny model and an SAE for it
"""

from __future__ import annotations

import inspect
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

SPECIALS = ["<pad>", "<eos>", "<bos>", "<unk>", "<mask>", "<start_of_turn>", "<end_of_turn>"]
# Gemma's chat template (model card): user/model turns, BOS first.
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% set role = 'model' if message['role'] == 'assistant' else message['role'] %}"
    "{{ '<start_of_turn>' + role + '\n' + message['content'] | trim + '<end_of_turn>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}"
)


def training_text() -> list[str]:
    """English prose that ships with Python itself: stdlib docstrings."""
    import collections
    import json as json_mod
    import pathlib
    import statistics
    import textwrap

    text = []
    for module in (collections, json_mod, pathlib, statistics, textwrap, inspect):
        for _, obj in inspect.getmembers(module):
            doc = inspect.getdoc(obj)
            if doc:
                text.append(doc)
    return text


def build_tokenizer(out: Path, vocab_size: int = 512) -> int:
    """A byte-level BPE tokenizer with Gemma's special tokens and chat template, saved so that
    ``AutoTokenizer.from_pretrained(out)`` works offline and prepends <bos>. Returns its size."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(training_text(), trainer)
    tok.post_processor = processors.TemplateProcessing(
        single="<bos> $A", pair="<bos> $A <bos> $B", special_tokens=[("<bos>", 2)]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<bos>",
        eos_token="<eos>",
        pad_token="<pad>",
        unk_token="<unk>",
        mask_token="<mask>",
        additional_special_tokens=["<start_of_turn>", "<end_of_turn>"],
        add_bos_token=True,
        chat_template=CHAT_TEMPLATE,
    )
    out.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(out)
    return tok.get_vocab_size()


def build_gemma2(
    out: Path,
    *,
    n_layers: int = 4,
    d_model: int = 64,
    n_heads: int = 4,
    n_kv_heads: int = 2,
    d_head: int = 16,
    d_mlp: int = 128,
    vocab_size: int | None = None,
    sliding_window: int = 6,
    query_pre_attn_scalar: int = 24,
    attn_softcap: float = 5.0,
    final_softcap: float = 3.0,
    init_std: float = 0.15,
    seed: int = 0,
) -> Path:
    """A Gemma 2 checkpoint with random weights, saved as Hugging Face would save it.

    Defaults make every Gemma 2 detail matter to the logits: grouped-query attention, a
    sliding window shorter than test prompts, soft caps that bite, a query scale unlike
    sqrt(d_head), and non-trivial norm weights.
    """
    from transformers import Gemma2Config, Gemma2ForCausalLM

    n_tokens = build_tokenizer(out)
    config = Gemma2Config(
        vocab_size=vocab_size or n_tokens,
        hidden_size=d_model,
        intermediate_size=d_mlp,
        num_hidden_layers=n_layers,
        num_attention_heads=n_heads,
        num_key_value_heads=n_kv_heads,
        head_dim=d_head,
        max_position_embeddings=256,
        sliding_window=sliding_window,
        query_pre_attn_scalar=query_pre_attn_scalar,
        attn_logit_softcapping=attn_softcap,
        final_logit_softcapping=final_softcap,
        initializer_range=init_std,
        pad_token_id=0,
        eos_token_id=1,
        bos_token_id=2,
    )
    config._attn_implementation = "eager"  # transformers refuses sdpa for Gemma 2
    config.architectures = ["Gemma2ForCausalLM"]
    torch.manual_seed(seed)
    return save_random(Gemma2ForCausalLM(config), out)


def build_gemma3(
    out: Path,
    *,
    n_layers: int = 6,
    seed: int = 0,
    multimodal: bool = False,
    rope_factor: float | None = None,
    d_model: int = 64,
    d_mlp: int = 128,
    d_head: int = 16,
    vocab_size: int | None = None,
) -> Path:
    """A Gemma 3 checkpoint with random weights: qk-norm, five local layers to one global,
    separate local and global rope bases, one KV head, as gemma-3-270m has. ``multimodal``
    saves a Gemma3ForConditionalGeneration (as 4B and up are) with a tiny vision tower;
    ``rope_factor`` stretches the global layers' rope linearly, as 4B and up do (8).
    ``d_model``, ``d_mlp``, ``d_head`` and ``vocab_size`` size it (gemma-3-270m: 640, 2048,
    256, 262144 with 18 layers)."""
    from transformers import (
        Gemma3Config,
        Gemma3ForCausalLM,
        Gemma3ForConditionalGeneration,
        Gemma3TextConfig,
        SiglipVisionConfig,
    )

    n_tokens = build_tokenizer(out)
    config = Gemma3TextConfig(
        vocab_size=vocab_size or n_tokens,
        hidden_size=d_model,
        intermediate_size=d_mlp,
        num_hidden_layers=n_layers,
        num_attention_heads=4,
        num_key_value_heads=1,
        head_dim=d_head,
        max_position_embeddings=256,
        sliding_window=6,
        query_pre_attn_scalar=24,
        initializer_range=0.15,
        rope_parameters={
            "sliding_attention": {"rope_type": "default", "rope_theta": 10.0},
            "full_attention": {"rope_type": "default", "rope_theta": 1000.0},
        },
        pad_token_id=0,
        eos_token_id=1,
        bos_token_id=2,
    )
    config._attn_implementation = "eager"
    if rope_factor is not None:
        assert config.rope_parameters is not None
        config.rope_parameters["full_attention"] = {
            "rope_type": "linear",
            "factor": rope_factor,
            "rope_theta": 1000.0,
        }
    torch.manual_seed(seed)
    if multimodal:
        vision = SiglipVisionConfig(
            hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
            image_size=28, patch_size=14,
        )  # fmt: skip
        mm = Gemma3Config(
            text_config=config, vision_config=vision, mm_tokens_per_image=4,
            image_token_index=5, boi_token_index=5, eoi_token_index=6,
        )  # fmt: skip
        mm.architectures = ["Gemma3ForConditionalGeneration"]
        model: Any = Gemma3ForConditionalGeneration(mm)
    else:
        config.architectures = ["Gemma3ForCausalLM"]
        model = Gemma3ForCausalLM(config)
    return save_random(model, out)


def save_random(model: Any, out: Path) -> Path:
    """Randomize the norm weights too (HF inits them to 0, i.e. scale 1, which would hide a
    missing +1 offset in a conversion), then save the checkpoint next to its tokenizer."""
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:
                param.normal_(0.0, 0.3)
    model.save_pretrained(out)
    return out


def build_gemma2_2b_shape(out: Path, n_layers: int = 2, seed: int = 0) -> Path:
    """gemma-2-2b's exact dimensions (d_model 2304, 8 heads, 4 KV heads, d_head 256, d_mlp
    9216, vocab 256000, window 4096, soft caps 50/30) with ``n_layers`` random layers."""
    return build_gemma2(
        out,
        n_layers=n_layers,
        d_model=2304,
        n_heads=8,
        n_kv_heads=4,
        d_head=256,
        d_mlp=9216,
        vocab_size=256000,
        sliding_window=4096,
        query_pre_attn_scalar=256,
        attn_softcap=50.0,
        final_softcap=30.0,
        init_std=0.02,
        seed=seed,
    )


def gemma_scope_params(
    acts: torch.Tensor, d_sae: int, *, firing_rate: float = 0.05, seed: int = 0
) -> dict[str, np.ndarray]:
    """Gemma Scope-layout arrays for an SAE over activations ``acts`` [n, d_in].

    Decoder rows are unit-norm random directions; the encoder is their transpose; each
    threshold is set at the feature's (1 - firing_rate) quantile of ``acts`` so features fire
    on real data but sparsely.
    """
    gen = torch.Generator().manual_seed(seed)
    d_in = acts.shape[-1]
    w_dec = torch.randn(d_sae, d_in, generator=gen)
    w_dec /= w_dec.norm(dim=-1, keepdim=True)
    w_enc = w_dec.T.contiguous() * 2.0
    b_enc = torch.randn(d_sae, generator=gen) * 0.1
    b_dec = torch.randn(d_in, generator=gen) * 0.01
    pre = acts.reshape(-1, d_in).float() @ w_enc + b_enc
    threshold = torch.quantile(pre, 1 - firing_rate, dim=0).clamp(min=1e-3)
    return {
        "W_enc": w_enc.numpy(),
        "W_dec": w_dec.numpy(),
        "b_enc": b_enc.numpy(),
        "b_dec": b_dec.numpy(),
        "threshold": threshold.numpy(),
    }


def write_params(folder: Path, params: dict[str, np.ndarray]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    np.savez(folder / "params.npz", allow_pickle=False, **params)
    return folder / "params.npz"


def write_gemma_scope_2(
    folder: Path,
    params: dict[str, np.ndarray],
    config: dict[str, Any] | None = None,
    skip: np.ndarray | None = None,
) -> Path:
    """Write ``params`` (Gemma Scope names, as ``gemma_scope_params`` gives them) in Gemma Scope
    2's layout: ``params.safetensors`` with w_enc, w_dec, b_enc, b_dec, threshold (and
    ``affine_skip_connection`` [d_in, d_out] when ``skip`` is given), plus ``config.json``."""
    from safetensors.numpy import save_file

    folder.mkdir(parents=True, exist_ok=True)
    tensors = {("w_" + k[2:] if k.startswith("W_") else k): v for k, v in params.items()}
    if skip is not None:
        tensors["affine_skip_connection"] = skip
    save_file({k: np.ascontiguousarray(v, np.float32) for k, v in tensors.items()},
              folder / "params.safetensors")  # fmt: skip
    if config is not None:
        (folder / "config.json").write_text(json.dumps(config, indent=2))
    return folder / "params.safetensors"


def seed_hf_cache(hf_home: Path, repo_id: str, files: dict[str, Path]) -> Path:
    """Place ``files`` (repo path -> local file) in a Hugging Face cache under ``hf_home`` as a
    download of ``repo_id`` would, so HF_HUB_OFFLINE=1 loads resolve to them."""
    repo = hf_home / "hub" / f"models--{repo_id.replace('/', '--')}"
    commit = "0" * 40
    snapshot = repo / "snapshots" / commit
    for rel, src in files.items():
        dest = snapshot / rel
        dest.parent.mkdir(parents=True, exist_ok=True)
        if not dest.exists():
            dest.symlink_to(Path(src).resolve())
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / "main").write_text(commit)
    return snapshot


@torch.no_grad()
def build_transcoders(
    model: Any,
    out: Path,
    *,
    d_sae: int = 128,
    text: str | None = None,
    read: str = "hook_mlp_in",
    skip: bool = True,
    firing_rate: float = 0.1,
    dec_scale: float = 1.0,
    seed: int = 0,
) -> list[Path]:
    """A random JumpReLU transcoder at every layer of ``model``, each reading
    ``blocks.L.<read>`` (``hook_mlp_in`` as Gemma Scope 2's, or ``ln2.hook_normalized``) and
    writing ``blocks.L.hook_mlp_out``, saved by sae-lens into ``out/L<layer>``; returns the
    folders. Thresholds make each feature fire on about ``firing_rate`` of the tokens of
    ``text``; decoder rows have norm about ``dec_scale`` times the MLP output's."""
    from sae_lens.registry import get_sae_class
    from sae_lens.saes.sae import SAEMetadata

    arch = "jumprelu_skip_transcoder" if skip else "jumprelu_transcoder"
    cls, cfg_cls = get_sae_class(arch)
    if read.endswith("hook_mlp_in") and not model.cfg.use_hook_mlp_in:
        model.set_use_hook_mlp_in(True)
    tokens = model.to_tokens(text or " ".join(training_text()[:6])[:1500])
    hooks = [f"blocks.{layer}.{h}" for layer in range(model.cfg.n_layers)
             for h in (read, "hook_mlp_out")]  # fmt: skip
    _, cache = model.run_with_cache(tokens, names_filter=lambda n: n in hooks)
    gen = torch.Generator().manual_seed(seed)
    folders = []
    for layer in range(model.cfg.n_layers):
        x = cache[f"blocks.{layer}.{read}"][0, 1:].float()
        y = cache[f"blocks.{layer}.hook_mlp_out"][0, 1:].float()
        d_in, d_out = x.shape[-1], y.shape[-1]
        meta = SAEMetadata(
            hook_name=f"blocks.{layer}.{read}",
            hook_name_out=f"blocks.{layer}.hook_mlp_out",
            model_name=str(model.cfg.model_name),
        )
        cfg = cfg_cls(d_in=d_in, d_sae=d_sae, d_out=d_out, dtype="float32", device="cpu",
                      apply_b_dec_to_input=False, metadata=meta)  # fmt: skip
        sae = cls(cfg)
        params = dict(sae.named_parameters())
        w_enc = torch.randn(d_in, d_sae, generator=gen) / x.norm(dim=-1).mean()
        params["W_enc"].copy_(w_enc)
        rows = torch.randn(d_sae, d_out, generator=gen) / d_out**0.5
        params["W_dec"].copy_(rows * y.norm(dim=-1).mean() * dec_scale / d_sae**0.5 * 4)
        params["b_dec"].copy_(y.mean(0))
        pre = x @ w_enc
        params["b_enc"].copy_(-pre.mean(0))
        pre = pre + params["b_enc"]
        params["threshold"].copy_(torch.quantile(pre, 1 - firing_rate, dim=0).clamp(min=1e-3))
        if "W_skip" in params:
            params["W_skip"].copy_(torch.randn(d_out, d_in, generator=gen) * 0.02)
        folder = Path(out) / f"L{layer}"
        sae.save_model(folder)
        folders.append(folder)
    return folders


@dataclass(frozen=True, kw_only=True)
class TinyWorkbench:
    """Paths to a tiny random-weight Gemma 2, SAEs for it and a corpus: everything the CLI,
    the notebooks and the examples need, offline."""

    model: str
    """A Hugging Face checkpoint folder (4 layers, d_model 64)."""
    saes: list[str]
    """SAE folders in Gemma Scope's layout: two L0 variants of a res SAE at layer 2 (1k wide)
    and a res SAE at layer 1."""
    corpus: str
    """A .jsonl of English prose (Python's own docstrings)."""


def tiny_workbench(out_dir: str | Path) -> TinyWorkbench:
    """Build (once; later calls reuse it) a tiny model, SAEs and a corpus under ``out_dir``."""
    from scope.model import load_model

    out = Path(out_dir).expanduser()
    model_dir = out / "tiny-gemma2"
    root = out / "saes" / "tiny-scope-res"
    saes = [root / "layer_2/width_1k/average_l0_50", root / "layer_2/width_1k/average_l0_10",
            root / "layer_1/width_1k/average_l0_50"]  # fmt: skip
    corpus = out / "corpus.jsonl"
    if not all((s / "params.npz").is_file() for s in saes) or not corpus.is_file():
        build_gemma2(model_dir)
        model = load_model(model_dir, device="cpu")
        text = " ".join(training_text()[:40])
        hooks = ["blocks.1.hook_resid_post", "blocks.2.hook_resid_post"]
        _, cache = model.run_with_cache(text[:4000], names_filter=lambda n: n in hooks)
        for folder, hook, rate, seed in zip(
            saes, [hooks[1], hooks[1], hooks[0]], (0.05, 0.01, 0.05), (0, 1, 2), strict=True
        ):
            write_params(
                folder, gemma_scope_params(cache[hook][0, 1:], 1024, firing_rate=rate, seed=seed)
            )
        docs = [d for d in training_text() if len(d) > 120]
        corpus.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    return TinyWorkbench(model=str(model_dir), saes=[str(s) for s in saes], corpus=str(corpus))


def main(out_dir: str) -> None:
    """Write a tiny model, SAEs for it and a corpus, for trying the CLI."""
    bench = tiny_workbench(out_dir)
    print(f"model:  {bench.model}")
    for sae in bench.saes:
        print(f"sae:    {sae}")
    print(f"corpus: {bench.corpus}")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "fixtures")
