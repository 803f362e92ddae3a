"""`scope train` on the tiny model: the saved release loads by name and encodes exactly like the
trained sae-lens SAE; the card's L0 and FVU equal a brute-force recomputation on the held-out
windows; FVU falls; the cache and the training resume to bitwise what an uninterrupted run
gives; folding sae-lens' normalisation and input b_dec is exact algebra; bad input fails
with one clear error."""

from __future__ import annotations

import json
import os
import signal

import numpy as np
import pytest
import torch
from train_resume import cache_resumes, standardised_and_folded, training_resumes
from typer.testing import CliRunner

from scope import load_sae
from scope import testing as fixtures
from scope.cli import app
from scope.corpus import CorpusSpec
from scope.errors import ScopeError
from scope.train import TrainSettings, build_cache, loop, train_saes
from scope.train.export import raw_params, storage_dtypes
from scope.train.run import held_out_windows

CTX = 24
HOOKS = ("blocks.1.hook_resid_post", "blocks.3.hook_resid_post")
SETTINGS = dict(width=96, target_l0=8, epochs=3, batch_size=256, lr=2e-2, checkpoint_every=3)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    path = tmp_path_factory.mktemp("corpus") / "c.jsonl"
    docs = [d for d in fixtures.training_text() if len(d) > 80]
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    return path


@pytest.fixture(scope="module")
def trained(tiny_model, corpus, tmp_path_factory):
    """Two SAEs trained into a local library, with every step's report."""
    root = tmp_path_factory.mktemp("lib")
    os.environ["SCOPE_SAES_DIR"] = str(root)
    reports: list[loop.StepReport] = []
    spec = CorpusSpec(paths=(str(corpus),), ctx=CTX, max_tokens=2048)
    results = train_saes(
        tiny_model,
        TrainSettings(hooks=HOOKS, **SETTINGS),
        spec,
        root / "tiny-train-res",
        cache=root.parent / "cache",
        eval_tokens=400,
        on_step=reports.append,
    )
    yield root, spec, results, reports
    del os.environ["SCOPE_SAES_DIR"]


def test_release_loads_by_name_and_encodes_like_the_trained_sae(trained, tiny_model):
    root, _, results, _ = trained
    assert [r.sae_id.split("/")[0] for r in results] == ["layer_1", "layer_3"]
    _, cache = tiny_model.run_with_cache(
        fixtures.training_text()[3][:300], names_filter=list(HOOKS)
    )
    for r in results:
        assert (root / "tiny-train-res" / r.sae_id / "params.npz").is_file()
        sae = load_sae("tiny-train-res", r.sae_id, device="cpu", dtype="float32")
        assert sae.cfg.metadata.hook_name == r.card["hook"]
        assert sae.cfg.metadata["release"] == "tiny-train-res"
        x = cache[r.card["hook"]][0, 1:]
        with torch.no_grad():
            expected = r.trained.encode(x)
            assert (expected > 0).sum() > 0
            assert torch.equal(sae.encode(x), expected)  # same weights, same ops
            assert torch.equal(sae.decode(expected), r.trained.decode(expected))
        assert load_sae(f"tiny-train-res/{r.sae_id}").cfg.d_sae == 96  # RELEASE/ID in one string
    readme = (root / "README.md").read_text()
    assert all(f"`tiny-train-res/{r.sae_id}`" in readme for r in results)


def brute_force(model, params, hook, windows):
    """L0 and FVU window by window, in float64 from the saved arrays."""
    special = set(model.tokenizer.all_special_ids)
    w_enc, b_enc, thr = (params[k].astype(np.float64) for k in ("W_enc", "b_enc", "threshold"))
    w_dec, b_dec = params["W_dec"].astype(np.float64), params["b_dec"].astype(np.float64)
    xs, l0 = [], []
    for w in range(len(windows)):
        tokens = torch.tensor(windows.tokens[w, : windows.lengths[w]], dtype=torch.long)[None]
        with torch.no_grad():
            _, cache = model.run_with_cache(tokens, names_filter=hook)
        for t, tok in enumerate(tokens[0].tolist()):
            if tok in special:
                continue
            x = cache[hook][0, t].double().numpy()
            pre = x @ w_enc + b_enc
            acts = np.maximum(pre, 0) * (pre > thr)
            l0.append(int((acts > 0).sum()))
            xs.append((x, acts @ w_dec + b_dec))
    x = np.stack([a for a, _ in xs])
    r = np.stack([b for _, b in xs])
    return float(np.mean(l0)), float(((x - r) ** 2).sum() / ((x - x.mean(0)) ** 2).sum()), len(l0)


