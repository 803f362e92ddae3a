"""Models load with transformer-lens and match Hugging Face transformers exactly."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from conftest import PROMPT

from scope import ScopeError, load_model, model_info
from scope import testing as fixtures
from scope.model import resolve_device, resolve_dtype, resolve_source, tl_config_dict


def hf_resid_posts(hf, tokens: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """HF logits and each decoder layer's output (the residual stream after the layer)."""
    outs: list[torch.Tensor] = []
    handles = [
        layer.register_forward_hook(
            lambda _m, _i, o: outs.append(o[0] if isinstance(o, tuple) else o)
        )
        for layer in hf.model.layers
    ]
    try:
        with torch.no_grad():
            logits = hf(tokens).logits
    finally:
        for h in handles:
            h.remove()
    return logits, outs


def test_tiny_logits_and_resid_match_hf(tiny_model, tiny_hf):
    tokens = tiny_model.to_tokens(PROMPT)
    assert tokens.shape[1] > 2 * tiny_model.cfg.window_size  # local attention is exercised
    hf_logits, hf_resid = hf_resid_posts(tiny_hf, tokens)
    with torch.no_grad():
        logits, cache = tiny_model.run_with_cache(tokens)
    assert hf_logits.abs().max() > 2.0  # the 3.0 soft cap bites
    assert (logits - hf_logits).abs().max().item() < 1e-4
    for layer, hf_layer in enumerate(hf_resid):
        ours = cache[f"blocks.{layer}.hook_resid_post"]
        assert (ours - hf_layer).abs().max().item() < 1e-4, layer


def test_tiny_model_has_local_and_global_gqa_softcap(tiny_model):
    cfg = tiny_model.cfg
    assert cfg.attn_types == ["local", "global", "local", "global"]
    assert cfg.n_key_value_heads == 2 and cfg.n_heads == 4
    assert cfg.attn_scores_soft_cap == 5.0 and cfg.output_logits_soft_cap == 3.0
    assert cfg.attn_scale == pytest.approx(24**0.5)


@pytest.mark.parametrize(
    "field,value",
    [
        ("attn_scale", 4.0),
        ("window_size", 10_000),
        ("attn_scores_soft_cap", -1.0),
        ("output_logits_soft_cap", -1.0),
        ("n_layers_attn_types", None),
    ],
)
def test_parity_check_catches_each_config_field(tiny_dir, tiny_hf, field, value):
    """The parity test above fails when any Gemma 2 detail is dropped from the config."""
    from sae_lens import HookedSAETransformer
    from transformer_lens import HookedTransformerConfig
    from transformer_lens.pretrained.weight_conversions.gemma import convert_gemma_weights
    from transformers import AutoConfig

    cfg = tl_config_dict(AutoConfig.from_pretrained(tiny_dir), "google/gemma-2-2b")
    if field == "n_layers_attn_types":
        cfg["attn_types"] = ["global"] * cfg["n_layers"]
    else:
        cfg[field] = value
    cfg.update(device="cpu", dtype=torch.float32)
    tl_cfg = HookedTransformerConfig.from_dict(cfg)
    model = HookedSAETransformer(tl_cfg)
    model.load_and_process_state_dict(
        convert_gemma_weights(tiny_hf, tl_cfg),
        fold_ln=False,
        center_writing_weights=False,
        center_unembed=False,
        fold_value_biases=False,
    )
    tokens = torch.tensor([[2] + list(range(10, 40))])
    with torch.no_grad():
        diff = (model(tokens) - tiny_hf(tokens).logits).abs().max().item()
    assert diff > 1e-3


def test_bos_prepended_once(tiny_model):
    tokens = tiny_model.to_tokens("hello world")
    assert tokens[0, 0].item() == tiny_model.tokenizer.bos_token_id
    assert (tokens[0] == tiny_model.tokenizer.bos_token_id).sum().item() == 1


def test_model_info(tiny_model, tiny_dir):
    info = model_info(tiny_model)
    assert info.n_layers == 4 and info.d_model == 64 and info.dtype == "float32"
    assert info.device == "cpu" and info.name == str(tiny_dir.resolve())
    assert info.n_params == sum(p.numel() for p in tiny_model.parameters())
    assert info.architecture == "Gemma2ForCausalLM"


def test_hf_copy_freed(tiny_dir):
    import gc
    import weakref

    from transformers import Gemma2ForCausalLM

    made: list[weakref.ref] = []
    original = Gemma2ForCausalLM.__init__

    def spy(self, *args, **kwargs):
        original(self, *args, **kwargs)
        made.append(weakref.ref(self))

    Gemma2ForCausalLM.__init__ = spy
    try:
        model = load_model(tiny_dir, device="cpu")
    finally:
        Gemma2ForCausalLM.__init__ = original
    gc.collect()
    assert made and all(ref() is None for ref in made)
    assert model.cfg.n_layers == 4


