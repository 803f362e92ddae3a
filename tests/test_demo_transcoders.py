"""The shipped demo transcoders (saes/gemma-3-270m-demo-transcoders), a skip transcoder at every
layer of the real demo model: each card's figures are what ``scope.evals`` gives again on the
card's held-out slice (a layer early, in the middle and late, and all of them spliced in at
once), every card is within the quality bars, few features are dead over the tokens the demo
records, and `./dev demo --transcoders` records them beside the demo SAEs so that the explorer's
Why page draws an attribution graph offline."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from served import free_port, wait_served
from shipped import fired_on, load_shipped
from streamlit.testing.v1 import AppTest

from scope.demo import DEMO_TRANSCODERS, demo_available, demo_sae_ids, demo_transcoder_ids
from scope.sae import saes_dir

pytestmark = pytest.mark.slow

ROOT = Path(__file__).parents[1]
DEMO_TOKENS = 100_000
"""What ``./dev demo`` records by default: the first tokens of the training text."""
FVU, DEAD = 0.3, 0.20
"""Bounds on each transcoder: FVU of the MLP output on the held-out slice, and the share of
features that never fire over the demo's tokens."""
RECOMPUTED = (0, 9, 17)
"""Layers whose card figures are recomputed in full (two forward passes each over the slice)."""


@pytest.fixture(scope="module")
def demo():
    return load_shipped(DEMO_TRANSCODERS)


def test_a_transcoder_at_every_layer_within_the_bars(demo):
    from scope.codec import codec_of

    model, tcs, cards, _ = demo
    layers = [codec_of(t).write_hook for t in tcs]
    assert layers == [f"blocks.{i}.hook_mlp_out" for i in range(model.cfg.n_layers)]
    assert all(codec_of(t).read_hook == f"blocks.{i}.ln2.hook_out" for i, t in enumerate(tcs))
    together = cards[0]["eval"]["all_spliced"]
    assert together["saes"] == model.cfg.n_layers
    for card in cards:
        ev = card["eval"]
        assert ev["fvu"] <= FVU, (card["sae_id"], ev["fvu"])
        assert ev["all_spliced"] == together  # one figure for the run, on every card
        assert card["training"]["skip"] and card["training"]["standardize"]


def test_demo_transcoder_cards_match_a_recomputation(demo):
    from scope.corpus import CorpusSpec
    from scope.evals import evaluate, splice_all

    model, tcs, cards, corpus = demo
    held_out = CorpusSpec(paths=(str(corpus.held_out),), ctx=cards[0]["corpus"]["ctx"],
                          max_tokens=cards[0]["eval"]["tokens"])  # fmt: skip
    report = evaluate(model, [tcs[i] for i in RECOMPUTED], held_out, batch_size=8)
    for i, row in zip(RECOMPUTED, report.rows, strict=True):
        ev = cards[i]["eval"]
        assert row.tokens == ev["tokens"]
        for name in ("l0", "fvu", "delta_loss", "dead"):
            assert getattr(row, name) == pytest.approx(ev[name], rel=0.05, abs=1e-3), (i, name)
    together = splice_all(model, tcs, held_out, batch_size=8)
    card = cards[0]["eval"]["all_spliced"]
    assert together.delta_loss == pytest.approx(card["delta_loss"], rel=0.05)
    assert together.predictions == card["predictions"]


def test_demo_transcoders_are_mostly_alive_on_the_demo_tokens(demo):
    from scope.corpus import CorpusSpec, build_windows

    model, tcs, cards, corpus = demo
    windows = build_windows(
        CorpusSpec(paths=(str(corpus.train),), ctx=128, max_tokens=DEMO_TOKENS), model.tokenizer
    )
    fired, counted, _ = fired_on(model, tcs, windows)
    assert counted >= DEMO_TOKENS * 0.95
    for card, n in zip(cards, fired, strict=True):
        dead = int((n == 0).sum())
        assert dead <= DEAD * n.numel(), (card["sae_id"], dead)


def test_dev_demo_with_transcoders_draws_an_attribution_graph(tmp_path, monkeypatch):
    """`./dev demo --transcoders` on a small slice: the store holds the demo SAEs and a
    transcoder at every layer, and the Why page draws the attribution graph (not the fallback
    that joins each feature to the target)."""
    if why := demo_available():
        pytest.skip(f"the demo model and corpus packages are needed: {why}")
    if not demo_transcoder_ids():
        pytest.skip(f"no demo transcoders under {saes_dir() / DEMO_TRANSCODERS}")
    store, port, log = tmp_path / "demo-tc", free_port(), tmp_path / "demo.log"
    env = {**os.environ, "SCOPE_VENV": sys.prefix, "PYTHONUNBUFFERED": "1"}
    args = [str(ROOT / "dev"), "demo", "--transcoders", "--tokens", "2k", "--store", str(store),
            "--port", str(port)]  # fmt: skip
    with log.open("w") as out:
        proc = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, env=env,
                                start_new_session=True)  # fmt: skip
    try:
        wait_served(f"http://127.0.0.1:{port}", proc, log, timeout=1800)
        deadline = time.monotonic() + 1800
        while "the explorer serves it until Ctrl-C" not in log.read_text():
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(1)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGINT)
        proc.wait(timeout=300)
    assert re.search(r"recording 21 demo SAEs", log.read_text()), log.read_text()[-3000:]

    from scope.store import Store

    keys = set(Store(store).saes)
    assert {f"L{i}.tc.2k" for i in range(18)} <= keys
    assert {i.split("/")[1].replace("layer_", "L") + ".res.4k" for i in demo_sae_ids()} <= keys
    monkeypatch.setenv("SCOPE_STORE", str(store))
    monkeypatch.setenv("SCOPE_DEVICE", "cpu")
    app = AppTest.from_file(str(ROOT / "app" / "Home.py"), default_timeout=900)
    app.session_state["inspect_text"] = "The capital of France is"
    app.switch_page("views/why.py").run()
    assert not app.exception, [e.value for e in app.exception]
    assert app.slider(key="why_node_t") is not None  # the graph's thresholds: a graph is drawn
    caption = " ".join(c.value for c in app.caption)
    assert re.search(r"\d+ of \d+ feature nodes, \d+ error nodes and \d+ edges kept", caption)
    spec = json.loads(app.get("plotly_chart")[0].proto.spec)
    assert any(t.get("mode") == "lines" for t in spec["data"])  # edges between nodes
