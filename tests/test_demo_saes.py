"""The shipped demo SAEs (saes/gemma-3-270m-demo-res) against the real demo model: each card's
L0 is what the weights give on held-out Wikipedia text, recomputed through scope.acts; its L0,
FVU, delta LM loss and dead fraction are what ``scope.evals`` gives again on the card's
held-out slice; and over the first 100k tokens the demo records, few features are dead,
dense or near-duplicates of another."""

from __future__ import annotations

import pytest
import torch
from shipped import fired_on, load_shipped

from scope.demo import DEMO_RELEASE
from scope.train.standardize import STD_FLOOR

TOKENS = 4000
"""Held-out tokens recomputed through scope.acts: the start of each card's slice."""
DEMO_TOKENS = 100_000
"""What ``./dev demo`` records by default: the first tokens of the training text."""
DEAD, DENSE, DUPLICATES = 0.20, 0.01, 0.01
"""Bounds over the demo's tokens: dead features (never fire), dense ones (fire on more than
10% of tokens), and live features whose decoder direction has a cosine above 0.95 with
another live feature's (in the stream's standardised units)."""
DELTA_LOSS, FVU, L0 = 0.35, 0.2, (30, 80)
"""Bounds on each card's held-out figures (delta LM loss in nats: 0.20 at layer 3, 0.26 at
layer 9, 0.35 at layer 15)."""


@pytest.fixture(scope="module")
def demo():
    model, saes, cards, corpus = load_shipped(DEMO_RELEASE)
    assert len(saes) >= 3
    return model, saes, cards, corpus


@pytest.mark.slow
def test_demo_sae_cards_match_a_recomputation(demo):
    from scope.corpus import CorpusSpec, build_windows
    from scope.evals import evaluate

    model, saes, cards, corpus = demo
    ctx = cards[0]["corpus"]["ctx"]
    windows = build_windows(
        CorpusSpec(paths=(str(corpus.held_out),), ctx=ctx, max_tokens=TOKENS), model.tokenizer
    )
    fired, counted, _ = fired_on(model, saes, windows)
    assert counted >= TOKENS * 0.95
    for card, l0 in zip(cards, (fired.sum(1) / counted).tolist(), strict=True):
        assert card["eval"]["l0"] == pytest.approx(l0, rel=0.05), card["sae_id"]
        assert card["d_sae"] >= 4096

    held_out = CorpusSpec(paths=(str(corpus.held_out),), ctx=ctx,
                          max_tokens=cards[0]["eval"]["tokens"])  # fmt: skip
    report = evaluate(model, saes, held_out, batch_size=8)
    for card, row in zip(cards, report.rows, strict=True):
        ev = card["eval"]
        assert row.tokens == ev["tokens"]
        for name in ("l0", "fvu", "delta_loss", "dead"):
            assert getattr(row, name) == pytest.approx(ev[name], rel=0.05), (card["sae_id"], name)
        assert L0[0] <= ev["l0"] <= L0[1] and ev["fvu"] <= FVU, card["sae_id"]
        assert ev["delta_loss"] <= DELTA_LOSS, card["sae_id"]


@pytest.mark.slow
def test_demo_saes_are_mostly_alive_and_distinct_on_the_demo_tokens(demo):
    from scope.corpus import CorpusSpec, build_windows

    model, saes, cards, corpus = demo
    windows = build_windows(
        CorpusSpec(paths=(str(corpus.train),), ctx=128, max_tokens=DEMO_TOKENS), model.tokenizer
    )
    fired, counted, stds = fired_on(model, saes, windows)
    assert counted >= DEMO_TOKENS * 0.95
    for sae, card, n, std in zip(saes, cards, fired, stds, strict=True):
        width = sae.cfg.d_sae
        live = n > 0
        assert int((~live).sum()) <= DEAD * width, (card["sae_id"], int((~live).sum()))
        assert int((n > 0.1 * counted).sum()) <= DENSE * width, card["sae_id"]
        # decoder directions compared in the stream's own units (each dimension over its
        # standard deviation): in raw units the residual stream's one massive dimension (most
        # of the variance at layer 9) makes every feature that writes mostly to it look alike
        with torch.no_grad():
            d = sae.W_dec[live].double() / std.clamp(min=float(std.median()) * STD_FLOOR)
            d = d / d.norm(dim=1, keepdim=True)
            cos = d @ d.T
            cos.fill_diagonal_(0)
        duplicated = int((cos > 0.95).any(1).sum())
        assert duplicated <= DUPLICATES * int(live.sum()), (card["sae_id"], duplicated)
