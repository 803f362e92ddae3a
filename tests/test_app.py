"""The explorer's pages, run headless with Streamlit's AppTest on a store recorded from the tiny
model: what a page shows equals what the store holds; the store's search against brute force."""

from __future__ import annotations

import html
import re
import socket
import threading
from pathlib import Path

import pytest
from streamlit.testing.v1 import AppTest

from scope import load_sae
from scope import testing as fixtures
from scope.corpus import CorpusSpec
from scope.generate import Sampling, compare
from scope.inspect import activations, inspect
from scope.record import RecordSettings, record
from scope.steer import Steer
from scope.steer_spec import with_maxes
from scope.store import Store, explore, set_label
from scope.store.view import visible
from scope.sweep import experiments

HOME = Path(__file__).parents[1] / "app" / "Home.py"
CTX = 32


@pytest.fixture
def app(app_store, tiny_dir, monkeypatch) -> AppTest:
    monkeypatch.setenv("SCOPE_STORE", str(app_store))
    monkeypatch.setenv("SCOPE_MODEL", str(tiny_dir))
    monkeypatch.setenv("SCOPE_DEVICE", "cpu")
    return AppTest.from_file(str(HOME), default_timeout=120)


def busiest(store: Store) -> int:
    row = store.sql("select feature from features order by count desc limit 1").fetchone()
    assert row is not None
    return int(row[0])


def no_errors(at: AppTest) -> None:
    assert not at.exception, [e.value for e in at.exception]
    assert not at.error, [e.value for e in at.error]


def test_overview_shows_the_stores_numbers(app, app_store):
    app.run()
    no_errors(app)
    store = Store(app_store)
    metrics = {m.label: m.value for m in app.metric}
    assert metrics["tokens recorded"] == f"{store.manifest.parts[0].tokens:,}"
    assert metrics["documents"] == f"{store.manifest.parts[0].documents:,}"
    saes = app.dataframe[1].value
    row = store.sql("select mean_l0, dead, dense from saes").fetchone()
    assert list(saes["sae"]) == ["L2.res.256"]
    assert saes["mean_l0"][0] == pytest.approx(row[0])
    assert (saes["dead"][0], saes["dense"][0]) == (row[1], row[2])


def test_feature_page_by_url_equals_the_store(app, app_store):
    store = Store(app_store)
    f = busiest(store)
    view = store.feature(f"L2.res.256/{f}")
    app.query_params.update({"sae": "L2.res.256", "feature": str(f)})
    app.switch_page("views/feature.py").run()
    no_errors(app)
    assert app.title[0].value == f"L2.res.256/{f}"
    metrics = {m.label: m.value for m in app.metric}
    assert metrics["max"] == f"{view.max:.2f}"
    assert metrics["tokens"] == f"{view.count:,}"
    top = view.top[0]
    shown = " ".join(h.proto.body for h in app.get("html"))
    assert html.escape(visible(top.tokens[top.pos])) in shown  # the max token, shaded
    assert f'title="{top.acts[top.pos]:.3f}"' in shown  # its value on hover
    app.radio[0].set_value("all").run()  # the lens over the whole vocabulary, as stored
    lens = app.dataframe[0].value
    assert list(lens["token"]) == [visible(t) for t, _ in view.top_tokens]


def test_label_saved_from_the_page_is_found_by_search(app, app_store):
    store = Store(app_store)
    f = busiest(store)
    app.query_params.update({"sae": "L2.res.256", "feature": str(f)})
    app.switch_page("views/feature.py").run()
    form_inputs = [t for t in app.text_input if t.label == "label"]
    form_inputs[0].input("docstring words")
    [t for t in app.text_area if t.label == "notes"][0].input("seen in tests")
    next(b for b in app.button if b.label == "Save").click().run()
    no_errors(app)
    assert Store(app_store).label("L2.res.256", f) == ("docstring words", "seen in tests")
    app.switch_page("views/search.py").run()
    [t for t in app.text_input if t.label == "explanation, label or notes"][0].input(
        "docstring"
    ).run()
    no_errors(app)
    found = app.dataframe[0].value
    assert list(zip(found["sae"], found["feature"], strict=True)) == [("L2.res.256", f)]
    assert found["open"][0] == f"/feature?sae=L2.res.256&feature={f}"


