"""Generations of different prompts, settings and steers as one batch (``scope.batch``): each
row makes what ``generate`` makes for it alone.

Not bitwise: a batch (and left padding) makes the kernels sum in another order than one row
does, so logits differ from a lone run's in the last bits (on the 2-core CPU these were written
on, by up to ~4e-6; not even a batch of identical rows is bitwise equal to one row there). What
the tests hold to, and what a user gets: every row's token ids equal its lone run's (greedy and
sampled; a token can only differ where a draw or a greedy pick falls within rounding of the
boundary between two tokens, which these fixed seeds do not), and every step's log-softmax
within 1e-5 of the lone run's.
"""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from scope import ScopeError, load_sae
from scope.batch import Batch, Gen
from scope.generate import Sampling, generate, prompt_tokens
from scope.steer import Steer

PROMPTS = [
    "The river ran fast under the old stone bridge, and the town slept",
    "Hi",
    "Once upon a time there was a fox",
    "A much longer prompt that goes on and on about many things in the wide world of today",
    "Tell me",
]
LOGP_TOL = 1e-5


@pytest.fixture(scope="module")
def sae(tiny_sae_dir):
    return load_sae(tiny_sae_dir, device="cpu")


@pytest.fixture(scope="module")
def gens(tiny_model, sae) -> list[Gen]:
    """Five rows: prompts of 3 to 20 tokens, greedy and sampled (top-p, frequency penalty),
    lengths 6 to 18, steers on the prompt, on the generated tokens, on all, clamped, by norm."""
    samplings = [
        Sampling(max_new_tokens=14, temperature=0.9, top_p=0.95, freq_penalty=0.5, seed=1),
        Sampling(max_new_tokens=6, temperature=0.0, seed=2),
        Sampling(max_new_tokens=18, temperature=1.0, top_p=None, seed=3),
        Sampling(max_new_tokens=10, temperature=0.7, top_p=0.9, seed=4),
        Sampling(max_new_tokens=12, temperature=0.9, top_p=0.95, freq_penalty=0.5, seed=5),
    ]
    steers = [
        [Steer(sae, 7, strength=20.0, positions="generated")],
        [],
        [Steer(sae, 3, strength=5.0, mode="clamp")],
        [Steer(sae, 7, strength=20.0, positions="prompt")],
        [Steer(sae, 5, strength=0.5, unit="norm"), Steer(sae, 9, mode="ablate")],
    ]
    return [
        Gen(prompt_tokens(tiny_model, p, False, 20), replace(s, stop_at_eos=False), st)
        for p, s, st in zip(PROMPTS, samplings, steers, strict=True)
    ]


@pytest.fixture(scope="module")
def lone(tiny_model, gens) -> list[tuple[list[int], torch.Tensor]]:
    """Each row run alone: its tokens (``generate``, a batch of one) and its log-softmax at
    each step."""
    out = []
    for g in gens:
        tokens = list(generate(tiny_model, g.tokens, g.sampling, g.steers))
        logits = torch.stack([s.logits[0] for s in Batch(tiny_model, [g])])
        out.append((tokens, logits.log_softmax(-1)))
    return out


def test_rows_of_different_prompts_equal_their_lone_runs(tiny_model, gens, lone):
    want = lone
    assert {len(set(g.tokens.shape[1] for g in gens))} == {len(gens)}  # all lengths differ
    got: list[list[int]] = [[] for _ in gens]
    logp: list[list[torch.Tensor]] = [[] for _ in gens]
    widths = []
    for step in Batch(tiny_model, gens):
        widths.append(len(step.rows))
        for k, r in enumerate(step.rows):
            got[r].append(int(step.tokens[k]))
            logp[r].append(step.logits[k].log_softmax(-1))
    assert got == [w[0] for w in want]
    assert [len(g) for g in got] == [g.sampling.max_new_tokens for g in gens]
    for mine, (_, theirs) in zip(logp, want, strict=True):
        assert float((torch.stack(mine) - theirs).abs().max()) < LOGP_TOL
    assert widths[0] == len(gens) and widths[-1] == 1  # rows left as they ended
    # the steers matter, so equality says each row got its own, at its own positions
    plain = [list(generate(tiny_model, g.tokens, g.sampling)) for g in gens]
    assert [p != w[0] for p, w in zip(plain, want, strict=True)] == [True, False, True, True, True]


def test_rows_joining_a_running_batch_equal_their_lone_runs(tiny_model, gens, lone):
    """Rows that join mid-run (their prompts in a forward of their own, then their cache rows
    beside the others') still make their lone tokens, longer or shorter than the rows there."""
    want = [tokens for tokens, _ in lone]
    batch = Batch(tiny_model, gens[:2])
    got: dict[int, list[int]] = {}
    ids: dict[int, int] = {}
    for n in range(100):
        if n in (3, 7):
            at = 2 if n == 3 else 4
            step = batch.join(gens[at : at + 2])
            ids.update(zip(step.rows, range(at, len(gens)), strict=False))
        else:
            maybe = batch.step()
            if maybe is None:
                break
            step = maybe
        ids.update({r: r for r in step.rows if r < 2})
        for k, r in enumerate(step.rows):
            got.setdefault(ids[r], []).append(int(step.tokens[k]))
    assert [got[i] for i in range(len(gens))] == want
    assert batch.over and batch.step() is None


def test_dropped_rows_leave_and_the_others_go_on(tiny_model, gens, lone):
    want = [lone[0][0], lone[2][0]]
    batch = Batch(tiny_model, gens[:3])
    got: dict[int, list[int]] = {0: [], 2: []}
    for n, step in enumerate(batch):
        if n == 2:
            batch.drop([1])
        assert n < 3 or 1 not in step.rows
        for k, r in enumerate(step.rows):
            if r != 1:
                got[r].append(int(step.tokens[k]))
    assert [got[0], got[2]] == want


def test_a_swamping_steer_is_refused_per_row_and_leaves_the_batch_as_it_was(
    tiny_model, sae, gens, lone
):
    batch = Batch(tiny_model, gens[:2])
    first = batch.step()
    assert first is not None
    huge = Gen(gens[2].tokens, gens[2].sampling, [Steer(sae, 3, strength=40000.0)])
    with pytest.raises(ScopeError, match="would write"):
        batch.join([gens[3], huge])
    rest = [first] + list(batch)
    got = {
        r: [int(s.tokens[k]) for s in rest for k, q in enumerate(s.rows) if q == r] for r in (0, 1)
    }
    assert [got[0], got[1]] == [lone[0][0], lone[1][0]]
    with pytest.raises(ScopeError, match="prompt tokens of shape"):
        Batch(tiny_model, [Gen(gens[0].tokens[0], gens[0].sampling)])
