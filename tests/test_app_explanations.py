"""Explanations in the explorer (AppTest): the feature page shows them with their scores and
explains on request, the search finds features by a word of their explanations, the overview
counts them."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from streamlit.testing.v1 import AppTest

from scope.explain import explain_features
from scope.store import Store, explore

HOME = Path(__file__).parents[1] / "app" / "Home.py"
KEY = "L2.res.256"
WORDS = {0: "compass directions after to the", 1: "years in dates"}


class Writer:
    """An explainer whose explanations are known, and a scorer that always says Yes."""

    name, style = "scripted", "chat"

    def __init__(self) -> None:
        self.next: list[str] = []

    def explain(self, shown, top):
        return "prompt", self.next.pop(0)

    def judge(self, questions):
        return [True] * len(questions)


@pytest.fixture(scope="module")
def explained(tmp_path_factory, app_store, tiny_model, tiny_sae_dir) -> tuple[Path, list[int]]:
    from scope import load_sae

    root = tmp_path_factory.mktemp("app-expl") / "store"
    shutil.copytree(app_store, root, ignore=shutil.ignore_patterns("explanations", "labels"))
    live = [f for f in WORDS if Store(root).sql(
        f"select count from features where sae = '{KEY}' and feature = {f}").fetchone()[0] > 0]  # fmt: skip
    writer = Writer()
    writer.next = [WORDS[f] for f in live]
    sae = load_sae(tiny_sae_dir, device="cpu")
    explain_features(str(root), [(KEY, f) for f in live], model=tiny_model, saes={KEY: sae},
                     explainer=writer, examples=4)  # fmt: skip
    return root, live


def page(root: Path, monkeypatch, tiny_dir, explainer: str | None = None) -> AppTest:
    monkeypatch.setenv("SCOPE_STORE", str(root))
    monkeypatch.setenv("SCOPE_MODEL", str(tiny_dir))
    monkeypatch.setenv("SCOPE_DEVICE", "cpu")
    if explainer:
        monkeypatch.setenv("SCOPE_EXPLAINER", explainer)
    return AppTest.from_file(str(HOME), default_timeout=180)


def test_feature_page_shows_explanations_with_scores(explained, monkeypatch, tiny_dir):
    root, live = explained
    at = page(root, monkeypatch, tiny_dir)
    at.query_params.update({"sae": KEY, "feature": str(live[0])})
    at.switch_page("views/feature.py").run()
    assert not at.exception and not at.error
    (shown,) = [m.value for m in at.markdown if WORDS[live[0]].replace(" ", "·") in m.value]
    e = Store(root).feature(f"{KEY}/{live[0]}").explanations[0]
    assert f"detection {e.detection:.2f} · fuzzing {e.fuzzing:.2f}" in shown
    assert f"({e.n_pos} held-out / {e.n_neg} non-activating" in shown and "`scripted`" in shown
    assert not [b for b in at.button if b.label == "Explain"]  # no --explainer: no button


def test_search_finds_features_by_their_explanations(explained, monkeypatch, tiny_dir):
    root, live = explained
    rows = explore.search(Store(root), explore.Query(label="compass")).df()
    assert list(rows["feature"]) == [f for f in live if "compass" in WORDS[f]]
    assert list(rows["explanation"]) == [WORDS[f] for f in live if "compass" in WORDS[f]]
    at = page(root, monkeypatch, tiny_dir)
    at.switch_page("views/search.py").run()
    at.text_input[1].input("year").run()  # a prefix of the last word
    table = at.dataframe[0].value
    assert list(table["feature"]) == [f for f in live if "years" in WORDS[f]]
    assert list(table["explanation"]) == [WORDS[f] for f in live if "years" in WORDS[f]]


def test_overview_counts_explanations(explained, monkeypatch, tiny_dir):
    root, live = explained
    at = page(root, monkeypatch, tiny_dir)
    at.run()
    assert not at.exception and not at.error
    (summary,) = [d.value for d in at.dataframe if "explained" in d.value.columns]
    assert list(summary["explained"]) == [len(live)]


@pytest.mark.slow
def test_explain_button_explains_with_the_apps_explainer(
    explained, monkeypatch, tiny_dir, tmp_path
):
    """--explainer naming an endpoint (`scope serve` over the tiny model, with room for the
    prompts): the button explains the feature and the page shows the new explanation; the
    store's own tiny model (256 tokens of context) is refused in one line instead."""
    from test_serve import Server

    from scope import load_model
    from scope.serve import create_app

    root, live = explained
    copy = tmp_path / "store"
    shutil.copytree(root, copy)
    dense = int(Store(copy).sql(f"select feature from features where sae = '{KEY}' and count > 0 "
                                "and feature not in (0, 1) order by count desc limit 1").fetchone()[0])  # fmt: skip
    at = page(copy, monkeypatch, tiny_dir, explainer=str(tiny_dir))
    at.query_params.update({"sae": KEY, "feature": str(dense)})
    at.switch_page("views/feature.py").run()
    (button,) = [b for b in at.button if b.label == "Explain"]
    button.click().run()
    assert any("context (256 tokens) cannot hold" in str(e.value) for e in at.error)
    server = Server(create_app(load_model(tiny_dir, device="cpu", n_ctx=4096), []))
    try:
        at = page(copy, monkeypatch, tiny_dir, explainer=server.url)
        at.query_params.update({"sae": KEY, "feature": str(dense)})
        at.switch_page("views/feature.py").run()
        (button,) = [b for b in at.button if b.label == "Explain"]
        button.click().run()
    finally:
        server.stop()
    assert not at.exception, [e.value for e in at.exception]
    got = Store(copy).feature(f"{KEY}/{dense}").explanations
    if got:  # a random-weight model may answer nothing: then the page says so
        assert got[0].explainer.startswith("http:") and got[0].n_pos > 0
        assert any(got[0].explanation.replace(" ", "·")[:20] in m.value for m in at.markdown)
    else:
        assert not at.error or any("no text" in str(e.value) for e in at.error)
