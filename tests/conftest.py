"""Shared fixtures: tiny Gemma 2 checkpoints and Gemma Scope-format SAEs, built at test time."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

from scope import testing as fixtures

PROMPT = "The quick brown fox jumps over the lazy dog, then naps in the warm afternoon sun."


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return fixtures.build_gemma2(tmp_path_factory.mktemp("models") / "tiny-gemma2")


@pytest.fixture(scope="session")
def tiny_model(tiny_dir: Path):
    from scope import load_model

    return load_model(tiny_dir, device="cpu")


@pytest.fixture(scope="session")
def tiny_hf(tiny_dir: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(
        tiny_dir, dtype=torch.float32, attn_implementation="eager"
    ).eval()


@pytest.fixture(scope="session")
def tiny_acts(tiny_model) -> torch.Tensor:
    """Layer-2 residual activations of the tiny model on a prompt (BOS excluded)."""
    _, cache = tiny_model.run_with_cache(PROMPT * 3, names_filter="blocks.2.hook_resid_post")
    return cache["blocks.2.hook_resid_post"][0, 1:]


@pytest.fixture(scope="session")
def tiny_sae_dir(tmp_path_factory: pytest.TempPathFactory, tiny_acts: torch.Tensor) -> Path:
    """A Gemma Scope-layout folder for a 256-wide res SAE at layer 2 of the tiny model."""
    root = tmp_path_factory.mktemp("saes")
    folder = root / "tiny-scope-res" / "layer_2" / "width_256" / "average_l0_13"
    fixtures.write_params(folder, fixtures.gemma_scope_params(tiny_acts, 256))
    return folder


@pytest.fixture
def saes_root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty local SAE library, used in place of the checkout's saes/."""
    root = tmp_path / "saes"
    root.mkdir()
    monkeypatch.setenv("SCOPE_SAES_DIR", str(root))
    return root


@pytest.fixture(scope="session")
def app_store(tmp_path_factory, tiny_model, tiny_sae_dir) -> Path:
    """A store recorded from the tiny model with its 256-wide SAE, for the explorer's tests."""
    from scope import load_sae
    from scope.corpus import CorpusSpec
    from scope.record import RecordSettings, record

    root = tmp_path_factory.mktemp("app") / "store"
    corpus = root.parent / "corpus.txt"
    docs = [d for d in fixtures.training_text() if len(d) > 200]
    corpus.write_text("\n\n".join(docs[:30]))
    sae = load_sae(tiny_sae_dir, device="cpu")
    record(tiny_model, [sae], CorpusSpec(paths=(str(corpus),), max_tokens=3000), root,
           RecordSettings(ctx=32, k=5, samples=3, batch_size=16))  # fmt: skip
    return root
