"""Every SAE architecture sae-lens loads is served exactly or refused: codes equal sae-lens'
own ``encode``, recordings equal the brute-force reference, evals equal a brute-force splice,
clamping a feature to its own value changes nothing, and add moves the written hook by exactly
strength x the feature's direction. Transcoders read one hook and are steered at the other.

Each SAE is built with random weights fitted to the tiny Gemma 2 (encoder biases set so each
feature fires on about a tenth of tokens), saved with sae-lens' ``save_model`` and loaded back
through ``load_sae``'s sae-lens folder route, as a user's own SAE would be."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import PROMPT
from reference import reference

from scope import ScopeError, load_sae
from scope import testing as fixtures
from scope.acts import capture, counted_mask, sae_acts, site_input
from scope.codec import codec_of, feature_write, reconstruct
from scope.corpus import CorpusSpec, build_windows
from scope.evals import evaluate_batches
from scope.identity import sae_info
from scope.record import RecordSettings, record
from scope.steer import Steer, steering
from scope.store import Store

RES = "blocks.1.hook_resid_post"
MLP_IN, MLP_OUT = "blocks.1.hook_mlp_in", "blocks.1.hook_mlp_out"
LN2 = "blocks.1.ln2.hook_normalized"
D_SAE = 96
# name -> (architecture, read hook, extra config); the JumpReLU ones with input processing
# (b_dec subtracted, run-time normalisation) take sae-lens' path, the plain ones the fused one
KINDS: dict[str, tuple[str, str, dict]] = {
    "jumprelu": ("jumprelu", RES, {"apply_b_dec_to_input": False}),
    "jumprelu_b_dec": ("jumprelu", RES, {"apply_b_dec_to_input": True}),
    "jumprelu_norm": (
        "jumprelu",
        RES,
        {"apply_b_dec_to_input": True, "normalize_activations": "constant_norm_rescale"},
    ),
    "jumprelu_layer_norm": ("jumprelu", RES, {"normalize_activations": "layer_norm"}),
    "standard": ("standard", RES, {"apply_b_dec_to_input": True}),
    "topk": ("topk", RES, {"k": 8, "apply_b_dec_to_input": False}),
    "topk_rescaled": ("topk", RES, {"k": 8, "rescale_acts_by_decoder_norm": True}),
    "gated": ("gated", RES, {"apply_b_dec_to_input": True}),
    # trained as BatchTopK / Matryoshka BatchTopK, saved by sae-lens as JumpReLU for inference
    "batchtopk": ("batchtopk", RES, {"k": 8}),
    "matryoshka_batchtopk": ("matryoshka_batchtopk", RES, {"k": 8, "matryoshka_widths": [32, 96]}),
    "transcoder": ("transcoder", MLP_IN, {"apply_b_dec_to_input": False}),
    "skip_transcoder": ("skip_transcoder", MLP_IN, {"apply_b_dec_to_input": False}),
    "jumprelu_transcoder": ("jumprelu_transcoder", LN2, {"apply_b_dec_to_input": False}),
    "jumprelu_skip_transcoder": (
        "jumprelu_skip_transcoder",
        MLP_IN,
        {"apply_b_dec_to_input": False},
    ),
}
FUSED = {"jumprelu", "jumprelu_transcoder", "jumprelu_skip_transcoder"}


def _inputs(model, hook: str) -> torch.Tensor:
    tokens = model.to_tokens(fixtures.training_text()[5][:600])
    return site_input(capture(model, tokens, [hook], 2)[hook])[0, 1:]  # BOS left out


@torch.no_grad()
def build_sae(model, name: str, root: Path):
    """A random sae-lens SAE of kind ``name`` fitted to the tiny model, saved and loaded back."""
    from sae_lens.registry import get_sae_class
    from sae_lens.saes.sae import SAEMetadata

    arch, hook, extra = KINDS[name]
    if arch in TRAINED_AS:
        return build_trained(model, name, root)
    cls, cfg_cls = get_sae_class(arch)
    x = _inputs(model, hook)
    d_in = x.shape[-1]
    fields = {"d_in": d_in, "d_sae": D_SAE, "dtype": "float32", "device": "cpu", **extra}
    if "transcoder" in arch:
        fields["d_out"] = model.cfg.d_model
    meta = {"hook_name": hook, "model_name": "tiny-gemma2"}
    if "transcoder" in arch:
        meta["hook_name_out"] = MLP_OUT
    cfg = cfg_cls(**fields, metadata=SAEMetadata(**meta))
    sae = cls(cfg)
    gen = torch.Generator().manual_seed(len(name))
    params = dict(sae.named_parameters())
    d_out = params["W_dec"].shape[-1]
    params["W_enc"].copy_(torch.randn(d_in, D_SAE, generator=gen) / d_in**0.5)
    # decoder rows of unequal norm, so a unit-direction and a raw-row write differ
    rows = torch.randn(D_SAE, d_out, generator=gen) / d_out**0.5
    params["W_dec"].copy_(rows * torch.rand(D_SAE, 1, generator=gen).add(0.5))
    params["b_dec"].copy_(torch.randn(d_out, generator=gen) * 0.05)
    if "W_skip" in params:
        params["W_skip"].copy_(torch.randn(d_out, d_in, generator=gen) * 0.05)
    sae.eval()
    if arch == "gated":
        params["r_mag"].copy_(torch.randn(D_SAE, generator=gen) * 0.1)
        pre = sae.process_sae_in(x) @ sae.W_enc
        params["b_gate"].copy_(-torch.quantile(pre, 0.9, dim=0))
        params["b_mag"].copy_(torch.randn(D_SAE, generator=gen) * 0.1)
    else:
        sae_in = sae.process_sae_in(x)
        pre = sae_in @ sae.W_enc
        params["b_enc"].copy_(-torch.quantile(pre, 0.85, dim=0))
        if "threshold" in params:  # fire on about a tenth of tokens, above zero
            pre = pre + sae.b_enc
            params["threshold"].copy_(torch.quantile(pre, 0.9, dim=0).clamp(min=1e-3))
    folder = root / name
    sae.save_model(folder)
    return load_sae(folder, device="cpu")


TRAINED_AS = ("batchtopk", "matryoshka_batchtopk")


@torch.no_grad()
def build_trained(model, name: str, root: Path):
    """A BatchTopK (or Matryoshka BatchTopK) training SAE with random weights and a fitted
    top-k threshold, saved with sae-lens' save_inference_model (as JumpReLU) and loaded back."""
    from sae_lens.saes import (
        BatchTopKTrainingSAE,
        BatchTopKTrainingSAEConfig,
        MatryoshkaBatchTopKTrainingSAE,
        MatryoshkaBatchTopKTrainingSAEConfig,
    )
    from sae_lens.saes.sae import SAEMetadata

    arch, hook, extra = KINDS[name]
    cls, cfg_cls = {
        "batchtopk": (BatchTopKTrainingSAE, BatchTopKTrainingSAEConfig),
        "matryoshka_batchtopk": (MatryoshkaBatchTopKTrainingSAE, MatryoshkaBatchTopKTrainingSAEConfig),
    }[arch]  # fmt: skip
    x = _inputs(model, hook)
    sae = cls(cfg_cls(d_in=x.shape[-1], d_sae=D_SAE, metadata=SAEMetadata(hook_name=hook), **extra))
    gen = torch.Generator().manual_seed(len(name))
    params = dict(sae.named_parameters())
    params["W_enc"].copy_(torch.randn(x.shape[-1], D_SAE, generator=gen) / x.shape[-1] ** 0.5)
    rows = torch.randn(D_SAE, x.shape[-1], generator=gen) / x.shape[-1] ** 0.5
    params["W_dec"].copy_(rows * torch.rand(D_SAE, 1, generator=gen).add(0.5))
    params["b_dec"].copy_(torch.randn(x.shape[-1], generator=gen) * 0.05)
    pre = (x - sae.b_dec) @ sae.W_enc
    params["b_enc"].copy_(-torch.quantile(pre, 0.5, dim=0))
    scaled = (pre + sae.b_enc).relu() * sae.W_dec.norm(dim=-1)
    sae.topk_threshold.fill_(float(torch.quantile(scaled.flatten(), 0.9)))
    sae.save_inference_model(root / name)
    return load_sae(root / name, device="cpu")


