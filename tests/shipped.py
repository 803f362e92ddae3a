"""The SAEs and transcoders shipped under saes/ with the real demo model, for the tests of
their cards (skipped, saying why, where the demo packages or the weights are missing)."""

from __future__ import annotations

import json
from typing import Any

import pytest

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
