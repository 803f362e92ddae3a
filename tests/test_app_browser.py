"""The explorer end to end in a real browser: `scope app` serving a store, driven by Playwright in
Chromium. Screenshots go to test-output/screenshots/ (or $SCOPE_SCREENSHOTS)."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from served import free_port, wait_served

from scope.steer_spec import with_maxes
from scope.store import Store

pytestmark = pytest.mark.slow

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
SHOTS = Path(
    os.environ.get("SCOPE_SCREENSHOTS", Path(__file__).parents[1] / "test-output" / "screenshots")
)
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync"]  # fmt: skip


@contextmanager
def serving(store: Path, model: Path, port: int) -> Iterator[str]:
    """`scope app` on 127.0.0.1:port until the block ends; its output is kept for failures."""
    log = open(store.parent / f"app-{port}.log", "w")  # noqa: SIM115
    proc = subprocess.Popen(
        [sys.executable, "-m", "scope.cli", "app", "--store", str(store), "--model", str(model),
         "--device", "cpu", "--port", str(port)],
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        wait_served(url, proc, Path(log.name))
        yield url
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)
        log.close()


@pytest.fixture(scope="module")
def browser():
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed")
    if CHROMIUM is None:
        pytest.skip("chromium is not installed (apt-get install -y chromium)")
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=ARGS)
        yield b
        b.close()


def shot(page, name: str) -> None:
    SHOTS.mkdir(parents=True, exist_ok=True)
    page.wait_for_timeout(600)  # let plotly and the fonts settle
    page.screenshot(path=str(SHOTS / f"{name}.png"), full_page=True)


def test_explorer_in_a_browser(browser, app_store, tiny_dir):
    store = Store(app_store)
    row = store.sql("select feature, max from features order by count desc limit 1").fetchone()
    assert row is not None
    f, top = int(row[0]), float(row[1])
    view = store.feature(f"L2.res.256/{f}")
    port = free_port()
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    page.set_default_timeout(120_000)
    with serving(app_store, tiny_dir, port) as url:
        page.goto(url)
        page.get_by_text("Feature density").wait_for()
        shot(page, "overview")

        # a feature page opened by its URL: shaded examples, the histogram, a token's value
        page.goto(f"{url}/feature?sae=L2.res.256&feature={f}")
        page.get_by_text("Top examples").wait_for()
        page.locator("#top-examples .tok").first.wait_for()
        page.locator(".js-plotly-plot").first.wait_for()
        assert page.get_by_role("heading", name=f"L2.res.256/{f}").count() == 1
        best = page.locator("#top-examples .tok[style*='outline']").first
        best.hover()
        value = best.evaluate("e => getComputedStyle(e, '::after').content")
        assert value.strip('"') == f"{view.top[0].acts[view.top[0].pos]:.3f}"
        assert float(value.strip('"')) == pytest.approx(top, abs=1e-3)
        shot(page, "feature")

        # search by the top example's activating token
        word = view.top[0].tokens[view.top[0].pos].strip()
        page.goto(f"{url}/search")
        box = page.get_by_role("textbox", name="token or text")
        box.fill(word)
        box.press("Enter")
        page.get_by_text("features", exact=False).first.wait_for()
        page.wait_for_timeout(1500)
        shot(page, "search")

        # the prompt inspector
        page.goto(f"{url}/inspector")
        page.get_by_role("textbox", name="text").fill(
            "The quick brown fox jumps over the lazy dog."
        )
        page.get_by_role("button", name="Inspect").click()
        page.get_by_text("Heat strips").wait_for()
        # the table's feature links and each strip's link (the page may draw them a moment
        # after the heading shows, so poll rather than count at once)
        links = page.locator("table a[href*='/feature?sae=L2.res.256']")
        strips = page.locator(".ex a[href*='/feature?sae=L2.res.256']")
        until(page, lambda: links.count() > 0 and strips.count() > 0,
              lambda: f"no feature links on the inspector: {page.locator('body').inner_text()}",
              timeout=120)  # fmt: skip
        shot(page, "inspector")

        # the lab, entered from the feature page, generates baseline and steered text
        page.goto(f"{url}/feature?sae=L2.res.256&feature={f}")
        page.get_by_role("button", name="Steer with this").click()
        page.get_by_role("heading", name="Steering lab").wait_for()
        page.get_by_role("textbox", name="prompt").fill("The fox")
        page.get_by_role("button", name="Generate").click()
        page.get_by_text("steered tokens, seed 0").wait_for()
        assert page.locator("div.gen[data-which='steered']").inner_text().strip()
        shot(page, "lab")

        # a label saved on the page
        page.goto(f"{url}/feature?sae=L2.res.256&feature={f}")
        page.get_by_role("textbox", name="label", exact=True).fill("browser label")
        page.get_by_role("button", name="Save").click()
        deadline = time.time() + 60  # the toast may come and go before a busy machine looks
        while Store(app_store).label("L2.res.256", f)[0] != "browser label":
            assert time.time() < deadline, "the label was not saved"
            page.wait_for_timeout(250)

    # after a restart the label is found by search
    with serving(app_store, tiny_dir, free_port()) as url:
        page.goto(f"{url}/search")
        box = page.get_by_role("textbox", name="label or notes")
        box.fill("browser")
        box.press("Enter")
        page.get_by_text("1 features").wait_for()
        shot(page, "search-label")
    page.close()


@pytest.fixture(scope="module")
def explorer(app_store, tiny_dir) -> Iterator[str]:
    """One explorer served for the tests below (each opens its own pages, so its own sessions)."""
    with serving(app_store, tiny_dir, free_port()) as url:
        yield url


def until(page, check, what, timeout: float = 60) -> None:
    """Poll ``check()`` (a page settles over a few reruns) until it holds; fail saying
    ``what()``, what the page shows then."""

    def holds() -> bool:
        try:
            return bool(check())
        except Exception:  # an element not there yet (Playwright's errors)
            return False

    deadline = time.time() + timeout
    while not holds():
        if time.time() > deadline:
            shot(page, "failed")
            pytest.fail(what())
        page.wait_for_timeout(250)


def as_shown(text: str) -> str:
    """Generated text compared as a page shows it: the random-weight model's byte fragments
    (U+FFFD) and control characters left out, as a browser drops or folds some of them."""
    return "".join(ch for ch in text if ch.isprintable() and ch != "\ufffd")


def shown_tokens(page) -> str:
    """The inspector's table, its token column joined back into text."""
    cells = page.locator("table tr td:nth-child(2)").all_inner_texts()
    return "".join(cells).replace("·", " ")