@pytest.fixture(scope="module")
def kinds(tmp_path_factory, tiny_model):
    root = tmp_path_factory.mktemp("kinds")
    return {name: build_sae(tiny_model, name, root) for name in KINDS}


@pytest.fixture(scope="module")
def tokens(tiny_model):
    return tiny_model.to_tokens([PROMPT, PROMPT[::-1][:60]], padding_side="right")


def test_each_architecture_takes_the_codec_it_should(kinds):
    for name, sae in kinds.items():
        codec = codec_of(sae)
        assert codec.fused == (name in FUSED), name
        assert codec.read_hook == KINDS[name][1]
        info = sae_info(sae)
        saved_as = "jumprelu" if KINDS[name][0] in TRAINED_AS else KINDS[name][0]
        assert info.architecture == saved_as and info.codec == codec.name
        if "transcoder" in name:
            assert info.key == f"L1.tc.{D_SAE}" and info.hook_out == MLP_OUT
        else:
            assert info.key == f"L1.res.{D_SAE}" and info.hook_out == RES


def test_codes_equal_sae_lens_encode(kinds, tiny_model, tokens):
    lengths = (tokens != tiny_model.tokenizer.pad_token_id).sum(1)
    for name, sae in kinds.items():
        got = sae_acts(tiny_model, [sae], tokens, lengths)
        x = site_input(got.hooks[codec_of(sae).read_hook])
        want = sae.encode(x) * got.counted[..., None]
        fired = float((want > 0).float().mean())
        assert 0.02 < fired < 0.5, (name, fired)  # the fixture fires; the test has teeth
        if name in FUSED:
            assert torch.equal(got.codes[0], want), name
        else:
            torch.testing.assert_close(got.codes[0], want, rtol=1e-6, atol=1e-6)


