"""Steered vs plain generation throughput on the same model, measured in one run.

    python bench/steer_bench.py                    # CPU: 6 layers x d_model 512, 8k SAE at layer 3
    python bench/steer_bench.py --gemma-2b-shape   # GPU: 26 layers of gemma-2-2b's shape, 16k SAE at layer 12
    python bench/steer_bench.py --sweep-only       # only the 9-point sweep, batched vs one by one
    python bench/steer_bench.py --model DIR        # any checkpoint, e.g. the demo's Gemma 3 270M

Plain generation is the workbench's sampler with no hooks (KV cache on); transformer-lens'
own `generate` is timed too for reference, and plain generation again with the weights laid out
as transformer-lens lays them (`load_model` stores the unembedding and gated MLPs transposed so
transformer-lens' per-forward `W.T.contiguous()` copies nothing). Steered runs add one feature (add), clamp one
(an SAE encode each step), and steer three features on two layers at once; each run builds
fresh hooks. Greedy, no early stop, so every run makes the same number of tokens; the sampler
at temperature 0.7 with top-p is timed unsteered. Medians of --repeats runs.

Sweeps: a --sweep-points strength sweep of one feature (0, 10, 20, ...), its points generated
as one batch (``generate_rows``) against the same points generated one after another, and the
whole ``sweep()`` (baseline, points and metrics) batched against ``batch_size=1``. The batched
tokens are checked equal to the sequential ones.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch

from scope import load_model, load_sae
from scope import testing as fixtures
from scope.generate import Sampling, generate, generate_rows, prompt_tokens
from scope.model import transposed_layout
from scope.steer import Steer
from scope.sweep import sweep


def timed(fn, repeats: int, device: torch.device) -> float:
    times = []
    for _ in range(repeats + 1):  # the first run warms up
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times[1:])


def make_sae(model, work: Path, layer: int, width: int, tokens: torch.Tensor):
    hook = f"blocks.{layer}.hook_resid_post"
    with torch.no_grad():
        _, cache = model.run_with_cache(tokens, names_filter=hook)
    folder = work / "sae" / "bench-res" / f"layer_{layer}" / f"width_{width}" / "average_l0_80"
    acts = cache[hook][0, 1:].float().cpu()
    fixtures.write_params(folder, fixtures.gemma_scope_params(acts, width, firing_rate=0.01))
    return load_sae(folder, device=next(model.parameters()).device, dtype=model.cfg.dtype)


def tl_layout(model) -> None:
    """The unembedding and gated MLPs laid out [in, out] as transformer-lens leaves them, so
    each forward copies them (what ``transposed_layout`` undoes)."""
    for module in model.modules():
        for name, param in list(module.named_parameters(recurse=False)):
            if param.dim() == 2 and not param.is_contiguous():
                setattr(module, name, torch.nn.Parameter(param.detach().contiguous(), False))


def time_generation(
    model, tokens, sampling: Sampling, cases: dict[str, list[Steer]], repeats: int, device
) -> None:
    """Print tokens/s of each case, of the sampler and of transformer-lens' own generate."""
    n = sampling.max_new_tokens
    results = {}
    for name, steers in cases.items():

        def run(steers: list[Steer] = steers) -> None:
            out = list(generate(model, tokens, sampling, steers))  # fresh hooks per run
            assert len(out) == n

        results[name] = n / timed(run, repeats, device)
    sampled = replace(sampling, temperature=0.7, top_p=0.9)
    results["sampled (T 0.7, top-p)"] = n / timed(
        lambda: list(generate(model, tokens, sampled)), repeats, device
    )
    tl = n / timed(
        lambda: model.generate(tokens, max_new_tokens=n, do_sample=False, stop_at_eos=False,
                               verbose=False, use_past_kv_cache=True),  # fmt: skip
        repeats, device,
    )  # fmt: skip
    plain = results["plain (no hooks)"]
    tl_layout(model)
    results["plain, TL's layout"] = n / timed(
        lambda: list(generate(model, tokens, sampling)), repeats, device
    )
    transposed_layout(model)
    print(f"{'transformer-lens generate':24} {tl:10.1f} tok/s")
    for case, tps in results.items():
        print(f"{case:24} {tps:10.1f} tok/s   {tps / plain:.2f}x plain", flush=True)