def test_every_edit_in_the_inspector_is_what_is_analysed(browser, explorer):
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    page.set_default_timeout(120_000)
    page.goto(f"{explorer}/inspector")
    box = page.get_by_role("textbox", name="text")
    texts = ["Paris is the capital of France.", "Tokyo is in Japan.",
             "The quick brown fox jumps.", "Rivers run to the sea."]  # fmt: skip
    for text in texts:
        box.fill(text)
        page.get_by_role("button", name="Inspect").click()
        until(
            page,
            lambda t=text: box.input_value() == t and shown_tokens(page) == t,
            lambda t=text: (
                f"after typing {t!r} and Inspect, the box holds "
                f"{box.input_value()!r} and the table shows {shown_tokens(page)!r}"
            ),
            timeout=30,
        )
    shot(page, "inspector-edits")
    page.close()


def test_every_prompt_in_the_lab_is_what_is_generated(browser, explorer, app_store, tiny_model):
    from scope.generate import Sampling, compare
    from scope.sae import load_recorded_sae
    from scope.steer import Steer

    store = Store(app_store)
    f = int(store.sql("select feature from features order by count desc limit 1").fetchone()[0])
    sae = load_recorded_sae(store.saes["L2.res.256"], device="cpu")
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    page.set_default_timeout(120_000)
    page.goto(f"{explorer}/feature?sae=L2.res.256&feature={f}")
    page.get_by_role("button", name="Steer with this").click()
    page.get_by_role("heading", name="Steering lab").wait_for()
    box = page.get_by_role("textbox", name="prompt")
    sampling = Sampling(max_new_tokens=40, temperature=0.7, top_p=0.9, seed=0)
    for prompt in ["The fox", "Rivers run to", "In the morning the"]:
        steers = with_maxes([Steer(sae, f, 1.0, unit="max")], store)
        want = compare(tiny_model, prompt, steers, sampling=sampling, store=store)
        box.fill(prompt)
        page.get_by_role("button", name="Generate").click()

        def done(p: str = prompt, w: str = as_shown(want.baseline)) -> bool:
            baseline = page.locator("div.gen[data-which='baseline']")
            return (
                box.input_value() == p
                and baseline.count() == 1
                and as_shown(baseline.text_content()) == w
            )

        def said(p: str = prompt, w: str = want.baseline) -> str:
            shown = page.locator("div.gen[data-which='baseline']").all_text_contents()
            return (f"after typing {p!r} and Generate, the box holds {box.input_value()!r} and "
                    f"the baseline is {shown!r}, not the library's {w!r}")  # fmt: skip

        until(page, done, said)
    shot(page, "lab-prompts")
    page.close()


