"""What ``./dev demo`` asks ``scope.demo`` before recording: the shipped SAEs (or transcoders)
of a release by layer, and whether a store already holds the recording it would make, SAEs
included, so that `./dev demo --transcoders` never serves a store recorded without them."""

from __future__ import annotations

from scope import load_sae
from scope import testing as fixtures
from scope.corpus import CorpusSpec
from scope.demo import DEMO_TRANSCODERS, demo_sae_ids, demo_transcoder_ids, recorded
from scope.record import RecordSettings, record

TINY = "tiny-scope-res/layer_2/width_256/average_l0_13"


def test_shipped_ids_are_listed_by_layer(tiny_sae_dir, tmp_path):
    params = (tiny_sae_dir / "params.npz").read_bytes()
    for layer, name in ((10, "sae_weights.safetensors"), (2, "params.npz"), (0, "params.npz")):
        folder = tmp_path / DEMO_TRANSCODERS / f"layer_{layer}" / "width_2k" / "average_l0_60"
        folder.mkdir(parents=True)
        (folder / name).write_bytes(params)  # a sae-lens save (what scope train writes) counts
    assert demo_transcoder_ids(tmp_path) == [
        f"{DEMO_TRANSCODERS}/layer_{i}/width_2k/average_l0_60" for i in (0, 2, 10)
    ]
    assert demo_sae_ids(tmp_path) == []  # the SAEs' release is another folder
    assert demo_sae_ids(tiny_sae_dir.parents[3], "tiny-scope-res") == [TINY]


def test_recorded_means_this_corpus_these_tokens_and_these_saes(
    tiny_model, tiny_sae_dir, tmp_path, monkeypatch
):
    monkeypatch.setenv("SCOPE_SAES_DIR", str(tiny_sae_dir.parents[3]))
    corpus, store = tmp_path / "corpus.txt", tmp_path / "store"
    corpus.write_text("\n\n".join(d for d in fixtures.training_text()[:10] if len(d) > 200))
    assert not recorded(store, 500, corpus)  # nothing there yet
    record(tiny_model, [load_sae(TINY, device="cpu")], CorpusSpec(paths=(str(corpus),),
           max_tokens=500), store, RecordSettings(ctx=32, k=5, samples=3, batch_size=16))  # fmt: skip
    assert recorded(store, 500, corpus) and recorded(store, 500, corpus, [TINY])
    assert not recorded(store, 500, corpus, [TINY, f"{DEMO_TRANSCODERS}/layer_0/width_2k/x"])
    assert not recorded(store, 1000, corpus, [TINY])
    assert not recorded(store, 500, tmp_path / "other.txt", [TINY])
