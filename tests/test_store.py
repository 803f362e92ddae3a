"""The store's reader and writer: any path, any thread, clear errors, side tables that outlive
recordings, and the feature dashboard as HTML."""

from __future__ import annotations

import shutil
import threading
from pathlib import Path

import pyarrow as pa
import pytest

from scope import ScopeError, load_sae
from scope import testing as fixtures
from scope.corpus import CorpusSpec
from scope.record import RecordSettings, record
from scope.store import Store, StoreWriter, add_side_table, set_label
from scope.store.view import Example, FeatureView, visible

CTX = 24


def settings() -> RecordSettings:
    return RecordSettings(ctx=CTX, k=3, samples=2, batch_size=8)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("corpus")
    docs = [d for d in fixtures.training_text() if len(d) > 200]
    (root / "a.txt").write_text("\n\n".join(docs[:6]))
    (root / "b.txt").write_text("\n\n".join(docs[6:12]))
    return root


@pytest.fixture(scope="module")
def store_path(tmp_path_factory, tiny_model, tiny_sae_dir, corpus) -> Path:
    """A store under a folder whose name has a quote and brackets."""
    root = tmp_path_factory.mktemp("odd") / "it's [v1] *?" / "store"
    sae = load_sae(tiny_sae_dir, device="cpu")
    spec = CorpusSpec(paths=(str(corpus / "a.txt"),), ctx=CTX, max_tokens=400)
    record(tiny_model, [sae], spec, root, settings())
    return root


def busiest(store: Store) -> int:
    found = store.sql(
        "select feature from features where sae = 'L2.res.256' order by count desc limit 1"
    ).fetchone()
    assert found is not None
    return int(found[0])


def test_paths_with_quotes_and_brackets(store_path):
    store = Store(store_path)
    f = busiest(store)
    view = store.feature(f"L2.res.256/{f}")
    assert view.count > 0 and view.top and view.top[0].tokens
    assert len(store.sql("select * from windows")) > 0
    assert len(store.sql("select * from lens")) == 256


def test_each_thread_gets_its_own_connection(store_path):
    store = Store(store_path)
    f = busiest(store)
    expected = store.feature(f"L2.res.256/{f}")
    results: list[object] = []
    connections: set[int] = set()

    def work() -> None:
        try:
            for _ in range(5):
                results.append(store.feature(f"L2.res.256/{f}"))
            connections.add(id(store.con))
        except Exception as err:  # surfaced by the assertion below
            results.append(err)

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(r == expected for r in results) and len(results) == 20
    assert len(connections) == 4 and id(store.con) not in connections
    store.close()
    assert store.feature(f"L2.res.256/{f}") == expected  # reopens after close


def test_io_errors_say_what_happened(tmp_path, store_path):
    copy = tmp_path / "copy"
    shutil.copytree(store_path, copy)
    store = Store(copy)
    (store.version / "hist.parquet").unlink()  # damaged, not replaced
    with pytest.raises(ScopeError, match=r"could not read .*hist"):
        store.sql("select * from hist")
    shutil.rmtree(store.version)  # what a newer recording does to an old snapshot
    with pytest.raises(ScopeError, match=r"was replaced by a newer recording .* refresh\(\)"):
        store.sql("select * from features")
    with pytest.raises(ScopeError, match=r"query failed: .*nope"):
        Store(store_path).sql("select * from nope")


def test_refresh_moves_to_the_newest_snapshot(
    tmp_path, tiny_model, tiny_sae_dir, corpus, store_path
):
    copy = tmp_path / "copy"
    shutil.copytree(store_path, copy)
    store = Store(copy)
    before = store.sql("select sum(tokens) from saes").fetchone()
    assert store.refresh() is False
    sae = load_sae(tiny_sae_dir, device="cpu")
    record(tiny_model, [sae], CorpusSpec(paths=(str(corpus / "b.txt"),), ctx=CTX, max_tokens=300),
           copy, settings())  # fmt: skip
    assert store.sql("select sum(tokens) from saes").fetchone() == before  # pinned snapshot
    other: list[object] = []
    worker = threading.Thread(target=lambda: other.append(store.con))  # another thread's
    worker.start()
    worker.join()
    assert store.refresh() is True
    after = store.sql("select sum(tokens) from saes").fetchone()
    assert after is not None and before is not None and after[0] > before[0]
    assert other[0].execute("select 1").fetchone() == (1,)  # refresh closed no one else's


