"""Train JumpReLU SAEs (and transcoders) with sae-lens' own JumpReLU training and save them as
Gemma Scope releases.

- ``cache``: one forward pass per batch caches every hook's activations (counted tokens only)
  to disk, a transcoder's input and output hooks row by row together; resumable.
- ``losses``: the training modules: sae-lens' ``JumpReLUTrainingSAE`` with the frequency
  penalty, and the JumpReLU transcoder built on it (optional affine skip).
- ``loop``: one module and its sae-lens ``SAETrainer`` per hook, in lockstep over the cached
  rows for several epochs; resumable checkpoints.
- ``export``: the raw-activation convention (normalisation and input b_dec folded), params.npz
  (a transcoder: sae-lens' safetensors) + cfg.json + card.json in
  ``layer_L/width_W/average_l0_N``, a README row.
- ``run``: ``train_saes`` ties them together, with held-out L0, FVU and delta loss
  (``scope.evals``) on every card.
"""

from scope.train.cache import ActivationCache, CacheProgress, build_cache
from scope.train.loop import StepReport
from scope.train.run import TrainedSAE, default_cache_root, train_saes
from scope.train.settings import TrainSettings

__all__ = [
    "ActivationCache",
    "CacheProgress",
    "StepReport",
    "TrainSettings",
    "TrainedSAE",
    "build_cache",
    "default_cache_root",
    "train_saes",
]
