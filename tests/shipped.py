"""The SAEs and transcoders shipped under saes/ with the real demo model, for the tests of
their cards (skipped, saying why, where the demo packages or the weights are missing)."""

from __future__ import annotations

import json
from typing import Any

import pytest
import torch

from scope.demo import demo_available, demo_sae_ids
from scope.sae import saes_dir


def load_shipped(release: str) -> tuple[Any, list[Any], list[dict[str, Any]], Any]:
    """The demo model, the release's SAEs by layer, their cards and the demo corpus."""
    if why := demo_available():
        pytest.skip(f"the demo model and corpus packages are needed: {why}")
    ids = demo_sae_ids(release=release)
    if not ids:
        pytest.skip(f"nothing shipped under {saes_dir() / release}")
    from scope.demo import prepare_corpus, prepare_model
    from scope.model import load_model
    from scope.sae import load_sae

    model = load_model(prepare_model(), device="cpu")
    saes = [load_sae(i, device="cpu") for i in ids]
    cards = [json.loads((saes_dir() / i / "card.json").read_text()) for i in ids]
    return model, saes, cards, prepare_corpus()


def fired_on(
    model: Any, saes: list[Any], windows: Any
) -> tuple[torch.Tensor, int, list[torch.Tensor]]:
    """Tokens each feature of each SAE fires on [n_saes, d_sae], the counted tokens, and the
    standard deviation of each dimension of each SAE's input over them."""
    from scope.acts import sae_acts, site_input
    from scope.codec import codec_of

    fired = torch.zeros(len(saes), saes[0].cfg.d_sae, dtype=torch.int64)
    sums = [torch.zeros(2, s.cfg.d_in, dtype=torch.float64) for s in saes]
    counted = 0
    for i in range(0, len(windows), 8):
        tokens = torch.from_numpy(windows.tokens[i : i + 8]).long()
        lengths = torch.from_numpy(windows.lengths[i : i + 8]).long()
        acts = sae_acts(model, saes, tokens, lengths)
        counted += int(acts.counted.sum())
        for k, codes in enumerate(acts.codes):
            fired[k] += (codes[acts.counted] > 0).sum(0)
            x = site_input(acts.hooks[codec_of(saes[k]).read_hook])[acts.counted].double()
            sums[k] += torch.stack([x.sum(0), (x**2).sum(0)])
    stds = [(s[1] / counted - (s[0] / counted) ** 2).clamp(min=0).sqrt() for s in sums]
    return fired, counted, stds