def test_card_figures_equal_brute_force(trained, tiny_model):
    _, spec, results, _ = trained
    windows = held_out_windows(spec, tiny_model.tokenizer, 2048, 400)
    for r in results:
        with np.load(r.folder / "params.npz") as f:
            params = {k: f[k] for k in f.files}
        l0, fvu, n = brute_force(tiny_model, params, r.card["hook"], windows)
        ev = r.card["eval"]
        assert ev["tokens"] == n > 300
        assert abs(ev["l0"] - l0) <= 2 / n  # a feature within rounding of its threshold
        assert ev["fvu"] == pytest.approx(fvu, rel=1e-5)
        assert 0 < ev["fvu"] < 1 and ev["l0"] > 0
        assert np.isfinite(ev["delta_loss"])
        assert r.sae_id.endswith(f"average_l0_{round(ev['l0'])}")
        assert r.card["training"]["tokens_seen"] == r.card["training"]["steps"] * 256
        assert r.card["corpus"]["tokens_cached"] == 2048
        assert json.loads((r.folder / "cfg.json").read_text())["hook_name"] == r.card["hook"]


def test_fvu_falls_over_training(trained):
    _, _, _, reports = trained
    assert reports[-1].step == reports[-1].steps == len(reports)
    for hook in HOOKS:
        first = np.mean([r.fvu[hook] for r in reports[:2]])
        last = np.mean([r.fvu[hook] for r in reports[-2:]])
        assert last < 0.8 * first, (hook, first, last)


def test_cache_and_training_resume_bitwise(tiny_model, corpus, tmp_path):
    spec = CorpusSpec(paths=(str(corpus),), ctx=CTX, max_tokens=1024)
    whole = cache_resumes(tiny_model, HOOKS, spec, tmp_path)
    # with every recipe option on: the L0 warm-up's scheduler, the dead-feature counters the
    # pre-activation loss reads, the frequency penalty and the standardisation all resume
    # too; Ctrl-C at step 7, SIGTERM at step 8
    settings = TrainSettings(hooks=HOOKS, threshold_init="per_feature", pre_act_loss=1e-3,
                             dead_tokens=256, freq_penalty=1.0, freq_target=0.1, l0_warm_up=0.5,
                             standardize=True, **SETTINGS)  # fmt: skip
    training_resumes(settings, whole, tmp_path, ((signal.SIGINT, 7), (signal.SIGTERM, 8)))


def test_folds_are_exact_algebra():
    """sae-lens' input scaling and an input b_dec, folded into raw-activation params."""
    from sae_lens import JumpReLUTrainingSAE, JumpReLUTrainingSAEConfig

    torch.manual_seed(0)
    x = torch.randn(50, 16, dtype=torch.float64) * 300
    for apply_b_dec in (False, True):
        cfg = JumpReLUTrainingSAEConfig(d_in=16, d_sae=40, dtype="float64", apply_b_dec_to_input=apply_b_dec,
                                        normalize_activations="expected_average_only_in")  # fmt: skip
        sae = JumpReLUTrainingSAE(cfg)
        with torch.no_grad():
            for p in (sae.b_enc, sae.b_dec):
                p.normal_()
            sae.threshold.uniform_(0.0, 0.3)
            scale = 0.004
            expected = sae.encode(x * scale)
            expected_recon = sae.decode(expected) / scale
            sae.fold_activation_norm_scaling_factor(scale)
        p = {k: torch.from_numpy(v).double() for k, v in raw_params(sae).items()}
        pre = x @ p["W_enc"] + p["b_enc"]
        acts = torch.relu(pre) * (pre > p["threshold"])
        assert torch.allclose(acts, expected, rtol=1e-5, atol=1e-5)  # params are float32
        assert torch.allclose(acts @ p["W_dec"] + p["b_dec"], expected_recon, rtol=1e-5, atol=1e-3)


