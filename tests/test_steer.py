"""Steering changes exactly what it says, at exactly the positions it says, and nothing else."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from scope import ScopeError, load_sae
from scope.steer import Sampling, Steer, build_hooks, compare, generate, prompt_tokens
from scope.sweep import parse_strengths, sweep

HOOK = "blocks.2.hook_resid_post"
PROMPT = "The river ran fast under the old stone bridge"


@pytest.fixture(scope="module")
def sae(tiny_sae_dir):
    return load_sae(tiny_sae_dir, device="cpu")


def run_steered(model, tokens, steers, prompt_len=None, store=None):
    """The hook's input and output under ``steers`` (capture hooks around the steering hook)."""
    seen: dict[str, torch.Tensor] = {}

    def grab(name):
        def fn(act, hook):
            seen[name] = act.detach().clone()

        return fn

    hooks = build_hooks(steers, prompt_len or tokens.shape[1], store)
    with torch.no_grad(), model.hooks(fwd_hooks=[(HOOK, grab("in")), *hooks, (HOOK, grab("out"))]):
        logits = model(tokens)
    return seen["in"][0], seen["out"][0], logits


def active_feature(model, sae, tokens, inactive=False):
    with torch.no_grad():
        _, cache = model.run_with_cache(tokens, names_filter=HOOK)
    acts = sae.encode(cache[HOOK][0])
    fired = (acts[1:] > 0).sum(0)
    return int(fired.argmin() if inactive else fired.argmax()), acts


@pytest.mark.parametrize("positions", ["all", "prompt"])
def test_add_changes_exactly_strength_times_unit_direction(tiny_model, sae, positions):
    tokens = tiny_model.to_tokens(PROMPT)
    x, y, _ = run_steered(tiny_model, tokens, [Steer(sae, 7, strength=3.5, positions=positions)])
    unit = sae.W_dec[7] / sae.W_dec[7].norm()
    delta = y - x
    assert torch.equal(delta[0], torch.zeros_like(delta[0]))  # never BOS
    torch.testing.assert_close(delta[1:], (3.5 * unit).expand_as(delta[1:]), rtol=0, atol=1e-5)


def test_add_generated_positions_only_in_generation(tiny_model, sae):
    tokens = tiny_model.to_tokens(PROMPT)
    x, y, _ = run_steered(tiny_model, tokens, [Steer(sae, 7, strength=3.5, positions="generated")])
    assert torch.equal(x, y)  # the whole prompt is untouched
    # feeding the prompt plus two generated tokens: exactly those two positions change
    longer = torch.cat([tokens, torch.tensor([[11, 12]])], dim=1)
    x, y, _ = run_steered(tiny_model, longer, [Steer(sae, 7, strength=3.5, positions="generated")],
                          prompt_len=tokens.shape[1])  # fmt: skip
    changed = (y - x).abs().sum(-1) > 0
    assert changed.tolist() == [False] * tokens.shape[1] + [True, True]


def test_norm_unit_scales_with_position_norm(tiny_model, sae):
    tokens = tiny_model.to_tokens(PROMPT)
    x, y, _ = run_steered(tiny_model, tokens, [Steer(sae, 3, strength=0.5, unit="norm")])
    unit = sae.W_dec[3] / sae.W_dec[3].norm()
    expected = 0.5 * x[1:].norm(dim=-1, keepdim=True) * unit
    torch.testing.assert_close((y - x)[1:], expected, rtol=1e-5, atol=1e-5)


def test_clamp_to_own_value_changes_nothing(tiny_model, sae):
    bos = tiny_model.tokenizer.bos_token_id
    tokens = torch.tensor([[bos, tiny_model.to_tokens("river")[0, 1]]])  # one steered position
    f, acts = active_feature(tiny_model, sae, tokens)
    value = float(acts[1, f])
    assert value > 0
    x, y, logits = run_steered(tiny_model, tokens, [Steer(sae, f, strength=value, mode="clamp")])
    assert torch.equal(x, y)
    with torch.no_grad():
        assert torch.equal(logits, tiny_model(tokens))


def test_clamp_changes_only_that_features_contribution(tiny_model, sae):
    tokens = tiny_model.to_tokens(PROMPT)
    f, acts = active_feature(tiny_model, sae, tokens)
    x, y, _ = run_steered(tiny_model, tokens, [Steer(sae, f, strength=12.0, mode="clamp")])
    # decode(codes with f := 12) + error term == x + (12 - a_f) W_dec[f], at every non-BOS position
    expected = x[1:] + (12.0 - acts[1:, f : f + 1]) * sae.W_dec[f]
    torch.testing.assert_close(y[1:], expected, rtol=1e-5, atol=1e-5)
    assert torch.equal(y[0], x[0])
    # the same edit written as the SAE sees it: its reconstruction with f set to 12, plus its error
    codes = sae.encode(x[1:])
    error = x[1:] - sae.decode(codes)
    codes[:, f] = 12.0
    torch.testing.assert_close(y[1:], sae.decode(codes) + error, rtol=1e-5, atol=1e-4)


