"""Recording on Ray against one process, measured in one run on the same tokens.

    python bench/ray_bench.py                      # 1 and 2 CPU workers of 1 thread each
    python bench/ray_bench.py --workers 1,2,4,8 --threads 2 --cpus 16

Same model and SAE as record_bench.py (6 layers x d_model 512, an 8k SAE at layer 3, random
weights built at run time). Rows:

- *one process*: ``record()`` in this process with --threads threads: what each worker does;
- *W plain processes at once*: W processes recording shards i/W side by side, no Ray and no
  merge: how far the machine itself lets W workers scale;
- *Ray, W workers*: ``record_on_ray`` on a local cluster of --cpus CPUs, W workers of --threads
  threads each, 4 shards per worker. Its tokens/s counts from the first shard handed out to the
  store complete (merges included); starting the workers (each loads the model) is timed apart.
- *merge per shard*: what the driver spends on each finished shard: unpacking its files and
  folding its state in; and writing a snapshot (the merged state and every reader table),
  which it does at most every --checkpoint-seconds and at the end (with 0: after every shard).

Figures are medians of --repeats rounds (each round times every row). Scaling = tokens/s /
(W x one process's tokens/s). "inside shards" adds up each worker's tokens / its seconds
recording shards: what the workers did, without the driver's or Ray's time.
"""

from __future__ import annotations

import argparse
import logging
import multiprocessing
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from record_bench import corpus_file  # noqa: E402

from scope import load_model  # noqa: E402
from scope import testing as fixtures  # noqa: E402
from scope.acts import capture  # noqa: E402
from scope.corpus import CorpusSpec, build_windows  # noqa: E402
from scope.record import RecordSettings, record  # noqa: E402
from scope.record.distributed import RayOptions, record_on_ray  # noqa: E402
from scope.record.shard_worker import Loader  # noqa: E402

LAYER, WIDTH = 3, 8192


def build(work: Path, ctx: int, tokens: int) -> tuple[Loader, CorpusSpec, int]:
    """The checkpoint, an SAE fitted to its activations, a corpus; the corpus's token count."""
    ckpt = fixtures.build_gemma2(
        work / "model", n_layers=6, d_model=512, n_heads=8, n_kv_heads=4, d_head=64, d_mlp=2048,
        sliding_window=64, query_pre_attn_scalar=64, attn_softcap=50.0, final_softcap=30.0, init_std=0.02,
    )  # fmt: skip
    model = load_model(ckpt, device="cpu")
    corpus = corpus_file(work, n_chars=tokens * 4)
    spec = CorpusSpec(paths=(str(corpus),), ctx=ctx, max_tokens=tokens)
    windows = build_windows(spec, model.tokenizer)
    hook = f"blocks.{LAYER}.hook_resid_post"
    with torch.no_grad():
        probe = torch.from_numpy(windows.tokens[:8]).long()
        acts = capture(model, probe, [hook], LAYER + 1)[hook][:, 1:].reshape(-1, 512)
    sae_dir = work / "sae" / "bench-res" / f"layer_{LAYER}" / "width_8k" / "average_l0_80"
    fixtures.write_params(sae_dir, fixtures.gemma_scope_params(acts, WIDTH, firing_rate=0.006))
    return Loader(model=str(ckpt), saes=(str(sae_dir),)), spec, windows.n_tokens


def one_process(load: Loader, spec: CorpusSpec, settings: RecordSettings, store: Path) -> float:
    """Seconds for ``record()`` here (the model already loaded, as a worker's is)."""
    model, saes = load("cpu")
    shutil.rmtree(store, ignore_errors=True)
    start = time.perf_counter()
    record(model, saes, spec, store, settings)
    return time.perf_counter() - start


def _side_worker(
    load: Loader,
    spec: CorpusSpec,
    settings: RecordSettings,
    shard: tuple[int, int],
    threads: int,
    store: Path,
    barrier: Any,
    out: Any,
) -> None:
    torch.set_num_threads(threads)
    model, saes = load("cpu")
    barrier.wait()
    record(model, saes, spec, store, replace(settings, shard=shard))
    out.put(time.perf_counter())


