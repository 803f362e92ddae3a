"""The README's main command end to end at small scale: `./dev demo` on the real Gemma 3 270M and
the shipped demo SAEs. It prepares the model, records a few hundred windows, is stopped with
Ctrl-C part-way (SIGINT to its process group, as a terminal sends it), resumes when run again,
serves the explorer, and serves a finished recording without recording again. One feature
page's data is read back from the store and checked against the model run through sae-lens
directly."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from served import free_port, wait_served

from scope.demo import demo_available, demo_sae_ids
from scope.store import Store

pytestmark = pytest.mark.slow

ROOT = Path(__file__).parents[1]
TOKENS = 25_000
"""About 200 windows of 128 tokens: a couple of minutes on two CPU cores."""


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
    """Sends ``sig`` to the demo's process group; one that already exited keeps its own code
    (and the failure that ended it is the one the test reports)."""
    if proc.poll() is None:
        os.killpg(proc.pid, sig)
    return proc.wait(timeout=120)


def recorded_so_far(log: Path) -> int:
    """Tokens recorded, from the last "recorded N/M tokens" progress line."""
    found = re.findall(r"recorded ([\d,]+)/[\d,]+ tokens", log.read_text())
    return int(found[-1].replace(",", "")) if found else 0


def test_dev_demo_records_resumes_and_serves(tmp_path):
    if why := demo_available():
        pytest.skip(f"the demo model and corpus packages are needed: {why}")
    if not (ids := demo_sae_ids()):
        pytest.skip("no demo SAEs under saes/")
    store, port = tmp_path / "demo", free_port()
    url = f"http://127.0.0.1:{port}"

    # first run: prepare, start recording, Ctrl-C once some tokens are in
    log = tmp_path / "first.log"
    proc = demo(store, port, log)
    deadline = time.monotonic() + 900
    while recorded_so_far(log) == 0:
        assert proc.poll() is None, log.read_text()[-3000:]
        assert time.monotonic() < deadline, log.read_text()[-3000:]
        time.sleep(1)
    assert stop(proc, signal.SIGINT) == 2, log.read_text()[-3000:]
    text = log.read_text()
    assert "stopped by SIGINT" in text and "the same ./dev demo continues it" in text
    assert "explorer:" not in text  # nothing is served from a stopped recording
    part = json.loads((store / "manifest.json").read_text())["parts"][-1]
    assert 0 < part["next"] < part["windows"]

    # second run: continues from where it stopped, then serves
    log = tmp_path / "second.log"
    proc = demo(store, port, log)
    try:
        wait_served(url, proc, log, timeout=900)
        text = log.read_text()
        assert "creating" not in text and "installing" not in text
        done = re.search(r"recorded ([\d,]+) tokens in", text)
        assert done, text[-3000:]
        assert 0 < int(done[1].replace(",", "")) < TOKENS  # only what the first run left
        assert f"explorer: {url}" in text
    finally:
        stop(proc, signal.SIGTERM)

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
    check_feature_page(s)


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
