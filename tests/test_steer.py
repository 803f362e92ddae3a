"""Steering changes exactly what it says, at exactly the positions it says, and nothing else;
generation is seeded per run and never touches the global RNG."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from scope import ScopeError, load_sae
from scope import testing as fixtures
from scope.acts import encode, site_input
from scope.generate import (
    Sampling,
    compare,
    generate,
    prompt_tokens,
    sample_token,
    text_stream,
)
from scope.steer import Steer, build_hooks, steering
from scope.steer_spec import with_maxes
from scope.sweep import parse_strengths, sweep

HOOK = "blocks.2.hook_resid_post"
EARLY = "blocks.0.hook_resid_post"
PROMPT = "The river ran fast under the old stone bridge"


@pytest.fixture(scope="module")
def sae(tiny_sae_dir):
    return load_sae(tiny_sae_dir, device="cpu")


@pytest.fixture(scope="module")
def early(tiny_model, tmp_path_factory):
    """A 64-wide SAE at layer 0."""
    with torch.no_grad():
        _, cache = tiny_model.run_with_cache(PROMPT, names_filter=EARLY)
    folder = tmp_path_factory.mktemp("early") / "t-res" / "layer_0" / "width_64" / "average_l0_3"
    fixtures.write_params(folder, fixtures.gemma_scope_params(cache[EARLY][0, 1:], 64))
    return load_sae(folder, device="cpu")


@pytest.fixture(scope="module")
def l0_store(tiny_model, sae, tiny_acts, tmp_path_factory):
    """A store that recorded two L0 variants of the layer-2 SAE: keys L2.res.256.l0_13 (``sae``)
    and L2.res.256.l0_4. Returns its folder and the sparse SAE."""
    from scope.corpus import CorpusSpec
    from scope.record import RecordSettings, record

    root = tmp_path_factory.mktemp("l0store")
    sparse = root / "tiny-scope-res" / "layer_2" / "width_256" / "average_l0_4"
    params = fixtures.gemma_scope_params(tiny_acts, 256, firing_rate=0.01, seed=9)
    # decoder rows of norm 0.3-3 (as SAEs trained without a norm constraint have), the
    # encoder scaled back so every feature's write is what it was
    scale = np.random.default_rng(9).uniform(0.3, 3.0, 256).astype(np.float32)
    params["W_dec"] = params["W_dec"] * scale[:, None]
    for name in ("b_enc", "threshold"):
        params[name] = params[name] / scale
    params["W_enc"] = params["W_enc"] / scale[None, :]
    fixtures.write_params(sparse, params)
    sparse_sae = load_sae(sparse, device="cpu")
    corpus = root / "c.txt"
    corpus.write_text(" ".join(fixtures.training_text()[:20]))
    record(tiny_model, [sae, sparse_sae], CorpusSpec(paths=(str(corpus),), ctx=32, max_tokens=600),
           root / "s", RecordSettings(ctx=32, batch_size=8))  # fmt: skip
    return root / "s", sparse_sae


def unit(sae, f):
    return sae.W_dec[f] / sae.W_dec[f].norm()


def run_steered(model, tokens, steers, prompt_len=None, hooks=(HOOK,)):
    """Each hook's input and output under ``steers`` (capture hooks around the steering hooks),
    as {hook: (x, y)} [pos, d] for several hooks, or (x, y) for one; and the logits."""
    seen: dict[tuple[str, str], torch.Tensor] = {}

    def grab(which):
        def fn(act, hook):
            seen[hook.name, which] = act.detach().clone()

        return fn

    with (
        torch.no_grad(),
        model.hooks(fwd_hooks=[(h, grab("in")) for h in hooks]),
        steering(model, steers, prompt_len=prompt_len or tokens.shape[1]),
        model.hooks(fwd_hooks=[(h, grab("out")) for h in hooks]),
    ):
        logits = model(tokens)
    got = {h: (seen[h, "in"][0], seen[h, "out"][0]) for h in hooks}
    return (*got[HOOK], logits) if tuple(hooks) == (HOOK,) else (got, logits)


def hook_input(model, tokens, hook=HOOK):
    """The activation at ``hook`` in a plain forward pass, [1, pos, d]."""
    with torch.no_grad():
        _, cache = model.run_with_cache(tokens, names_filter=hook)
    return cache[hook]


def active_feature(model, sae, tokens, inactive=False):
    """The feature firing on the most (or fewest) non-BOS positions, and the codes [pos - 1,
    d_sae] read exactly as a steer on every position reads them: ``encode`` of x[:, 1:]."""
    acts = encode(sae, site_input(hook_input(model, tokens))[:, 1:])[0]
    fired = (acts > 0).sum(0)
    return int(fired.argmin() if inactive else fired.argmax()), acts


def no_hooks(model):
    """No hook on any hook point, transformer-lens' or plain PyTorch ones."""
    return all(not hp.fwd_hooks and not hp._forward_hooks for hp in model.hook_dict.values())


