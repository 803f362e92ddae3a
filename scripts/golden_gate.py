"""Golden Gate-style steering: find the feature for a concept by contrast, then steer with it.

    python scripts/golden_gate.py                              # gemma-2-2b + a Gemma Scope SAE at layer 20
    python scripts/golden_gate.py --model DIR --sae DIR        # any Gemma model and SAE
    python scripts/golden_gate.py --concept "..." --concept "..." --neutral "..."   # any concept
    python scripts/golden_gate.py --feature 2943 --concept "..."   # a feature you already know

The feature is the one whose mean activation on sentences about the concept (--concept, Golden
Gate Bridge sentences by default) most exceeds its mean on neutral sentences (--neutral), unless
--feature names it. It is then steered with unit "max" at strength --times-max, where its max is
the highest activation it reached on the concept sentences: its decoder row is added at every
position as if it fired that many times as strongly as it did there. The steered continuation
is printed next to the baseline (same seed, same sampling), and the steer in the form
`scope steer --steer` and `scope serve` take.
"""

from __future__ import annotations

import argparse

import torch

from scope import load_model, load_sae
from scope.acts import sae_acts
from scope.generate import Sampling, compare
from scope.steer import Steer
from scope.steer_spec import SteerSpec

CONCEPT = [
    "The Golden Gate Bridge spans the strait at the entrance to San Francisco Bay.",
    "Fog rolled over the Golden Gate Bridge as cars crossed toward Marin County.",
    "Painted International Orange, the Golden Gate Bridge opened in 1937.",
]
NEUTRAL = [
    "She made a cup of tea and read the newspaper in the kitchen.",
    "The committee will meet on Thursday to discuss the budget.",
    "Photosynthesis turns light, water and carbon dioxide into sugar.",
]


def mean_acts(model, sae, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and max activation of every feature over the texts' tokens (BOS and other special
    tokens excluded)."""
    rows = []
    for text in texts:
        acts = sae_acts(model, [sae], model.to_tokens(text))
        rows.append(acts.codes[0][acts.counted].float())
    acts = torch.cat(rows)
    return acts.mean(0), acts.max(0).values


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--model", default="google/gemma-2-2b")
    ap.add_argument("--sae", default="gemma-scope-2b-pt-res-canonical/layer_20/width_16k/canonical")
    ap.add_argument("--prompt", default="On my weekend trip I went to see")
    ap.add_argument("--concept", action="append", help="a sentence about the concept (repeat)")
    ap.add_argument("--neutral", action="append", help="a sentence about something else (repeat)")
    ap.add_argument("--feature", type=int, help="steer this feature instead of searching")
    ap.add_argument(
        "--times-max", type=float, default=4.0, help="strength as a multiple of the feature's max"
    )
    ap.add_argument("--max-new-tokens", type=int, default=40)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    model = load_model(args.model)
    sae = load_sae(args.sae, device=model.cfg.device, dtype=model.cfg.dtype)
    concept_mean, concept_max = mean_acts(model, sae, args.concept or CONCEPT)
    neutral_mean, _ = mean_acts(model, sae, args.neutral or NEUTRAL)
    if args.feature is None:
        feature = int((concept_mean - neutral_mean).argmax())
    elif not 0 <= args.feature < sae.cfg.d_sae:
        raise SystemExit(f"--feature {args.feature}: the SAE has features 0-{sae.cfg.d_sae - 1}")
    else:
        feature = args.feature
    if concept_max[feature] <= 0:
        raise SystemExit(
            f"feature {feature} never fires on the --concept sentences: give ones it fires on"
        )
    # what the feature writes at times-max its max on the concept sentences
    steer = Steer(sae, feature, args.times_max, unit="max", max_act=float(concept_max[feature]))
    print(f"feature {feature}: mean {concept_mean[feature]:.2f} on the concept, {neutral_mean[feature]:.2f} "
          f"on neutral text; max {steer.max_act:.2f}; steering {SteerSpec.of(steer)}")  # fmt: skip
    result = compare(model, args.prompt, [steer],
                     sampling=Sampling(max_new_tokens=args.max_new_tokens, seed=args.seed))  # fmt: skip
    print(f"prompt:   {args.prompt}\nbaseline: {result.baseline}\nsteered:  {result.steered}")


if __name__ == "__main__":
    main()
