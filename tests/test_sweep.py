"""Batched sweeps: every row of a batch gives what its own sequential run gives.

On the machine these were written on, the tiny model's logits for a row alone and inside a
batch are bitwise equal, but that is not portable (another x86 CPU's kernels differed by ~2e-6
between batch shapes). So the tests compare greedy tokens exactly (on this fixture the top two
logits are never that close) and metrics within 1e-5 relative; steering math that does not
depend on the batch shape (add) is compared bitwise.
"""

from __future__ import annotations

from dataclasses import replace
from types import SimpleNamespace

import pytest
import torch

from scope import ScopeError, load_sae
from scope import testing as fixtures
from scope.generate import Sampling, generate, generate_rows, prompt_tokens
from scope.steer import Steer, build_hooks, build_row_hooks
from scope.sweep import measure, measure_rows, sweep

HOOK = "blocks.2.hook_resid_post"
LAYER1 = "blocks.1.hook_resid_post"
PROMPT = "The river ran fast under the old stone bridge"
CLOSE = {"rel": 1e-5, "abs": 1e-6}


@pytest.fixture(scope="module")
def sae(tiny_sae_dir):
    return load_sae(tiny_sae_dir, device="cpu")


@pytest.fixture(scope="module")
def layer1(tiny_model, tmp_path_factory):
    """A 128-wide SAE at layer 1 (another hook than ``sae``'s)."""
    with torch.no_grad():
        _, cache = tiny_model.run_with_cache(PROMPT * 2, names_filter=LAYER1)
    folder = tmp_path_factory.mktemp("l1") / "t-res" / "layer_1" / "width_128" / "average_l0_9"
    fixtures.write_params(folder, fixtures.gemma_scope_params(cache[LAYER1][0, 1:], 128))
    return load_sae(folder, device="cpu")


@pytest.fixture(scope="module")
def tokens(tiny_model):
    return prompt_tokens(tiny_model, PROMPT, False, 16)


def sequential(model, tokens, sampling, rows):
    """Each row generated on its own, the way a sweep ran before it was batched."""
    return [list(generate(model, tokens, sampling, row)) for row in rows]


def assert_metrics_close(got, want):
    for g, w in zip(got, want, strict=True):
        assert g.keys() == w.keys()
        for name in g:
            assert g[name] == pytest.approx(w[name], **CLOSE), name


def test_row_hooks_apply_each_rows_strength(tiny_model, sae):
    """Per-row steering at a hook equals steering each row alone: bitwise for add (elementwise
    math), within rounding for clamp (an SAE encode, a matmul whose kernel may depend on the
    batch shape). Rows 0, 2, 3 share one add (not consecutive: the gather path) and row 2
    clamps a second feature after it."""
    with torch.no_grad():
        _, cache = tiny_model.run_with_cache(PROMPT, names_filter=HOOK)
    x = cache[HOOK]  # [1, pos, d]
    rows = [
        [Steer(sae, 7, strength=3.0)],
        [],
        [Steer(sae, 7, strength=-2.0), Steer(sae, 11, strength=5.0, mode="clamp")],
        [Steer(sae, 7, strength=7.5, positions="generated")],
        [Steer(sae, 7, strength=1.0, unit="norm")],
    ]
    ((name, fn),) = build_row_hooks(rows, prompt_len=4)
    assert name == HOOK and len(fn.groups) == 4  # add, add (generated), add (norm), clamp
    point = SimpleNamespace(name=HOOK)
    batched = fn(x.repeat(len(rows), 1, 1), point)
    for i, row in enumerate(rows):
        alone = x.clone()
        for _, one in build_hooks(row, prompt_len=4):
            alone = one(alone, point)
        if any(s.mode == "clamp" for s in row):
            torch.testing.assert_close(batched[i], alone[0], rtol=1e-6, atol=1e-5)
            assert not torch.equal(alone, x)
        else:
            assert torch.equal(batched[i], alone[0]), f"row {i}"
    assert torch.equal(batched[1], x[0])  # the unsteered row is untouched
    assert not torch.equal(batched[3, :4], batched[0, :4])  # row 3 steers generated only
    assert torch.equal(batched[3, :4], x[0, :4])
    with pytest.raises(ScopeError, match="built for 5 rows but the batch has 2"):
        build_row_hooks(rows, prompt_len=4)[0][1](x.repeat(2, 1, 1), point)


def test_greedy_rows_equal_sequential_runs(tiny_model, sae, layer1, tokens):
    """A batch mixing strengths, modes and hooks (and an unsteered row) gives each row the
    tokens its own generation gives."""
    sampling = Sampling(max_new_tokens=16, temperature=0.0, stop_at_eos=False)
    rows = [[], *([Steer(sae, 7, strength=s)] for s in (0.0, 15.0, 20.0, 25.0))]
    rows += [[Steer(sae, 7, strength=25.0, mode="clamp")], [Steer(layer1, 5, strength=40.0)]]
    rows += [[Steer(layer1, 5, strength=40.0), Steer(sae, 7, mode="ablate")]]
    got = generate_rows(tiny_model, tokens, sampling, rows)
    want = sequential(tiny_model, tokens, sampling, rows)
    assert got == want
    assert all(len(g) == 16 for g in got) and len({tuple(g) for g in got}) >= 4


