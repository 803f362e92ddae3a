"""Explanations: the scoring arithmetic against a scripted scorer, the held-out split and
hard negatives against brute force, and `scope explain` end to end over real HTTP against
`scope serve` (table filled, rerun skips, a killed run completes, search finds it, bad input
is one line and loses nothing)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("openai")

from test_serve import Server  # noqa: E402

from scope.explain import balanced_accuracy, search  # noqa: E402
from scope.explain.prompts import marked, read_explanation, read_yes_no  # noqa: E402
from scope.explain.score import detection, fuzzing, split  # noqa: E402
from scope.store import Store  # noqa: E402

KEY = "L2.res.256"


def test_balanced_accuracy_counts_unreadable_answers_as_wrong():
    labels = [True, True, True, False, False]
    got = balanced_accuracy(labels, [True, None, False, False, True])
    assert got.accuracy == pytest.approx(0.5 * (1 / 3 + 1 / 2))
    assert (got.n_pos, got.n_neg, got.unreadable) == (3, 2, 1)
    assert balanced_accuracy([True], [True]).accuracy is None  # no negatives: no score


def test_prompt_pieces():
    assert marked(["a", " b", " c", " d"], [False, True, True, False]) == "a<<·b·c>>·d"
    assert (
        read_explanation("thinking...\n[EXPLANATION]: compass directions") == "compass directions"
    )
    assert read_explanation(" years in dates\nmore") == "years in dates"
    assert [read_yes_no(t) for t in (" Yes.", "no", "maybe", "")] == [True, False, None, None]


@pytest.fixture(scope="module")
def store(app_store):
    return Store(app_store)


@pytest.fixture(scope="module")
def sae(tiny_sae_dir):
    from scope import load_sae

    return load_sae(tiny_sae_dir, device="cpu")


def brute_acts(model, sae, store, window: int) -> np.ndarray:
    """The feature codes of one stored window through sae-lens' own run_with_cache_with_saes."""
    (tokens,) = store.sql("select tokens from windows where window_id = ?", [window]).fetchone()
    hook = sae.cfg.metadata.hook_name + ".hook_sae_acts_post"
    _, cache = model.run_with_cache_with_saes(torch.tensor([list(tokens)]), saes=[sae],
                                              names_filter=lambda n: n == hook)  # fmt: skip
    return cache[hook][0, 1:].double().numpy()  # BOS left out


def busiest(store) -> int:
    return int(
        store.sql(
            f"select feature from features where sae = '{KEY}' order by count desc limit 1"
        ).fetchone()[0]
    )


def test_a_base_model_reads_past_blank_lines_to_its_one_line_explanation(tiny_model, monkeypatch):
    import scope.generate
    from scope.explain.models import LocalModel
    from scope.explain.prompts import Shown

    local = LocalModel(tiny_model, "tiny")
    assert local.style == "completion"
    said = tiny_model.tokenizer.encode("\n\n the word fox\nExamples:", add_special_tokens=False)
    made: list[int] = []

    def scripted(model, tokens, sampling, steers=()):
        for t in said:
            made.append(t)
            yield t

    monkeypatch.setattr(scope.generate, "generate", scripted)
    monkeypatch.setattr(
        tiny_model.cfg, "n_ctx", 4096
    )  # room for the few-shot prompt; no forward runs
    shown = [Shown(tokens=[" the", " fox"], acts=[0.0, 2.0])]
    prompt, explanation = local.explain(shown, top=2.0)
    assert explanation == "the word fox" and prompt.endswith("Explanation:")
    assert len(made) < len(said)  # it stopped at the line's end


def test_split_holds_out_what_it_scores_and_negatives_never_fire(store, tiny_model, sae):
    f = busiest(store)
    sets = split(store, tiny_model, sae, KEY, f, n_shown=6)
    assert sets.positives and len(sets.negatives) == len(sets.positives)
    assert not set(sets.shown_ids) & (set(sets.positive_ids) | set(sets.negative_ids))
    assert not set(sets.positive_ids) & set(sets.negative_ids)
    for w, (lo, hi) in zip(sets.negative_ids, sets.negative_spans, strict=True):
        assert hi - lo >= 8 and (brute_acts(tiny_model, sae, store, w)[lo:hi, f] == 0).all()
    for w in sets.positive_ids:
        assert brute_acts(tiny_model, sae, store, w)[:, f].max() > 0
    near = store.sql(
        f"select neighbours from lens where sae = '{KEY}' and feature = {f}"
    ).fetchone()[0]
    hard_pool = {
        int(w)
        for (w,) in store.sql(
            f"select window_id from topk where sae = '{KEY}' and feature in ({', '.join(map(str, near))})"
        ).fetchall()
    }
    assert sets.hard >= 1 and set(sets.negative_ids[: sets.hard]) <= hard_pool