def test_ablating_an_inactive_feature_changes_nothing(tiny_model, sae):
    tokens = tiny_model.to_tokens(PROMPT)
    f, acts = active_feature(tiny_model, sae, tokens, inactive=True)
    assert (acts[1:, f] == 0).all()
    x, y, logits = run_steered(tiny_model, tokens, [Steer(sae, f, mode="ablate")])
    assert torch.equal(x, y)
    with torch.no_grad():
        assert torch.equal(logits, tiny_model(tokens))


def test_ablating_an_active_feature_zeroes_it(tiny_model, sae):
    tokens = tiny_model.to_tokens(PROMPT)
    f, _ = active_feature(tiny_model, sae, tokens)
    _, y, _ = run_steered(tiny_model, tokens, [Steer(sae, f, mode="ablate")])
    assert (sae.encode(y[1:])[:, f] < 1e-3).all()


def test_several_features_on_several_layers(tiny_model, sae, tmp_path, tiny_acts):
    from scope import testing as fixtures

    with torch.no_grad():
        _, cache = tiny_model.run_with_cache(PROMPT, names_filter="blocks.0.hook_resid_post")
    folder = tmp_path / "t-res" / "layer_0" / "width_64" / "average_l0_3"
    fixtures.write_params(
        folder, fixtures.gemma_scope_params(cache["blocks.0.hook_resid_post"][0, 1:], 64)
    )
    early = load_sae(folder, device="cpu")
    tokens = tiny_model.to_tokens(PROMPT)
    steers = [
        Steer(sae, 7, strength=2.0),
        Steer(sae, 9, strength=-1.0),
        Steer(early, 5, strength=4.0),
    ]
    hooks = build_hooks(steers, tokens.shape[1])
    assert sorted(h for h, _ in hooks) == ["blocks.0.hook_resid_post", HOOK]
    with torch.no_grad(), tiny_model.hooks(fwd_hooks=hooks):
        steered = tiny_model(tokens)
    with torch.no_grad():
        plain = tiny_model(tokens)
    assert (steered - plain).abs().max() > 1e-3


def test_hooks_removed_after_exception(tiny_model, sae):
    tokens = tiny_model.to_tokens(PROMPT)
    with torch.no_grad():
        before = tiny_model(tokens)

    class Boom(Exception):
        pass

    def explode(act, hook):
        raise Boom

    with pytest.raises(Boom), torch.no_grad():
        hooks = build_hooks([Steer(sae, 7, strength=50.0)], tokens.shape[1])
        with tiny_model.hooks(fwd_hooks=[*hooks, ("blocks.3.hook_resid_post", explode)]):
            tiny_model(tokens)
    with pytest.raises(Boom):
        list(generate(tiny_model, tokens, Sampling(max_new_tokens=3),
                      [*build_hooks([Steer(sae, 7, strength=50.0)], tokens.shape[1]), ("blocks.3.hook_resid_post", explode)]))  # fmt: skip
    assert all(len(hp.fwd_hooks) == 0 for hp in tiny_model.hook_dict.values())
    with torch.no_grad():
        assert torch.equal(tiny_model(tokens), before)


def test_kv_cache_generation_equals_full_recompute(tiny_model, sae):
    """Greedy generation with the KV cache (and steering hooks) equals recomputing the whole
    sequence each step."""
    tokens = tiny_model.to_tokens(PROMPT)
    steer = [Steer(sae, 7, strength=6.0, positions="all")]
    got = list(
        generate(
            tiny_model,
            tokens,
            Sampling(max_new_tokens=12, temperature=0.0),
            build_hooks(steer, tokens.shape[1]),
        )
    )
    seq = tokens
    for _ in range(12):
        with torch.no_grad(), tiny_model.hooks(fwd_hooks=build_hooks(steer, tokens.shape[1])):
            nxt = tiny_model(seq)[0, -1].argmax()
        seq = torch.cat([seq, nxt.view(1, 1)], dim=1)
    assert got == seq[0, tokens.shape[1] :].tolist()


