"""The shipped demo SAEs (saes/gemma-3-270m-demo-res) against the real demo model: each card's
L0 is what the weights give on held-out Wikipedia text, recomputed through scope.acts; its L0,
FVU, delta LM loss and dead fraction are what ``scope.evals`` gives again on the card's
held-out slice; and over the first 100k tokens the demo records, few features are dead,
dense or near-duplicates of another."""

from __future__ import annotations

import json

import pytest
import torch

from scope.demo import DEMO_RELEASE, demo_available, demo_sae_ids
from scope.sae import saes_dir

TOKENS = 4000
"""Held-out tokens recomputed through scope.acts: the start of each card's slice."""
DEMO_TOKENS = 100_000
"""What ``./dev demo`` records by default: the first tokens of the training text."""
DEAD, DENSE, DUPLICATES = 0.20, 0.01, 0.01
"""Bounds over the demo's tokens: dead features (never fire), dense ones (fire on more than
10% of tokens), and live features whose decoder direction has a cosine above 0.95 with
another live feature's."""
DELTA_LOSS, FVU, L0 = 0.35, 0.2, (30, 80)
"""Bounds on each card's held-out figures."""


@pytest.fixture(scope="module")
def demo():
    if why := demo_available():
        pytest.skip(f"the demo model and corpus packages are needed: {why}")
    ids = demo_sae_ids()
    if not ids:
        pytest.skip(f"no demo SAEs under {saes_dir() / DEMO_RELEASE}")
    from scope.demo import prepare_corpus, prepare_model
    from scope.model import load_model
    from scope.sae import load_sae

    model = load_model(prepare_model(), device="cpu")
    saes = [load_sae(i, device="cpu") for i in ids]
    assert len(saes) >= 3
    cards = [json.loads((saes_dir() / i / "card.json").read_text()) for i in ids]
    return model, saes, cards, prepare_corpus()


def _fired(model, saes, windows) -> tuple[torch.Tensor, int]:
    """Tokens each feature of each SAE fires on [n_saes, d_sae], and the counted tokens."""
    from scope.acts import sae_acts

    fired = torch.zeros(len(saes), saes[0].cfg.d_sae, dtype=torch.int64)
    counted = 0
    for i in range(0, len(windows), 8):
        tokens = torch.from_numpy(windows.tokens[i : i + 8]).long()
        lengths = torch.from_numpy(windows.lengths[i : i + 8]).long()
        acts = sae_acts(model, saes, tokens, lengths)
        counted += int(acts.counted.sum())
        for k, codes in enumerate(acts.codes):
            fired[k] += (codes[acts.counted] > 0).sum(0)
    return fired, counted


@pytest.mark.slow
def test_demo_sae_cards_match_a_recomputation(demo):
    from scope.corpus import CorpusSpec, build_windows
    from scope.evals import evaluate

    model, saes, cards, corpus = demo
    ctx = cards[0]["corpus"]["ctx"]
    windows = build_windows(
        CorpusSpec(paths=(str(corpus.held_out),), ctx=ctx, max_tokens=TOKENS), model.tokenizer
    )
    fired, counted = _fired(model, saes, windows)
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
    fired, counted = _fired(model, saes, windows)
    assert counted >= DEMO_TOKENS * 0.95
    for sae, card, n in zip(saes, cards, fired, strict=True):
        width = sae.cfg.d_sae
        live = n > 0
        assert int((~live).sum()) <= DEAD * width, (card["sae_id"], int((~live).sum()))
        assert int((n > 0.1 * counted).sum()) <= DENSE * width, card["sae_id"]
        with torch.no_grad():
            d = sae.W_dec[live].float()
            d = d / d.norm(dim=1, keepdim=True)
            cos = d @ d.T
            cos.fill_diagonal_(0)
        duplicated = int((cos > 0.95).any(1).sum())
        assert duplicated <= DUPLICATES * int(live.sum()), (card["sae_id"], duplicated)