@pytest.mark.parametrize("whole", [True, False])
def test_search_by_token_equals_brute_force(app_store, whole):
    store = Store(app_store)
    rows = store.sql(
        "select k.feature, k.pos, k.act, w.tokens from topk k join windows w using (window_id)"
    ).fetchall()
    vocab = store.tokens_text(list(range(len(store.sql("select token from vocab")))))
    f = busiest(store)
    word = next(
        vocab[tokens[pos]] for feat, pos, _, tokens in rows
        if feat == f and len(vocab[tokens[pos]].strip()) > 1
    )  # fmt: skip
    needle = word.strip().lower()[: None if whole else 2]  # a fragment finds more by substring
    hits: dict[int, int] = {}
    mass: dict[int, float] = {}
    total: dict[int, float] = {}
    best: dict[int, tuple[float, str]] = {}
    for feat, pos, act, tokens in rows:
        total[feat] = total.get(feat, 0.0) + act
        context = "".join(vocab[t] for t in tokens[max(pos - 5, 1) : pos + 1])
        if vocab[tokens[pos]].strip().lower() == needle if whole else needle in context.lower():
            hits[feat] = hits.get(feat, 0) + 1
            mass[feat] = mass.get(feat, 0.0) + act
            best[feat] = max(best.get(feat, (-1.0, "")), (act, context))
    lens = store.sql("select feature, top_ids from lens").fetchall()
    by_lens = {feat for feat, ids in lens if any(vocab[i].strip().lower() == needle for i in ids)}
    found = explore.search(store, explore.Query(text=needle, whole=whole, limit=10_000)).df()
    assert set(found["feature"]) == set(hits) | by_lens
    for feat, n, share, context in zip(
        found["feature"], found["hits"], found["share"], found["context"], strict=True
    ):
        assert n == hits.get(feat, 0)
        assert share == pytest.approx(mass.get(feat, 0.0) / total[feat], abs=1e-6)
        if feat in best:
            assert context == best[feat][1]
    assert list(found["share"]) == sorted(found["share"], reverse=True)  # ranked by share
    assert f in set(found["feature"])


def test_search_matches_whole_tokens_unless_asked(app_store):
    store = Store(app_store)
    vocab = store.tokens_text(list(range(len(store.sql("select token from vocab")))))
    activating = [t.strip().lower() for (t,) in store.sql("select text from activating").fetchall()]
    # a token that is part of a longer activating token: found inside it by substring only
    part, longer = next(
        (p, w) for w in activating for p in {v.strip().lower() for v in vocab}
        if len(p) > 1 and p != w and p in w and p not in activating
    )  # fmt: skip
    whole = explore.search(store, explore.Query(text=part, limit=10_000)).df()
    inside = explore.search(store, explore.Query(text=part, whole=False, limit=10_000)).df()
    assert (whole["hits"] == 0).all()  # only logit-lens matches, if any
    assert (inside["hits"] > 0).any(), (part, longer)


def test_search_page_shows_whole_token_hits_with_their_context(app, app_store):
    store = Store(app_store)
    word = store.sql(
        "select lower(trim(text)) from activating where length(trim(text)) > 1 "
        "group by 1 order by count(*) desc limit 1"
    ).fetchone()[0]
    app.switch_page("views/search.py").run()
    [t for t in app.text_input if t.label == "token or text"][0].input(word).run()
    no_errors(app)
    shown = app.dataframe[0].value
    want = explore.search(store, explore.Query(text=word)).df()
    assert list(shown["feature"]) == list(want["feature"])
    assert list(shown["share"]) == list(want["share"])
    assert all(c.replace("↵", "\n").endswith(word) or not h
               for c, h in zip(want["context"].fillna("").str.lower(), want["hits"], strict=True))  # fmt: skip
    next(t for t in app.toggle if t.label == "whole tokens").set_value(False).run()
    no_errors(app)
    inside = explore.search(store, explore.Query(text=word, whole=False)).df()
    assert list(app.dataframe[0].value["feature"]) == list(inside["feature"])


def test_search_filters_and_sorts(app_store):
    store = Store(app_store)
    q = explore.Query(min_density=0.01, max_density=0.2, min_max=1.0, sort="max", limit=10_000)
    found = explore.search(store, q).df()
    want = store.sql(
        "select feature from features where density between 0.01 and 0.2 and max >= 1 "
        "order by max desc, feature"
    ).df()
    assert list(found["feature"]) == list(want["feature"])
    with pytest.raises(Exception, match="min_density"):
        explore.Query(min_density=0.5, max_density=0.1)


