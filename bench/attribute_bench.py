"""Seconds and peak memory of attribution on a model of the demo's shape.

    python bench/attribute_bench.py                        # gemma-3-270m's shape, random weights
    python bench/attribute_bench.py --layers 6 --tokens 16  # a quicker look

The model has the demo's dimensions (Gemma 3: d_model 640, 4 heads of 256, one KV head,
d_mlp 2048, vocabulary 262,144; 18 layers by default) with random weights, and a random
JumpReLU skip transcoder at every layer (2,048 features; thresholds set so a feature fires on
``--firing`` of tokens). Each measurement runs in a fresh process (its peak RSS is the
measurement's, model included; the model alone is printed as the baseline):

- ``attribute``: ``scope.attribute`` of the most likely next token's logit (one forward and one
  backward through the frozen model), every transcoder's features at every position;
- ``graph``: ``scope.graph.attribution_graph`` (every active feature's row by batched backward
  passes) and its pruned JSON.

Medians of ``--repeats`` runs (after one warm-up) within each process.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

PROMPT = (
    "The history of the city begins with a small settlement on the river, where traders from "
    "the north met farmers from the valley to exchange grain, salt and wool for tools, cloth "
    "and news of the wider world beyond the hills"
)


def build(out: Path, layers: int, firing: float) -> tuple[Path, list[Path]]:
    from scope import load_model
    from scope import testing as fixtures

    model_dir = out / f"g3-270m-shape-{layers}L"
    if not (model_dir / "config.json").is_file():
        fixtures.build_gemma3(model_dir, n_layers=layers, d_model=640, d_mlp=2048, d_head=256,
                              vocab_size=262144)  # fmt: skip
    tc = out / f"tc-{layers}L-{firing}"
    if not (tc / f"L{layers - 1}" / "cfg.json").is_file():
        model = load_model(model_dir, device="cpu")
        fixtures.build_transcoders(model, tc, d_sae=2048, firing_rate=firing)
    return model_dir, [tc / f"L{n}" for n in range(layers)]


def measure(
    kind: str,
    model_dir: str,
    folders: list[str],
    n_tokens: int,
    repeats: int,
    max_nodes: int | None,
) -> dict:
    import torch

    from scope import load_model, load_sae
    from scope.attribute import attribute
    from scope.graph import attribution_graph, graph_json

    model = load_model(model_dir, device="cpu")
    saes = [load_sae(f, device="cpu") for f in folders]
    tokens = model.to_tokens(PROMPT)[:, :n_tokens]
    assert tokens.shape[1] == n_tokens, f"the prompt has only {tokens.shape[1]} tokens"
    base_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    times, info = [], {}
    for i in range(repeats + 1):
        start = time.perf_counter()
        if kind == "attribute":
            a = attribute(model, saes, tokens)
            info = {"features": int(sum(len(f) for f in a.features))}
        else:
            g = attribution_graph(model, saes, model.to_string(tokens[0, 1:]),
                                  max_feature_nodes=max_nodes)  # fmt: skip
            data = graph_json(g)
            info = {
                "features": g.n_features,
                "nodes": len(data["nodes"]),
                "links": len(data["links"]),
            }
        if i:  # the first is a warm-up
            times.append(time.perf_counter() - start)
    torch.set_num_threads(torch.get_num_threads())
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    return {"kind": kind, "tokens": n_tokens, "seconds": statistics.median(times),
            "peak_gib": peak, "model_gib": base_rss, **info}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=18)
    parser.add_argument("--tokens", default="16,64", help="prompt lengths, BOS included")
    parser.add_argument("--kinds", default="attribute,graph")
    parser.add_argument("--firing", type=float, default=0.01)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--cache", default=".bench-attribute", help="where the model is built")
    parser.add_argument("--max-feature-nodes", type=int, help="graph: cap the feature nodes")
    parser.add_argument("--one", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        kind, model_dir, n, folders = json.loads(args.one)
        result = measure(kind, model_dir, folders, n, args.repeats, args.max_feature_nodes)
        print(json.dumps(result))
        return
    model_dir, folders = build(Path(args.cache), args.layers, args.firing)
    print(f"model: {args.layers} layers of gemma-3-270m's shape, transcoders of 2048 at every "
          f"layer, firing {args.firing}; medians of {args.repeats}")  # fmt: skip
    print(f"{'what':<10} {'tokens':>6} {'seconds':>8} {'peak GiB':>9} {'model GiB':>9}  nodes")
    for kind in args.kinds.split(","):
        for n in (int(t) for t in args.tokens.split(",")):
            one = json.dumps([kind, str(model_dir), n, [str(f) for f in folders]])
            cmd = [sys.executable, __file__, "--one", one, "--repeats", str(args.repeats)]
            if args.max_feature_nodes:
                cmd += ["--max-feature-nodes", str(args.max_feature_nodes)]
            done = subprocess.run(cmd, capture_output=True, text=True)
            if done.returncode:
                print(done.stderr[-2000:])
                continue
            r = json.loads(done.stdout.strip().splitlines()[-1])
            extra = {k: r[k] for k in ("features", "nodes", "links") if k in r}
            print(f"{kind:<10} {n:>6} {r['seconds']:>8.2f} {r['peak_gib']:>9.2f} "
                  f"{r['model_gib']:>9.2f}  {extra}")  # fmt: skip


if __name__ == "__main__":
    main()
