"""The explorer's "Why" page, headless (AppTest) on the tiny model's store: the top features it
lists are ``scope.attribute``'s, the layer-by-position chart is drawn, and the ablation check
moves the target the way the attributions say."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from streamlit.testing.v1 import AppTest

from scope import load_sae
from scope import testing as fixtures
from scope.attribute import Target, attribute, measure
from scope.graph import attribution_graph, prune
from scope.steer import Steer, steering

HOME = Path(__file__).parents[1] / "app" / "Home.py"
PROMPT = "The quick brown fox jumps over the lazy"


@pytest.fixture
def app(app_store, tiny_dir, monkeypatch) -> AppTest:
    monkeypatch.setenv("SCOPE_STORE", str(app_store))
    monkeypatch.setenv("SCOPE_MODEL", str(tiny_dir))
    monkeypatch.setenv("SCOPE_DEVICE", "cpu")
    at = AppTest.from_file(str(HOME), default_timeout=180)
    at.session_state["inspect_text"] = PROMPT
    return at


def _drawn(app: AppTest) -> dict:
    """The nodes and edges the page's figure draws, by graph index, read from its traces."""
    spec = json.loads(app.get("plotly_chart")[0].proto.spec)
    nodes, edges, weights = set(), set(), {}
    for trace in spec["data"]:
        data = trace.get("customdata") or []
        if trace.get("mode") == "lines":
            for point in data:
                if point is not None:
                    edges.add((point[0], point[1]))
                    weights[(point[0], point[1])] = point[2]
        else:
            nodes.update(data)
    return {"nodes": nodes, "edges": edges, "weights": weights}


@pytest.fixture(scope="module")
def tc_store(tmp_path_factory, tiny_model) -> tuple[Path, list]:
    """A store recorded from the tiny model with a 32-wide transcoder at each of its layers."""
    from scope.corpus import CorpusSpec
    from scope.record import RecordSettings, record

    root = tmp_path_factory.mktemp("why-tc")
    folders = fixtures.build_transcoders(tiny_model, root / "tc", d_sae=32, firing_rate=0.08)
    saes = [load_sae(f, device="cpu") for f in folders]
    corpus = root / "corpus.txt"
    corpus.write_text("\n\n".join(d for d in fixtures.training_text()[:20] if len(d) > 200))
    record(tiny_model, saes, CorpusSpec(paths=(str(corpus),), max_tokens=800), root / "store",
           RecordSettings(ctx=32, k=5, samples=3, batch_size=16))  # fmt: skip
    return root / "store", saes


def test_why_draws_the_pruned_attribution_graph_and_steers_a_node(
    tc_store, tiny_dir, tiny_model, monkeypatch
):
    store, saes = tc_store
    monkeypatch.setenv("SCOPE_STORE", str(store))
    monkeypatch.setenv("SCOPE_MODEL", str(tiny_dir))
    monkeypatch.setenv("SCOPE_DEVICE", "cpu")
    app = AppTest.from_file(str(HOME), default_timeout=180)
    app.session_state["inspect_text"] = PROMPT
    app.switch_page("views/why.py").run()
    assert not app.exception, [e.value for e in app.exception]
    graph = attribution_graph(tiny_model, saes, PROMPT, max_feature_nodes=512)
    for node_t, edge_t in ((0.8, 0.98), (0.5, 0.9)):
        app.slider(key="why_node_t").set_value(node_t)
        app.slider(key="why_edge_t").set_value(edge_t).run()
        assert not app.exception, [e.value for e in app.exception]
        pruned = prune(graph, node_t, edge_t)
        drawn = _drawn(app)
        assert drawn["nodes"] == set(pruned.nodes.nonzero().flatten().tolist())
        targets, sources = pruned.edges.nonzero(as_tuple=True)
        assert drawn["edges"] == set(zip(sources.tolist(), targets.tolist(), strict=True))
        for (src, dst), w in drawn["weights"].items():
            assert w == pytest.approx(float(graph.adjacency[dst, src]), rel=1e-5, abs=1e-7)
        assert len(drawn["edges"]) > 5
    features = [i for i in drawn["nodes"] if i < graph.n_features]
    layer, pos, feature = graph.active[features[-1]].tolist()
    app.selectbox(key="why_node").set_value(features[-1]).run()
    link = f'<a href="/feature?sae=L{layer}.tc.32&amp;feature={feature}" target="_self">'
    assert any(link in m.value for m in app.markdown)
    app.button(key="why_steer").click().run()
    assert not app.exception, [e.value for e in app.exception]
    steers = app.session_state["steers"]
    assert [(r["sae"], r["feature"]) for r in steers] == [(f"L{layer}.tc.32", feature)]