def test_compare_same_seed_and_sampling(tiny_model, sae):
    zero = compare(tiny_model, PROMPT, [Steer(sae, 7, strength=0.0)], seed=3, max_new_tokens=15)
    assert zero.baseline_tokens == zero.steered_tokens  # a zero steer is the baseline exactly
    again = compare(tiny_model, PROMPT, [Steer(sae, 7, strength=0.0)], seed=3, max_new_tokens=15)
    assert again.baseline_tokens == zero.baseline_tokens
    strong = compare(tiny_model, PROMPT, [Steer(sae, 7, strength=40.0)], seed=3, max_new_tokens=15)
    assert (
        strong.baseline_tokens == zero.baseline_tokens
        and strong.steered_tokens != strong.baseline_tokens
    )
    streamed: list[tuple[str, int]] = []
    compare(tiny_model, PROMPT, [Steer(sae, 7, strength=40.0)], seed=3, max_new_tokens=15,
            on_token=lambda which, t: streamed.append((which, t)))  # fmt: skip
    assert [t for w, t in streamed if w == "steered"] == strong.steered_tokens


def test_chat_template_for_it_models(tiny_model):
    raw = prompt_tokens(tiny_model, "hi there", chat=False, max_new_tokens=5)
    chat = prompt_tokens(tiny_model, "hi there", chat=True, max_new_tokens=5)
    text = tiny_model.tokenizer.decode(chat[0])
    assert text.startswith(
        "<bos><start_of_turn>user\nhi there<end_of_turn>\n<start_of_turn>model\n"
    )
    assert raw[0, 0] == tiny_model.tokenizer.bos_token_id and chat.shape[1] > raw.shape[1]
    tiny_model.scope_source, saved = "google/gemma-2-2b-it", tiny_model.scope_source
    try:
        assert torch.equal(prompt_tokens(tiny_model, "hi there", chat=None, max_new_tokens=5), chat)
    finally:
        tiny_model.scope_source = saved


@pytest.mark.parametrize(
    "make,pattern",
    [
        (
            lambda sae: Steer(sae, 256, strength=1.0),
            r"feature 256 is out of range: L2.res.256 has features 0..255",
        ),
        (lambda sae: Steer(sae, -1), r"out of range"),
        (lambda sae: Steer(sae, 3, strength=math.nan), r"strength nan is not a finite number"),
        (lambda sae: Steer(sae, 3, strength=math.inf), r"strength inf is not a finite number"),
        (lambda sae: Steer(sae, 3, strength=1e6), r"strength 1000000.0 is absurd"),
        (lambda sae: Steer(sae, 3, mode="boost"), r"mode 'boost' is not one of add, clamp, ablate"),
        (lambda sae: Steer(sae, 3, unit="max"), None),
    ],
)
def test_bad_steers(sae, make, pattern):
    if pattern is None:
        with pytest.raises(ScopeError, match=r"unit 'max' needs a recorded store"):
            build_hooks([make(sae)], 3)
    else:
        with pytest.raises(ScopeError, match=pattern):
            make(sae)


def test_bad_prompts(tiny_model, sae):
    with pytest.raises(ScopeError, match="the prompt is empty"):
        compare(tiny_model, "  ", [Steer(sae, 1, strength=1.0)])
    with pytest.raises(ScopeError, match=r"> the model's context of 256"):
        compare(tiny_model, "word " * 300, [Steer(sae, 1, strength=1.0)])
    with pytest.raises(ScopeError, match="max_new_tokens 0 must be at least 1"):
        Sampling(max_new_tokens=0)


def test_sweep_metrics_and_saved_experiment(tiny_model, sae, tmp_path):
    tokens = tiny_model.to_tokens(PROMPT)
    f, _ = active_feature(tiny_model, sae, tokens)
    result = sweep(tiny_model, PROMPT, Steer(sae, f), parse_strengths("0:40:20"),
                   sampling=Sampling(max_new_tokens=12, temperature=0.0), save_to=tmp_path)  # fmt: skip
    by = {p.strength: p for p in result.points}
    assert list(by) == [0.0, 20.0, 40.0]
    assert by[0.0].kl == pytest.approx(0.0, abs=1e-6) and by[0.0].text == result.baseline
    assert by[0.0].target_act == pytest.approx(by[0.0].text_act, rel=1e-6)
    # positive steering raises the feature downstream, and moves the distribution away
    assert by[0.0].target_act < by[20.0].target_act < by[40.0].target_act
    assert by[40.0].kl > by[20.0].kl > 0
    assert all(np.isfinite(p.loss) for p in result.points)
    saved = list((tmp_path / "experiments").glob("*.parquet"))
    assert len(saved) == 1
    import pyarrow.parquet as pq

    table = pq.read_table(saved[0])
    assert table.num_rows == 3 and set(table.column_names) >= {
        "strength",
        "target_act",
        "kl",
        "loss",
        "text",
    }
    fig = result.figure()
    assert len(fig.data) == 3 and list(fig.data[0].x) == [0.0, 20.0, 40.0]