def test_previous_next_and_random_walk_live_features(app_store):
    store = Store(app_store)
    live = [
        f for (f,) in store.sql("select feature from features where not dead order by 1").fetchall()
    ]
    assert explore.live_neighbour(store, "L2.res.256", live[0], 1) == live[1]
    assert explore.live_neighbour(store, "L2.res.256", live[0], -1) == live[-1]  # wraps
    assert explore.random_live(store, "L2.res.256") in live


def test_inspector_shows_the_top_features_of_each_token(app, tiny_model, tiny_sae_dir, app_store):
    app.switch_page("views/inspector.py").run()
    no_errors(app)
    text = "The quick brown fox jumps over the lazy dog."
    app.text_area[0].input(text)
    app.toggle[0].set_value(False)  # dense features shown: compare with the library's own
    next(b for b in app.selectbox if b.label == "rank by").set_value("activation")
    next(b for b in app.button if b.label == "Inspect").click().run()
    no_errors(app)
    store = Store(app_store)
    sae = load_sae(tiny_sae_dir, device="cpu")
    rows = inspect(tiny_model, [sae], text, top=5, store=store)
    table = (
        app.markdown[-1].value
        if "| pos |" in app.markdown[-1].value
        else next(m.value for m in app.markdown if "| pos |" in m.value)
    )
    for r in rows:
        line = next(x for x in table.splitlines() if x.startswith(f"| {r.position} |"))
        for h in r.features:
            assert (
                f'<a href="/feature?sae={h.sae}&amp;feature={h.feature}" target="_self">'
                f"{h.sae}/{h.feature}</a>" in line
            )
            assert f" {h.act:.2f}" in line
        shown = [int(m) for m in re.findall(r"feature=(\d+)\"", line)]
        assert shown == [h.feature for h in r.features]  # in the library's order


def test_inspector_ranks_by_fraction_of_each_features_max(app, tiny_model, tiny_sae_dir, app_store):
    app.switch_page("views/inspector.py").run()
    text = "The quick brown fox jumps over the lazy dog."
    app.text_area[0].input(text)
    next(
        b for b in app.button if b.label == "Inspect"
    ).click().run()  # defaults: fraction, dense hidden
    no_errors(app)
    store = Store(app_store)
    sae = load_sae(tiny_sae_dir, device="cpu")
    acts = activations(tiny_model, [sae], text, store=store)
    codes = acts.codes[0]
    maxes = dict(store.sql("select feature, max from features").fetchall())
    dense = {f for (f,) in store.sql("select feature from features where dense").fetchall()}
    table = next(m.value for m in app.markdown if "| pos |" in m.value)
    for pos in acts.counted:
        score = {
            f: float(codes[pos, f]) / maxes[f] if maxes[f] > 0 else 1.0
            for f in range(codes.shape[1]) if codes[pos, f] > 0 and f not in dense
        }  # fmt: skip
        want = sorted(score, key=lambda f: -score[f])[:5]
        line = next(x for x in table.splitlines() if x.startswith(f"| {pos} |"))
        shown = [int(m) for m in re.findall(r"feature=(\d+)\"", line)]
        assert shown == want
        for f in want:  # the raw value and its fraction of the max beside each
            assert f"{float(codes[pos, f]):.2f} ({float(codes[pos, f]) / maxes[f]:.0%})" in line
    names = dict(store.sql("select feature, text from activating where rank = 0").fetchall())
    f = want[0]
    assert (
        f'target="_self">L2.res.256/{f}</a> <small>{html.escape(repr(names[f].strip() or names[f])[1:-1])}</small>'
        in line
    )


