"""Recording throughput against a bare loop and SAEDashboard, measured in one run.

    python bench/record_bench.py                       # CPU: 6 layers x d_model 512, 8k SAE at layer 3
    python bench/record_bench.py --gemma-2b-shape      # GPU: gemma-2-2b dims, 16k SAE at layer 12
    python bench/record_bench.py --saedashboard PYTHON # also time SAEDashboard, in its own venv
    python bench/record_bench.py --gemma-2b-shape --overlap   # also time scope record --overlap
    python bench/record_bench.py --whole-model         # every layer, one SAE each (CPU: 6 x 4k)
    python bench/record_bench.py --whole-model --gemma-2b-shape   # GPU: 26 layers, 16k SAEs
    python bench/record_bench.py --ops                 # aten ops per recorded batch, 1 vs 6 SAEs

The bare loop does only the unavoidable work: the forward pass up to the SAE's layer and the
JumpReLU encode, over the same windows and batches. `scope record` adds every statistic, the
exact top-k, interval samples, checkpoints and the Parquet store. SAEDashboard builds every
feature's dashboard data from the same model (weights copied), SAE and windows (all of them,
so its start-up is spread over as many tokens as record's); it is slow: about 10 minutes for
32k tokens on 2 CPU cores (`--tokens 32768`), timed once.
Figures are medians of --repeats runs; ratios are of tokens/s.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from scope import load_model, load_sae
from scope import testing as fixtures
from scope.acts import capture, encode
from scope.codec import codec_of
from scope.corpus import CorpusSpec, build_windows
from scope.record import RecordSettings, record

TL_FIELDS = [
    "d_model", "d_head", "n_heads", "d_mlp", "n_layers", "n_ctx", "eps", "d_vocab", "act_fn",
    "normalization_type", "rotary_base", "rotary_dim", "positional_embedding_type", "use_attn_scale",
    "attn_scale", "n_key_value_heads", "window_size", "use_local_attn", "attn_types",
    "attn_scores_soft_cap", "output_logits_soft_cap", "gated_mlp", "final_rms",
    "use_normalization_before_and_after", "original_architecture", "default_prepend_bos",
]  # fmt: skip


CPU_MODEL = dict(
    n_layers=6, d_model=512, n_heads=8, n_kv_heads=4, d_head=64, d_mlp=2048, sliding_window=64,
    query_pre_attn_scalar=64, attn_softcap=50.0, final_softcap=30.0, init_std=0.02,
)  # fmt: skip
"""The CPU bench model: Gemma 2's architecture, 6 layers x d_model 512, random weights."""


def corpus_file(work: Path, n_chars: int) -> Path:
    """English prose that ships with Python (stdlib docstrings), one document a line of a
    .jsonl, repeated to length."""
    docs = [d for d in fixtures.training_text() if len(d) > 80]
    path = work / "corpus.jsonl"
    written = 0
    with path.open("w") as f:
        while written < n_chars:
            for d in docs:
                f.write(json.dumps({"text": d}) + "\n")
                written += len(d)
    return path


def bare_loop(
    model, sae, windows, hook: str, layer: int, batch: int, with_encode: bool = True
) -> float:
    device = next(model.parameters()).device
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    start = time.perf_counter()
    with torch.no_grad():
        for i in range(0, len(windows), batch):
            width = int(windows.lengths[i : i + batch].max())
            tokens = torch.from_numpy(windows.tokens[i : i + batch, :width]).to(device, torch.long)
            acts = capture(model, tokens, [hook], layer + 1)[hook]
            if with_encode:
                acts = encode(sae, acts)
            del acts
    sync()
    return time.perf_counter() - start


def run_record(
    model, sae, corpus: Path, work: Path, ctx: int, tokens: int, batch: int, overlap: bool = False
) -> float:
    store = work / "store"
    shutil.rmtree(store, ignore_errors=True)
    spec = CorpusSpec(paths=(str(corpus),), ctx=ctx, max_tokens=tokens)
    settings = RecordSettings(ctx=ctx, batch_size=batch, overlap=overlap)
    start = time.perf_counter()
    record(model, [sae], spec, store, settings)
    if next(model.parameters()).is_cuda:
        torch.cuda.synchronize()
    return time.perf_counter() - start


