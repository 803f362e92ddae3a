"""Explorer latency: a feature page's data and search queries on a big store, medians and p95.

    python bench/app_bench.py                      # 16k SAE over 1M tokens (recorded once, reused)
    python bench/app_bench.py --tokens 200k --width 4096   # smaller, quicker

The store is recorded once under --work with `scope.record` (a random-weight Gemma 2 model, as
the tests build, and a Gemma Scope-format 16k SAE over English docstrings of the standard
library), then reused. Timed, each on features drawn at random among the live ones:
- feature page: everything the page shows (`Store.feature`: stats, top and interval examples,
  histogram, logit lens, neighbours, label);
- search by token (top examples' activating token and the logit lens), by label, and a
  filtered, sorted listing;
- the overview page's queries.
Every figure is the median and p95 over --repeats queries; the first query (which opens the
connection) is reported apart.
"""

from __future__ import annotations

import argparse
import inspect
import json
import random
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

from scope import load_model, load_sae
from scope import testing as fixtures
from scope.corpus import CorpusSpec
from scope.record import RecordSettings, record
from scope.store import Store, explore, set_label


def stdlib_text() -> list[str]:
    """Docstrings of every importable standard-library module and its members."""
    docs: list[str] = []
    skip = {"antigravity", "this", "idlelib", "tkinter", "turtle", "turtledemo", "__hello__"}
    for name in sorted(sys.stdlib_module_names):
        if name in skip or name.startswith("_"):
            continue
        try:
            module = __import__(name)
        except Exception:  # noqa: BLE001 - platform-specific modules
            continue
        for _, obj in inspect.getmembers(module):
            doc = inspect.getdoc(obj)
            if doc and len(doc) > 80:
                docs.append(doc)
    return list(dict.fromkeys(docs))


def build_store(work: Path, tokens: int, width: int) -> Path:
    store = work / f"store-{width}-{tokens}"
    if (store / "manifest.json").is_file() and Store(store).manifest.state == "complete":
        return store
    model_dir = work / "model"
    if not (model_dir / "config.json").is_file():
        fixtures.build_gemma2(model_dir)
    model = load_model(model_dir, device="cpu")
    corpus = work / "corpus.jsonl"
    docs = stdlib_text()
    with corpus.open("w") as f:
        for i in range(max(1, tokens * 4 // sum(map(len, docs)) + 1)):  # ~4 characters a token
            for d in docs:
                f.write(json.dumps({"text": d if i == 0 else f"{i}. {d}"}) + "\n")
    hook = "blocks.2.hook_resid_post"
    _, cache = model.run_with_cache(" ".join(docs[:50])[:6000], names_filter=hook)
    sae_dir = work / "saes" / "bench-res" / f"layer_2/width_{width // 1024}k/average_l0_40"
    params = fixtures.gemma_scope_params(cache[hook][0, 1:], width, firing_rate=40 / width)
    fixtures.write_params(sae_dir, params)
    sae = load_sae(sae_dir, device="cpu")
    spec = CorpusSpec(paths=[str(corpus)], max_tokens=tokens)
    started = time.perf_counter()
    record(model, [sae], spec, store, RecordSettings(ctx=128))
    print(f"recorded {tokens:,} tokens in {time.perf_counter() - started:.0f} s into {store}")
    return store


def timed(fn: Callable[[], object], repeats: int) -> tuple[float, float, float]:
    """(first, median, p95) in ms."""
    times = []
    for _ in range(repeats + 1):
        t = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t) * 1000)
    first, rest = times[0], sorted(times[1:])
    return first, statistics.median(rest), rest[min(len(rest) - 1, int(0.95 * len(rest)))]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--work", default=str(Path.home() / ".cache/gemma-scope-workbench/bench-app"))
    ap.add_argument("--tokens", default="1M")
    ap.add_argument("--width", type=int, default=16384)
    ap.add_argument("--repeats", type=int, default=50)
    args = ap.parse_args()
    from scope.corpus import parse_tokens

    torch.set_num_threads(2)
    work = Path(args.work).expanduser()
    work.mkdir(parents=True, exist_ok=True)
    root = build_store(work, parse_tokens(args.tokens), args.width)
    store = Store(root)
    key = next(iter(store.saes))
    live = [f for (f,) in store.sql("select feature from features where not dead").fetchall()]
    rng = random.Random(0)
    set_label(root, key, live[0], "bench label", "notes for the search")
    vocab = [
        t for (t,) in store.sql("select text from vocab where length(trim(text)) > 2").fetchall()
    ]
    rows = {
        "feature page": lambda: store.feature(f"{key}/{rng.choice(live)}"),
        "search: token": lambda: explore.search(store, explore.Query(text=rng.choice(vocab))),
        "search: label": lambda: explore.search(store, explore.Query(label="bench")),
        "search: filter + sort": lambda: explore.search(
            store, explore.Query(sae=key, min_density=1e-4, max_density=0.01, sort="max")
        ),
        "overview": lambda: explore.overview(store),
    }
    tokens = store.manifest.tokens_recorded
    print(f"store: {root} ({tokens:,} tokens, {key}, {len(live):,} live features)")
    print(
        f"{'query':<24}{'first ms':>10}{'median ms':>11}{'p95 ms':>9}  target: median 300, p95 1000"
    )
    for name, fn in rows.items():
        first, median, p95 = timed(fn, args.repeats)
        ok = "ok" if median <= 300 and p95 <= 1000 else "SLOW"
        print(f"{name:<24}{first:>10.0f}{median:>11.1f}{p95:>9.1f}  {ok}")


if __name__ == "__main__":
    main()
