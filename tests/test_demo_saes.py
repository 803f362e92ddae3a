"""The shipped demo SAEs (saes/gemma-3-270m-demo-res) against the real demo model: each card's
L0 is what the weights give on held-out Wikipedia text, recomputed through scope.acts."""

from __future__ import annotations

import json

import pytest
import torch

from scope.demo import DEMO_RELEASE, demo_available, demo_sae_ids
from scope.sae import saes_dir

TOKENS = 4000
"""Held-out tokens recomputed: the start of the slice each card's figures were measured on."""


@pytest.mark.slow
def test_demo_sae_cards_match_a_recomputation():
    if why := demo_available():
        pytest.skip(f"the demo model and corpus packages are needed: {why}")
    ids = demo_sae_ids()
    if not ids:
        pytest.skip(f"no demo SAEs under {saes_dir() / DEMO_RELEASE}")
    from scope.acts import sae_acts
    from scope.corpus import CorpusSpec, build_windows
    from scope.demo import prepare_corpus, prepare_model
    from scope.model import load_model
    from scope.sae import load_sae

    model = load_model(prepare_model(), device="cpu")
    saes = [load_sae(i, device="cpu") for i in ids]
    assert len(saes) >= 3
    cards = [json.loads((saes_dir() / i / "card.json").read_text()) for i in ids]
    ctx = cards[0]["corpus"]["ctx"]
    windows = build_windows(
        CorpusSpec(paths=(str(prepare_corpus().held_out),), ctx=ctx, max_tokens=TOKENS),
        model.tokenizer,
    )
    fired = torch.zeros(len(saes), dtype=torch.float64)
    counted = 0
    for i in range(0, len(windows), 8):
        tokens = torch.from_numpy(windows.tokens[i : i + 8]).long()
        lengths = torch.from_numpy(windows.lengths[i : i + 8]).long()
        acts = sae_acts(model, saes, tokens, lengths)
        counted += int(acts.counted.sum())
        for k, codes in enumerate(acts.codes):
            fired[k] += (codes[acts.counted] > 0).sum()
    assert counted >= TOKENS * 0.95
    for card, l0 in zip(cards, (fired / counted).tolist(), strict=True):
        assert card["eval"]["l0"] == pytest.approx(l0, rel=0.05), card["sae_id"]
        assert 20 <= card["eval"]["l0"] <= 100 and card["eval"]["fvu"] <= 0.3
        assert card["d_sae"] >= 4096