def test_sampled_rows_draw_what_their_sequential_runs_draw(tiny_model, sae, tokens, monkeypatch):
    """Each row has its own generator: row i with seed s draws exactly the numbers a run with
    seed s draws, and so samples the same tokens (temperature, top-p and frequency penalty)."""
    import scope.generate

    sampling = Sampling(max_new_tokens=14, temperature=1.0, top_p=0.9, freq_penalty=0.5,
                        stop_at_eos=False)  # fmt: skip
    rows = [[], [Steer(sae, 7, strength=20.0)], [Steer(sae, 7, strength=20.0)], [Steer(sae, 9)]]
    seeds = [3, 3, 4, 3]
    draws: list[torch.Tensor] = []
    real = scope.generate.sample_rows

    def spy(logits, sampling, u, counts=None):
        draws.append(u.clone())
        return real(logits, sampling, u, counts)

    monkeypatch.setattr(scope.generate, "sample_rows", spy)
    got = generate_rows(tiny_model, tokens, sampling, rows, seeds=seeds)
    columns = torch.stack(draws, dim=1)  # [rows, steps]
    monkeypatch.undo()
    for i, seed in enumerate(seeds):
        expected = torch.rand(
            14, generator=torch.Generator().manual_seed(seed), dtype=torch.float64
        )
        assert torch.equal(columns[i], expected)
        assert got[i] == list(generate(tiny_model, tokens, replace(sampling, seed=seed), rows[i]))
    assert got[1] != got[2] and got[0] != got[1]  # the seed and the steer both matter
    with pytest.raises(ScopeError, match="3 seeds for 4 rows"):
        generate_rows(tiny_model, tokens, sampling, rows, seeds=[1, 2, 3])


def test_rows_stop_at_their_end_token(tiny_model, sae, tokens, monkeypatch):
    """A row that makes an end token stops there (nothing after it is kept) while the others
    go on; ragged continuations are measured as each alone."""
    import scope.generate

    free = Sampling(max_new_tokens=12, temperature=0.0, stop_at_eos=False)
    steers = [Steer(sae, 7, strength=s) for s in (0.0, 15.0, 30.0, 45.0, 90.0)]
    rows = [[s] for s in steers]
    unstopped = sequential(tiny_model, tokens, free, rows)
    end = unstopped[2][3]  # row 2 ends at its 4th token; others where (if) they make it
    monkeypatch.setattr(scope.generate, "end_tokens", lambda tokenizer: {end})
    stopping = replace(free, stop_at_eos=True)
    got = generate_rows(tiny_model, tokens, stopping, rows)
    assert got == sequential(tiny_model, tokens, stopping, rows)
    for g, u in zip(got, unstopped, strict=True):
        cut = u.index(end) + 1 if end in u else len(u)
        assert g == u[:cut]
    assert len(got[2]) <= 4 and len({len(g) for g in got}) > 1 and max(map(len, got)) == 12
    batched = measure_rows(tiny_model, tokens, got, steers)
    assert_metrics_close(
        batched, [measure(tiny_model, tokens, c, s) for c, s in zip(got, steers, strict=True)]
    )


def test_sweep_equals_its_points_run_one_by_one(tiny_model, sae, layer1, tokens):
    """A sweep over strengths, two modes and two SAEs (two hooks), in one batch and in batches
    of 5 rows: each point's tokens equal its own generation, its metrics ``measure`` of it."""
    sampling = Sampling(max_new_tokens=10, temperature=0.0)
    strengths = [0.0, 15.0, 20.0]
    base = Steer(sae, 7)
    one = sweep(tiny_model, PROMPT, base, strengths, modes=["add", "clamp"], saes=[sae, layer1],
                sampling=sampling)  # fmt: skip
    fives = sweep(tiny_model, PROMPT, base, strengths, modes=["add", "clamp"], saes=[sae, layer1],
                  sampling=sampling, batch_size=5)  # fmt: skip
    assert len(one.points) == 12
    assert one.baseline == tiny_model.tokenizer.decode(
        list(generate(tiny_model, tokens, sampling)), skip_special_tokens=True
    )
    assert fives.baseline == one.baseline
    for p, q in zip(one.points, fives.points, strict=True):
        steer = replace(
            base, sae=sae if p.hook == HOOK else layer1, mode=p.mode, strength=p.strength
        )
        cont = list(generate(tiny_model, tokens, sampling, [steer]))
        assert p.tokens == q.tokens == cont
        want = measure(tiny_model, tokens, cont, steer)
        for name, value in want.items():
            assert getattr(p, name) == pytest.approx(value, **CLOSE)
            assert getattr(q, name) == pytest.approx(value, **CLOSE)
    assert len({tuple(p.tokens) for p in one.points}) >= 3


def test_sweep_batch_size_is_checked(tiny_model, sae):
    for bad in (0, -3, 2.5, True):
        with pytest.raises(ScopeError, match=f"batch size {bad!r} must be a whole number"):
            sweep(tiny_model, PROMPT, Steer(sae, 7), [1.0], batch_size=bad)


def test_a_given_max_is_its_own_saes_only(tiny_model, sae, layer1, tokens):
    """Unit max across SAEs: the steer's ``max_act`` is its own feature's; the other SAE's
    point needs its own max (a store), never the first SAE's number."""
    steer = Steer(sae, 7, 2.0, unit="max", max_act=3.0)
    with pytest.raises(ScopeError, match=r"L1\.res\.128/7: unit 'max' needs a recorded store"):
        sweep(tiny_model, PROMPT, steer, [2.0], saes=[sae, layer1],
              on_point=lambda *a: pytest.fail("a point ran"))  # fmt: skip
    sampling = Sampling(max_new_tokens=4, temperature=0.0)
    (point,) = sweep(tiny_model, PROMPT, steer, [2.0], sampling=sampling).points
    # the point ran with the number it was given (no store anywhere)
    assert point.tokens == list(generate(tiny_model, tokens, sampling, [steer]))
    assert point.spec().unit == "max" and point.strength == 2.0