def test_labels_survive_recordings_and_concurrent_edits(
    tmp_path, tiny_model, tiny_sae_dir, corpus, store_path
):
    copy = tmp_path / "copy"
    shutil.copytree(store_path, copy)
    set_label(copy, "L2.res.256", 3, "rivers", "fires on water words")
    # many editors at once: every edit lands (no read-modify-write lost)
    threads = [
        threading.Thread(target=set_label, args=(copy, "L2.res.256", 10 + i, f"label {i}"))
        for i in range(8)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    # a label edit while a recording holds the store's lock is neither blocked nor lost
    with StoreWriter(copy):
        set_label(copy, "L2.res.256", 4, "bridges")
    sae = load_sae(tiny_sae_dir, device="cpu")
    record(tiny_model, [sae], CorpusSpec(paths=(str(corpus / "b.txt"),), ctx=CTX, max_tokens=300),
           copy, settings())  # fmt: skip
    store = Store(copy)
    assert store.feature("L2.res.256/3").label == "rivers"
    assert store.feature("L2.res.256/3").notes == "fires on water words"
    rows = store.sql("select feature, label from labels order by feature").fetchall()
    assert rows == [(3, "rivers"), (4, "bridges")] + [(10 + i, f"label {i}") for i in range(8)]
    set_label(copy, "L2.res.256", 3, "")  # clearing
    assert store.feature("L2.res.256/3").label == ""


def test_side_tables_become_views(tmp_path, store_path):
    copy = tmp_path / "copy"
    shutil.copytree(store_path, copy)
    add_side_table(copy, "evals", "run1", pa.table({"sae": ["L2.res.256"], "fvu": [0.2]}), {"n": 1})
    assert (copy / "evals" / "run1.json").is_file()
    assert Store(copy).sql("select sae, fvu from evals").fetchall() == [("L2.res.256", 0.2)]
    with pytest.raises(ValueError, match="not one of"):
        add_side_table(copy, "features", "x", pa.table({"a": [1]}))


def test_feature_view_renders_inline_with_visible_tokens(store_path):
    store = Store(store_path)
    view = store.feature(f"L2.res.256/{busiest(store)}")
    page = view._repr_html_()
    assert view.address in page and "top examples" in page and "rgba(234,88,12" in page
    odd = FeatureView(
        sae="L0.res.1k", index=1, count=1, density=0.1, max=2.0, mean=1.0, std=0.0,
        top=[Example(window=0, doc="d", offset=0, act=2.0, pos=1,
                     tokens=["<bos>", "\x1b]0;pwned\x07", "<b>", " a\n"], acts=[0, 2.0, 1.0, 0])],
        intervals={}, histogram=[], top_tokens=[], bottom_tokens=[], neighbours=[],
        neuronpedia_url=None,
    )  # fmt: skip
    page = odd._repr_html_()
    assert "\x1b" not in page and "\\x1b]0;pwned\\x07" in page and "&lt;b&gt;" in page
    assert visible(" a\n\t") == "·a↵→"


def test_sae_keys_read_in_layer_order():
    """Pages, tables and menus list L3 before L9 before L15 (not L15, L3, L9 as text sorts)."""
    from scope.store.reader import natural

    keys = ["L15.res.4k", "L3.res.4k", "L9.res.4k", "L9.res.4k.l0_61", "L9.mlp.16k", "L12.att.2k"]
    assert sorted(keys, key=natural) == [
        "L3.res.4k", "L9.mlp.16k", "L9.res.4k", "L9.res.4k.l0_61", "L12.att.2k", "L15.res.4k"
    ]  # fmt: skip