def test_float16_only_where_it_holds():
    arrays = {
        "W_enc": np.full((4, 8), 3e-6, np.float32),  # below float16's normal range
        "W_dec": np.linspace(-2, 2, 32, dtype=np.float32).reshape(8, 4),
        "b_enc": np.zeros(8, np.float32),
        "b_dec": np.array([1.0, 7e4, 2.0, 3.0], np.float32),  # overflows float16
        "threshold": np.ones(8, np.float32),
    }
    assert storage_dtypes(arrays, "float16") == {"W_enc": "float32", "W_dec": "float16",
        "b_enc": "float32", "b_dec": "float32", "threshold": "float32"}  # fmt: skip
    assert set(storage_dtypes(arrays, "float32").values()) == {"float32"}


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(target_l0=5000), "--target-l0 5000 is not between 0 and the width"),
        (dict(target_l0=2000), "not sparse"),
        (dict(hooks=()), "no hook to train on"),
        (dict(epochs=0), "--epochs 0"),
        (dict(sparsity_loss="l1"), "--sparsity-loss 'l1' is not one of quadratic, step, tanh"),
        (dict(l0_warm_up=1.0), "--l0-warm-up 1 is a fraction of the run"),
        (dict(pre_act_loss=-1.0), "--pre-act-loss -1 must be 0"),
        (dict(dead_tokens=0), "--dead-tokens 0 must be at least 1"),
        (dict(freq_penalty=-1.0), "--freq-penalty -1 must be 0"),
        (dict(freq_target=1.5), "--freq-target 1.5 is a fraction of tokens"),
        (dict(threshold_init="zero"), "--threshold-init 'zero' is not one of global, per_feature"),
    ],
)
def test_bad_settings(kwargs, message):
    with pytest.raises(ScopeError, match=message):
        TrainSettings(**{"hooks": HOOKS, "width": 4096, **kwargs})