@pytest.mark.slow
def test_lab_generates_what_the_library_generates(app, tiny_model, tiny_sae_dir, app_store):
    store = Store(app_store)
    f = busiest(store)
    app.session_state["steers"] = [{"sae": "L2.res.256", "feature": f, "mode": "add",
                                    "strength": 4.0, "unit": "max", "positions": "all"}]  # fmt: skip
    app.switch_page("views/lab.py").run()
    no_errors(app)
    [t for t in app.text_area if t.label == "prompt"][0].input("The fox")
    next(b for b in app.button if b.label == "Generate").click().run()
    no_errors(app)
    sae = load_sae(tiny_sae_dir, device="cpu")
    want = compare(tiny_model, "The fox", with_maxes([Steer(sae, f, 4.0, unit="max")], store),
                   sampling=Sampling(max_new_tokens=40, temperature=0.7, top_p=0.9, seed=0), store=store)  # fmt: skip
    shown = {"baseline": "", "steered": ""}
    for h in app.get("html"):
        for which in shown:
            if f'data-which="{which}"' in h.proto.body:
                shown[which] = h.proto.body
    assert f">{html.escape(want.baseline)}</div>" in shown["baseline"]
    assert f">{html.escape(want.steered)}</div>" in shown["steered"]
    assert want.baseline != want.steered


def test_pages_without_a_model_say_why(app_store, tmp_path, monkeypatch):
    monkeypatch.setenv("SCOPE_STORE", str(app_store))
    monkeypatch.setenv("SCOPE_MODEL", str(tmp_path / "no-such-model"))
    at = AppTest.from_file(str(HOME), default_timeout=60)
    for page in ("views/inspector.py", "views/lab.py"):
        at.switch_page(page).run()
        assert not at.exception
        assert "The model is off" in at.warning[0].value
        assert "--model" in at.warning[0].value
    at.switch_page("views/search.py").run()
    no_errors(at)
    assert len(at.dataframe[0].value) > 0


@pytest.mark.slow
def test_labels_and_a_recording_into_the_same_store_both_survive(
    tmp_path, tiny_model, tiny_sae_dir
):
    root = tmp_path / "store"
    corpus = tmp_path / "a.txt"
    docs = [d for d in fixtures.training_text() if len(d) > 200]
    corpus.write_text("\n\n".join(docs[:20]))
    more = tmp_path / "b.txt"
    more.write_text("\n\n".join(docs[20:60]))
    sae = load_sae(tiny_sae_dir, device="cpu")
    settings = RecordSettings(ctx=CTX, k=3, samples=2, batch_size=4, checkpoint_seconds=0.0)
    record(tiny_model, [sae], CorpusSpec(paths=(str(corpus),), max_tokens=600), root, settings)
    stop = threading.Event()
    written: list[int] = []

    def label_loop() -> None:
        i = 0
        while not stop.is_set():
            set_label(root, "L2.res.256", i % 256, f"label {i}")
            written.append(i)
            i += 1

    thread = threading.Thread(target=label_loop)
    thread.start()
    try:
        record(tiny_model, [sae], CorpusSpec(paths=(str(more),), max_tokens=1500), root, settings)
    finally:
        stop.set()
        thread.join()
    store = Store(root)
    assert len(store.manifest.parts) == 2 and store.manifest.state == "complete"
    assert written
    last = {i % 256: i for i in written}  # the newest label of each feature wins
    for f, i in last.items():
        assert store.label("L2.res.256", f)[0] == f"label {i}"
    assert len(store.sql("select * from labels")) == len(last)


@pytest.mark.slow
def test_lab_sweep_is_charted_saved_and_listed(app, app_store):
    store = Store(app_store)
    f = busiest(store)
    before = len(experiments(store))
    app.session_state["steers"] = [{"sae": "L2.res.256", "feature": f, "mode": "add",
                                    "strength": 1.0, "unit": "max", "positions": "all"}]  # fmt: skip
    app.switch_page("views/lab.py").run()
    [t for t in app.text_input if t.label == "strengths"][0].input("0,4")
    [n for n in app.number_input if n.label == "new tokens"][0].set_value(8)
    next(b for b in app.button if b.label == "Run sweep").click().run()
    no_errors(app)
    saved = experiments(Store(app_store))
    assert len(saved) == before + 1
    done = saved[0]
    assert [p.strength for p in done.points] == [0.0, 4.0] and done.feature == f
    assert any(f"Saved sweeps ({before + 1})" in h.value for h in app.subheader)
    assert len(app.get("plotly_chart")) >= 2  # the new sweep's chart, and each saved one's