def test_reconstruction_equals_sae_lens_forward(kinds, tiny_model, tokens):
    for name, sae in kinds.items():
        x = site_input(capture(tiny_model, tokens, [codec_of(sae).read_hook], 2)[KINDS[name][1]])
        _, out = reconstruct(sae, x)
        torch.testing.assert_close(out, sae(x), rtol=1e-6, atol=1e-6)


@pytest.fixture(scope="module")
def recorded(tmp_path_factory, tiny_model, kinds):
    corpus = tmp_path_factory.mktemp("arch-corpus")
    (corpus / "a.txt").write_text("\n\n".join(fixtures.training_text()[10:16]))
    spec = CorpusSpec(paths=(str(corpus),), ctx=24, max_tokens=600)
    root = tmp_path_factory.mktemp("arch-store") / "store"
    record(
        tiny_model, list(kinds.values()), spec, root,
        RecordSettings(ctx=24, k=4, samples=3, batch_size=4),
    )  # fmt: skip
    return root, spec


def test_recording_equals_brute_force_for_every_architecture(recorded, tiny_model, kinds):
    root, spec = recorded
    store = Store(root)
    windows = build_windows(spec, tiny_model.tokenizer)
    for name, sae in kinds.items():
        key = store.key_of(sae)
        assert store.saes[key].codec == codec_of(sae).name
        assert store.saes[key].hook_out == codec_of(sae).write_hook
        ref = reference(tiny_model, sae, windows, 4, 3)
        rows = store.sql(
            "select count, max, mean from features where sae = ? order by feature", [key]
        ).fetchall()
        count = np.array([r[0] for r in rows])
        np.testing.assert_array_equal(count, ref.count, err_msg=name)
        assert count.sum() > 0, name
        np.testing.assert_allclose([r[1] for r in rows], ref.act_max, rtol=1e-5, atol=1e-6)
        live = count > 0
        mean = np.array([r[2] or 0.0 for r in rows])
        np.testing.assert_allclose(mean[live], (ref.act_sum / np.maximum(ref.count, 1))[live],
                                   rtol=1e-5)  # fmt: skip
        top = store.sql(
            "select feature, rank, window_id from topk where sae = ? order by feature, rank",
            [key],
        ).fetchall()
        for f, rank, window in top:
            assert ref.top[f][rank][1] == window, (name, f, rank)


