"""How SAEs are trained: one frozen settings object, checked when it is made."""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass

from scope.errors import ScopeError


@dataclass(frozen=True, kw_only=True)
class TrainSettings:
    """Settings of one training run: one JumpReLU SAE per hook, all over the same tokens."""

    hooks: tuple[str, ...]
    """Hooks to train an SAE on (``blocks.6.hook_resid_post``), one SAE each, all cached
    from one forward pass."""
    width: int = 4096
    """Features per SAE (d_sae)."""
    target_l0: float = 60.0
    """Mean features firing per token to aim for: the centre of sae-lens' quadratic L0
    penalty (Gemma Scope 2's), and what the initial threshold is set from."""
    l0_coefficient: float = 1.0
    """Weight of the L0 penalty against the reconstruction loss (sae-lens' l0_coefficient);
    higher holds L0 closer to the target at some cost in reconstruction."""
    epochs: int = 4
    """Passes over the cached activations."""
    batch_size: int = 4096
    """Tokens per optimizer step."""
    lr: float = 5e-4
    """Adam learning rate (constant after a warm-up, decayed linearly over the last 20%)."""
    ste_to_input: bool = True
    """sae-lens' jumprelu_ste_to_input: the L0 penalty's straight-through gradient reaches the
    encoder too (Anthropic's setup), not only the threshold (DeepMind's); without it the
    threshold, moving ~lr per step, cannot hold L0 near the target in a short run."""
    bandwidth: float = 0.05
    """Width of the straight-through estimator's window around the threshold (sae-lens'
    jumprelu_bandwidth), in units of the normalised activations."""
    seed: int = 0
    """Seeds the SAE initialisation and the order tokens are visited in."""
    checkpoint_every: int = 100
    """Steps between resumable checkpoints (also written when the run is interrupted)."""

    def __post_init__(self) -> None:
        if not self.hooks:
            raise ScopeError("no hook to train on: pass --layer (with --site) or --hook")
        if len(set(self.hooks)) != len(self.hooks):
            raise ScopeError(f"a hook is given twice in {list(self.hooks)}: give each once")
        if self.width < 1:
            raise ScopeError(f"--width {self.width} must be at least 1, e.g. 4096")
        if not 0 < self.target_l0 < self.width:
            raise ScopeError(
                f"--target-l0 {self.target_l0:g} is not between 0 and the width {self.width}: "
                "pick a few dozen features per token, e.g. --target-l0 60"
            )
        if self.target_l0 > self.width / 4:
            raise ScopeError(
                f"--target-l0 {self.target_l0:g} would fire over a quarter of the {self.width} "
                "features on every token, which is not sparse: pick e.g. 20-100, or a wider SAE"
            )
        if self.l0_coefficient <= 0:
            raise ScopeError(f"--l0-coefficient {self.l0_coefficient:g} must be positive")
        if self.epochs < 1:
            raise ScopeError(f"--epochs {self.epochs} must be at least 1")
        if self.batch_size < 1:
            raise ScopeError(f"--batch-size {self.batch_size} must be at least 1")
        if not 0 < self.lr < 1:
            raise ScopeError(f"--lr {self.lr:g} must be between 0 and 1, e.g. 5e-4")
        if self.bandwidth <= 0:
            raise ScopeError(f"bandwidth {self.bandwidth:g} must be positive")
        if self.checkpoint_every < 1:
            raise ScopeError(f"--checkpoint-every {self.checkpoint_every} must be at least 1")

    def fingerprint(self) -> str:
        """A short hash of everything that changes the trained weights (not checkpoint_every):
        a checkpoint is resumed only by a run with the same fingerprint and cache."""
        fields = asdict(self)
        fields.pop("checkpoint_every")
        return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:12]


__all__ = ["TrainSettings"]