def test_scope_app_serves_on_localhost_with_the_store(app_store, monkeypatch):
    from served import free_port
    from typer.testing import CliRunner

    import scope.cli.serve as serve
    from scope.cli import app as cli

    port, other = str(free_port()), str(free_port())  # a fixed port may be taken
    ran: list[list[str]] = []
    monkeypatch.setattr(serve.os, "execv", lambda exe, args: ran.append(args))
    result = CliRunner().invoke(cli, ["app", "--store", str(app_store), "--port", port])
    assert result.exit_code == 0, result.output
    assert f"http://127.0.0.1:{port}" in result.output and "warning" not in result.output
    args = ran[0]
    assert args[args.index("--server.address") + 1] == "127.0.0.1"
    assert args[args.index("--server.port") + 1] == port
    assert args[-2:] == ["--store", str(app_store.resolve())]
    assert args[args.index("run") + 1] == str(HOME.resolve())

    result = CliRunner().invoke(cli, ["app", "--store", str(app_store), "--address", "0.0.0.0",
                                      "--port", other, "--model", "m"])  # fmt: skip
    assert "has no login" in result.output
    assert ran[1][-2:] == ["--model", "m"]


def test_scope_app_refuses_a_folder_that_is_not_a_store_and_a_busy_port(app_store, tmp_path):
    from typer.testing import CliRunner

    from scope.cli import app as cli

    result = CliRunner().invoke(cli, ["app", "--store", str(tmp_path)])
    assert result.exit_code == 2
    assert "is not a store" in result.output and "scope record" in result.output
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = CliRunner().invoke(cli, ["app", "--store", str(app_store), "--port", str(port)])
    assert result.exit_code == 2
    assert f"cannot serve on 127.0.0.1:{port}" in result.output and "--port" in result.output


def test_health_counts_duplicate_features_against_brute_force(
    tmp_path, tiny_model, tiny_sae_dir, monkeypatch
):
    import numpy as np

    params = dict(np.load(tiny_sae_dir / "params.npz"))
    for f in (1, 2):  # copies of feature 0: the same activations, so the same top examples
        params["W_enc"][:, f] = params["W_enc"][:, 0]
        params["W_dec"][f] = params["W_dec"][0]
        params["b_enc"][f], params["threshold"][f] = params["b_enc"][0], params["threshold"][0]
    params["W_dec"][3] = params["W_dec"][4] + 0.05 * params["W_dec"][3]  # 3 writes what 4 does
    folder = tmp_path / "saes" / "tiny-scope-res" / "layer_2" / "width_256" / "average_l0_13"
    fixtures.write_params(folder, params)
    corpus = tmp_path / "a.txt"
    corpus.write_text("\n\n".join(d for d in fixtures.training_text() if len(d) > 200))
    root = tmp_path / "store"
    record(tiny_model, [load_sae(folder, device="cpu")],
           CorpusSpec(paths=(str(corpus),), max_tokens=1500), root,
           RecordSettings(ctx=CTX, k=5, samples=2, batch_size=16))  # fmt: skip
    store = Store(root)

    w = params["W_dec"] / np.linalg.norm(params["W_dec"], axis=1, keepdims=True)
    cos = w @ w.T
    np.fill_diagonal(cos, -2.0)
    by_decoder = set()
    for f in range(len(cos)):
        j = int(cos[f].argmax())
        if cos[f, j] > 0.95:
            by_decoder |= {f, j}
    tops: dict[int, list[tuple[int, int]]] = {}
    for f, window, pos in store.sql(
        "select feature, window_id, pos from topk order by feature, rank"
    ).fetchall():
        tops.setdefault(f, []).append((window, pos))
    groups: dict[tuple, list[int]] = {}
    for f, sig in tops.items():
        groups.setdefault(tuple(sig), []).append(f)
    by_examples = {f for g in groups.values() if len(g) > 1 for f in g}
    assert {0, 1, 2, 3, 4} <= by_decoder and {0, 1, 2} <= by_examples  # what was built in

    health = explore.health(store).df()
    assert (health["dup_decoder"][0], health["dup_examples"][0]) == (
        len(by_decoder),
        len(by_examples),
    )
    dead, dense = store.sql("select dead, dense from saes").fetchone()
    assert health["dead_frac"][0] == dead / 256 and health["dense_frac"][0] == dense / 256
    found = explore.duplicates(store).df()
    listed = {
        tuple(f) for f, k in zip(found["features"], found["kind"], strict=True) if k == "examples"
    }
    assert listed == {tuple(sorted(g)) for g in groups.values() if len(g) > 1}

    # the overview shows the same numbers and flags
    monkeypatch.setenv("SCOPE_STORE", str(root))
    at = AppTest.from_file(str(HOME), default_timeout=120).run()
    no_errors(at)
    shown = next(d.value for d in at.dataframe if "dup_examples" in d.value.columns)
    assert list(shown["dup_examples"]) == [len(by_examples)]
    assert list(shown["dup_decoder"]) == [len(by_decoder)]
    # flagged: more than 1% of the live features are in a duplicate group
    live = 256 - dead
    assert max(len(by_decoder), len(by_examples)) > 0.01 * live
    assert "duplicates" in shown["flags"][0].split()


