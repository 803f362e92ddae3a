"""Run SAEDashboard on the benchmark's model, SAE and tokens, in SAEDashboard's own
environment (it pins other transformer-lens and transformers versions than the workbench).

    python saedashboard_worker.py WORK_DIR     -> prints one JSON line: seconds, tokens, check

tokens: the windows' tokens that count (special tokens such as BOS and padding excluded).
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np
import torch


def main(work: Path) -> None:
    from sae_dashboard.sae_vis_data import SaeVisConfig
    from sae_dashboard.sae_vis_runner import SaeVisRunner
    from sae_lens import HookedSAETransformer
    from sae_lens.saes.jumprelu_sae import JumpReLUSAE, JumpReLUSAEConfig
    from safetensors.torch import load_file
    from transformer_lens import HookedTransformerConfig

    spec = json.loads((work / "spec.json").read_text())
    torch.set_num_threads(spec["threads"])
    cfg = HookedTransformerConfig(**spec["tl_config"], device="cpu", dtype=torch.float32)
    model = HookedSAETransformer(cfg)
    model.load_state_dict(load_file(work / "model.safetensors"), strict=False)
    model.eval()
    params = dict(np.load(work / "params.npz"))
    d_in, d_sae = params["W_enc"].shape
    sae = JumpReLUSAE(
        JumpReLUSAEConfig(
            d_in=d_in, d_sae=d_sae, dtype="float32", device="cpu", apply_b_dec_to_input=False
        )
    )
    sae.load_state_dict({k: torch.from_numpy(v) for k, v in params.items()})
    sae.cfg.metadata.hook_name = spec["hook"]
    tokens = torch.from_numpy(np.load(work / "tokens.npy")).long()
    with torch.no_grad():  # the same model as the workbench's: compare one activation sum
        _, cache = model.run_with_cache(tokens[:1], names_filter=spec["hook"])
    check = float(cache[spec["hook"]].double().sum())
    config = SaeVisConfig(
        hook_point=spec["hook"],
        features=list(range(d_sae)),
        minibatch_size_features=spec["features_per_batch"],
        minibatch_size_tokens=spec["windows_per_batch"],
        device="cpu",
        dtype="float32",
        ignore_tokens=set(spec["ignore_tokens"]),
        verbose=False,
    )
    start = time.perf_counter()
    SaeVisRunner(config).run(encoder=sae, model=model, tokens=tokens)
    seconds = time.perf_counter() - start
    n_tokens = int((~torch.isin(tokens, torch.tensor(spec["ignore_tokens"]))).sum())
    print(json.dumps({"seconds": seconds, "tokens": n_tokens, "check": check}))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
