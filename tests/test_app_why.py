"""The explorer's "Why" page, headless (AppTest) on the tiny model's store: the top features it
lists are ``scope.attribute``'s, the layer-by-position chart is drawn, and the ablation check
moves the target the way the attributions say."""

from __future__ import annotations

from pathlib import Path

import pytest
from streamlit.testing.v1 import AppTest

from scope import load_sae
from scope.attribute import Target, attribute, measure
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
    app.button[0].click().run()
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
            assert page.locator("table a[href*='/feature?sae=L2.res.256']").count() == 15
            shot(page, "why-top")
            page.get_by_role("button", name="Run the ablation check").click()
            page.get_by_text("features ablated at every position").wait_for()
            shot(page, "why")
        browser.close()
