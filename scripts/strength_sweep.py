"""Sweep a feature's steering strength and plot what it does: the feature's activation, the KL
to the baseline, and the fluency (loss under the unsteered model) of each continuation.

    python scripts/strength_sweep.py --feature 1234                 # gemma-2-2b, layer 12 16k SAE
    python scripts/strength_sweep.py --model DIR --sae DIR --feature 7 --strengths 0:40:10 --out runs/sweeps

The sweep is saved under OUT/experiments/ (Parquet + JSON) and drawn to OUT/sweep.html.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from scope import load_model, load_sae
from scope.generate import Sampling
from scope.steer import Steer
from scope.sweep import SweepPoint, parse_strengths, sweep


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--model", default="google/gemma-2-2b")
    ap.add_argument("--sae", default="gemma-scope-2b-pt-res-canonical/layer_12/width_16k/canonical")
    ap.add_argument("--feature", type=int, required=True)
    ap.add_argument("--prompt", default="Tell me about your weekend.")
    ap.add_argument("--strengths", default="-40:120:20")
    ap.add_argument("--modes", default="add", help="comma-separated: add, clamp")
    ap.add_argument("--max-new-tokens", type=int, default=30)
    ap.add_argument("--out", default="runs/sweeps")
    args = ap.parse_args()

    model = load_model(args.model)
    sae = load_sae(args.sae, device=model.cfg.device, dtype=model.cfg.dtype)

    def show(p: SweepPoint, index: int, total: int) -> None:
        print(f"[{index + 1}/{total}] {p.mode:6} {p.strength:8g}  act {p.target_act:7.2f}  "
              f"KL {p.kl:6.3f}  loss {p.loss:5.2f}  {p.text[:60]!r}", flush=True)  # fmt: skip

    result = sweep(model, args.prompt, Steer(sae, args.feature), parse_strengths(args.strengths),
                   modes=args.modes.split(","), sampling=Sampling(max_new_tokens=args.max_new_tokens, temperature=0.0),
                   save_to=args.out, on_point=show)  # fmt: skip
    print(f"baseline: {result.baseline!r}")
    html = Path(args.out) / "sweep.html"
    result.figure().write_html(html)
    print(f"saved {args.out}/experiments/{result.id}.parquet and {html}")


if __name__ == "__main__":
    main()