def side_by_side(
    load: Loader, spec: CorpusSpec, settings: RecordSettings, k: int, threads: int, work: Path
) -> float:
    """Seconds for k plain processes (no Ray, no merge) recording shards i/k at once, from
    the moment all have loaded to the last one done: what the machine itself allows k ways."""
    ctx = multiprocessing.get_context("spawn")
    barrier, out = ctx.Barrier(k + 1), ctx.Queue()
    procs = []
    for i in range(k):
        store = work / f"side-{i}"
        shutil.rmtree(store, ignore_errors=True)
        args = (load, spec, settings, (i, k), threads, store, barrier, out)
        procs.append(ctx.Process(target=_side_worker, args=args))
        procs[-1].start()
    barrier.wait()
    start = time.perf_counter()
    ends = [out.get() for _ in range(k)]
    for proc in procs:
        proc.join()
    return max(ends) - start


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--workers", default="1,2", help="worker counts to time, e.g. 1,2,4")
    ap.add_argument("--threads", type=int, default=1, help="CPU threads per worker")
    ap.add_argument("--cpus", type=int, default=None, help="CPUs of the local cluster")
    ap.add_argument("--tokens", type=int, default=32_768)
    ap.add_argument("--ctx", type=int, default=128)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    import ray

    counts = [int(x) for x in args.workers.split(",")]
    work = Path(tempfile.mkdtemp(prefix="scope-ray-bench-"))
    ray.init(num_cpus=args.cpus, include_dashboard=False, logging_level=logging.ERROR,
             log_to_driver=False)  # fmt: skip
    try:
        load, spec, n = build(work, args.ctx, args.tokens)
        settings = RecordSettings(ctx=args.ctx, batch_size=args.batch)
        torch.set_num_threads(args.threads)
        one: list[float] = []
        side: dict[int, list[float]] = {w: [] for w in counts if w > 1}
        rates: dict[int, list[float]] = {w: [] for w in counts}
        own: dict[int, list[float]] = {w: [] for w in counts}
        starts: dict[int, list[float]] = {w: [] for w in counts}
        folds: list[float] = []
        snapshots: list[float] = []
        for _ in range(args.repeats):  # interleaved, so a change in the machine's load hits all
            one.append(n / one_process(load, spec, settings, work / "one"))
            for w in counts:
                if w > 1:
                    side[w].append(n / side_by_side(load, spec, settings, w, args.threads, work))
                store = work / f"ray-{w}"
                shutil.rmtree(store, ignore_errors=True)
                options = RayOptions(workers=w, shards=4 * w, threads=args.threads)
                begin = time.perf_counter()
                summary = record_on_ray(load, spec, store, settings, options)
                rates[w].append(summary.record.tokens / summary.record.seconds)
                starts[w].append(time.perf_counter() - begin - summary.record.seconds)
                own[w].append(sum(x.tokens / x.seconds for x in summary.workers))
                folds += summary.fold_seconds
                snapshots += summary.snapshot_seconds
        med = statistics.median
        one_tps = med(one)
        cpus = int(ray.cluster_resources()["CPU"])
        print(f"machine: {cpus} CPUs in the cluster, {args.threads} thread(s) per worker")
        print(f"model: 6 layers x d_model 512, {WIDTH} SAE at layer {LAYER}; {n:,} tokens, "
              f"windows of {args.ctx}, batch {args.batch}; medians of {args.repeats}")  # fmt: skip
        print(f"one process ({args.threads} thread(s)):      {one_tps:10,.0f} tok/s")
        for w in counts:
            if w > 1:
                print(f"{w} plain processes at once:     {med(side[w]):10,.0f} tok/s  "
                      f"{med(side[w]) / (w * one_tps):.2f}x of linear (the machine's own limit)")  # fmt: skip
            tps = med(rates[w])
            print(f"Ray, {w} worker(s):               {tps:10,.0f} tok/s  "
                  f"{tps / (w * one_tps):.2f}x of linear; inside shards {med(own[w]):,.0f} tok/s; "
                  f"+{med(starts[w]):.1f} s starting the workers")  # fmt: skip
        print(f"merge per shard (driver):         {med(folds):10.2f} s  "
              f"(unpack + fold, median of {len(folds)} shards)")  # fmt: skip
        print(f"snapshot (driver):                {med(snapshots):10.2f} s  "
              f"(state + every table, median of {len(snapshots)})")  # fmt: skip
    finally:
        ray.shutdown()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