def whole_model_loop(model, saes, windows, batch: int, with_encode: bool) -> float:
    """Seconds for the forward through every SAE's layer (and each SAE's encode) over the
    windows: the unavoidable work of a whole-model recording."""
    device = next(model.parameters()).device
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    hooks = [codec_of(s).read_hook for s in saes]  # each SAE's input (a transcoder's too)
    sync()
    start = time.perf_counter()
    with torch.no_grad():
        for i in range(0, len(windows), batch):
            width = int(windows.lengths[i : i + batch].max())
            tokens = torch.from_numpy(windows.tokens[i : i + batch, :width]).to(device, torch.long)
            acts = capture(model, tokens, hooks, model.cfg.n_layers)
            if with_encode:
                codes = [encode(s, acts[h]) for s, h in zip(saes, hooks, strict=True)]
                del codes
            del acts
    sync()
    return time.perf_counter() - start


def record_rates(model, saes, corpus: Path, work: Path, ctx: int, tokens: int, batch: int):
    """(tokens/s once running, from the first batch to the last; seconds end to end) of one
    `record()` call writing every table."""
    store = work / "store"
    shutil.rmtree(store, ignore_errors=True)
    spec = CorpusSpec(paths=(str(corpus),), ctx=ctx, max_tokens=tokens)
    marks: list[tuple[float, int]] = []

    def seen(p) -> None:
        if next(model.parameters()).is_cuda:
            torch.cuda.synchronize()
        marks.append((time.perf_counter(), p.tokens))

    start = time.perf_counter()
    record(model, saes, spec, store, RecordSettings(ctx=ctx, batch_size=batch), on_progress=seen)
    total = time.perf_counter() - start
    (t0, n0), (t1, n1) = marks[0], marks[-1]
    return (n1 - n0) / (t1 - t0), total


def aten_ops_per_batch(model, saes, corpus: Path, work: Path, ctx: int, batch: int) -> float:
    """aten ops (torch.profiler, CPU events, nested ones included) per recorded batch: the
    difference between recording 4 and 2 batches, halved, so start-up and tables cancel."""
    from torch.profiler import ProfilerActivity, profile

    counts = []
    for batches in (2, 4):
        store = work / "store"
        shutil.rmtree(store, ignore_errors=True)
        spec = CorpusSpec(paths=(str(corpus),), ctx=ctx, max_tokens=batches * batch * (ctx - 1))
        settings = RecordSettings(ctx=ctx, batch_size=batch, tables=False, checkpoint_seconds=1e9)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            record(model, saes, spec, store, settings)
        counts.append(sum(1 for e in prof.events() if e.name.startswith("aten::")))
    return (counts[1] - counts[0]) / 2


def layer_saes(model, windows, layers: list[int], width: int, work: Path, device) -> list:
    """One Gemma Scope-layout residual SAE per layer, fitted to the model's activations."""
    hooks = [f"blocks.{layer}.hook_resid_post" for layer in layers]
    with torch.no_grad():
        probe = torch.from_numpy(windows.tokens[:8]).to(device, torch.long)
        acts = capture(model, probe, hooks, max(layers) + 1)
    out = []
    for layer, hook in zip(layers, hooks, strict=True):
        folder = (
            work
            / "sae"
            / "bench-res"
            / f"layer_{layer}"
            / f"width_{width // 1024}k"
            / "average_l0_80"
        )
        flat = acts[hook][:, 1:].reshape(-1, model.cfg.d_model).float().cpu()
        fixtures.write_params(
            folder, fixtures.gemma_scope_params(flat, width, firing_rate=0.006, seed=layer)
        )
        out.append(load_sae(folder, device=device, dtype=model.cfg.dtype))
    return out


