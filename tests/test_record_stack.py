"""SAEs of one width are updated as one stack (``stack_states``): the same kernels per batch
for any number of them, and every SAE's store and state are what recording it alone gives, to
the bit (plain, overlapped, stopped and resumed)."""

from __future__ import annotations

from pathlib import Path

import pytest
from safetensors.torch import load_file
from store_compare import TABLES, stopped_then_resumed

from scope import load_sae
from scope import testing as fixtures
from scope.corpus import CorpusSpec
from scope.record import RecordSettings, loop, record
from scope.store import Store


def settings(**kw) -> RecordSettings:
    return RecordSettings(**{"ctx": 24, "k": 4, "samples": 3, "batch_size": 4, **kw})


@pytest.fixture(scope="module")
def saes(tiny_model, tmp_path_factory):
    """Residual SAEs 128 wide at layers 0, 1 and 3, and one 64 wide at layer 2."""
    hooks = [f"blocks.{layer}.hook_resid_post" for layer in range(4)]
    _, cache = tiny_model.run_with_cache(
        fixtures.training_text()[6][:400], names_filter=lambda n: n in hooks
    )
    root = tmp_path_factory.mktemp("stack") / "t-res"
    out = []
    for layer, width in [(0, 128), (1, 128), (3, 128), (2, 64)]:
        folder = root / f"layer_{layer}" / f"width_{width}" / "average_l0_5"
        acts = cache[hooks[layer]][0, 1:]
        fixtures.write_params(folder, fixtures.gemma_scope_params(acts, width, seed=layer))
        out.append(load_sae(folder, device="cpu"))
    return out


@pytest.fixture(scope="module")
def spec(tmp_path_factory) -> CorpusSpec:
    corpus = tmp_path_factory.mktemp("corpus") / "c.txt"
    corpus.write_text("\n\n".join(d for d in fixtures.training_text()[:40] if len(d) > 200))
    return CorpusSpec(paths=(str(corpus),), ctx=24, max_tokens=1200)


@pytest.fixture(scope="module")
def alone(tmp_path_factory, tiny_model, saes, spec) -> dict[str, Path]:
    """Each SAE recorded on its own."""
    root = tmp_path_factory.mktemp("alone")
    out = {}
    for i, sae in enumerate(saes):
        record(tiny_model, [sae], spec, root / str(i), settings())
        (key,) = Store(root / str(i)).saes
        out[key] = root / str(i)
    return out


def assert_each_as_alone(store: Path, alone: dict[str, Path]) -> None:
    """Every table row and every state tensor of each SAE equals its own recording's."""
    s = Store(store)
    assert sorted(s.saes) == sorted(alone)
    for key, path in alone.items():
        one = Store(path)
        for name, order in TABLES:
            if name == "windows":
                continue
            q = f"select * from {name} where sae = '{key}' order by {order}"
            got, want = s.sql(q).fetchall(), one.sql(q).fetchall()
            assert want, f"{name} of {key} is empty: the comparison would be vacuous"
            assert got == want, f"{name} of {key} differs"
        got = load_file(store / s.manifest.state_version / "state" / f"{key}.safetensors")
        want = load_file(path / one.manifest.state_version / "state" / f"{key}.safetensors")
        assert got.keys() == want.keys()
        for name in want:
            assert got[name].equal(want[name]), f"state {name} of {key} differs"


def test_one_update_per_width_equals_each_alone(
    tmp_path, tiny_model, saes, spec, alone, monkeypatch
):
    widths = []
    real = loop.FeatureState.update

    def update(self, acts, counted, windows):
        widths.append(acts.shape[-1])
        return real(self, acts, counted, windows)

    monkeypatch.setattr(loop.FeatureState, "update", update)
    record(tiny_model, saes, spec, tmp_path / "all", settings())
    batches = len(widths) // 2
    assert batches > 3 and widths == [3 * 128, 64] * batches  # one stack of three, one alone
    assert_each_as_alone(tmp_path / "all", alone)


def test_stacked_stop_and_resume_equals_each_alone(tmp_path, tiny_model, saes, spec, alone):
    """Overlapped, stopped after the third batch (its state saved from the stack's views),
    resumed (the saved states stacked again)."""
    store = tmp_path / "stopped"
    stopped_then_resumed(tiny_model, saes, spec, store, settings(overlap=True))
    assert_each_as_alone(store, alone)