@pytest.mark.parametrize("positions", ["all", "prompt"])
def test_add_changes_exactly_strength_times_unit_direction(tiny_model, sae, positions):
    tokens = tiny_model.to_tokens(PROMPT)
    x, y, _ = run_steered(tiny_model, tokens, [Steer(sae, 7, strength=3.5, positions=positions)])
    delta = y - x
    assert torch.equal(delta[0], torch.zeros_like(delta[0]))  # never BOS
    torch.testing.assert_close(delta[1:], (3.5 * unit(sae, 7)).expand_as(delta[1:]), rtol=0, atol=1e-5)  # fmt: skip


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
    expected = 0.5 * x[1:].norm(dim=-1, keepdim=True) * unit(sae, 3)
    torch.testing.assert_close((y - x)[1:], expected, rtol=1e-5, atol=1e-5)


def test_clamp_to_own_value_changes_nothing(tiny_model, sae):
    """The hook reads a_f with ``encode`` on x[:, 1:2] of its activation: the same function on
    the same tensor gives the value, so the clamp adds exactly zero and the logits are equal."""
    bos = tiny_model.tokenizer.bos_token_id
    tokens = torch.tensor([[bos, tiny_model.to_tokens("river")[0, 1]]])  # one steered position
    f, _ = active_feature(tiny_model, sae, tokens)
    value = float(encode(sae, site_input(hook_input(tiny_model, tokens))[:, 1:2])[0, 0, f])
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
    expected = x[1:] + (12.0 - acts[:, f : f + 1]) * sae.W_dec[f]
    torch.testing.assert_close(y[1:], expected, rtol=1e-5, atol=1e-5)
    assert torch.equal(y[0], x[0])
    # the same edit written as the SAE sees it: its reconstruction with f set to 12, plus its error
    codes = encode(sae, x[1:])
    error = x[1:] - sae.decode(codes)
    codes[:, f] = 12.0
    torch.testing.assert_close(y[1:], sae.decode(codes) + error, rtol=1e-5, atol=1e-4)


def test_ablating_an_inactive_feature_changes_nothing(tiny_model, sae):
    tokens = tiny_model.to_tokens(PROMPT)
    f, acts = active_feature(tiny_model, sae, tokens, inactive=True)
    assert (acts[:, f] == 0).all()  # read as the hook reads it
    x, y, logits = run_steered(tiny_model, tokens, [Steer(sae, f, mode="ablate")])
    assert torch.equal(x, y)
    with torch.no_grad():
        assert torch.equal(logits, tiny_model(tokens))


def test_ablating_an_active_feature_zeroes_it(tiny_model, sae):
    tokens = tiny_model.to_tokens(PROMPT)
    f, _ = active_feature(tiny_model, sae, tokens)
    _, y, _ = run_steered(tiny_model, tokens, [Steer(sae, f, mode="ablate")])
    assert (encode(sae, y[1:])[:, f] < 1e-3).all()