def settle(page) -> None:
    """Wait until the page's run (started by the last input) has finished."""
    page.wait_for_timeout(400)
    page.locator("[data-testid=stStatusWidget]").wait_for(state="hidden")


def pick(page, label: str, option: str) -> None:
    """Choose ``option`` in the first selectbox labelled ``label`` (the lab's "Add a feature")."""
    page.get_by_role("combobox", name=label, exact=True).first.click()
    page.get_by_role("option", name=option, exact=True).click()
    settle(page)


def fill_feature(page, feature: int) -> None:
    """Type ``feature`` into the lab's "Add a feature" box, opening the expander when it is
    closed; a rerun may be under way, so each step is retried until the box shows the number."""
    from playwright.sync_api import TimeoutError as PlaywrightTimeout

    number = page.get_by_role("spinbutton", name="feature", exact=True)
    expander = page.locator("details").filter(has_text="Add a feature")
    for _ in range(8):
        settle(page)
        if expander.get_attribute("open") is None:
            expander.locator("summary").click()
            settle(page)
        try:
            number.fill(str(feature), timeout=5000)
            number.press("Enter", timeout=5000)
            settle(page)
            if number.input_value(timeout=5000) == str(feature):
                return
        except PlaywrightTimeout:
            continue
    shot(page, "failed")
    pytest.fail(f"the lab's feature box never took {feature}")


def steer_row(page, feature: int):
    """The steering lab's row of ``feature``: its link, mode, strength, unit and positions."""
    link = page.get_by_role("link", name=f"L2.res.256/{feature}", exact=True)
    return page.locator("[data-testid=stHorizontalBlock]").filter(has=link).last


def row_settings(page, feature: int) -> tuple[str, ...]:
    """A row's mode, strength, positions, and its unit when the mode is add."""
    row = steer_row(page, feature)
    mode = row.get_by_role("combobox", name="mode").input_value(timeout=2000)
    shown = (
        mode,
        row.get_by_role("spinbutton", name="strength").input_value(timeout=2000),
        row.get_by_role("combobox", name="positions").input_value(timeout=2000),
    )
    if mode != "add":
        return shown
    return (*shown, row.get_by_role("combobox", name="unit").input_value(timeout=2000))


def test_removing_a_steered_feature_keeps_every_other_rows_settings(
    browser, explorer, app_store, tiny_model
):
    from scope.generate import Sampling, compare
    from scope.sae import load_recorded_sae
    from scope.steer import Steer

    store = Store(app_store)
    a, b, c = (int(r[0]) for r in store.sql(
        "select feature from features where not dead order by count desc limit 3").fetchall())  # fmt: skip
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    page.set_default_timeout(30_000)
    page.goto(f"{explorer}/lab")
    page.get_by_role("heading", name="Steering lab").wait_for()
    rows = [(a, "add", "3", "prompt"), (b, "ablate", None, "all"), (c, "clamp", "2", "all")]
    for feature, mode, strength, positions in rows:
        add = page.get_by_role("button", name="Add", exact=True)
        fill_feature(page, feature)
        pick(page, "mode", mode)
        if strength is not None:
            box = page.get_by_role("spinbutton", name="strength", exact=True).first
            box.fill(strength)
            box.press("Enter")
            settle(page)
        pick(page, "positions", positions)
        page.wait_for_timeout(500)
        add.click()
        page.get_by_role("link", name=f"L2.res.256/{feature}", exact=True).wait_for()
    want_a, want_c = ("add", "3.00", "prompt", "max"), ("clamp", "2.00", "all")
    until(page, lambda: row_settings(page, a) == want_a and row_settings(page, c) == want_c,
          lambda: "the rows do not show the settings they were added with", timeout=30)  # fmt: skip
    steer_row(page, b).get_by_role("button", name="✕").click()
    until(page, lambda: page.get_by_role("link", name=f"L2.res.256/{b}", exact=True).count() == 0,
          lambda: f"L2.res.256/{b} was not removed", timeout=30)  # fmt: skip
    page.wait_for_timeout(1000)
    assert (row_settings(page, a), row_settings(page, c)) == (want_a, want_c)
    shot(page, "lab-rows")

    # what runs is what the rows show
    sae = load_recorded_sae(store.saes["L2.res.256"], device="cpu")
    want = compare(tiny_model, "The fox", with_maxes([Steer(sae, a, 3.0, unit="max", positions="prompt"),
                                                      Steer(sae, c, 2.0, mode="clamp")], store),
                   sampling=Sampling(max_new_tokens=40, temperature=0.7, top_p=0.9, seed=0),
                   store=store)  # fmt: skip
    shifted = compare(tiny_model, "The fox", with_maxes([Steer(sae, a, 3.0, unit="max", positions="prompt"),
                                                         Steer(sae, c, 0.0, mode="ablate")], store),
                      sampling=Sampling(max_new_tokens=40, temperature=0.7, top_p=0.9, seed=0),
                      store=store)  # fmt: skip
    assert as_shown(shifted.steered) != as_shown(want.steered)  # the test tells them apart
    page.get_by_role("textbox", name="prompt").fill("The fox")
    page.get_by_role("button", name="Generate").click()
    steered = page.locator("div.gen[data-which='steered']")
    until(page, lambda: steered.count() == 1 and as_shown(steered.text_content()) == as_shown(want.steered),
          lambda: f"the steered text is {steered.all_text_contents()!r}, not the library's "
          f"{as_shown(want.steered)!r} for the rows shown")  # fmt: skip
    page.close()