class Scripted:
    """A scorer that answers from a rule, to check what each score counts."""

    name, style = "scripted", "chat"

    def __init__(self, rule):
        self.rule = rule
        self.asked: list[str] = []

    def judge(self, questions):
        self.asked += questions
        return [self.rule(q) for q in questions]


def test_detection_and_fuzzing_score_exactly_what_the_scorer_says(store, tiny_model, sae):
    f = busiest(store)
    sets = split(store, tiny_model, sae, KEY, f, n_shown=6)
    always = Scripted(lambda q: True)
    got = detection(always, "x", sets)
    assert (
        got.accuracy == 0.5
        and got.n_pos == len(sets.positives)
        and got.n_neg == len(sets.negatives)
    )
    # a perfect detector: Yes exactly for the held-out positives' texts
    texts = {marked(ex.tokens, [False] * len(ex.tokens)) for ex in sets.positives}
    perfect = Scripted(lambda q: any(f"Text: {t}\n" in q for t in texts))
    assert detection(perfect, "x", sets).accuracy == 1.0
    # fuzzing: Yes only where the marks sit on tokens that fire
    fired = Scripted(lambda q: "<<" in q)
    assert fuzzing(fired, "x", sets).accuracy == 0.5  # every version is marked somewhere
    assert len(fired.asked) == 2 * sum(any(a > 0 for a in ex.acts) for ex in sets.positives)


# ---------------------------------------------------------------- end to end over HTTP


@pytest.fixture(scope="module")
def endpoint(tiny_dir):
    from scope import load_model
    from scope.serve import create_app

    s = Server(
        create_app(load_model(tiny_dir, device="cpu", n_ctx=4096), [])
    )  # delphi prompts are long
    yield s.url.removesuffix("/v1")
    s.stop()


def scope_explain(store: Path, *args: str, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "scope.cli", "explain", "--store", str(store), *args],
                          capture_output=True, text=True, timeout=600, **kw)  # fmt: skip


@pytest.fixture(scope="module")
def explained(tmp_path_factory, app_store, endpoint):
    import shutil

    root = tmp_path_factory.mktemp("explain") / "store"
    shutil.copytree(app_store, root)
    live = [
        int(f)
        for (f,) in Store(root)
        .sql(
            f"select feature from features where sae = '{KEY}' and count > 0 order by feature limit 4"
        )
        .fetchall()
    ]
    result = scope_explain(root, "--features", ",".join(map(str, live)), "--explainer", endpoint)
    assert result.returncode == 0, result.stderr[-3000:]
    return root, live, result


def no_text(result: subprocess.CompletedProcess) -> int:
    """How many features the run says got no text (a random-weight model may answer blanks)."""
    import re

    found = re.search(r"(\d+) got no text", result.stderr)
    return int(found.group(1)) if found else 0


@pytest.mark.slow  # scope explain in subprocesses against a served model
def test_explain_fills_the_table_and_a_rerun_skips(explained, endpoint):
    root, live, first = explained
    rows = (
        Store(root)
        .sql(
            "select sae, feature, explainer, detection, n_pos, n_neg from explanations order by feature"
        )
        .fetchall()
    )
    assert len(rows) >= 2 and len(rows) + no_text(first) == len(live), first.stderr
    assert {r[1] for r in rows} <= set(live) and all(r[0] == KEY for r in rows)
    assert all(r[2].startswith("http:") and r[4] > 0 and r[5] == r[4] for r in rows)
    assert all(r[3] is not None and 0 <= r[3] <= 1 for r in rows)
    view = Store(root).feature(f"{KEY}/{rows[0][1]}")
    assert view.explanations and view.explanations[0].explainer == rows[0][2]
    again = scope_explain(root, "--features", ",".join(map(str, live)), "--explainer", endpoint)
    assert again.returncode == 0 and f"{len(rows)} already explained" in again.stderr
    assert len(Store(root).sql("select * from explanations").fetchall()) == len(rows)