def test_why_lists_the_top_features_draws_them_and_checks_by_ablation(
    app, tiny_model, tiny_sae_dir
):
    app.switch_page("views/why.py").run()
    assert not app.exception, [e.value for e in app.exception]
    assert not app.error, [e.value for e in app.error]
    sae = load_sae(tiny_sae_dir, device="cpu")
    tokens = tiny_model.to_tokens(PROMPT)
    top = int(tiny_model(tokens)[0, -1].argmax())
    want = attribute(tiny_model, [sae], tokens, Target(token=top), keys=["L2.res.256"]).df()
    table = next(m.value for m in app.markdown if m.value.startswith("| feature | pos |"))
    rows = table.splitlines()[2:]
    assert len(rows) == 15
    for line, r in zip(rows, want.head(15).itertuples(), strict=True):
        link = f'<a href="/feature?sae=L2.res.256&amp;feature={r.feature}" target="_self">'
        assert f"{link}L2.res.256/{r.feature}</a>" in line  # a link that opens in place
        assert f"| {r.position} |" in line and f"{r.attribution:+.4f}" in line
    assert len(app.get("plotly_chart")) == 1
    drawn = _drawn(app)
    kept = want[(want["attribution"].abs().cumsum() / want["attribution"].abs().sum()).shift(
        fill_value=0) < 0.8]  # fmt: skip
    assert drawn["nodes"] == set(range(len(kept))) | {-1}  # the features kept, and the target
    assert drawn["edges"] == {(i, -1) for i in range(len(kept))}
    for i, r in enumerate(kept.itertuples()):
        assert drawn["weights"][(i, -1)] == pytest.approx(r.attribution, rel=1e-6)
    app.button(key="why_ablate").click().run()
    said = next(m.value for m in app.markdown if m.value.startswith("With 5 features ablated"))
    chosen = want[want["attribution"] > 0].drop_duplicates(["sae", "feature"]).head(5)
    steers = [Steer(sae, int(f), mode="ablate") for f in chosen["feature"]]
    before = measure(tiny_model, tokens, Target(token=top))
    with steering(tiny_model, steers, prompt_len=tokens.shape[1]):
        after = measure(tiny_model, tokens, Target(token=top))
    assert f"from **{before:.3f}** to **{after:.3f}**" in said
    assert after < before  # the features the attributions say push the token up, ablated


@pytest.mark.slow
def test_why_in_a_browser(app_store, tiny_dir):
    """The page served by `scope app` in Chromium: the table of top features, the chart, and
    the ablation check's sentence after a click; a screenshot goes to test-output/screenshots/."""
    from served import free_port
    from test_app_browser import CHROMIUM, shot

    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed")
    if CHROMIUM is None:
        pytest.skip("chromium is not installed (apt-get install -y chromium)")
    from test_app_browser import ARGS, serving

    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=ARGS)
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        page.set_default_timeout(180_000)
        with serving(app_store, tiny_dir, free_port()) as url:
            page.goto(f"{url}/why")
            page.get_by_text("Top features by attribution").wait_for()
            page.locator(".js-plotly-plot").first.wait_for()
            links = page.locator("table a[href*='/feature?sae=L2.res.256']")
            links.nth(14).wait_for()
            assert links.count() == 15
            shot(page, "why-top")
            page.get_by_role("button", name="Run the ablation check").click()
            page.get_by_text("features ablated at every position").wait_for()
            shot(page, "why")
        browser.close()


@pytest.mark.slow
def test_why_graph_in_a_browser(tc_store, tiny_dir):
    """The attribution graph of the transcoder store in Chromium: nodes and edges drawn, the
    node picker under it; a screenshot goes to test-output/screenshots/why-graph.png."""
    from served import free_port
    from test_app_browser import CHROMIUM, shot

    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed")
    if CHROMIUM is None:
        pytest.skip("chromium is not installed (apt-get install -y chromium)")
    from test_app_browser import ARGS, serving

    store, _ = tc_store
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=ARGS)
        page = browser.new_page(viewport={"width": 1400, "height": 1100})
        page.set_default_timeout(180_000)
        with serving(store, tiny_dir, free_port()) as url:
            page.goto(f"{url}/why")
            page.get_by_text("feature nodes,").wait_for()
            plot = page.locator(".js-plotly-plot").first
            plot.wait_for()
            assert plot.locator("g.trace.scatter path.js-line").count() > 0  # edges
            assert plot.locator("path.point").count() > 10  # nodes
            page.get_by_role("button", name="Steer with this").wait_for()
            shot(page, "why-graph")
        browser.close()
