"""The README's main command end to end at small scale: `./dev demo` on the real Gemma 3 270M and
the shipped demo SAEs. It prepares the model and starts recording; the explorer answers before the
recording ends and its overview shows how far the recording is (AppTest, and a Chromium
screenshot where Playwright and Debian's chromium are installed); Ctrl-C (SIGINT to its process
group, as a terminal sends it) stops both; run again, it serves at once what was recorded and
continues; a finished recording is served without recording again. The store ends equal, table
by table to the bit, to an uninterrupted `scope record` of the same corpus, and one feature page's
data is checked against the model run through sae-lens directly."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from served import free_port, wait_served
from store_compare import assert_identical
from streamlit.testing.v1 import AppTest

from scope.demo import demo_available, demo_sae_ids
from scope.store import Store
from scope.store.progress import read_status

pytestmark = pytest.mark.slow

ROOT = Path(__file__).parents[1]
TOKENS = 20_000
"""About 240 windows of 128 tokens: four batches, a minute or two on two CPU cores."""
SHOTS = Path(
    os.environ.get("SCOPE_SCREENSHOTS", Path(__file__).parents[1] / "test-output" / "screenshots")
)


def demo(store: Path, port: int, log: Path) -> subprocess.Popen:
    """`./dev demo` in its own process group (a terminal's foreground job), using this venv."""
    env = {**os.environ, "SCOPE_VENV": sys.prefix, "PYTHONUNBUFFERED": "1"}
    with log.open("w") as out:  # the child keeps its own copy of the descriptor
        return subprocess.Popen(
            [str(ROOT / "dev"), "demo", "--tokens", str(TOKENS), "--store", str(store),
             "--port", str(port)],
            stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True,
        )  # fmt: skip


def stop(proc: subprocess.Popen, sig: int) -> int:
    """Sends ``sig`` to the demo's process group and waits until every process in it (the
    recording, the explorer) has ended; the script's own exit code (one that already exited
    keeps its own, and the failure that ended it is the one the test reports)."""
    if proc.poll() is None:
        os.killpg(proc.pid, sig)
    code = proc.wait(timeout=300)
    deadline = time.monotonic() + 120
    while True:
        try:
            os.killpg(proc.pid, 0)
        except ProcessLookupError:
            return code
        assert time.monotonic() < deadline, "a process of the demo outlived the stop"
        time.sleep(0.5)


def overview_in_a_browser(url: str, path: Path) -> str | None:
    """The overview's progress line as Chromium shows it, with a screenshot at ``path``; None
    where Playwright or Debian's chromium is missing."""
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        return None
    if chromium is None:
        return None
    args = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
            "--disable-background-networking", "--disable-component-update", "--disable-sync"]  # fmt: skip
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, headless=True, args=args)
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        page.set_default_timeout(180_000)
        page.goto(url)
        page.get_by_text("Feature density").wait_for()
        page.wait_for_timeout(1000)  # let plotly and the fonts settle
        path.parent.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(path), full_page=True)
        line = page.get_by_text("Recording:").first.inner_text()
        browser.close()
    return line