def test_bad_input(tiny_model, corpus, tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    settings = TrainSettings(hooks=HOOKS, **SETTINGS)
    with pytest.raises(ScopeError, match="has no text"):
        train_saes(tiny_model, settings, CorpusSpec(paths=(str(empty),), max_tokens=100),
                   tmp_path / "r", cache=tmp_path / "c1")  # fmt: skip
    wrong = TrainSettings(hooks=("blocks.9.hook_resid_post",), **SETTINGS)
    with pytest.raises(ScopeError, match="layer 9 is not in"):
        train_saes(tiny_model, wrong, CorpusSpec(paths=(str(corpus),), max_tokens=100),
                   tmp_path / "r", cache=tmp_path / "c2")  # fmt: skip
    two = TrainSettings(hooks=("blocks.1.hook_resid_post", "blocks.1.hook_mlp_out"), **SETTINGS)
    with pytest.raises(ScopeError, match="both layer 1"):
        train_saes(
            tiny_model, two, CorpusSpec(paths=(str(corpus),), max_tokens=100), tmp_path / "r"
        )
    few = CorpusSpec(paths=(str(corpus),), ctx=CTX, max_tokens=100)
    with pytest.raises(ScopeError, match="fewer than one batch"):
        train_saes(tiny_model, settings, few, tmp_path / "r", cache=tmp_path / "c3")


def test_train_command(tiny_dir, corpus, tmp_path):
    result = CliRunner().invoke(app, [
        "train", "--model", str(tiny_dir), "--layer", "2", "--width", "64", "--target-l0", "6",
        "--corpus", str(corpus), "--ctx", str(CTX), "--tokens", "1200", "--epochs", "1",
        "--batch-size", "256", "--eval-tokens", "300", "--out", str(tmp_path / "rel-res"),
        "--cache", str(tmp_path / "cache"), "--threshold-init", "per_feature", "--pre-act-loss",
        "1e-3", "--dead-tokens", "1k", "--freq-penalty", "2", "--freq-target", "0.2",
        "--l0-warm-up", "0.5", "--sparsity-loss", "step", "--standardize",
    ])  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "/rel-res/layer_2/width_64/average_l0_" in result.output
    (card,) = (tmp_path / "rel-res").rglob("card.json")
    training = json.loads(card.read_text())["training"]
    assert training["tokens_seen"] == 4 * 256
    expected = dict(
        threshold_init="per_feature",
        pre_act_loss=1e-3,
        dead_tokens=1000,
        freq_penalty=2.0,
        freq_target=0.2,
        l0_warm_up=0.5,
        sparsity_loss="step",
        standardize=True,
    )
    assert {k: training[k] for k in expected} == expected
    assert training["dead_window_steps"] == 4  # 1000 tokens in 256-token steps, rounded up
    recipe = ("step L0 penalty, pre-activation loss, frequency penalty (scope.train.losses), "
              "per-dimension standardisation (scope.train.standardize)")  # fmt: skip
    assert training["trainer"].endswith(recipe)
    bad = CliRunner().invoke(app, ["train", "--model", str(tiny_dir), "--layer", "2",
                                   "--target-l0", "0", "--corpus", str(corpus), "--out", "x"])  # fmt: skip
    assert bad.exit_code == 2 and "--target-l0 0 is not between" in bad.output


# ---- recipe options: each changes what it says -------------------------------------------

RECIPE = dict(width=96, target_l0=8, epochs=4, batch_size=256, lr=2e-2, checkpoint_every=100)


@pytest.fixture(scope="module")
def small_cache(tiny_model, corpus, tmp_path_factory):
    spec = CorpusSpec(paths=(str(corpus),), ctx=CTX, max_tokens=1024)
    return build_cache(tiny_model, HOOKS[:1], spec, tmp_path_factory.mktemp("recipe") / "cache")


def _all_rows(cache) -> torch.Tensor:
    return loop.load_batch(cache, HOOKS[0], np.arange(cache.state.rows))


@torch.no_grad()
def _firing(t: loop.Training, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Pre-activations [rows, width] of the training SAE over raw rows, and each feature's
    firing fraction."""
    trainer = t.trainers[HOOKS[0]]
    sae = t.saes[HOOKS[0]]
    pre = trainer.activation_scaler(x) @ sae.W_enc + sae.b_enc
    return pre, (pre > sae.threshold).float().mean(0)


def test_threshold_init_per_feature_starts_every_feature_at_the_target_rate(small_cache, tmp_path):
    settings = TrainSettings(hooks=HOOKS[:1], **RECIPE)
    # the rows the thresholds are set from: the first batches (here all four of epoch 0)
    first = [loop.batch_rows(settings, small_cache.state.rows, k) for k in range(4)]
    x = torch.cat([loop.load_batch(small_cache, HOOKS[0], r) for r in first])
    fired, thresholds = {}, {}
    for init in ("global", "per_feature"):
        s = TrainSettings(hooks=HOOKS[:1], threshold_init=init, **RECIPE)
        t = loop.start(s, small_cache, tmp_path / init)
        pre, freq = _firing(t, x)
        fired[init] = (freq * len(x)).round().long()
        thresholds[init] = t.saes[HOOKS[0]].threshold.detach().clone()
    n = len(x)
    k = int((1 - 8 / 96) * n)  # each threshold is the kth smallest pre-activation
    by_hand = pre.sort(dim=0).values[k - 1]
    assert bool((by_hand > 0).all())
    assert torch.equal(thresholds["per_feature"], by_hand)
    # every feature fires on 86 of the 1024 rows, fewer where equal rows tie at the threshold
    assert int(fired["per_feature"].max()) == n - k and int(fired["per_feature"].min()) >= 80
    # one global threshold: the same total, spread unevenly (on a real model's residual
    # stream, many features never fire)
    assert thresholds["global"].unique().numel() == 1
    assert abs(int(fired["global"].sum()) - (n - k) * 96) <= 96
    assert int(fired["global"].max() - fired["global"].min()) > 40


def test_standardize_trains_on_standardised_rows_and_folds_back_exactly(small_cache, tmp_path):
    s = TrainSettings(hooks=HOOKS[:1], standardize=True, **RECIPE)
    t = loop.run(loop.start(s, small_cache, tmp_path / "c"), stop_after=6)
    standardised_and_folded(t, HOOKS[0], np.arange(0, small_cache.state.rows, 2))


def _train(settings: TrainSettings, cache, folder, *, kill=None, stop_after=None):
    t = loop.start(settings, cache, folder)
    if kill is not None:  # features pushed far below their thresholds: dead, no gradient
        with torch.no_grad():
            pre, _ = _firing(t, _all_rows(cache))
            sae = t.saes[HOOKS[0]]
            sae.b_enc[kill] -= pre[:, kill].max(0).values - sae.threshold[kill] + 0.2
    return loop.run(t, stop_after=stop_after)


def test_pre_act_loss_revives_dead_features(small_cache, tmp_path):
    kill = torch.arange(0, 96, 4)
    x = _all_rows(small_cache)
    out = {}
    for coef in (0.0, 1e-3):
        s = TrainSettings(hooks=HOOKS[:1], pre_act_loss=coef, dead_tokens=256, **RECIPE)
        t = _train(s, small_cache, tmp_path / str(coef), kill=kill, stop_after=4)
        early = _firing(t, x)[0][:, kill].mean(0)
        out[coef] = early, _firing(loop.run(t), x)[1]
    (early_off, freq_off), (early_on, freq_on) = out[0.0], out[1e-3]
    # after 4 steps (dead from step 2 on, a window of one 256-token step): the loss has lifted
    # every killed feature's pre-activations; without it nothing moves them
    assert bool((early_on > early_off + 0.02).all())
    assert int((freq_off[kill] > 0).sum()) == 0  # without it they stay dead to the end
    assert int((freq_on[kill] > 0).sum()) >= 0.75 * len(kill)  # with it most fire again


def test_pre_act_loss_value_is_sae_lens_formula(small_cache, tmp_path):
    """The loss a step adds equals coef * mean over tokens of sum over dead features of
    relu(threshold - pre) * |W_dec row|, by hand in float64."""
    s = TrainSettings(hooks=HOOKS[:1], pre_act_loss=1e-3, dead_tokens=256, **RECIPE)
    t = loop.start(s, small_cache, tmp_path / "c")
    trainer, sae = t.trainers[HOOKS[0]], t.saes[HOOKS[0]]
    dead = torch.zeros(96, dtype=torch.bool)
    dead[::3] = True
    trainer.n_forward_passes_since_fired[dead] = 10  # > the window of 1 step
    assert torch.equal(trainer.dead_neurons, dead)
    x = trainer.activation_scaler(_all_rows(small_cache)[:256])
    out = trainer.sae.training_forward_pass(step_input=_step_input(trainer, x))
    p = {k: v.detach().double() for k, v in sae.state_dict().items()}
    pre = x.double() @ p["W_enc"] + p["b_enc"]
    gap = (p["threshold"] - pre).relu() * p["W_dec"].norm(dim=1) * dead
    assert float(out.losses["pre_act_loss"]) == pytest.approx(1e-3 * float(gap.sum(1).mean()), rel=1e-5)  # fmt: skip


def _step_input(trainer, x):
    from sae_lens.saes.sae import TrainStepInput

    return TrainStepInput(sae_in=x, coefficients=trainer.get_coefficients(),
                          dead_neuron_mask=trainer.dead_neurons, n_training_steps=0,
                          is_logging_step=False)  # fmt: skip


@pytest.mark.parametrize("mode", ["quadratic", "step", "tanh"])
def test_sparsity_loss_and_l0_warm_up_values(small_cache, tmp_path, mode):
    """Each sparsity loss on a fixed batch equals its formula by hand, and the warm-up ramps
    the coefficient linearly over the given fraction of the run (16 steps: 4 of warm-up)."""
    s = TrainSettings(hooks=HOOKS[:1], sparsity_loss=mode, l0_coefficient=0.5, l0_warm_up=0.25,
                      **RECIPE)  # fmt: skip
    t = loop.start(s, small_cache, tmp_path / mode)
    trainer, sae = t.trainers[HOOKS[0]], t.saes[HOOKS[0]]
    x = trainer.activation_scaler(_all_rows(small_cache)[:256])
    coefs = []
    for _ in range(6):
        coefs.append(trainer.get_coefficients()["l0"])
        out = trainer.sae.training_forward_pass(step_input=_step_input(trainer, x))
        p = {k: v.detach().double() for k, v in sae.state_dict().items()}
        pre = x.double() @ p["W_enc"] + p["b_enc"]
        acts = pre * (pre > p["threshold"])
        l0 = (pre > p["threshold"]).sum(1).double()
        per_token = {
            "quadratic": 2 / 8 * (l0 - 8) ** 2,
            "step": l0,
            "tanh": torch.tanh(4 * acts * p["W_dec"].norm(dim=1)).sum(1),
        }[mode]
        expected = coefs[-1] * float(per_token.mean())
        assert float(out.losses["l0_loss"]) == pytest.approx(expected, rel=1e-5, abs=1e-9)
        loop.run(t, stop_after=t.step + 1)
    assert t.steps == 16
    assert coefs == pytest.approx([0.0, 0.125, 0.25, 0.375, 0.5, 0.5])


def test_frequency_loss_value_and_gradient_by_hand():
    from scope.train.losses import frequency_loss

    g = torch.Generator().manual_seed(1)
    pre = torch.randn(200, 12, generator=g, dtype=torch.float64)
    thr = torch.linspace(-1.5, 1.5, 12, dtype=torch.float64).requires_grad_()
    loss = frequency_loss(pre, thr, bandwidth=0.3, ste_to_input=False, coefficient=2.0, target=0.1)
    loss.backward()
    f = (pre > thr.detach()).double().mean(0)
    over = (f - 0.1).clamp(min=0)
    assert float(loss) == pytest.approx(2.0 * float((over**2).sum()) / 0.1, rel=1e-12)
    # d loss / d threshold_i = 2 * 2 * over_i / 0.1 * d f_i / d threshold_i, where sae-lens'
    # straight-through estimate of d f_i / d threshold_i is -mean(rectangle((pre - t) / bw)) / bw
    window = ((pre - thr.detach()).abs() < 0.15).double().mean(0)
    expected = 2.0 * 2 * over / 0.1 * (-window / 0.3)
    assert torch.allclose(thr.grad, expected, rtol=1e-12, atol=0)
    assert float(over[-1]) == 0 and float(thr.grad[-1]) == 0  # a rare feature is left alone
    assert float(over[0]) > 0.5 and float(thr.grad[0]) < 0  # a dense one: threshold goes up


def test_frequency_penalty_lowers_dense_features_firing(small_cache, tmp_path):
    x = _all_rows(small_cache)
    freq = {}
    for coef in (0.0, 10.0):
        s = TrainSettings(hooks=HOOKS[:1], freq_penalty=coef, freq_target=0.1, **RECIPE)
        freq[coef] = _firing(_train(s, small_cache, tmp_path / str(coef)), x)[1]
    off, on = freq[0.0], freq[10.0]
    assert int((off > 0.15).sum()) >= 10 and float(off.max()) > 0.4  # dense without it
    assert int((on > 0.15).sum()) == 0 and float(on.max()) < 0.5 * float(off.max())
    assert abs(float(on.sum()) - 8) < 2  # L0 still near its target