def test_feature_lens_over_corpus_tokens_is_the_raw_lens_filtered(
    app, app_store, tiny_model, tiny_sae_dir
):
    store = Store(app_store)
    f = busiest(store)
    app.query_params.update({"sae": "L2.res.256", "feature": str(f)})
    app.switch_page("views/feature.py").run()
    no_errors(app)
    loading = [b for b in app.button if b.label == "load the model"]
    if loading:  # this process has not loaded the model yet
        loading[0].click().run()
        no_errors(app)
    sae = load_sae(tiny_sae_dir, device="cpu")
    logits = (sae.W_dec[f].detach() @ tiny_model.W_U.detach()).tolist()  # the raw lens
    corpus = {t for (tokens,) in store.sql("select tokens from windows").fetchall()
              for t in tokens[1:]}  # fmt: skip
    inside = sorted(corpus, key=lambda t: -logits[t])
    vocab = store.tokens_text(list(range(len(logits))))
    promotes, suppresses = app.dataframe[0].value, app.dataframe[1].value
    assert list(promotes["token"]) == [visible(vocab[t]) for t in inside[:10]]
    assert list(promotes["logit"]) == pytest.approx([logits[t] for t in inside[:10]], abs=1e-4)
    assert list(suppresses["token"]) == [visible(vocab[t]) for t in inside[::-1][:10]]
    # the stored lens over the whole vocabulary, filtered to the corpus, begins the same list
    (top_ids,) = store.sql("select top_ids from lens where feature = ?", [f]).fetchone()
    raw = [visible(vocab[i]) for i in top_ids]
    kept = [visible(vocab[i]) for i in top_ids if i in corpus]
    assert list(promotes["token"])[: len(kept)] == kept
    assert len(kept) < len(raw)  # the corpus leaves some of the raw top tokens out

    app.radio[0].set_value("all").run()
    no_errors(app)
    assert list(app.dataframe[0].value["token"]) == raw


def test_feature_page_tries_the_feature_on_typed_text(app, app_store, tiny_model, tiny_sae_dir):
    store = Store(app_store)
    live = store.sql("select min(feature) from features where not dead").fetchone()[0]
    app.switch_page("views/feature.py").run()  # the sidebar's link: no feature named
    no_errors(app)
    assert app.title[0].value.startswith(f"L2.res.256/{live}")  # a live feature, not 0 if dead
    f = busiest(store)
    app.query_params.update({"sae": "L2.res.256", "feature": str(f)})
    app.run()
    text = "The quick brown fox jumps over the lazy dog."
    next(t for t in app.text_area if t.label == "your text").input(text)
    next(b for b in app.button if b.label == "Show the feature on it").click().run()
    no_errors(app)
    sae = load_sae(tiny_sae_dir, device="cpu")
    acts = activations(tiny_model, [sae], text, store=store)
    values = acts.strip("L2.res.256", f)
    shown = next(h.proto.body for h in app.get("html") if "id='tried'" in h.proto.body)
    assert re.findall(r'title="([-\d.]+)"', shown) == [f"{values[p]:.3f}" for p in acts.counted]


def test_page_scripts_hold_no_bare_strings_that_streamlit_would_draw():
    """Streamlit's "magic" draws each bare expression of a page script: a string after the
    page's docstring (an attribute docstring, say) shows at the top of the page as text."""
    import ast

    pages = [HOME, *sorted((HOME.parent / "views").glob("*.py"))]
    assert len(pages) > 5
    drawn = [
        f"{page.name}:{node.lineno}"
        for page in pages
        for node in ast.parse(page.read_text()).body[1:]
        if isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant)
    ]
    assert drawn == [], f"bare strings Streamlit would draw (make them comments): {drawn}"
