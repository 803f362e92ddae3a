"""`scope train --site transcoder` on the tiny model: a step's loss equals a hand computation on
a fixed batch; training lowers FVU on the MLP output from the initial weights; the saved
release loads through ``load_sae`` as a transcoder reading the MLP's input and writing its
output, encodes and reconstructs bit for bit like the trained module, and passes the
workbench's transcoder checks (recording, steering on the write hook, splice evals); the
paired cache pairs each input row with its own MLP output and, like the training, resumes to
bitwise what an uninterrupted run gives; all-spliced loss equals a two-pass splice by hand."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
from conftest import PROMPT
from reference import reference
from safetensors.torch import load_file
from test_architectures import check_evals, check_steering
from train_resume import cache_resumes, standardised_and_folded, training_resumes
from typer.testing import CliRunner

from scope import load_sae
from scope import testing as fixtures
from scope.acts import capture, counted_mask, sae_acts, site_input
from scope.cli import app
from scope.codec import codec_of, reconstruct
from scope.corpus import CorpusSpec, build_windows
from scope.errors import ScopeError
from scope.evals import evaluate, splice_all
from scope.identity import sae_info
from scope.record import RecordSettings, record
from scope.store import Store
from scope.train import TrainSettings, build_cache, loop, train_saes
from scope.train.cache import ActivationCache
from scope.train.run import held_out_windows

CTX = 24
READS = ("blocks.1.ln2.hook_out", "blocks.3.ln2.hook_out")
WRITES = ("blocks.1.hook_mlp_out", "blocks.3.hook_mlp_out")
SETTINGS = dict(width=96, target_l0=8, epochs=3, batch_size=256, lr=2e-2, checkpoint_every=3)
RECIPE = dict(threshold_init="per_feature", pre_act_loss=1e-3, dead_tokens=256,
              freq_penalty=1.0, freq_target=0.1)  # fmt: skip


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    path = tmp_path_factory.mktemp("corpus") / "c.jsonl"
    docs = [d for d in fixtures.training_text() if len(d) > 80]
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    return path


@pytest.fixture(scope="module")
def trained(tiny_model, corpus, tmp_path_factory):
    """Skip transcoders at layers 1 and 3 trained into a local library, with the recipe
    options on."""
    root = tmp_path_factory.mktemp("lib")
    os.environ["SCOPE_SAES_DIR"] = str(root)
    spec = CorpusSpec(paths=(str(corpus),), ctx=CTX, max_tokens=2048)
    settings = TrainSettings(hooks=READS, outputs=WRITES, skip=True, standardize=True, **RECIPE,
                             **SETTINGS)  # fmt: skip
    cache = tmp_path_factory.mktemp("tc-cache") / "cache"
    results = train_saes(tiny_model, settings, spec, root / "tiny-train-tc", cache=cache,
                         eval_tokens=400)  # fmt: skip
    yield root, spec, settings, results, cache
    del os.environ["SCOPE_SAES_DIR"]


@torch.no_grad()
def _pairs(model, windows, read, write):
    """(input rows, output rows) of every counted token of ``windows``, float64."""
    tokens = torch.from_numpy(windows.tokens).long()
    lengths = torch.from_numpy(windows.lengths).long()
    acts = capture(model, tokens, [read, write], 4)
    counted = counted_mask(model, tokens, lengths)
    return acts[read][counted].double(), acts[write][counted].double()


def test_release_loads_as_a_transcoder_and_encodes_like_the_trained_module(trained, tiny_model):
    root, _, _, results, _ = trained
    assert [r.sae_id.split("/")[0] for r in results] == ["layer_1", "layer_3"]
    tokens = tiny_model.to_tokens([PROMPT, PROMPT[::-1][:60]], padding_side="right")
    lengths = (tokens != tiny_model.tokenizer.pad_token_id).sum(1)
    for r, read, write in zip(results, READS, WRITES, strict=True):
        folder = root / "tiny-train-tc" / r.sae_id
        assert sorted(p.name for p in folder.iterdir()) == ["card.json", "cfg.json",
                                                            "sae_weights.safetensors"]  # fmt: skip
        sae = load_sae("tiny-train-tc", r.sae_id, device="cpu", dtype="float32")
        assert type(sae).__name__ == "JumpReLUSkipTranscoder"
        codec = codec_of(sae)
        assert codec.transcoder and codec.fused and codec.skip
        assert (codec.read_hook, codec.write_hook) == (read, write)
        assert (r.card["hook"], r.card["hook_out"]) == (read, write)
        info = sae_info(sae)
        assert info.key == f"L{read.split('.')[1]}.tc.96" and info.sha256 == r.card["sha256"]
        assert r.card["architecture"] == "jumprelu_skip_transcoder"
        got = sae_acts(tiny_model, [sae], tokens, lengths)
        x = site_input(got.hooks[read])
        with torch.no_grad():
            want = r.trained.encode(x)
            assert float((want > 0).float().mean()) > 0.02  # it fires: the test has teeth
            assert torch.equal(got.codes[0], want * got.counted[..., None])  # same weights, ops
            _, out = reconstruct(sae, x)
            assert torch.equal(out, r.trained.output(x, want))
        assert load_sae(f"tiny-train-tc/{r.sae_id}").cfg.d_sae == 96  # RELEASE/ID in one string
    readme = (root / "README.md").read_text()
    assert f"`{READS[0]}` -> `{WRITES[0]}`" in readme
    with pytest.raises(
        ScopeError, match=r"\(2 ids\)\. Nearest ids: .*layer_1/width_96/average_l0_"
    ):
        load_sae("tiny-train-tc", "layer_2/width_96/average_l0_8")


def test_saved_transcoder_passes_the_transcoder_checks(trained, tiny_model, corpus, tmp_path):
    """The layer-1 transcoder as any other: splice evals equal a brute-force splice, steering
    acts on the MLP output and leaves its input alone, recording equals the reference."""
    _, _, _, results, _ = trained
    sae = load_sae(results[0].folder, device="cpu")
    tokens = tiny_model.to_tokens([PROMPT, PROMPT[::-1][:60]], padding_side="right")
    check_evals(tiny_model, "tc", sae, tokens)
    check_steering(tiny_model, "tc", sae)
    spec = CorpusSpec(paths=(str(corpus),), ctx=CTX, max_tokens=300)
    record(tiny_model, [sae], spec, tmp_path / "store", RecordSettings(ctx=CTX, k=4, samples=3))
    ref = reference(tiny_model, sae, build_windows(spec, tiny_model.tokenizer), 4, 3)
    count = [r[0] for r in Store(tmp_path / "store").sql(
        "select count from features order by feature").fetchall()]  # fmt: skip
    np.testing.assert_array_equal(count, ref.count)
    assert sum(count) > 0


def test_card_figures_by_hand_and_fvu_falls_from_the_initial_weights(trained, tiny_model, tmp_path):
    _, spec, settings, results, folder = trained
    windows = held_out_windows(spec, tiny_model.tokenizer, 2048, 400)
    cache = ActivationCache.open(folder)
    assert cache is not None
    initial = loop.start(settings, cache, tmp_path / "initial")  # the weights before any step
    assert initial.step == 0
    for r, read, write in zip(results, READS, WRITES, strict=True):
        x, y = _pairs(tiny_model, windows, read, write)
        p = {k: v.double() for k, v in load_file(r.folder / "sae_weights.safetensors").items()}
        pre = x @ p["W_enc"] + p["b_enc"]
        acts = pre.relu() * (pre > p["threshold"])
        y_hat = acts @ p["W_dec"] + p["b_dec"] + x @ p["W_skip"].T
        fvu = float(((y - y_hat) ** 2).sum() / ((y - y.mean(0)) ** 2).sum())
        ev = r.card["eval"]
        assert ev["tokens"] == len(x) > 300
        assert ev["fvu"] == pytest.approx(fvu, rel=1e-5)
        assert abs(ev["l0"] - float((acts > 0).sum(1).double().mean())) <= 2 / len(x)
        assert ev["dead_fraction"] == ev["dead"] / 96
        assert np.isfinite(ev["delta_loss"])
        assert ev["all_spliced"]["saes"] == 2 and np.isfinite(ev["all_spliced"]["delta_loss"])
        # the same rows through the module as it started (in its scaled units; FVU is not
        # changed by scaling the target)
        trainer, module = initial.trainers[read], initial.saes[read]
        with torch.no_grad():
            pair = trainer.activation_scaler(torch.cat([x, y], -1).float())
            x0, y0 = module.split(pair)
            out0 = module.output(x0, module.encode(x0))
        fvu0 = float(((y0 - out0) ** 2).sum() / ((y0 - y0.mean(0)) ** 2).sum())
        assert fvu0 > 0.95 and fvu < 0.85 * fvu0, (read, fvu0, fvu)
        training = r.card["training"]
        assert training["skip"] is True and training["target_scaling_factor_folded"] > 0
        assert "TrainingTranscoder" in training["trainer"]


def _step_input(trainer, pair):
    from sae_lens.saes.sae import TrainStepInput

    return TrainStepInput(sae_in=pair, coefficients=trainer.get_coefficients(),
                          dead_neuron_mask=trainer.dead_neurons, n_training_steps=0,
                          is_logging_step=False)  # fmt: skip


@pytest.fixture(scope="module")
def paired_cache(tiny_model, corpus, tmp_path_factory):
    spec = CorpusSpec(paths=(str(corpus),), ctx=CTX, max_tokens=1024)
    folder = tmp_path_factory.mktemp("paired") / "cache"
    return build_cache(tiny_model, (READS[0], WRITES[0]), spec, folder)


def test_loss_equals_a_hand_computation(paired_cache, tmp_path):
    """Every term of a step's loss on a fixed batch, by hand in float64 from the module's
    weights: the reconstruction of the target (skip term included), the quadratic L0 penalty,
    the pre-activation loss on dead features and the frequency penalty; and the scaler brings
    each side to mean norm sqrt(64) over the first batches."""
    s = TrainSettings(hooks=READS[:1], outputs=WRITES[:1], skip=True, l0_coefficient=0.5,
                      **RECIPE, **SETTINGS)  # fmt: skip
    t = loop.start(s, paired_cache, tmp_path / "c")
    trainer, tc = t.trainers[READS[0]], t.saes[READS[0]]
    first = np.concatenate([loop.batch_rows(s, paired_cache.state.rows, k) for k in range(4)])
    x_raw = loop.load_batch(paired_cache, READS[0], np.sort(first))
    y_raw = loop.load_batch(paired_cache, WRITES[0], np.sort(first))
    scaler = trainer.activation_scaler
    assert scaler.scaling_factor == pytest.approx(8 / float(x_raw.norm(dim=-1).mean()), rel=1e-6)
    assert scaler.target_factor == pytest.approx(8 / float(y_raw.norm(dim=-1).mean()), rel=1e-6)
    loop.run(t, stop_after=1)  # off the initial thresholds (set at pre-activations exactly)
    assert float(tc.W_skip.detach().abs().max()) > 0  # the skip has moved from zero
    dead = torch.zeros(96, dtype=torch.bool)
    dead[::3] = True
    trainer.n_forward_passes_since_fired[dead] = 10  # > the window of one 256-token step
    pair = scaler(loop.module_batch(s, paired_cache, READS[0], np.arange(256)))
    out = tc.training_forward_pass(step_input=_step_input(trainer, pair))
    p = {k: v.detach().double() for k, v in tc.state_dict().items()}
    x, y = pair[:, :64].double(), pair[:, 64:].double()
    pre = x @ p["W_enc"] + p["b_enc"]
    fired = pre > p["threshold"]
    y_hat = (pre * fired) @ p["W_dec"] + p["b_dec"] + x @ p["W_skip"].T
    norms = p["W_dec"].norm(dim=1)
    freq = fired.double().mean(0)
    expected = {
        "mse_loss": ((y_hat - y) ** 2).sum(1).mean(),
        "l0_loss": 0.5 * (2 / 8 * (fired.sum(1).double() - 8) ** 2).mean(),
        "pre_act_loss": 1e-3 * ((p["threshold"] - pre).relu() * norms * dead).sum(1).mean(),
        "freq_loss": 1.0 * ((freq - 0.1).relu() ** 2).sum() / 0.1,
    }
    assert set(out.losses) == set(expected)
    for name, value in expected.items():
        assert float(out.losses[name]) == pytest.approx(float(value), rel=1e-5), name
        assert float(value) > 0, name  # every term is at work
    assert float(out.loss) == pytest.approx(float(sum(expected.values())), rel=1e-5)
    assert torch.equal(out.sae_in, pair[:, 64:])  # FVU and sae-lens' logs read the target


def test_standardize_folds_a_skip_transcoder_back_exactly(paired_cache, tmp_path):
    s = TrainSettings(hooks=READS[:1], outputs=WRITES[:1], skip=True, standardize=True, **RECIPE,
                      **SETTINGS)  # fmt: skip
    t = loop.run(loop.start(s, paired_cache, tmp_path / "c"), stop_after=4)
    assert float(t.saes[READS[0]].W_skip.detach().abs().max()) > 0  # the skip is folded too
    standardised_and_folded(t, READS[0], np.arange(0, paired_cache.state.rows, 2))


def test_paired_cache_pairs_rows_and_resumes_and_training_resumes_bitwise(
    tiny_model, corpus, tmp_path
):
    spec = CorpusSpec(paths=(str(corpus),), ctx=CTX, max_tokens=1024)
    whole = cache_resumes(tiny_model, (*READS, *WRITES), spec, tmp_path)

    # row i of the output hook is the MLP of row i of the input hook (to bfloat16 rounding),
    # and not of its neighbour's
    rows = np.arange(1024)
    for read, write in zip(READS, WRITES, strict=True):
        block = tiny_model.blocks[int(read.split(".")[1])]
        x, y = (loop.load_batch(whole, h, rows) for h in (read, write))
        with torch.no_grad():
            mlp = block.ln2_post(block.mlp(x[:, None]))[:, 0]
        err = ((mlp - y).norm(dim=-1) / y.norm(dim=-1)).max()
        shifted = ((mlp[1:] - y[:-1]).norm(dim=-1) / y[:-1].norm(dim=-1)).median()
        assert float(err) < 0.05 and float(shifted) > 0.5, (read, float(err), float(shifted))

    # the training of one of the pairs (the loop is the same for each)
    settings = TrainSettings(hooks=READS[:1], outputs=WRITES[:1], skip=True, l0_warm_up=0.5,
                             standardize=True, **RECIPE, **SETTINGS)  # fmt: skip
    expected = training_resumes(settings, whole, tmp_path)  # Ctrl-C at step 7
    assert any(k.endswith("W_skip") for k in expected)


def capture_spliced(model, tokens, put):
    """Layer 3's transcoder input with layer 1's MLP output replaced by ``put``."""
    seen = {}

    def grab(act, hook):
        seen["x"] = act.clone()

    model.run_with_hooks(tokens, stop_at_layer=4, fwd_hooks=[(WRITES[0], put), (READS[1], grab)])
    return seen["x"]


@torch.no_grad()
def test_all_spliced_loss_equals_a_two_pass_splice_by_hand(trained, tiny_model, corpus):
    """Both transcoders spliced at once: layer 3 reads what layer 1's splice gives. By hand:
    a first pass with layer 1 spliced gives layer 3's input; a second pass puts both outputs
    in as constants. One transcoder alone equals ``evaluate``'s one-site splice."""
    _, _, _, results, _ = trained
    saes = [load_sae(r.folder, device="cpu") for r in results]
    windows = build_windows(CorpusSpec(paths=(str(corpus),), ctx=CTX, max_tokens=150),
                            tiny_model.tokenizer)  # fmt: skip
    got = splice_all(tiny_model, saes, windows, batch_size=4)
    tokens = torch.from_numpy(windows.tokens).long()
    lengths = torch.from_numpy(windows.lengths).long()
    counted = counted_mask(tiny_model, tokens, lengths)
    ce, n = 0.0, 0
    for i in range(0, len(tokens), 4):
        tok, cnt = tokens[i : i + 4, : int(lengths[i : i + 4].max())], counted[i : i + 4]
        cnt = cnt[:, : tok.shape[1]]
        x1 = capture(tiny_model, tok, [READS[0]], 2)[READS[0]]
        y1 = saes[0](x1)

        def put(y, cnt=cnt):
            return lambda act, hook: torch.where(cnt[..., None], y, act)

        x3 = capture_spliced(tiny_model, tok, put(y1))
        y3 = saes[1](x3)
        logits = tiny_model.run_with_hooks(tok, fwd_hooks=[(WRITES[0], put(y1)),
                                                           (WRITES[1], put(y3))])  # fmt: skip
        pred = cnt[:, :-1] & cnt[:, 1:]
        logp = torch.log_softmax(logits[:, :-1].float(), -1)[pred]
        ce += float(-logp.gather(-1, tok[:, 1:][pred][:, None]).double().sum())
        n += int(pred.sum())
    assert got.predictions == n > 80
    assert got.ce_loss_with_saes == pytest.approx(ce / n, rel=1e-5)
    assert got.delta_loss == pytest.approx(got.ce_loss_with_saes - got.ce_loss_without_saes)
    one = splice_all(tiny_model, saes[:1], windows, batch_size=4)
    (row,) = evaluate(tiny_model, saes[:1], windows, batch_size=4).rows
    assert one.ce_loss_with_saes == pytest.approx(row.ce_loss_with_sae, rel=1e-6)
    assert one.ce_loss_without_saes == pytest.approx(row.ce_loss_without_sae, rel=1e-6)
    assert abs(got.ce_loss_with_saes - one.ce_loss_with_saes) > 1e-4  # layer 3 counts too