@torch.no_grad()
def _brute_force_ce(model, sae, tokens, lengths):
    """Mean next-token loss with the SAE's write hook replaced by sae-lens' forward of what
    it reads, at counted tokens: plain transformer-lens hooks, nothing of the workbench."""
    counted = counted_mask(model, tokens, lengths)
    read, write = KINDS_HOOKS(sae)
    seen: dict[str, torch.Tensor] = {}

    def grab(act, hook):
        seen["x"] = site_input(act).clone()

    def put(act, hook):
        recon = sae(seen["x"] if read != write else act)
        return torch.where(counted[..., None], recon.to(act.dtype), act)

    if read.endswith("hook_mlp_in"):
        model.set_use_hook_mlp_in(True)
    hooks = [(read, grab), (write, put)] if read != write else [(write, put)]
    logits = model.run_with_hooks(tokens, fwd_hooks=hooks)
    pred = counted[:, :-1] & counted[:, 1:]
    logp = torch.log_softmax(logits[:, :-1].float(), dim=-1)[pred]
    return float(-logp.gather(-1, tokens[:, 1:][pred][:, None]).double().mean())


def KINDS_HOOKS(sae):  # noqa: N802 - read as a table lookup
    codec = codec_of(sae)
    return codec.read_hook, codec.write_hook


def check_evals(model, name, sae, tokens):
    lengths = (tokens != model.tokenizer.pad_token_id).sum(1)
    (row,) = evaluate_batches(model, [sae], [(tokens, lengths)], keys=[name])
    want = _brute_force_ce(model, sae, tokens, lengths)
    assert row.ce_loss_with_sae == pytest.approx(want, rel=1e-5), name
    assert row.kl_div_with_sae > 1e-3, name  # the splice changes the model: teeth


def test_evals_equal_a_brute_force_splice(kinds, tiny_model, tokens):
    for name, sae in kinds.items():
        check_evals(tiny_model, name, sae, tokens)


def _write_hook_acts(model, sae, tokens, steers):
    """(clean, steered) activations at the SAE's read and write hooks."""
    read, write = KINDS_HOOKS(sae)
    names = sorted({read, write})
    clean = capture(model, tokens, names, 2)
    clean = {k: v.clone() for k, v in clean.items()}
    got: dict[str, torch.Tensor] = {}

    def grab(act, hook):
        got[hook.name] = act.clone()

    with steering(model, steers, prompt_len=tokens.shape[1]):
        from scope.steer import attach

        with attach(model, [(n, grab) for n in names]):
            model(tokens, stop_at_layer=2)
    return clean, got


