"""How SAEs are trained: one frozen settings object, checked when it is made."""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from typing import Literal

from scope.errors import ScopeError

SPARSITY_LOSSES = ("quadratic", "step", "tanh")
THRESHOLD_INITS = ("global", "per_feature")


@dataclass(frozen=True, kw_only=True)
class TrainSettings:
    """Settings of one training run: one JumpReLU SAE (or transcoder) per hook, all over the
    same tokens."""

    hooks: tuple[str, ...]
    """Hooks to train on (``blocks.6.hook_resid_post``), one SAE (or transcoder) reading each,
    all cached from one forward pass."""
    outputs: tuple[str, ...] = ()
    """Empty (SAEs): each SAE reconstructs the hook it reads. Else transcoders, one hook per
    entry of ``hooks``: the transcoder reading ``hooks[i]`` is trained to give ``outputs[i]``
    (``scope train --site transcoder``: the MLP's input ``blocks.L.ln2.hook_out`` to its output
    ``blocks.L.hook_mlp_out``), both cached from the same forward pass."""
    skip: bool = False
    """Transcoders only: learn an affine skip connection too, ``x @ W_skip.T`` added to the
    output (Gemma Scope 2's affine transcoders; sae-lens' ``jumprelu_skip_transcoder``), so the
    features model what a linear map of the input does not. Starts at zero, as sae-lens'."""
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
    sparsity_loss: Literal["quadratic", "step", "tanh"] = "quadratic"
    """sae-lens' jumprelu_sparsity_loss_mode: ``quadratic`` (Gemma Scope 2's) penalises
    ``2 / target * (L0 - target)^2`` per token, pulling L0 to ``target_l0`` from both sides;
    ``step`` (Gemma Scope's) penalises L0 itself and ``tanh`` (Anthropic's) the sum of
    ``tanh(4 * act * |W_dec row|)``, both pushing L0 down only (``target_l0`` then sets just
    the initial threshold, and ``l0_coefficient`` the sparsity: try ~1e-3 for step)."""
    l0_warm_up: float = 0.0
    """Fraction of the run over which sae-lens ramps the L0 coefficient linearly from 0
    (l0_warm_up_steps): features first learn to reconstruct, then to be sparse."""
    pre_act_loss: float = 0.0
    """Weight of sae-lens' pre-activation loss (pre_act_loss_coefficient, Anthropic's
    dead-feature loss): for each dead feature (see ``dead_tokens``), ``relu(threshold - pre)
    * |W_dec row|`` summed over features and averaged over tokens, which lifts a dead
    feature's pre-activations toward its threshold until it fires again; live features get no
    gradient from it. 0 turns it off. A dead feature's encoder row and bias get no other
    gradient, and Adam moves a parameter by about ``lr`` per step whatever its gradient's
    scale, so a small weight (e.g. 3e-3; Anthropic's 3e-6 was in other units) revives."""
    dead_tokens: int | None = None
    """A feature is dead (for ``pre_act_loss``) after firing on none of this many training
    tokens in a row (sae-lens' dead_feature_window, in steps of ``batch_size`` tokens rounded
    up); None: a quarter of the run."""
    freq_penalty: float = 0.0
    """Weight of the frequency penalty on features firing on more than ``freq_target`` of
    the tokens of a batch: ``sum over features of relu(f - freq_target)^2 / freq_target``, f
    the feature's firing fraction in the batch, differentiated through sae-lens'
    straight-through step estimator (so it raises a dense feature's threshold, and with
    ``ste_to_input`` lowers its pre-activations). Gemma Scope 2 trained with a frequency
    penalty whose definition is not published; this is the workbench's. 0 turns it off."""
    freq_target: float = 0.05
    """Firing fraction above which ``freq_penalty`` applies (a card counts a feature dense
    above 0.1)."""
    threshold_init: Literal["global", "per_feature"] = "global"
    """Where the thresholds start: ``global`` puts every feature's at the one value where the
    target L0 fires over the first batch (features whose pre-activations sit low never fire,
    and get no reconstruction gradient); ``per_feature`` puts each at its own (1 - target_l0 /
    width) quantile, so every feature starts firing on the same share of tokens."""
    standardize: bool = False
    """Train on each input dimension standardised (mean 0, variance 1 over the run's first
    batches; a transcoder's target too), folded back into raw-activation weights at the end
    (``scope.train.standardize``): where a few dimensions carry most of the variance, as in
    Gemma 3's residual stream, the reconstruction then weighs every dimension alike instead of
    spending the features on those few. The workbench's own option."""
    seed: int = 0
    """Seeds the SAE initialisation and the order tokens are visited in."""
    checkpoint_every: int = 100
    """Steps between resumable checkpoints (also written when the run is interrupted)."""

    def __post_init__(self) -> None:
        if not self.hooks:
            raise ScopeError("no hook to train on: pass --layer (with --site) or --hook")
        if len(set(self.hooks)) != len(self.hooks):
            raise ScopeError(f"a hook is given twice in {list(self.hooks)}: give each once")
        if self.outputs and len(self.outputs) != len(self.hooks):
            raise ScopeError(
                f"{len(self.outputs)} output hooks for {len(self.hooks)} input hooks: a transcoder "
                "needs one of each"
            )
        for read, write in zip(self.hooks, self.outputs, strict=False):
            if read == write:
                raise ScopeError(
                    f"transcoder output {write} is its input: a transcoder maps one hook to "
                    "another (train an SAE on it instead)"
                )
        if self.skip and not self.outputs:
            raise ScopeError("--skip is for transcoders: add --site transcoder")
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
        if self.sparsity_loss not in SPARSITY_LOSSES:
            raise ScopeError(
                f"--sparsity-loss {self.sparsity_loss!r} is not one of {', '.join(SPARSITY_LOSSES)}"
            )
        if not 0 <= self.l0_warm_up < 1:
            raise ScopeError(f"--l0-warm-up {self.l0_warm_up:g} is a fraction of the run: 0 to <1")
        if self.pre_act_loss < 0:
            raise ScopeError(f"--pre-act-loss {self.pre_act_loss:g} must be 0 (off) or positive")
        if self.dead_tokens is not None and self.dead_tokens < 1:
            raise ScopeError(f"--dead-tokens {self.dead_tokens} must be at least 1, e.g. 100000")
        if self.freq_penalty < 0:
            raise ScopeError(f"--freq-penalty {self.freq_penalty:g} must be 0 (off) or positive")
        if not 0 < self.freq_target < 1:
            raise ScopeError(
                f"--freq-target {self.freq_target:g} is a fraction of tokens: between 0 and 1"
            )
        if self.threshold_init not in THRESHOLD_INITS:
            raise ScopeError(
                f"--threshold-init {self.threshold_init!r} is not one of "
                f"{', '.join(THRESHOLD_INITS)}"
            )
        if self.checkpoint_every < 1:
            raise ScopeError(f"--checkpoint-every {self.checkpoint_every} must be at least 1")

    @property
    def transcoders(self) -> bool:
        """True when the run trains transcoders (``outputs`` given)."""
        return bool(self.outputs)

    @property
    def cached(self) -> tuple[str, ...]:
        """Every hook the run caches: the inputs, and the transcoders' outputs."""
        return tuple(dict.fromkeys(self.hooks + self.outputs))

    def target(self, hook: str) -> str:
        """The hook the module reading ``hook`` reconstructs: its output, or ``hook`` itself."""
        return self.outputs[self.hooks.index(hook)] if self.outputs else hook

    def fingerprint(self) -> str:
        """A short hash of everything that changes the trained weights (not checkpoint_every):
        a checkpoint is resumed only by a run with the same fingerprint and cache."""
        fields = asdict(self)
        fields.pop("checkpoint_every")
        for key in ("outputs", "skip", "standardize"):  # older runs keep their fingerprints
            if not fields[key]:
                fields.pop(key)
        return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:12]


__all__ = ["SPARSITY_LOSSES", "THRESHOLD_INITS", "TrainSettings"]