def test_search_finds_a_feature_by_a_word_of_its_explanation(tmp_path, app_store, tiny_model, sae):
    import shutil

    from scope.explain import explain_features
    from scope.store import set_label

    root = tmp_path / "store"
    shutil.copytree(app_store, root, ignore=shutil.ignore_patterns("explanations", "labels"))
    words = {0: "compass directions after to the", 1: "years in dates", 2: "the compass rose"}
    live = [
        f
        for f in words
        if Store(root)
        .sql(f"select count from features where sae = '{KEY}' and feature = {f}")
        .fetchone()[0]
        > 0
    ]

    class Writer(Scripted):
        def explain(self, shown, top):
            self.n = getattr(self, "n", 0) + 1
            return "prompt", words[live[self.n - 1]]

    report = explain_features(str(root), [(KEY, f) for f in live], model=tiny_model,
                              saes={KEY: sae}, explainer=Writer(lambda q: True), examples=4)  # fmt: skip
    assert [e.feature for e in report.made] == live
    set_label(root, KEY, 5, "Compass bearings", "seen with north")
    hits = search(Store(root), "compass")
    assert {(h.sae, h.feature) for h in hits} == {
        (KEY, f) for f in live if "compass" in words[f]
    } | {(KEY, 5)}
    assert [h.feature for h in search(Store(root), "dat")] == [
        f for f in live if "dates" in words[f]
    ]  # a prefix
    assert search(Store(root), "zebra") == []


@pytest.mark.slow  # scope explain in subprocesses against a served model
def test_bad_input_is_one_line_and_loses_nothing(explained, tmp_path):
    root, live, _ = explained
    before = Store(root).sql("select count(*) from explanations").fetchone()
    with socketless_port() as port:
        dead = scope_explain(root, "--features", "0-300", "--explainer", f"http://127.0.0.1:{port}")
    assert dead.returncode == 2
    lines = [ln for ln in dead.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "256" in lines[0] and "0..255" in lines[0], lines
    with socketless_port() as port:
        down = scope_explain(
            root, "--features", str(live[0]), "--redo", "--explainer", f"http://127.0.0.1:{port}"
        )
    assert down.returncode == 2 and "cannot reach the endpoint" in down.stderr
    assert Store(root).sql("select count(*) from explanations").fetchone() == before


class socketless_port:  # noqa: N801 - a context manager read as a phrase
    """A port on 127.0.0.1 that nothing listens on."""

    def __enter__(self) -> int:
        import socket

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            return int(s.getsockname()[1])

    def __exit__(self, *exc) -> None:
        pass


@pytest.mark.slow  # scope explain in subprocesses against a served model
def test_an_endpoint_that_wants_a_key_is_refused_in_one_line(explained, tiny_dir):
    from scope import load_model
    from scope.serve import create_app

    root, live, _ = explained
    s = Server(create_app(load_model(tiny_dir, device="cpu", n_ctx=4096), [], api_key="secret"))
    try:
        env = {
            k: v
            for k, v in os.environ.items()
            if k not in ("OPENAI_API_KEY", "SCOPE_EXPLAINER_API_KEY")
        }
        result = scope_explain(
            root, "--features", str(live[0]), "--redo", "--explainer", s.url, env=env
        )
        assert (
            result.returncode == 2
            and "401" in result.stderr
            and "SCOPE_EXPLAINER_API_KEY" in result.stderr
        )
        ok = scope_explain(root, "--features", str(live[0]), "--redo", "--explainer", s.url,
                           env={**env, "SCOPE_EXPLAINER_API_KEY": "secret"})  # fmt: skip
        assert ok.returncode == 0, ok.stderr[-2000:]
    finally:
        s.stop()


@pytest.mark.slow
def test_a_killed_run_completes_when_run_again(explained, endpoint, tmp_path):
    import shutil

    root, _, _ = explained
    copy = tmp_path / "store"
    shutil.copytree(root, copy, ignore=shutil.ignore_patterns("explanations"))
    live = [
        int(f)
        for (f,) in Store(copy)
        .sql(
            f"select feature from features where sae = '{KEY}' and count > 0 order by feature limit 12"
        )
        .fetchall()
    ]
    args = [sys.executable, "-m", "scope.cli", "explain", "--store", str(copy), "--features",
            ",".join(map(str, live)), "--explainer", endpoint, "--concurrency", "2"]  # fmt: skip
    proc = subprocess.Popen(
        args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True
    )
    deadline = time.monotonic() + 300
    while not list((copy / "explanations").glob("*.parquet")):
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[1][-2000:]
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    kept = len(Store(copy).sql("select * from explanations").fetchall())
    assert 0 < kept < len(live)
    again = scope_explain(copy, "--features", ",".join(map(str, live)), "--explainer", endpoint)
    assert again.returncode == 0, again.stderr[-2000:]
    rows = Store(copy).sql("select feature from explanations order by feature").fetchall()
    got = [r[0] for r in rows]
    assert len(set(got)) == len(got) and len(got) + no_text(again) == len(live)  # none twice