def test_a_steer_built_across_two_tabs(browser, explorer, app_store):
    """The steer list lives in the URL: a feature opened in a new tab from the lab, then a
    nearest-feature link followed in place, adds to the same list; Back from a heat strip's
    link returns to the inspector's analysis."""
    store = Store(app_store)
    f = int(store.sql("select feature from features order by count desc limit 1").fetchone()[0])
    near = store.feature(f"L2.res.256/{f}").neighbours[0][0]
    context = browser.new_context(viewport={"width": 1400, "height": 1000})
    context.set_default_timeout(60_000)
    first = context.new_page()
    first.goto(f"{explorer}/feature?sae=L2.res.256&feature={f}")
    first.get_by_role("button", name="Steer with this").click()
    first.get_by_role("heading", name="Steering lab").wait_for()
    strength = steer_row(first, f).get_by_role("spinbutton", name="strength")
    strength.fill("3")
    strength.press("Enter")
    link = first.get_by_role("link", name=f"L2.res.256/{f}", exact=True)
    steered = f"steer=L2.res.256%2F{f}%3A3xmax"  # SteerSpec's form: L2.res.256/F:3xmax
    until(first, lambda: steered in first.url and steered in (link.get_attribute("href") or ""),
          lambda: f"the lab's URL {first.url} does not hold the steer as set")  # fmt: skip

    # the row's link, opened in a second tab, carries the list
    href = link.get_attribute("href")
    second = context.new_page()
    second.goto(f"{explorer}{href}")
    link = second.get_by_role("link", name=str(near), exact=True)
    assert link.get_attribute("target") == "_self"  # links inside the app navigate in place
    link.click()
    second.get_by_role("heading", name=f"L2.res.256/{near}").wait_for()
    second.get_by_role("button", name="Steer with this").click()
    second.get_by_role("heading", name="Steering lab").wait_for()
    until(second, lambda: row_settings(second, f) == ("add", "3.00", "all", "max")
          and row_settings(second, near) == ("add", "1.00", "all", "max"),
          lambda: "the second tab's lab does not hold both steered features")  # fmt: skip
    shot(second, "lab-two-tabs")

    # Back from a heat strip's link returns to the inspector's analysis
    text = "Paris is the capital of France."
    second.goto(f"{explorer}/inspector")
    second.get_by_role("textbox", name="text").fill(text)
    second.get_by_role("button", name="Inspect").click()
    until(second, lambda: shown_tokens(second) == text, lambda: f"{text!r} was not analysed")
    strip = second.locator("div.ex a").first
    strip.click()
    second.get_by_role("heading", name="Top examples").wait_for()
    second.go_back()
    until(second, lambda: shown_tokens(second) == text,
          lambda: f"Back shows {shown_tokens(second)!r}, not the analysis of {text!r}")  # fmt: skip
    assert second.get_by_role("textbox", name="text").input_value() == text
    context.close()