def test_dev_demo_serves_while_recording_stops_resumes_and_equals_one_pass(tmp_path, monkeypatch):
    if why := demo_available():
        pytest.skip(f"the demo model and corpus packages are needed: {why}")
    if not (ids := demo_sae_ids()):
        pytest.skip("no demo SAEs under saes/")
    store, port = tmp_path / "demo", free_port()
    url = f"http://127.0.0.1:{port}"

    # first run: prepare, record, and the explorer answers while the recording goes on
    log = tmp_path / "first.log"
    proc = demo(store, port, log)
    try:
        wait_served(url, proc, log, timeout=1200)
        status = read_status(store)
        assert status is not None and status.running(), log.read_text()[-3000:]
        assert status.tokens < status.total == Store(store).manifest.parts[-1].tokens
        monkeypatch.setenv("SCOPE_STORE", str(store))
        at = AppTest.from_file(str(ROOT / "app" / "Home.py"), default_timeout=300).run()
        assert not at.exception and not at.error, [e.value for e in at.exception]
        bar = at.get("progress")[0].proto.text
        assert re.match(rf"Recording: [\d,]+ of {status.total:,} tokens \(\d+%\) · ", bar), bar
        line = overview_in_a_browser(url, SHOTS / "demo-recording.png")
        assert line is None or f"of {status.total:,} tokens" in line, line
    finally:
        code = stop(proc, signal.SIGINT)
    text = log.read_text()
    assert code == 2, text[-3000:]
    assert "stopped by SIGINT" in text and "the same ./dev demo continues it" in text
    assert f"explorer: {url}" in text
    part = json.loads((store / "manifest.json").read_text())["parts"][-1]
    assert 0 < part["next"] < part["windows"]
    kept = Store(store)  # the stop left a snapshot of everything recorded
    assert kept.sql("select max(tokens) from saes").fetchone() == (status_tokens(store),)

    # second run: serves what was recorded at once (before the model loads), then continues
    log = tmp_path / "second.log"
    proc = demo(store, port, log)
    try:
        wait_served(url, proc, log, timeout=600)
        assert not re.search(r"recorded [\d,]+/", log.read_text())  # nothing recorded yet
        deadline = time.monotonic() + 1200
        while "the explorer serves it until Ctrl-C" not in log.read_text():
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(1)
        text = log.read_text()
        assert "creating" not in text and "installing" not in text
        done = re.search(r"recorded ([\d,]+) tokens in", text)
        assert done, text[-3000:]
        assert 0 < int(done[1].replace(",", "")) < TOKENS  # only what the first run left
    finally:
        code = stop(proc, signal.SIGINT)
    assert code == 0, log.read_text()[-3000:]  # Ctrl-C ends a finished demo's serving

    # third run: the finished recording is served without loading the model to record
    log = tmp_path / "third.log"
    proc = demo(store, port, log)
    try:
        wait_served(url, proc, log)
        assert "recording" not in log.read_text()
    finally:
        stop(proc, signal.SIGTERM)

    s = Store(store)
    assert s.manifest.state == "complete"
    assert set(s.saes) == {f"L{i.split('/')[1][6:]}.res.4k" for i in ids}
    windows = s.sql("select count(*), sum(n_tokens) from windows").fetchone()
    assert windows is not None and windows[0] >= 150 and windows[1] >= TOKENS
    status = read_status(store)
    assert status is not None and status.state == "complete" and status.tokens == status.total

    # the same corpus recorded in one uninterrupted `scope record`
    model, corpus = (s.manifest.model.name, s.manifest.parts[-1].corpus[0])
    plain = tmp_path / "plain"
    args = [sys.executable, "-m", "scope.cli", "record", "--model", model, "--corpus", corpus,
            "--tokens", "20k", "--store", str(plain)]  # fmt: skip
    for sae in ids:
        args += ["--sae", sae]
    one = subprocess.run(args, capture_output=True, text=True, timeout=1800)
    assert one.returncode == 0, one.stderr[-3000:]
    assert_identical(plain, store)
    check_feature_page(s)


def status_tokens(store: Path) -> int:
    status = read_status(store)
    assert status is not None and status.state == "stopped"
    assert status.snapshot_tokens == status.tokens  # the stop's snapshot holds all of it
    return status.tokens


def check_feature_page(s: Store) -> None:
    """The middle layer's strongest feature, as its page shows it: the top example's activation
    on every token equals the model and SAE run on that window alone through sae-lens, and the
    page's max is the feature's max."""
    from scope.model import load_model
    from scope.sae import load_recorded_sae

    key = "L9.res.4k"
    feature, top = s.sql(
        "select feature, max from features where sae = ? order by max desc limit 1", [key]
    ).fetchone()
    view = s.feature(f"{key}/{feature}")
    assert view.max == pytest.approx(top) and view.count > 0
    assert view.top and view.top[0].act == pytest.approx(top)
    assert view.top_tokens and view.neighbours and view.histogram
    best = view.top[0]
    ids = s.sql("select tokens from windows where window_id = ?", [best.window]).fetchone()[0]
    assert "".join(best.tokens) == "".join(s.tokens_text(ids))

    model = load_model(s.manifest.model.name, device="cpu")
    sae = load_recorded_sae(s.saes[key])
    hook = sae.cfg.metadata.hook_name + ".hook_sae_acts_post"
    with torch.no_grad():
        _, cache = model.run_with_cache_with_saes(
            torch.tensor([ids]), saes=[sae], names_filter=lambda name: name == hook
        )
    expect = cache[hook][0, :, feature].double().numpy()
    expect[0] = 0.0  # BOS does not count
    got = np.array(best.acts, dtype=np.float64)
    np.testing.assert_allclose(got, expect[: len(got)], atol=1e-3 * top, rtol=1e-3)
    assert int(np.argmax(got)) == best.pos