def time_sweeps(
    model, sae, sampling: Sampling, points: int, repeats: int, device: torch.device
) -> dict[str, tuple[float, float]]:
    """Seconds (one by one, batched) for the generations alone and for the whole sweep()."""
    prompt = "The history of the city begins with"
    sampling = replace(sampling, chat=False)
    tokens = prompt_tokens(model, prompt, False, sampling.max_new_tokens)
    strengths = [10.0 * i for i in range(points)]
    rows = [[Steer(sae, 5, strength=s)] for s in strengths]
    one_by_one = [list(generate(model, tokens, sampling, row)) for row in rows]
    if generate_rows(model, tokens, sampling, rows) != one_by_one:
        raise SystemExit("the batched sweep's tokens differ from the sequential ones")

    def whole(batch_size: int) -> float:
        return timed(
            lambda: sweep(model, prompt, Steer(sae, 5), strengths, sampling=sampling, batch_size=batch_size),
            repeats, device,
        )  # fmt: skip

    def each() -> None:
        for row in rows:
            list(generate(model, tokens, sampling, row))

    return {
        "generations": (
            timed(each, repeats, device),
            timed(lambda: generate_rows(model, tokens, sampling, rows), repeats, device),
        ),
        "sweep() with metrics": (whole(1), whole(points + 1)),
    }


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--gemma-2b-shape", action="store_true")
    ap.add_argument("--model", help="a checkpoint folder or hub name instead of random weights")
    ap.add_argument(
        "--layers", type=int, default=None, help="layers of the gemma-2-2b-shaped model (26)"
    )
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--sweep-points", type=int, default=9)
    ap.add_argument("--sweep-only", action="store_true", help="time only the sweeps")
    ap.add_argument("--no-sweep", action="store_true", help="time only the generations")
    ap.add_argument("--device", default=None)
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="scope-steer-bench-"))
    try:
        if args.model:
            ckpt, layers, width = args.model, (3, 9), 4096
        elif args.gemma_2b_shape:
            ckpt = fixtures.build_gemma2_2b_shape(work / "model", n_layers=args.layers or 26)
            layers, width = (6, 12), 16384
        else:
            ckpt = fixtures.build_gemma2(
                work / "model", n_layers=6, d_model=512, n_heads=8, n_kv_heads=4, d_head=64, d_mlp=2048,
                sliding_window=64, query_pre_attn_scalar=64, attn_softcap=50.0, final_softcap=30.0, init_std=0.02,
            )  # fmt: skip
            layers, width = (1, 3), 8192
        model = load_model(ckpt, device=args.device)
        device = next(model.parameters()).device
        text = " ".join(fixtures.training_text()[:3])[:600]
        probe = model.to_tokens(text)[:, :128]
        early, late = (make_sae(model, work, layer, width, probe) for layer in layers)
        sampling = Sampling(max_new_tokens=args.new_tokens, temperature=0.0, stop_at_eos=False)
        tokens = prompt_tokens(model, "The history of the city begins with", False, args.new_tokens)
        cases: dict[str, list[Steer]] = {
            "plain (no hooks)": [],
            "add 1 feature": [Steer(late, 5, strength=8.0)],
            "clamp 1 feature": [Steer(late, 5, strength=8.0, mode="clamp")],
            "3 features, 2 layers": [
                Steer(late, 5, strength=8.0),
                Steer(late, 9, mode="ablate"),
                Steer(early, 3, strength=4.0),
            ],
        }
        name = (
            torch.cuda.get_device_name()
            if device.type == "cuda"
            else f"{torch.get_num_threads()} threads"
        )
        print(f"device: {device} ({name}); model {model.cfg.n_layers} layers, d_model {model.cfg.d_model}; "
              f"SAEs {width} wide at layers {layers}; {args.new_tokens} new tokens, medians of {args.repeats}",
              flush=True)  # fmt: skip
        if not args.sweep_only:
            time_generation(model, tokens, sampling, cases, args.repeats, device)
        if args.no_sweep:
            return
        n = args.sweep_points
        sweep_times = time_sweeps(model, late, sampling, n, args.repeats, device)
        for case, (one_by_one, batched) in sweep_times.items():
            print(f"{n}-point sweep, {case}: one by one {one_by_one:.2f} s, one batch {batched:.2f} s: "
                  f"{one_by_one / batched:.2f}x")  # fmt: skip
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
