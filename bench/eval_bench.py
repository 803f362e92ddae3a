"""`scope.evals.evaluate` against sae-lens' own `run_evals`, on the same SAEs and tokens, in one run.

    python bench/eval_bench.py                 # CPU: 6 layers x d_model 512, three 4k SAEs
    python bench/eval_bench.py --saes 1        # one SAE

Both compute L0, reconstruction, and the loss and KL with the SAE spliced in and with the site
zeroed, over the same full-length windows and batches. sae-lens evaluates one SAE per call (a
clean forward per SAE); scope runs one clean forward per batch for all SAEs, then the spliced
and zeroed passes per SAE. Figures are medians of --repeats runs; ratios are of tokens/s.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch

from scope import load_model, load_sae
from scope import testing as fixtures
from scope.acts import capture
from scope.corpus import CorpusSpec, build_windows
from scope.evals import evaluate


def sae_lens_evals(model, saes, tokens: torch.Tensor, batch: int) -> float:
    """Seconds for sae-lens' run_evals over ``tokens`` for every SAE, one call each."""
    from datasets import Dataset
    from sae_lens.evals import get_eval_everything_config, run_evals
    from sae_lens.training.activation_scaler import ActivationScaler
    from sae_lens.training.activations_store import ActivationsStore

    ds = Dataset.from_dict({"tokens": tokens.tolist()})
    n_batches = len(tokens) // batch
    config = get_eval_everything_config(batch, n_batches, n_batches)
    start = time.perf_counter()
    for sae in saes:
        sae.cfg.metadata.context_size = tokens.shape[1]
        sae.cfg.metadata.prepend_bos = True
        store = ActivationsStore.from_sae(model, sae, dataset=ds, context_size=tokens.shape[1],
                                          store_batch_size_prompts=batch, n_batches_in_buffer=4)  # fmt: skip
        run_evals(sae, store, model, ActivationScaler(), config)
    return time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--tokens", type=int, default=16_384)
    ap.add_argument("--ctx", type=int, default=64)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--saes", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="scope-eval-bench-"))
    ckpt = fixtures.build_gemma2(
        work / "model", n_layers=6, d_model=512, n_heads=8, n_kv_heads=4, d_head=64, d_mlp=2048,
        sliding_window=64, query_pre_attn_scalar=64, attn_softcap=50.0, final_softcap=30.0, init_std=0.02,
    )  # fmt: skip
    model = load_model(ckpt, device="cpu")
    text = " ".join(fixtures.training_text()) * 4
    (work / "c.txt").write_text(text)
    spec = CorpusSpec(paths=(str(work / "c.txt"),), ctx=args.ctx, max_tokens=args.tokens * 2)
    windows = build_windows(spec, model.tokenizer)
    full = windows.lengths == args.ctx
    n = int(full.sum()) // args.batch * args.batch
    rows = full.nonzero()[0][:n]
    same = replace(windows, tokens=windows.tokens[rows], lengths=windows.lengths[rows],
                   doc=windows.doc[rows], offset=windows.offset[rows], ids=windows.ids[rows])  # fmt: skip
    tokens = torch.from_numpy(same.tokens).long()
    layers = [1, 3, 5][: args.saes]
    hooks = [f"blocks.{layer}.hook_resid_post" for layer in layers]
    with torch.no_grad():
        acts = capture(model, tokens[:8], hooks, max(layers) + 1)
    saes = []
    for layer, hook in zip(layers, hooks, strict=True):
        folder = work / "saes" / "b-res" / f"layer_{layer}" / "width_4k" / "average_l0_40"
        fixtures.write_params(
            folder,
            fixtures.gemma_scope_params(acts[hook][:, 1:].reshape(-1, 512), 4096, firing_rate=0.01),
        )
        saes.append(load_sae(folder, device="cpu"))
    ours, theirs = [], []
    for _ in range(args.repeats):
        start = time.perf_counter()
        evaluate(model, saes, same, batch_size=args.batch)
        ours.append(time.perf_counter() - start)
        theirs.append(sae_lens_evals(model, saes, tokens, args.batch))
    n_tokens = tokens.numel()
    a, b = n_tokens / statistics.median(ours), n_tokens / statistics.median(theirs)
    print(f"device: cpu ({torch.get_num_threads()} threads); model: 6 layers x d_model 512")
    print(
        f"{len(saes)} SAEs (4096 wide, layers {layers}), {n_tokens:,} tokens in windows of {args.ctx}, batch {args.batch}"
    )
    print(f"scope evaluate:     {a:10,.0f} tok/s  (median of {args.repeats}; all SAEs)")
    print(f"sae-lens run_evals: {b:10,.0f} tok/s  (median of {args.repeats}; one call per SAE)")
    print(f"ratio: {a / b:.2f}x")


if __name__ == "__main__":
    main()
