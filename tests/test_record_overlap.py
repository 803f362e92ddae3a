"""The overlapped recording path (``RecordSettings.overlap``, ``scope record --overlap``) writes
the same store as the plain one, to the bit: on a CPU it runs the same steps in a different
order (the next batch's forward before this batch's state updates), and the state sees the
same tensors in the same order."""

from __future__ import annotations

from pathlib import Path

import pytest
from store_compare import assert_identical, stopped_then_resumed
from typer.testing import CliRunner

from scope import load_sae
from scope import testing as fixtures
from scope.cli import app
from scope.corpus import CorpusSpec
from scope.record import RecordSettings, loop, record


def settings(**kw) -> RecordSettings:
    return RecordSettings(**{"ctx": 24, "k": 4, "samples": 3, "batch_size": 4, **kw})


@pytest.fixture(scope="module")
def saes(tiny_sae_dir, tiny_model, tmp_path_factory):
    """The layer-2 residual SAE and a layer-1 MLP-output SAE (two hooks in one forward)."""
    hook = "blocks.1.hook_mlp_out"
    _, cache = tiny_model.run_with_cache(fixtures.training_text()[4][:400], names_filter=hook)
    folder = tmp_path_factory.mktemp("mlp") / "t-mlp" / "layer_1" / "width_64" / "average_l0_3"
    fixtures.write_params(folder, fixtures.gemma_scope_params(cache[hook][0, 1:], 64, seed=7))
    return [load_sae(tiny_sae_dir, device="cpu"), load_sae(folder, device="cpu")]


@pytest.fixture(scope="module")
def spec(tmp_path_factory) -> CorpusSpec:
    corpus = tmp_path_factory.mktemp("corpus") / "c.txt"
    corpus.write_text("\n\n".join(d for d in fixtures.training_text()[:40] if len(d) > 200))
    return CorpusSpec(paths=(str(corpus),), ctx=24, max_tokens=1200)


@pytest.fixture(scope="module")
def plain(tmp_path_factory, tiny_model, saes, spec) -> Path:
    root = tmp_path_factory.mktemp("plain") / "s"
    record(tiny_model, saes, spec, root, settings())
    return root


def test_overlapped_recording_is_the_plain_one(tmp_path, tiny_model, saes, spec, plain):
    """A checkpoint after every batch too: each one waits for the updates queued before it."""
    store = tmp_path / "overlap"
    summary = record(tiny_model, saes, spec, store, settings(overlap=True, checkpoint_seconds=0))
    assert summary.windows > 12  # several batches of 4
    assert_identical(plain, store)


def test_overlap_forwards_the_next_batch_before_folding_this_one(
    tmp_path, tiny_model, saes, spec, monkeypatch
):
    """The order of the steps: plain f0 u0 f1 u1 ...; overlapped f0 f1 u0 f2 u1 ... (u: one
    update per SAE), with every batch folded once, in order."""
    steps: list[str] = []
    real_forward, real_update = loop.sae_acts, loop.FeatureState.update

    def forward(*args, **kw):
        steps.append("f")
        return real_forward(*args, **kw)

    def update(self, acts, counted, windows):
        steps.append(f"u{int(windows[0])}")
        return real_update(self, acts, counted, windows)

    monkeypatch.setattr(loop, "sae_acts", forward)
    monkeypatch.setattr(loop.FeatureState, "update", update)
    orders = {}
    for overlap in (False, True):
        steps.clear()
        record(tiny_model, saes, spec, tmp_path / str(overlap), settings(overlap=overlap))
        orders[overlap] = list(steps)
    n = orders[False].count("f")
    assert n == orders[True].count("f") > 3
    folds = [s for s in orders[False] if s != "f"]
    assert folds == [s for s in orders[True] if s != "f"] and len(folds) == 2 * n
    assert orders[False][:4] == ["f", folds[0], folds[1], "f"]
    assert orders[True][:5] == ["f", "f", folds[0], folds[1], "f"]
    assert orders[True][-2:] == folds[-2:] and orders[True][-3] != "f"


def test_overlapped_stop_keeps_whole_batches_and_resumes_identically(
    tmp_path, tiny_model, saes, spec, plain
):
    """A stop request drops the batch already forwarded (its updates were not applied) and
    saves the state of the batches folded so far; --resume redoes the dropped one."""
    store = tmp_path / "stopped"
    stopped_then_resumed(tiny_model, saes, spec, store, settings(overlap=True))
    assert_identical(plain, store)


def test_cli_record_overlap(tmp_path, tiny_dir, tiny_sae_dir, saes, spec, tiny_model):
    """``scope record --overlap`` gives the store the library's plain path gives."""
    args = ["record", "--model", str(tiny_dir), "--sae", str(tiny_sae_dir), "--corpus",
            spec.paths[0], "--ctx", "24", "--k", "4", "--samples", "3", "--batch-size", "4",
            "--tokens", "1200", "--device", "cpu"]  # fmt: skip
    result = CliRunner().invoke(app, [*args, "--store", str(tmp_path / "cli"), "--overlap"])
    assert result.exit_code == 0, result.output
    record(tiny_model, saes[:1], spec, tmp_path / "lib", settings())
    assert_identical(tmp_path / "lib", tmp_path / "cli")