@torch.no_grad()
def test_clamp_to_own_value_changes_nothing(kinds, tiny_model):
    tokens = tiny_model.to_tokens(" fox")[:, :2]  # BOS + one token: one position is steered
    for name, sae in kinds.items():
        read = codec_of(sae).read_hook
        x = site_input(capture(tiny_model, tokens, [read], 2)[read])
        codes = sae.encode(x[:, 1:])[0, 0]  # read as the steer reads it: the one position
        f = int(codes.argmax())
        assert codes[f] > 0, name
        steer = Steer(sae, f, strength=float(codes[f]), mode="clamp")
        clean = tiny_model(tokens)
        with steering(tiny_model, [steer], prompt_len=2):
            steered = tiny_model(tokens)
        assert torch.equal(clean, steered), name
        off = Steer(sae, f, strength=0.0, mode="ablate")
        with steering(tiny_model, [off], prompt_len=2):
            assert not torch.equal(clean, tiny_model(tokens)), name


def check_steering(tiny_model, name, sae):
    tokens = tiny_model.to_tokens(PROMPT)
    read, write = KINDS_HOOKS(sae)
    x = site_input(capture(tiny_model, tokens, [read], 2)[read])
    codes = sae.encode(x)[0]
    f = int((codes[1:] > 0).sum(0).argmax())
    clean, got = _write_hook_acts(tiny_model, sae, tokens, [Steer(sae, f, 2.5, mode="clamp")])
    delta = (got[write] - clean[write])[0, 1:]
    want = (2.5 - codes[1:, f : f + 1]) * feature_write(sae, f, x[0, 1:])
    torch.testing.assert_close(delta, want, rtol=1e-4, atol=1e-5)
    assert torch.equal(got[write][0, 0], clean[write][0, 0])  # never BOS
    if read != write:
        assert torch.equal(got[read], clean[read]), name  # the input is untouched
    clean, got = _write_hook_acts(tiny_model, sae, tokens, [Steer(sae, f, 3.0)])
    row = sae.W_dec[f]
    want = 3.0 * row / row.norm()
    torch.testing.assert_close((got[write] - clean[write])[0, 1:],
                               want.expand(tokens.shape[1] - 1, -1), rtol=1e-4, atol=1e-5)  # fmt: skip


def test_clamp_and_add_move_the_write_hook_exactly(kinds, tiny_model):
    for name, sae in kinds.items():
        check_steering(tiny_model, name, sae)


def test_unsupported_architecture_is_refused_at_load(tmp_path):
    from sae_lens.registry import get_sae_class
    from sae_lens.saes.sae import SAEMetadata

    cls, cfg_cls = get_sae_class("abstopk")
    cfg_cls(d_in=64, d_sae=32, k=4, metadata=SAEMetadata(hook_name=RES))
    sae = cls(cfg_cls(d_in=64, d_sae=32, k=4, metadata=SAEMetadata(hook_name=RES)))
    sae.save_model(tmp_path / "abs")
    with pytest.raises(
        ScopeError, match=r"architecture 'abstopk' is not supported: .*Supported: jumprelu"
    ):
        load_sae(tmp_path / "abs", device="cpu")