def test_device_and_dtype_defaults():
    assert resolve_dtype(None, torch.device("cpu")) == torch.float32
    assert resolve_dtype(None, torch.device("cuda")) == torch.bfloat16
    assert resolve_dtype("bf16", torch.device("cpu")) == torch.bfloat16
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    if not torch.cuda.is_available() and torch.backends.mps.is_available():
        expected = "mps"
    assert resolve_device(None).type == expected
    with pytest.raises(ScopeError, match="dtype 'float8'"):
        resolve_dtype("float8", torch.device("cpu"))


def test_name_resolution(tmp_path):
    assert resolve_source("gemma-2-2b") == "google/gemma-2-2b"
    assert resolve_source("google/gemma-2-9b-it") == "google/gemma-2-9b-it"
    with pytest.raises(ScopeError, match="not a Gemma model"):
        resolve_source("gpt2")
    with pytest.raises(ScopeError, match="does not exist"):
        resolve_source(str(tmp_path / "nope"))
    with pytest.raises(ScopeError, match="no config.json"):
        resolve_source(str(tmp_path))


def test_non_gemma_folder_refused(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    with pytest.raises(ScopeError, match="'gpt2' model"):
        load_model(tmp_path, device="cpu")


def run_offline(code: str, hf_home: Path, **env: str) -> subprocess.CompletedProcess:
    full_env = {**os.environ, "HF_HOME": str(hf_home), "HF_HUB_OFFLINE": "1", **env}
    full_env.pop("HF_TOKEN", None)
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        env=full_env,
        capture_output=True,
        text=True,
        timeout=600,
    )


def test_unreachable_hub_says_how_to_fix(tmp_path):
    result = run_offline(
        """
        from scope import load_model, ScopeError
        try:
            load_model("google/gemma-2-2b", device="cpu")
        except ScopeError as err:
            print("ERR", err)
    """,
        tmp_path / "hf",
    )
    assert "ERR could not load google/gemma-2-2b" in result.stdout, result.stderr[-2000:]
    assert "HF_TOKEN" in result.stdout and "--model DIR" in result.stdout


def test_no_network_fails_fast_and_quietly(tmp_path):
    """No HF_HUB_OFFLINE, and every request goes to a closed port on this machine (a proxy that
    is not there): one short probe, then the cache only, the clear error in seconds, no retries."""
    dead = "http://127.0.0.1:9"
    result = run_offline(
        """
        import time
        import transformers, transformer_lens, huggingface_hub  # imports are not the failure
        from scope import load_model, ScopeError
        start = time.perf_counter()
        try:
            load_model("google/gemma-2-2b", device="cpu")
        except ScopeError as err:
            print("ERR", err)
        print("SECONDS", time.perf_counter() - start)
    """,
        tmp_path / "hf",
        HF_HUB_OFFLINE="0", HTTPS_PROXY=dead, HTTP_PROXY=dead, ALL_PROXY=dead, NO_PROXY="",
    )  # fmt: skip
    assert "ERR could not load google/gemma-2-2b" in result.stdout, result.stderr[-2000:]
    seconds = float(result.stdout.split("SECONDS")[1])
    assert seconds < 10, seconds
    assert "retry" not in result.stderr.lower(), result.stderr[-2000:]


def test_gated_hub_says_how_to_get_access(monkeypatch):
    from transformers import AutoConfig

    def gated(*_args, **_kwargs):  # what transformers raises for a gated repo without access
        raise OSError(
            "You are trying to access a gated repo.\nMake sure to have access to it "
            "at https://huggingface.co/google/gemma-2-9b.\n403 Client Error."
        )

    monkeypatch.setattr(AutoConfig, "from_pretrained", gated)
    with pytest.raises(ScopeError, match=r"gated model.*accept its license.*HF_TOKEN"):
        load_model("google/gemma-2-9b", device="cpu")


