"""Merging is exact: sums do not depend on the order of their terms, and shard stores folded
into a store one at a time (in any order, across a restart) equal one pass to the bit, with a
readable snapshot after each."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from store_compare import assert_identical

from scope import ScopeError, load_sae
from scope import testing as fixtures
from scope.corpus import CorpusSpec
from scope.record import RecordSettings, exact, record
from scope.record.merge import ShardMerger, merge_stores
from scope.record.state import FeatureState
from scope.store import Store, StoreWriter, read_manifest

CTX = 24


def settings(**kw) -> RecordSettings:
    """One window a forward pass: a window meets the same ops in a shard as in one pass, so
    its activations are the same to the bit (batched with other windows, kernels may round
    differently)."""
    return RecordSettings(**{"ctx": CTX, "k": 4, "samples": 3, "batch_size": 1, **kw})


def test_sums_are_exact_in_any_order():
    gen = torch.Generator().manual_seed(0)
    n, features = 20_000, 7
    # activations over eight decades: a float sum of these depends on the order
    values = (10.0 ** (torch.rand(n, generator=gen) * 8 - 4)).float().double()
    index = torch.randint(0, features, (n,), generator=gen)
    one = exact.fixed_zeros(features, "cpu")
    exact.add_at(one, index, values)
    chunks = []
    for part in torch.randperm(n, generator=gen).split(1_337):
        total = exact.fixed_zeros(features, "cpu")
        exact.add_at(total, index[part], values[part])
        chunks.append(total)
    folded = exact.fixed_zeros(features, "cpu")
    for total in reversed(chunks):
        folded = exact.added(folded, total)
    assert torch.equal(one, folded)
    got = exact.to_float(folded)
    for f in range(features):
        want = math.fsum(values[index == f].tolist())
        assert got[f].item() == pytest.approx(want, rel=1e-15)
    terms = values[index == 0].tolist()
    assert sum(terms) != sum(reversed(terms))  # what float sums do: the check is not vacuous


def test_states_saved_with_float_sums_still_load():
    st = FeatureState.empty(5, k=2, ctx=4, m=2, device=torch.device("cpu"))
    old = {n: t for n, t in st.tensors().items() if not n.endswith("_fx")}
    old["act_sum"] = torch.tensor([0.0, 1.5, 12345.678, 3e-3, 7.0], dtype=torch.float64)
    old["act_sumsq"] = old["act_sum"] ** 2
    loaded = FeatureState.from_tensors(old)
    np.testing.assert_allclose(loaded.act_sum, old["act_sum"], rtol=1e-15, atol=1e-12)
    np.testing.assert_allclose(loaded.act_sumsq, old["act_sumsq"], rtol=1e-15, atol=1e-12)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> CorpusSpec:
    root = tmp_path_factory.mktemp("corpus")
    docs = [d[:300] for d in fixtures.training_text() if len(d) > 200][:10]
    (root / "c.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    return CorpusSpec(paths=(str(root / "c.jsonl"),), ctx=CTX)


@pytest.fixture(scope="module")
def shards(tmp_path_factory, tiny_model, tiny_sae_dir, corpus) -> tuple[Path, list[Path]]:
    """One pass and four shard stores of the same corpus."""
    root = tmp_path_factory.mktemp("stores")
    saes = [load_sae(tiny_sae_dir, device="cpu")]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matrices: one thread is several times faster
    try:
        record(tiny_model, saes, corpus, root / "one", settings())
        for i in range(4):
            record(tiny_model, saes, corpus, root / f"s{i}", settings(shard=(i, 4)))
    finally:
        torch.set_num_threads(threads)
    return root / "one", [root / f"s{i}" for i in range(4)]


def test_shards_folded_one_at_a_time_equal_one_pass(
    tmp_path, shards, tiny_model, tiny_sae_dir, corpus
):
    one, parts = shards
    store = tmp_path / "folded"
    order = [2, 0, 3, 1]
    tokens = {i: read_manifest(parts[i]).tokens_recorded for i in order}
    (store / "windows").mkdir(parents=True)  # left by a first run killed before its manifest
    (store / "windows" / "part-000.shard-0005-of-0009.parquet").write_bytes(b"")
    with StoreWriter(store) as writer:  # the first two, then stop (a driver killed)
        merger = ShardMerger(writer, 4)
        for i in order[:2]:
            merger.add(parts[i])
            merger.commit()
            held = Store(store)  # readable after every shard, and says how far it is
            assert held.manifest.state == "recording"
            assert held.manifest.sharded.merged == sorted(order[: order.index(i) + 1])
    assert Store(store).sql("select sum(count) from l0").fetchone() == (tokens[2] + tokens[0],)
    with pytest.raises(
        ScopeError, match=r"recorded as 4 shards, 2 merged so far.*--ray .*--resume"
    ):
        record(tiny_model, [load_sae(tiny_sae_dir, device="cpu")], corpus, store, settings())
    with StoreWriter(store) as writer:
        with pytest.raises(ScopeError, match="merged from 4 shards, not 5: use --shards 4"):
            ShardMerger(writer, 5)
        merger = ShardMerger(writer, 4)  # continues from the saved state
        with pytest.raises(ScopeError, match=r"is shard 0/4, which .* already holds"):
            merger.add(parts[0])
        for i in order[2:]:
            merger.add(parts[i])
            merger.commit()
    assert Store(store).manifest.state == "complete"
    assert_identical(one, store)
    windows = sorted(p.name for p in (store / "windows").iterdir())
    assert windows == [f"part-000.shard-{i:04d}-of-0004.parquet" for i in range(4)]


def test_merge_refuses_a_shard_of_another_corpus(tmp_path, shards, tiny_model, tiny_sae_dir):
    _, parts = shards
    other = CorpusSpec(paths=(str(fixtures.__file__),), ctx=CTX, max_tokens=200)
    record(
        tiny_model, [load_sae(tiny_sae_dir, device="cpu")], other, tmp_path / "x", settings(shard=(1, 4))
    )  # fmt: skip
    with StoreWriter(tmp_path / "m") as writer:
        merger = ShardMerger(writer, 4)
        merger.add(parts[0])
        with pytest.raises(ScopeError, match="recorded another corpus.*corpus files changed"):
            merger.add(tmp_path / "x", name="shard 1")
    with pytest.raises(ScopeError, match=r"shards given are \[0, 1, 2\] of 4"):
        merge_stores(tmp_path / "m2", parts[:3])
