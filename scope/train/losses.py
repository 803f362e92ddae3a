"""The training SAE: sae-lens' ``JumpReLUTrainingSAE`` (its MSE, sparsity and pre-activation
losses, unchanged) plus the workbench's frequency penalty on dense features.

Gemma Scope 2 trained with a frequency penalty but did not publish its form; this one is
the workbench's. With ``f_i`` the fraction of a batch's tokens on which feature ``i`` fires,

    freq_loss = freq_penalty * sum_i relu(f_i - freq_target)^2 / freq_target

``f_i`` is the mean of sae-lens' ``Step`` (exactly the firing fraction in the forward pass),
so its gradient is the same straight-through estimator the L0 penalty uses: it raises a dense
feature's threshold (and, with ``jumprelu_ste_to_input``, lowers its pre-activations near the
threshold), and leaves features at or below the target alone.
"""

from __future__ import annotations

from typing import Any

import torch
from sae_lens import JumpReLUTrainingSAE, JumpReLUTrainingSAEConfig
from sae_lens.saes.jumprelu_sae import Step
from sae_lens.saes.sae import TrainStepInput


def frequency_loss(
    hidden_pre: torch.Tensor,
    threshold: torch.Tensor,
    *,
    bandwidth: float,
    ste_to_input: bool,
    coefficient: float,
    target: float,
) -> torch.Tensor:
    """The frequency penalty of one batch's pre-activations [tokens, d_sae] (see the module
    docstring)."""
    fired = Step.apply(hidden_pre, threshold.to(hidden_pre.dtype), bandwidth, ste_to_input)
    freq = fired.mean(0)  # type: ignore[union-attr]
    return coefficient * ((freq - target).relu() ** 2).sum() / target


class TrainingSAE(JumpReLUTrainingSAE):
    """sae-lens' JumpReLU training SAE with the frequency penalty added to its losses (as
    ``freq_loss``) when ``freq_penalty`` > 0; the weights, their checkpoints and everything
    else are sae-lens'."""

    def __init__(
        self, cfg: JumpReLUTrainingSAEConfig, *, freq_penalty: float = 0.0, freq_target: float
    ) -> None:
        super().__init__(cfg)
        self.freq_penalty = freq_penalty
        self.freq_target = freq_target

    def calculate_aux_loss(
        self,
        step_input: TrainStepInput,
        feature_acts: torch.Tensor,
        hidden_pre: torch.Tensor,
        sae_out: torch.Tensor,
    ) -> dict[str, Any]:
        losses = super().calculate_aux_loss(step_input, feature_acts, hidden_pre, sae_out)
        if self.freq_penalty > 0:
            losses["freq_loss"] = frequency_loss(
                hidden_pre,
                self.threshold,
                bandwidth=self.bandwidth,
                ste_to_input=self.cfg.jumprelu_ste_to_input,
                coefficient=self.freq_penalty,
                target=self.freq_target,
            )
        return losses


__all__ = ["TrainingSAE", "frequency_loss"]
