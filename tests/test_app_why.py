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
        assert f"[L2.res.256/{r.feature}](/feature?sae=L2.res.256&feature={r.feature})" in line
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