def whole_model(args, work: Path) -> None:
    """Every layer with one SAE, and (``--ops``) the aten op count per batch."""
    if args.gemma_2b_shape:
        ckpt = fixtures.build_gemma2_2b_shape(work / "model", n_layers=26)
        width, tokens, batch = 16384, args.tokens or 200_000, args.batch or 64
    else:
        ckpt = fixtures.build_gemma2(work / "model", **CPU_MODEL)
        width = 1024 if args.ops else 4096
        tokens, batch = args.tokens or 8192, args.batch or 16
    model = load_model(ckpt, device=args.device)
    device = next(model.parameters()).device
    corpus = corpus_file(work, n_chars=tokens * 4)
    windows = build_windows(
        CorpusSpec(paths=(str(corpus),), ctx=args.ctx, max_tokens=tokens), model.tokenizer
    )
    n_layers = model.cfg.n_layers
    saes = layer_saes(model, windows, list(range(n_layers)), width, work, device)
    what = f"{'cuda ' + torch.cuda.get_device_name() if device.type == 'cuda' else f'{torch.get_num_threads()} threads'}"
    print(f"device: {device} ({what}); model: Gemma 2 architecture, {n_layers} layers, "
          f"d_model {model.cfg.d_model}; SAEs {width} wide, one per layer; batches of "
          f"{batch} x {args.ctx}")  # fmt: skip
    if args.ops:
        one = aten_ops_per_batch(
            model, saes[n_layers // 2 : n_layers // 2 + 1], corpus, work, args.ctx, batch
        )
        every = aten_ops_per_batch(model, saes, corpus, work, args.ctx, batch)
        print(f"aten ops per recorded batch: 1 SAE (layer {n_layers // 2}) {one:,.0f}; "
              f"{n_layers} SAEs {every:,.0f}: {every / one:.2f}x")  # fmt: skip
        return
    n = windows.n_tokens
    whole_model_loop(model, saes, windows, batch, with_encode=True)  # warm-up
    fwd = statistics.median(
        whole_model_loop(model, saes, windows, batch, False) for _ in range(args.repeats)
    )
    enc = statistics.median(
        whole_model_loop(model, saes, windows, batch, True) for _ in range(args.repeats)
    )
    rates = [
        record_rates(model, saes, corpus, work, args.ctx, tokens, batch)
        for _ in range(args.repeats)
    ]
    running = statistics.median(r[0] for r in rates)
    end_to_end = n / statistics.median(r[1] for r in rates)
    fwd_tps, enc_tps = n / fwd, n / enc
    print(f"{n:,} tokens, medians of {args.repeats}")
    print(f"forward through all {n_layers} layers:        {fwd_tps:12,.0f} tok/s  1.00x")
    print(
        f"forward + {n_layers} encodes:                  {enc_tps:12,.0f} tok/s  {enc_tps / fwd_tps:.2f}x"
    )
    print(
        f"scope record, {n_layers} SAEs, per batch:      {running:12,.0f} tok/s  "
        f"{running / fwd_tps:.2f}x ({running / enc_tps:.2f}x of forward + encodes)"
    )
    print(f"scope record, end to end (tables too):  {end_to_end:12,.0f} tok/s  "
          f"{end_to_end / fwd_tps:.2f}x")  # fmt: skip


def saedashboard(
    python: str, model, sae_dir: Path, windows, hook: str, work: Path, batch: int
) -> dict:
    """SAEDashboard's seconds for every feature over the same windows as `scope record` (padded
    to the window length with the pad token, which it ignores like every special token)."""
    dash = work / "saedashboard"
    dash.mkdir(exist_ok=True)
    from safetensors.torch import save_file

    cfg = model.cfg.to_dict()
    spec = {
        "tl_config": {k: cfg[k] for k in TL_FIELDS},
        "hook": hook,
        "threads": torch.get_num_threads(),
        "features_per_batch": 256,
        "windows_per_batch": batch,
        "ignore_tokens": sorted(set(model.tokenizer.all_special_ids)),
    }
    (dash / "spec.json").write_text(json.dumps(spec))
    weights = {
        k: v.detach().contiguous() for k, v in model.named_parameters()
    }  # buffers are rebuilt
    save_file(weights, dash / "model.safetensors")
    shutil.copyfile(sae_dir / "params.npz", dash / "params.npz")
    np.save(dash / "tokens.npy", windows.tokens.astype(np.int64))  # every window, pad included
    worker = Path(__file__).resolve().parent / "saedashboard_worker.py"
    out = subprocess.run([python, str(worker), str(dash)], capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit(f"SAEDashboard failed:\n{out.stderr[-3000:]}")
    result = json.loads(out.stdout.strip().splitlines()[-1])
    with torch.no_grad():
        _, cache = model.run_with_cache(
            torch.from_numpy(windows.tokens[:1]).long(), names_filter=hook
        )
    ours = float(cache[hook].double().sum())
    assert abs(result["check"] - ours) <= 1e-3 * max(1.0, abs(ours)), (result["check"], ours)
    return result


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument(
        "--gemma-2b-shape", action="store_true", help="gemma-2-2b dims, 16k SAE at layer 12"
    )
    ap.add_argument("--tokens", type=int, default=None, help="corpus tokens per run")
    ap.add_argument("--ctx", type=int, default=128)
    ap.add_argument("--batch", type=int, default=None, help="windows per batch")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--saedashboard", metavar="PYTHON", help="python of a venv with sae-dashboard")
    ap.add_argument("--device", default=None)
    ap.add_argument("--overlap", action="store_true", help="also time scope record --overlap (GPU)")
    ap.add_argument("--whole-model", action="store_true", help="every layer, one SAE each")
    ap.add_argument("--ops", action="store_true", help="aten ops per batch, 1 SAE vs one per layer")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="scope-bench-"))
    try:
        if args.whole_model or args.ops:
            whole_model(args, work)
            return
        if args.gemma_2b_shape:
            ckpt = fixtures.build_gemma2_2b_shape(work / "model", n_layers=13)
            layer, width, tokens, batch = 12, 16384, args.tokens or 1_000_000, args.batch or 64
        else:
            ckpt = fixtures.build_gemma2(work / "model", **CPU_MODEL)
            layer, width, tokens, batch = 3, 8192, args.tokens or 65_536, args.batch or 32
        model = load_model(ckpt, device=args.device)
        device = next(model.parameters()).device
        hook = f"blocks.{layer}.hook_resid_post"
        corpus = corpus_file(work, n_chars=tokens * 4)
        windows = build_windows(
            CorpusSpec(paths=(str(corpus),), ctx=args.ctx, max_tokens=tokens), model.tokenizer
        )
        with torch.no_grad():
            probe = torch.from_numpy(windows.tokens[:8]).to(device, torch.long)
            acts = capture(model, probe, [hook], layer + 1)[hook][:, 1:].reshape(
                -1, model.cfg.d_model
            )
        sae_dir = (
            work
            / "sae"
            / "bench-res"
            / f"layer_{layer}"
            / f"width_{width // 1024}k"
            / "average_l0_80"
        )
        fixtures.write_params(
            sae_dir, fixtures.gemma_scope_params(acts.float().cpu(), width, firing_rate=0.006)
        )
        sae = load_sae(sae_dir, device=device, dtype=model.cfg.dtype)
        n = windows.n_tokens
        bare = [
            bare_loop(model, sae, windows, hook, layer, batch) for _ in range(args.repeats + 1)
        ][1:]
        fwd = [
            bare_loop(model, sae, windows, hook, layer, batch, with_encode=False)
            for _ in range(args.repeats)
        ]
        rec = [
            run_record(model, sae, corpus, work, args.ctx, tokens, batch)
            for _ in range(args.repeats)
        ]
        bare_tps, rec_tps = n / statistics.median(bare), n / statistics.median(rec)
        fwd_tps = n / statistics.median(fwd)
        print(
            f"device: {device} ({torch.cuda.get_device_name() if device.type == 'cuda' else f'{torch.get_num_threads()} threads'})"
        )
        print(
            f"model: Gemma 2 architecture, {model.cfg.n_layers} layers, d_model {model.cfg.d_model}; "
            f"SAE {width} wide at {hook}; {n:,} tokens in windows of {args.ctx}, batch {batch}"
        )
        print(f"forward to layer {layer} only:                {fwd_tps:12,.0f} tok/s")
        print(
            f"bare loop (forward to layer {layer} + encode): {bare_tps:12,.0f} tok/s  (median of {args.repeats})"
        )
        print(
            f"scope record (everything, store written):  {rec_tps:12,.0f} tok/s  (median of {args.repeats})"
        )
        print(
            f"record / bare loop: {rec_tps / bare_tps:.2f}x;  record / forward only: {rec_tps / fwd_tps:.2f}x"
        )
        if args.overlap:
            over = [
                run_record(model, sae, corpus, work, args.ctx, tokens, batch, overlap=True)
                for _ in range(args.repeats)
            ]
            over_tps = n / statistics.median(over)
            print(f"scope record --overlap:                     {over_tps:12,.0f} tok/s  "
                  f"(median of {args.repeats}): {over_tps / bare_tps:.2f}x bare loop, "
                  f"{over_tps / fwd_tps:.2f}x forward only")  # fmt: skip
        if args.saedashboard:
            dash = saedashboard(args.saedashboard, model, sae_dir, windows, hook, work, batch)
            if dash["tokens"] != n:
                raise SystemExit(f"SAEDashboard counted {dash['tokens']:,} tokens, record {n:,}")
            dash_tps = n / dash["seconds"]
            print(f"SAEDashboard (all {width} features, the same {n:,} tokens, one run): "
                  f"{dash_tps:12,.1f} tok/s  ({dash['seconds']:,.0f} s)")  # fmt: skip
            print(f"record / SAEDashboard: {rec_tps / dash_tps:.1f}x")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