def test_parse_strengths():
    assert parse_strengths("-20:80:10") == [-20.0 + 10 * i for i in range(11)]
    assert parse_strengths("0,4,8") == [0.0, 4.0, 8.0]
    with pytest.raises(ScopeError, match="START:STOP:STEP"):
        parse_strengths("1:2:0")


def test_max_unit_uses_the_recorded_max(tiny_model, sae, tmp_path):
    from scope import testing as fixtures

    from scope.corpus import CorpusSpec
    from scope.record import RecordSettings, record
    from scope.store import Store

    corpus = tmp_path / "c.txt"
    corpus.write_text(" ".join(fixtures.training_text()[:20]))
    record(tiny_model, [sae], CorpusSpec(paths=(str(corpus),), ctx=32, max_tokens=600), tmp_path / "s",
           RecordSettings(ctx=32, batch_size=8))  # fmt: skip
    store = Store(tmp_path / "s")
    f = store.sql(
        "select feature from features where sae = 'L2.res.256' order by max desc limit 1"
    ).fetchall()[0][0]
    top = store.feature(f"L2.res.256/{f}").max
    tokens = tiny_model.to_tokens(PROMPT)
    x, y, _ = run_steered(
        tiny_model, tokens, [Steer(sae, f, strength=2.0, unit="max")], store=store
    )
    unit = sae.W_dec[f] / sae.W_dec[f].norm()
    torch.testing.assert_close(
        (y - x)[1:], (2.0 * top * unit).expand_as(x[1:]), rtol=1e-5, atol=1e-4
    )
    dead = store.sql(
        "select feature from features where sae = 'L2.res.256' and count = 0"
    ).fetchall()
    if dead:
        with pytest.raises(ScopeError, match="never fired"):
            build_hooks([Steer(sae, dead[0][0], strength=1.0, unit="max")], 3, store)


def test_cli_steer_and_sweep(tiny_dir, tiny_sae_dir, tmp_path):
    import os
    import subprocess
    import sys

    scope = os.path.join(os.path.dirname(sys.executable), "scope")
    env = {**os.environ, "COLUMNS": "200"}
    common = [
        "--model",
        str(tiny_dir),
        "--sae",
        str(tiny_sae_dir),
        "--prompt",
        PROMPT,
        "--max-new-tokens",
        "8",
    ]
    out = subprocess.run([scope, "steer", *common, "--feature", "7", "--strength", "30"],
                         capture_output=True, text=True, timeout=300, env=env)  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]
    assert "baseline" in out.stdout and "steered: L2.res.256/7 add 30" in out.stdout
    out = subprocess.run([scope, "sweep", *common, "--feature", "7", "--strengths", "0,20", "--out",
                          str(tmp_path), "--plot", str(tmp_path / "s.html")],
                         capture_output=True, text=True, timeout=300, env=env)  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]
    assert (tmp_path / "s.html").stat().st_size > 1000 and list(
        (tmp_path / "experiments").glob("*.parquet")
    )
    bad = subprocess.run([scope, "steer", *common, "--feature", "999", "--strength", "1"],
                         capture_output=True, text=True, timeout=300, env=env)  # fmt: skip
    assert bad.returncode == 2 and "feature 999 is out of range" in bad.stderr
    nan = subprocess.run([scope, "steer", *common, "--feature", "3", "--strength", "nan"],
                         capture_output=True, text=True, timeout=300, env=env)  # fmt: skip
    assert nan.returncode == 2 and "not a finite number" in nan.stderr


def test_example_scripts_run(tiny_dir, tiny_sae_dir, tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent / "scripts"
    gg = subprocess.run([sys.executable, str(root / "golden_gate.py"), "--model", str(tiny_dir), "--sae",
                         str(tiny_sae_dir), "--max-new-tokens", "8"], capture_output=True, text=True, timeout=300)  # fmt: skip
    assert gg.returncode == 0, gg.stderr[-2000:]
    assert "baseline:" in gg.stdout and "steered:" in gg.stdout and "feature " in gg.stdout
    sw = subprocess.run([sys.executable, str(root / "strength_sweep.py"), "--model", str(tiny_dir), "--sae",
                         str(tiny_sae_dir), "--feature", "7", "--strengths", "0:20:10", "--max-new-tokens", "6",
                         "--out", str(tmp_path)], capture_output=True, text=True, timeout=300)  # fmt: skip
    assert sw.returncode == 0, sw.stderr[-2000:]
    assert (tmp_path / "sweep.html").is_file() and len(sw.stdout.splitlines()) >= 4
