"""Train JumpReLU SAEs with sae-lens' own JumpReLU training and save them as Gemma Scope
releases.

- ``cache``: one forward pass per batch caches every hook's activations (counted tokens only)
  to disk; resumable.
- ``loop``: sae-lens' ``JumpReLUTrainingSAE`` + ``SAETrainer`` per hook, in lockstep over the
  cached rows for several epochs; resumable checkpoints.
- ``export``: the raw-activation convention (normalisation and input b_dec folded), params.npz
  + cfg.json + card.json in ``layer_L/width_W/average_l0_N``, a README row.
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
