"""Explanations per minute: an in-process explainer against `scope serve` over HTTP, one request
at a time against eight in flight, on the same store, features and model, in one run.

    python bench/explain_bench.py                  # the tiny CPU workbench, 8 features
    python bench/explain_bench.py --features 16

Each feature is explained (one greedy explanation, up to 120 tokens) and scored by detection and
fuzzing on held-out and non-activating examples (one Yes/No judgement per example): the full
``explain_features`` work, written to a fresh copy of the store each run. The in-process
explainer judges in batches of 16 by comparing the next-token logits of " Yes" and " No"; over
HTTP every judgement is its own chat request (3 tokens), so the endpoint's batching of
concurrent requests is what concurrency buys. Prints features per minute and the prompt
tokens per feature (the explanation prompt and every judgement).
"""

from __future__ import annotations

import argparse
import shutil
import socket
import statistics
import tempfile
import threading
import time
from pathlib import Path

from scope import CorpusSpec, RecordSettings, Store, load_model, load_sae, record
from scope import testing as fixtures
from scope.explain import HTTPModel, LocalModel, explain_features
from scope.explain.prompts import detection_question, fuzzing_question
from scope.explain.score import split


class Counting:
    """Wraps an explainer and counts the prompt tokens it is sent."""

    def __init__(self, inner, tokenizer) -> None:
        self.inner, self.tok = inner, tokenizer
        self.name, self.style = inner.name, inner.style
        self.tokens = 0

    def explain(self, shown, top):
        prompt, text = self.inner.explain(shown, top)
        self.tokens += len(self.tok.encode(prompt))
        return prompt, text

    def judge(self, questions):
        self.tokens += sum(len(self.tok.encode(q)) for q in questions)
        return self.inner.judge(questions)


def serve(model) -> tuple[str, object]:
    import uvicorn

    from scope.serve import create_app

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(create_app(model, []), log_level="warning"))
    threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True).start()
    while not server.started:
        time.sleep(0.05)
    return f"http://127.0.0.1:{sock.getsockname()[1]}", server


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--features", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=1)
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="explain-bench-"))
    bench = fixtures.tiny_workbench(work / "fixtures")
    model = load_model(bench.model, device="cpu", n_ctx=8192)  # room for the prompts
    sae = load_sae(bench.saes[0], device="cpu")
    store_dir = work / "store"
    record(model, [sae], CorpusSpec(paths=(bench.corpus,), max_tokens=20_000), store_dir,
           RecordSettings(ctx=64))  # fmt: skip
    store = Store(store_dir)
    key = store.key_of(sae)
    assert key is not None
    live = [int(f) for (f,) in store.sql(
        "select feature from features where sae = ? and count > 0 order by count desc limit ?",
        [key, args.features]).fetchall()]  # fmt: skip
    targets = [(key, f) for f in live]
    sets = split(store, model, sae, key, live[0], 20)
    print(f"{len(live)} features of {key}; e.g. {len(sets.shown)} shown, {len(sets.positives)} "
          f"held out, {len(sets.negatives)} non-activating per feature")  # fmt: skip
    print("judgement prompt tokens, e.g.:",
          len(model.tokenizer.encode(detection_question("x", sets.positives[0]))),
          len(model.tokenizer.encode(fuzzing_question("x", sets.positives[0],
                                                      [True] * len(sets.positives[0].acts)))))  # fmt: skip

    url, server = serve(load_model(bench.model, device="cpu", n_ctx=8192))
    runs = {
        "in-process (batched judgements)": (lambda: LocalModel(model, bench.model), 1),
        "scope serve, 1 request at a time": (lambda: HTTPModel(url), 1),
        "scope serve, 8 requests in flight": (lambda: HTTPModel(url), 8),
    }
    results = {}
    for name, (make, concurrency) in runs.items():
        times, tokens = [], 0
        for _ in range(args.repeats):
            copy = work / f"copy-{len(times)}"
            shutil.rmtree(copy, ignore_errors=True)
            shutil.copytree(store_dir, copy)
            who = Counting(make(), model.tokenizer)
            start = time.perf_counter()
            report = explain_features(str(copy), targets, model=model, saes={key: sae},
                                      explainer=who, concurrency=concurrency, examples=10)  # fmt: skip
            times.append(time.perf_counter() - start)
            tokens = who.tokens // max(len(report.made) + len(report.empty), 1)
        per_min = 60 * len(targets) / statistics.median(times)
        results[name] = per_min
        print(f"{name:38s} {per_min:7.1f} features/min  ({statistics.median(times):.1f} s), "
              f"{tokens:,} prompt tokens per feature")  # fmt: skip
    one, eight = (
        results["scope serve, 1 request at a time"],
        results["scope serve, 8 requests in flight"],
    )
    print(f"8 in flight / 1 at a time: {eight / one:.2f}x")
    server.should_exit = True  # type: ignore[attr-defined]


if __name__ == "__main__":
    main()