def test_train_command_every_layer(tiny_dir, corpus, tmp_path):
    result = CliRunner().invoke(app, [
        "train", "--model", str(tiny_dir), "--site", "transcoder", "--layer", "all", "--skip",
        "--width", "64", "--target-l0", "6", "--corpus", str(corpus), "--ctx", str(CTX),
        "--tokens", "600", "--epochs", "1", "--batch-size", "256", "--eval-tokens", "120",
        "--out", str(tmp_path / "rel-tc"), "--cache", str(tmp_path / "cache"),
    ])  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "trained 4 transcoders" in result.output and "all 4 spliced in at once" in result.output
    cards = sorted((tmp_path / "rel-tc").rglob("card.json"))
    assert [c.relative_to(tmp_path / "rel-tc").parts[0] for c in cards] == [
        f"layer_{i}" for i in range(4)
    ]
    for i, path in enumerate(cards):
        card = json.loads(path.read_text())
        assert card["hook"] == f"blocks.{i}.ln2.hook_out"
        assert card["hook_out"] == f"blocks.{i}.hook_mlp_out"
        assert card["architecture"] == "jumprelu_skip_transcoder"
        assert card["eval"]["all_spliced"]["saes"] == 4
        assert codec_of(load_sae(path.parent, device="cpu")).write_hook == card["hook_out"]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--site", "transcoder", "--hook", "blocks.1.ln2.hook_out"], "takes --layer"),
        (["--layer", "1", "--skip"], "--skip is for transcoders"),
        (["--layer", "one"], "--layer 'one' is not a layer number"),
        (["--site", "neuron", "--layer", "1"], "--site 'neuron' is not one of"),
    ],
)
def test_bad_command_input(tiny_dir, corpus, args, message):
    result = CliRunner().invoke(app, ["train", "--model", str(tiny_dir), "--corpus", str(corpus),
                                      "--out", "x", *args])  # fmt: skip
    assert result.exit_code == 2 and message in result.output, result.output


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(outputs=WRITES[:1]), "1 output hooks for 2 input hooks"),
        (dict(outputs=READS), "is its input"),
        (dict(skip=True), "--skip is for transcoders"),
    ],
)
def test_bad_settings(kwargs, message):
    with pytest.raises(ScopeError, match=message):
        TrainSettings(**{"hooks": READS, **kwargs})