def test_several_features_on_several_layers(tiny_model, sae, early):
    """Five steers on two layers, with prompt and generated positions in one forward pass:
    each hook's output is its input plus exactly each of its steers' deltas, in order."""
    tokens = tiny_model.to_tokens(PROMPT)
    n = tokens.shape[1]
    p = n - 3  # the last three positions count as generated
    f, _ = active_feature(tiny_model, sae, tokens)
    steers = [
        Steer(sae, 7, strength=2.0),
        Steer(early, 6, strength=0.5, unit="norm"),
        Steer(sae, 9, strength=-1.0, positions="prompt"),
        Steer(early, 5, strength=4.0, positions="generated"),
        Steer(sae, f, strength=12.0, mode="clamp", positions="generated"),
    ]
    assert sorted(h for h, _ in build_hooks(steers, p)) == [EARLY, HOOK]
    got, logits = run_steered(tiny_model, tokens, steers, prompt_len=p, hooks=(EARLY, HOOK))
    x0, y0 = got[EARLY]
    want0 = x0.clone()
    want0[1:] += 0.5 * x0[1:].norm(dim=-1, keepdim=True) * unit(early, 6)
    want0[p:] += 4.0 * unit(early, 5)
    torch.testing.assert_close(y0, want0, rtol=0, atol=1e-5)
    x2, y2 = got[HOOK]
    assert not torch.equal(x2, hook_input(tiny_model, tokens)[0])  # layer 0's steers reach it
    want2 = x2.clone()
    want2[1:] += 2.0 * unit(sae, 7)
    want2[1:p] -= 1.0 * unit(sae, 9)
    before_clamp = want2[p:].clone()
    want2[p:] += (12.0 - encode(sae, before_clamp)[:, f : f + 1]) * sae.W_dec[f]
    torch.testing.assert_close(y2, want2, rtol=0, atol=1e-5)
    assert torch.equal(y0[0], x0[0]) and torch.equal(y2[0], x2[0])  # never BOS
    with torch.no_grad():
        assert not torch.equal(logits, tiny_model(tokens))
    assert no_hooks(tiny_model)


def test_steering_twice_gives_identical_results(tiny_model, sae):
    """Each ``with steering`` is a fresh run: the second use steers the same positions (the
    two generated ones), not positions shifted by what the first use saw."""
    tokens = torch.cat([tiny_model.to_tokens(PROMPT), torch.tensor([[11, 12]])], dim=1)
    p = tokens.shape[1] - 2
    steers = [Steer(sae, 7, strength=3.5, positions="generated")]
    runs = [run_steered(tiny_model, tokens, steers, prompt_len=p) for _ in range(2)]
    for x, y, logits in runs:
        changed = (y - x).abs().sum(-1) > 0
        assert changed.tolist() == [False] * p + [True, True]
        assert torch.equal(logits, runs[0][2])


def test_a_second_sequence_in_one_run_is_refused(tiny_model, sae):
    tokens = tiny_model.to_tokens(PROMPT)
    with (
        torch.no_grad(),
        steering(tiny_model, [Steer(sae, 7, strength=3.5)], prompt_len=tokens.shape[1]),
    ):
        tiny_model(tokens)
        with pytest.raises(ScopeError, match="that is a new sequence"):
            tiny_model(tokens)
    assert no_hooks(tiny_model)


@pytest.mark.parametrize("positions", ["all", "generated"])
def test_kv_cache_generation_equals_full_recompute(tiny_model, sae, positions):
    """Greedy generation with the KV cache (and steering hooks) equals recomputing the whole
    sequence each step, also for a second generation with the same steers."""
    tokens = tiny_model.to_tokens(PROMPT)
    steer = [Steer(sae, 7, strength=30.0, positions=positions)]
    sampling = Sampling(max_new_tokens=12, temperature=0.0, stop_at_eos=False)
    first = list(generate(tiny_model, tokens, sampling, steer))
    second = list(generate(tiny_model, tokens, sampling, steer))
    seq = tokens
    for _ in range(12):
        with torch.no_grad(), steering(tiny_model, steer, prompt_len=tokens.shape[1]):
            nxt = tiny_model(seq)[0, -1].argmax()
        seq = torch.cat([seq, nxt.view(1, 1)], dim=1)
    assert first == second == seq[0, tokens.shape[1] :].tolist()
    plain = list(generate(tiny_model, tokens, sampling))
    assert plain != first