@pytest.mark.slow  # a scope record subprocess
def test_cli_refuses_an_unsupported_sae_in_one_line_and_writes_nothing(tmp_path, tiny_dir):
    from sae_lens.registry import get_sae_class
    from sae_lens.saes.sae import SAEMetadata

    cls, cfg_cls = get_sae_class("abstopk")
    cls(cfg_cls(d_in=64, d_sae=32, k=4, metadata=SAEMetadata(hook_name=RES))).save_model(
        tmp_path / "abs"
    )
    (tmp_path / "c.txt").write_text(PROMPT)
    store = tmp_path / "store"
    result = subprocess.run(
        [sys.executable, "-m", "scope.cli", "record", "--model", str(tiny_dir), "--sae",
         str(tmp_path / "abs"), "--corpus", str(tmp_path / "c.txt"), "--store", str(store)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 2, result.stderr[-2000:]
    lines = [ln for ln in (result.stdout + result.stderr).splitlines() if ln.strip()]
    assert len(lines) == 1 and "abstopk" in lines[0] and "Supported" in lines[0], lines
    assert not store.exists()


def test_fold_dec_norm_gives_unit_rows_and_scaled_codes(tmp_path, kinds, tiny_model):
    sae = kinds["jumprelu_b_dec"]
    src = Path(sae_info(sae).source)
    folded = load_sae(src, device="cpu", fold_dec_norm=True)
    torch.testing.assert_close(folded.W_dec.norm(dim=-1), torch.ones(D_SAE))
    x = _inputs(tiny_model, RES)
    norms = sae.W_dec.norm(dim=-1)
    torch.testing.assert_close(sae_acts_of(folded, x), sae_acts_of(sae, x) * norms, rtol=1e-5,
                               atol=1e-5)  # fmt: skip
    assert sae_info(folded).folded and sae_info(folded).sha256 != sae_info(sae).sha256


def sae_acts_of(sae, x):
    from scope.codec import encode

    return encode(sae, x)


def test_skip_transcoder_on_gemma3_records_steers_and_evaluates_exactly(tmp_path):
    """Gemma Scope 2's transcoder shape on the tiny Gemma 3: a JumpReLU skip transcoder from
    hook_mlp_in to hook_mlp_out; recording reads the input, steering and splicing edit the
    output (the input untouched), each equal to its brute-force answer."""
    from scope import load_model

    model = load_model(fixtures.build_gemma3(tmp_path / "g3", n_layers=3), device="cpu")
    sae = build_sae(model, "jumprelu_skip_transcoder", tmp_path / "tc")
    assert sae_info(sae).key == f"L1.tc.{D_SAE}" and codec_of(sae).skip
    tokens = model.to_tokens([PROMPT, PROMPT[::-1][:60]], padding_side="right")
    x = site_input(capture(model, tokens, [MLP_IN], 2)[MLP_IN])
    _, out = reconstruct(sae, x)
    torch.testing.assert_close(out, sae(x), rtol=1e-6, atol=1e-6)
    check_evals(model, "tc", sae, tokens)
    check_steering(model, "tc", sae)
    corpus = tmp_path / "c.txt"
    corpus.write_text("\n\n".join(fixtures.training_text()[10:13]))
    spec = CorpusSpec(paths=(str(corpus),), ctx=24, max_tokens=300)
    record(model, [sae], spec, tmp_path / "store", RecordSettings(ctx=24, k=4, samples=3))
    store = Store(tmp_path / "store")
    ref = reference(model, sae, build_windows(spec, model.tokenizer), 4, 3)
    count = [r[0] for r in store.sql("select count from features order by feature").fetchall()]
    np.testing.assert_array_equal(count, ref.count)
    assert sum(count) > 0


def test_hook_override_is_refused_for_a_transcoder(kinds):
    src = Path(sae_info(kinds["skip_transcoder"]).source)
    with pytest.raises(ScopeError, match=r"--hook .* transcoder reads one hook and writes another"):
        load_sae(src, device="cpu", hook="blocks.2.hook_resid_post")
    assert codec_of(load_sae(src, device="cpu", hook=MLP_IN)).write_hook == MLP_OUT  # its own


def test_listing_marks_what_is_refused_and_loading_it_is_refused_before_any_download():
    from scope.fit import list_saes

    rows = {r.release: r for r in list_saes("google/gemma-2-2b")}
    assert rows["temporal-sae-gemma-2-2b"].refused and "earlier tokens" in str(
        rows["temporal-sae-gemma-2-2b"].refused
    )
    assert "summed" in str(rows["mntss-gemma-2-2b-2.5m-clt-as-per-layer"].refused)
    served = [r for r in rows.values() if r.refused is None]
    assert {"gemma-scope-2b-pt-res", "gemma-scope-2b-pt-transcoders"} <= {r.release for r in served}
    with pytest.raises(ScopeError, match=r"'temporal-sae-gemma-2-2b' is not supported: .*earlier"):
        load_sae("temporal-sae-gemma-2-2b/blocks.12.hook_resid_post", device="cpu")