@pytest.mark.slow
def test_gemma_2_2b_hub_path_parity(tmp_path_factory):
    """A 2-layer checkpoint with gemma-2-2b's exact dimensions, placed in the Hugging Face
    cache as google/gemma-2-2b, loads through load_model("google/gemma-2-2b") offline: the
    very path the real model takes. Logits and residuals match transformers."""
    src = fixtures.build_gemma2_2b_shape(tmp_path_factory.mktemp("g2b") / "ckpt")
    hf_home = tmp_path_factory.mktemp("hf")
    fixtures.seed_hf_cache(
        hf_home, "google/gemma-2-2b", {p.name: p for p in src.iterdir() if p.is_file()}
    )
    result = run_offline(
        """
        import json, torch
        from transformers import AutoModelForCausalLM
        from scope import load_model
        model = load_model("google/gemma-2-2b", device="cpu")
        tokens = model.to_tokens("Gemma Scope reads the residual stream of every layer.")
        with torch.no_grad():
            logits, cache = model.run_with_cache(tokens)
        resid = [cache[f"blocks.{i}.hook_resid_post"] for i in range(model.cfg.n_layers)]
        cfg = model.cfg
        shape = [cfg.d_model, cfg.n_heads, cfg.n_key_value_heads, cfg.d_head, cfg.d_mlp,
                 cfg.d_vocab, cfg.window_size, cfg.attn_scores_soft_cap, cfg.output_logits_soft_cap]
        del model, cache
        hf = AutoModelForCausalLM.from_pretrained("google/gemma-2-2b", dtype=torch.float32,
                                                  attn_implementation="eager")
        outs = []
        for layer in hf.model.layers:
            layer.register_forward_hook(lambda m, i, o: outs.append(o[0] if isinstance(o, tuple) else o))
        with torch.no_grad():
            hf_logits = hf(tokens).logits
        print(json.dumps({"logits": (logits - hf_logits).abs().max().item(),
                          "resid": max((a - b).abs().max().item() for a, b in zip(resid, outs)),
                          "shape": shape, "tokens": tokens.shape[1]}))
    """,
        hf_home,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    print("gemma-2-2b-shape parity:", report)
    assert report["shape"] == [2304, 8, 4, 256, 9216, 256000, 4096, 50.0, 30.0]
    assert report["logits"] < 1e-4 and report["resid"] < 1e-4
    shutil.rmtree(src)  # 2.8 GB: pytest keeps its temp folders of the last runs


def test_gemma3_folder_parity(tmp_path):
    """A Gemma 3 text checkpoint (qk-norm, 5:1 local/global, two rope bases) matches HF."""
    from transformers import AutoModelForCausalLM

    src = fixtures.build_gemma3(tmp_path / "tiny-gemma3")
    model = load_model(src, device="cpu")
    hf = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32, attn_implementation="eager")
    assert model.cfg.use_qk_norm and model.cfg.attn_types.count("global") == 1
    assert (model.cfg.rotary_base, model.cfg.rotary_base_local) == (1000.0, 10.0)
    tokens = model.to_tokens(PROMPT)
    hf_logits, hf_resid = hf_resid_posts(hf.eval(), tokens)
    with torch.no_grad():
        logits, cache = model.run_with_cache(tokens)
    assert (logits - hf_logits).abs().max().item() < 1e-4
    for layer, hf_layer in enumerate(hf_resid):
        assert (cache[f"blocks.{layer}.hook_resid_post"] - hf_layer).abs().max().item() < 1e-4


@pytest.mark.parametrize("factor", [8.0, None])
def test_gemma3_multimodal_folder_parity(tmp_path, factor):
    """Gemma 3 4B and up are Gemma3ForConditionalGeneration with linearly scaled global rope:
    the text tower loads, its scaling read from the checkpoint, and its logits match HF."""
    from transformers import AutoModelForCausalLM

    src = fixtures.build_gemma3(tmp_path / "mm", multimodal=True, rope_factor=factor)
    model = load_model(src, device="cpu")
    hf = AutoModelForCausalLM.from_pretrained(
        src, dtype=torch.float32, attn_implementation="eager"
    ).eval()
    assert type(hf).__name__ == "Gemma3ForConditionalGeneration"
    assert model.cfg.rotary_scaling_factor == (factor or 1.0)
    tokens = model.to_tokens(PROMPT)
    with torch.no_grad():
        diff = (model(tokens) - hf(input_ids=tokens).logits).abs().max().item()
    assert diff < 1e-4


def test_mlp_input_hook_equals_hf_pre_feedforward_norm(tiny_model, tiny_hf):
    """blocks.L.ln2.hook_out (added by load_model) is the MLP's input, as Gemma Scope's
    transcoders read it: Hugging Face's pre_feedforward_layernorm output."""
    seen = {}
    norm = tiny_hf.model.layers[1].pre_feedforward_layernorm
    handle = norm.register_forward_hook(lambda m, i, o: seen.setdefault("x", o.detach()))
    tokens = tiny_model.to_tokens("The MLP reads the norm's output.")
    with torch.no_grad():
        tiny_hf(tokens)
    handle.remove()
    _, cache = tiny_model.run_with_cache(tokens, names_filter="blocks.1.ln2.hook_out")
    torch.testing.assert_close(cache["blocks.1.ln2.hook_out"], seen["x"], rtol=1e-4, atol=1e-4)