def test_generate_is_seeded_per_run_and_leaves_the_global_rng_alone(tiny_model, sae):
    tokens = tiny_model.to_tokens(PROMPT)
    sampling = Sampling(max_new_tokens=16, temperature=1.0, top_p=None, seed=5, stop_at_eos=False)
    steer = [Steer(sae, 7, strength=20.0)]
    state = torch.get_rng_state()
    first = list(generate(tiny_model, tokens, sampling, steer))
    assert torch.equal(torch.get_rng_state(), state)
    torch.manual_seed(1234)  # the global seed plays no part
    assert list(generate(tiny_model, tokens, sampling, steer)) == first
    other = Sampling(max_new_tokens=16, temperature=1.0, top_p=None, seed=6, stop_at_eos=False)
    assert list(generate(tiny_model, tokens, other, steer)) != first


def test_baseline_and_steered_draw_the_same_numbers(tiny_model, sae, monkeypatch):
    import scope.generate

    draws: list[float] = []
    real = scope.generate.sample_rows

    def spy(logits, sampling, u, counts=None):
        draws.extend(u.tolist())
        return real(logits, sampling, u, counts)

    monkeypatch.setattr(scope.generate, "sample_rows", spy)
    sampling = Sampling(max_new_tokens=10, temperature=1.0, seed=3, stop_at_eos=False)
    result = compare(tiny_model, PROMPT, [Steer(sae, 7, strength=40.0)], sampling=sampling)
    assert result.steered_tokens != result.baseline_tokens
    expected = torch.rand(10, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    assert draws == expected.tolist() * 2


def test_sample_token():
    logits = torch.tensor([2.0, 1.0, 0.5, -1.0])
    greedy = Sampling(temperature=0.0, freq_penalty=5.0)
    assert sample_token(logits, greedy, 0.99, torch.tensor([9.0, 0, 0, 0])) == 0
    full = Sampling(temperature=1.0, top_p=None)
    cdf = logits.softmax(-1).cumsum(-1)
    for u in (0.0, 0.3, 0.7, 0.9, 0.97, 0.999999):
        assert sample_token(logits, full, u) == int((cdf <= u).sum())
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    cut = Sampling(temperature=1.0, top_p=0.6)  # keeps 0.5 and 0.3: 0.5 < 0.6 before the 0.3
    picks = {sample_token(probs.log(), cut, u) for u in np.linspace(0, 0.999999, 200)}
    assert picks == {0, 1}
    penalized = Sampling(temperature=1.0, top_p=None, freq_penalty=1.0)
    flat = torch.zeros(2)
    assert sample_token(flat, penalized, 0.5, torch.tensor([3.0, 0.0])) == 1  # p = .05, .95
    assert sample_token(flat, full, 0.4) == 0


def test_generation_is_plain_between_tokens(tiny_model, sae):
    """The steering hooks are on the model only during each forward pass: a consumer that
    stops or fails mid-stream leaves the model as it was."""
    tokens = tiny_model.to_tokens(PROMPT)
    with torch.no_grad():
        before = tiny_model(tokens)
    stream = generate(tiny_model, tokens, Sampling(max_new_tokens=5), [Steer(sae, 7, strength=9.0)])
    next(stream)
    assert no_hooks(tiny_model)

    class Boom(Exception):
        pass

    with pytest.raises(Boom):
        for _ in stream:
            raise Boom
    assert no_hooks(tiny_model)
    with torch.no_grad():
        assert torch.equal(tiny_model(tokens), before)


def test_hooks_removed_after_exception(tiny_model, sae):
    tokens = tiny_model.to_tokens(PROMPT)
    with torch.no_grad():
        before = tiny_model(tokens)

    class Boom(Exception):
        pass

    def explode(act, hook):
        raise Boom

    with (
        pytest.raises(Boom),
        torch.no_grad(),
        steering(tiny_model, [Steer(sae, 7, strength=50.0)], prompt_len=tokens.shape[1]),
        tiny_model.hooks(fwd_hooks=[("blocks.3.hook_resid_post", explode)]),
    ):
        tiny_model(tokens)
    assert no_hooks(tiny_model)
    with pytest.raises(Boom), tiny_model.hooks(fwd_hooks=[("blocks.3.hook_resid_post", explode)]):
        list(generate(tiny_model, tokens, Sampling(max_new_tokens=3), [Steer(sae, 7, strength=50.0)]))  # fmt: skip
    assert no_hooks(tiny_model)
    with torch.no_grad():
        assert torch.equal(tiny_model(tokens), before)


def test_text_stream_adds_up_to_the_decoded_text(tiny_model):
    tokens = tiny_model.to_tokens(PROMPT)
    out = list(generate(tiny_model, tokens, Sampling(max_new_tokens=20, temperature=1.0)))
    tok = tiny_model.tokenizer
    pieces = list(text_stream(tok, iter(out)))
    assert "".join(pieces) == tok.decode(out, skip_special_tokens=True)
    assert len(pieces) > 1 and all(pieces)


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
    assert strong.steers[0]["sae"] == "L2.res.256"


def test_chat_template_for_it_models(tiny_model):
    raw = prompt_tokens(tiny_model, "hi there", chat=False, max_new_tokens=5)
    chat = prompt_tokens(tiny_model, "hi there", chat=True, max_new_tokens=5)
    text = tiny_model.tokenizer.decode(chat[0])
    assert text.startswith(
        "<bos><start_of_turn>user\nhi there<end_of_turn>\n<start_of_turn>model\n"
    )
    assert raw[0, 0] == tiny_model.tokenizer.bos_token_id and chat.shape[1] > raw.shape[1]
    from scope.model import model_source, set_model_source

    saved = model_source(tiny_model)
    set_model_source(tiny_model, "google/gemma-2-2b-it")
    try:
        assert torch.equal(prompt_tokens(tiny_model, "hi there", chat=None, max_new_tokens=5), chat)
    finally:
        set_model_source(tiny_model, saved)


def test_a_write_that_swamps_the_activation_is_refused_at_the_first_forward(tiny_model, sae):
    """Absolute strengths are judged against the model's own scale: a steer may write at most
    50 times the median norm of the activation it is added to, however big the model's norms."""
    tokens = tiny_model.to_tokens(PROMPT)
    _, cache = tiny_model.run_with_cache(tokens, names_filter=HOOK)
    scale = float(cache[HOOK][0, 1:].norm(dim=-1).median())
    x, y, _ = run_steered(tiny_model, tokens, [Steer(sae, 3, strength=40 * scale)])
    assert float((y - x)[1:].norm(dim=-1).mean()) == pytest.approx(40 * scale, rel=1e-4)
    value = 60 * scale / float(sae.W_dec[3].norm())
    for steer in (Steer(sae, 3, strength=60 * scale), Steer(sae, 3, value, mode="clamp")):
        with pytest.raises(ScopeError, match=r"times the activation's norm there .*smaller"):
            run_steered(tiny_model, tokens, [steer])
    assert no_hooks(tiny_model)  # the refused run left no hook behind, TL's or torch's


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
        (lambda sae: Steer(sae, 3, strength=1e7), r"strength 10000000.0 is absurd"),
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


def test_bad_prompts_and_sampling(tiny_model, sae):
    with pytest.raises(ScopeError, match="the prompt is empty"):
        compare(tiny_model, "  ", [Steer(sae, 1, strength=1.0)])
    with pytest.raises(ScopeError, match=r"> the model's context of 256"):
        compare(tiny_model, "word " * 300, [Steer(sae, 1, strength=1.0)])
    with pytest.raises(ScopeError, match="max_new_tokens 0 must be at least 1"):
        Sampling(max_new_tokens=0)
    with pytest.raises(ScopeError, match="freq_penalty -1 must be 0"):
        Sampling(freq_penalty=-1)
    with pytest.raises(ScopeError, match="freq_penalty nan must be 0"):
        Sampling(freq_penalty=math.nan)
    with pytest.raises(ScopeError, match="not both"):
        compare(tiny_model, PROMPT, [], sampling=Sampling(), seed=2)
    with pytest.raises(ScopeError, match="unit 'max' needs a recorded store"):
        compare(tiny_model, PROMPT, [Steer(sae, 1, strength=1.0, unit="max")])


def test_sweep_metrics_and_saved_experiment(tiny_model, sae, tmp_path):
    tokens = tiny_model.to_tokens(PROMPT)
    f, _ = active_feature(tiny_model, sae, tokens)
    done: list[tuple[float, int, int]] = []
    result = sweep(tiny_model, PROMPT, Steer(sae, f), parse_strengths("0:40:20"),
                   sampling=Sampling(max_new_tokens=12, temperature=0.0), save_to=tmp_path,
                   on_point=lambda p, i, n: done.append((p.strength, i, n)))  # fmt: skip
    assert done == [(0.0, 0, 3), (20.0, 1, 3), (40.0, 2, 3)]
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


def test_sweep_checks_every_point_before_generating(tiny_model, sae):
    with pytest.raises(ScopeError, match="unit 'max' needs a recorded store"):
        sweep(tiny_model, PROMPT, Steer(sae, 3, unit="max"), [1.0],
              on_point=lambda *a: pytest.fail("a point ran"))  # fmt: skip


def test_parse_strengths():
    assert parse_strengths("-20:80:10") == [-20.0 + 10 * i for i in range(11)]
    assert parse_strengths("0,4,8") == [0.0, 4.0, 8.0]
    with pytest.raises(ScopeError, match="START:STOP:STEP"):
        parse_strengths("1:2:0")


def test_max_unit_uses_the_recorded_max(tiny_model, sae, l0_store):
    from scope.store import Store

    path, sparse = l0_store
    store = Store(path)
    for s, key in ((sae, "L2.res.256.l0_13"), (sparse, "L2.res.256.l0_4")):
        f = store.sql(
            "select feature from features where sae = ? order by max desc limit 1", [key]
        ).fetchall()[0][0]
        top = store.feature(f"{key}/{f}").max
        tokens = tiny_model.to_tokens(PROMPT)
        steers = with_maxes([Steer(s, f, strength=2.0, unit="max")], store)
        assert steers[0].max_act == pytest.approx(top)  # the number, read once from the store
        x, y, _ = run_steered(tiny_model, tokens, steers)
        # what the feature writes at twice its recorded max: the same whatever its row's norm
        torch.testing.assert_close(
            (y - x)[1:], (2.0 * top * s.W_dec[f]).expand_as(x[1:]), rtol=1e-5, atol=1e-4
        )
    assert not torch.allclose(sparse.W_dec.norm(dim=-1), torch.ones(256))
    dead = store.sql(
        "select feature from features where sae = 'L2.res.256.l0_13' and count = 0"
    ).fetchall()
    if dead:
        with pytest.raises(ScopeError, match="never fired"):
            with_maxes([Steer(sae, dead[0][0], strength=1.0, unit="max")], store)


def test_sweep_in_a_store_with_l0_variants_joins_its_features(tiny_model, sae, l0_store):
    """The sweep files its points under the store's key for the SAE (L2.res.256.l0_13, not
    the short L2.res.256), so experiments join features."""
    from scope.store import Store

    path, _ = l0_store
    steer = Steer(sae, 7)
    assert steer.describe(Store(path).saes)["sae"] == "L2.res.256.l0_13"
    assert steer.describe()["sae"] == "L2.res.256"
    result = sweep(tiny_model, PROMPT, steer, [0.0, 10.0], store=Store(path),
                   sampling=Sampling(max_new_tokens=4, temperature=0.0))  # fmt: skip
    assert {p.sae for p in result.points} == {"L2.res.256.l0_13"}
    store = Store(path)  # opened after the sweep is saved
    (joined,) = store.sql(
        "select count(*) from experiments e join features f on e.sae = f.sae and e.feature = f.feature"
    ).fetchone()
    assert joined == 2


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
    # the same steer as a SteerSpec, by the SAE's key: the same run
    spec = subprocess.run([scope, "steer", *common, "--steer", "L2.res.256/7:30"],
                          capture_output=True, text=True, timeout=300, env=env)  # fmt: skip
    assert spec.returncode == 0, spec.stderr[-2000:]
    assert spec.stdout == out.stdout
    out = subprocess.run([scope, "sweep", *common, "--feature", "7", "--strengths", "0,20", "--out",
                          str(tmp_path), "--plot", str(tmp_path / "s.html")],
                         capture_output=True, text=True, timeout=300, env=env)  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]
    assert (tmp_path / "s.html").stat().st_size > 1000 and list(
        (tmp_path / "experiments").glob("*.parquet")
    )
    bad = subprocess.run([scope, "steer", *common, "--feature", "999", "--strength", "1"],
                         capture_output=True, text=True, timeout=300, env=env)  # fmt: skip
    assert bad.returncode == 2 and "feature: 999 is out of range" in bad.stderr
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
