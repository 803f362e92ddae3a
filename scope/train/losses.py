"""The modules in training: sae-lens' ``JumpReLUTrainingSAE`` (its MSE, sparsity and
pre-activation losses, unchanged) plus the workbench's frequency penalty on dense features, and
the JumpReLU transcoder built on it (sae-lens has transcoders for inference only).

``TrainingTranscoder`` is ``TrainingSAE`` with a decoder that writes another hook: the encoder,
its straight-through estimators, the threshold projection, every sparsity loss and the
frequency penalty are the SAE's own code; only the reconstruction target differs (the output
hook's activation, given beside the input in each batch) and, with ``skip``, sae-lens' affine
skip connection ``x @ W_skip.T`` is added to the output. ``PairedScaler`` scales a transcoder's
input and target each as sae-lens' ``expected_average_only_in`` scales an SAE's input.

Gemma Scope 2 trained with a frequency penalty but did not publish its form; this one is
the workbench's. With ``f_i`` the fraction of a batch's tokens on which feature ``i`` fires,

    freq_loss = freq_penalty * sum_i relu(f_i - freq_target)^2 / freq_target

``f_i`` is the mean of sae-lens' ``Step`` (exactly the firing fraction in the forward pass),
so its gradient is the same straight-through estimator the L0 penalty uses: it raises a dense
feature's threshold (and, with ``jumprelu_ste_to_input``, lowers its pre-activations near the
threshold), and leaves features at or below the target alone.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from sae_lens import JumpReLUTrainingSAE, JumpReLUTrainingSAEConfig
from sae_lens.saes.jumprelu_sae import Step
from sae_lens.saes.sae import TrainStepInput, TrainStepOutput
from sae_lens.training.activation_scaler import ActivationScaler
from torch import nn


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


@dataclass
class TrainingTranscoderConfig(JumpReLUTrainingSAEConfig):
    """sae-lens' JumpReLU training config and a transcoder's output: the width of the hook it
    writes, and whether it learns a skip connection."""

    d_out: int = 0
    """Width of the output hook (the MLP's output: d_model)."""
    skip: bool = False
    """An affine skip connection ``x @ W_skip.T`` (sae-lens' ``jumprelu_skip_transcoder``)."""


class TrainingTranscoder(TrainingSAE):
    """A JumpReLU transcoder in training (see the module docstring). sae-lens' trainer hands it
    paired rows ``[input | target]`` (``d_in + d_out`` wide, scaled by ``PairedScaler``)."""

    cfg: TrainingTranscoderConfig  # type: ignore[assignment]
    W_skip: nn.Parameter

    def __init__(
        self, cfg: TrainingTranscoderConfig, *, freq_penalty: float = 0.0, freq_target: float
    ) -> None:
        if cfg.d_out < 1:
            raise ValueError(f"a transcoder needs its output width d_out, got {cfg.d_out}")
        super().__init__(cfg, freq_penalty=freq_penalty, freq_target=freq_target)
        if cfg.skip:  # sae-lens' SkipTranscoder: [d_out, d_in], starting at zero
            self.W_skip = nn.Parameter(
                torch.zeros(cfg.d_out, cfg.d_in, dtype=self.dtype, device=self.device)
            )

    def initialize_weights(self) -> None:
        """sae-lens' initialisation, then the decoder drawn afresh over the output's width
        (sae-lens ties W_enc to W_dec.T, which for another hook means nothing): kaiming-uniform
        rows scaled to sae-lens' initial decoder norm, and a zero b_dec."""
        super().initialize_weights()
        cfg = self.cfg
        w_dec = torch.empty(cfg.d_sae, cfg.d_out, dtype=self.dtype, device=self.device)
        nn.init.kaiming_uniform_(w_dec)
        if cfg.decoder_init_norm is not None:
            w_dec *= cfg.decoder_init_norm / w_dec.norm(dim=-1, keepdim=True)
        self.W_dec = nn.Parameter(w_dec)
        self.b_dec = nn.Parameter(torch.zeros(cfg.d_out, dtype=self.dtype, device=self.device))

    def split(self, pair: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(input, target) of a batch of paired rows."""
        return pair[..., : self.cfg.d_in], pair[..., self.cfg.d_in :]

    def output(self, x: torch.Tensor, feature_acts: torch.Tensor) -> torch.Tensor:
        """What the transcoder writes for input ``x`` and its codes: the decoder, plus the skip
        connection (as sae-lens' ``SkipTranscoder.forward``)."""
        out = self.decode(feature_acts)
        return out + x @ self.W_skip.T if self.cfg.skip else out

    def training_forward_pass(self, step_input: TrainStepInput) -> TrainStepOutput:
        """sae-lens' training step (``JumpReLUTrainingSAE.training_forward_pass``) on paired
        rows: the same threshold projection, encoder and auxiliary losses (``calculate_aux_loss``,
        inherited), summed in the same order; the reconstruction loss is against the target.
        The output's ``sae_in`` is that target, what ``sae_out`` approximates (sae-lens' own
        explained-variance log reads it so)."""
        with torch.no_grad():
            self.threshold.data.clamp_(min=0.0)
        x, target = self.split(step_input.sae_in)
        feature_acts, hidden_pre = self.encode_with_hidden_pre(x)
        sae_out = self.output(x, feature_acts)
        mse_loss = self.mse_loss_fn(sae_out, target).sum(dim=-1).mean()
        losses = {"mse_loss": mse_loss}
        losses.update(self.calculate_aux_loss(step_input, feature_acts, hidden_pre, sae_out))
        total = mse_loss
        for name, value in losses.items():
            if name != "mse_loss":
                total = total + value
        return TrainStepOutput(sae_in=target, sae_out=sae_out, feature_acts=feature_acts,
                               hidden_pre=hidden_pre, loss=total, losses=losses)  # fmt: skip

    @torch.no_grad()
    def fold_scaling(self, in_factor: float, out_factor: float) -> None:
        """Fold the trainer's input and target scalings into the weights, as sae-lens'
        ``fold_activation_norm_scaling_factor`` folds an SAE's one factor: the raw input gives
        the same pre-activations, and the output comes out in the raw target's units."""
        self.W_enc.data *= in_factor
        self.W_dec.data /= out_factor
        self.b_dec.data /= out_factor
        if self.cfg.skip:
            self.W_skip.data *= in_factor / out_factor
        self.cfg.normalize_activations = "none"


@dataclass
class PairedScaler(ActivationScaler):
    """sae-lens' ``expected_average_only_in`` scaling for a transcoder's paired rows
    ``[input | target]``: the input by ``scaling_factor``, the target by ``target_factor``, each
    bringing its side to a mean norm of sqrt(its width), so that the reconstruction loss weighs
    against the sparsity losses as an SAE's does whatever the two hooks' scales. Saved and
    loaded with the trainer's state, as sae-lens' scaler is."""

    d_in: int = 0
    """Width of the input half."""
    target_factor: float | None = None

    def scale(self, acts: torch.Tensor) -> torch.Tensor:
        if self.scaling_factor is None or self.target_factor is None:
            return acts
        x, y = acts[..., : self.d_in], acts[..., self.d_in :]
        return torch.cat([x * self.scaling_factor, y * self.target_factor], dim=-1)

    def unscale(self, acts: torch.Tensor) -> torch.Tensor:
        if self.scaling_factor is None or self.target_factor is None:
            return acts
        x, y = acts[..., : self.d_in], acts[..., self.d_in :]
        return torch.cat([x / self.scaling_factor, y / self.target_factor], dim=-1)

    def estimate_scaling_factor(
        self,
        d_in: int,
        data_provider: Iterator[torch.Tensor],
        n_batches_for_norm_estimate: int = 1000,
    ) -> None:
        """Both factors from the same ``n_batches_for_norm_estimate`` batches of paired rows
        (``d_in``, sae-lens' argument, is the input's width here too)."""
        self.d_in = d_in
        batches = [next(data_provider) for _ in range(n_batches_for_norm_estimate)]
        n = len(batches)
        mean_in = self._calculate_mean_norm(iter([b[..., :d_in] for b in batches]), n)
        mean_out = self._calculate_mean_norm(iter([b[..., d_in:] for b in batches]), n)
        self.scaling_factor = d_in**0.5 / mean_in
        self.target_factor = (batches[0].shape[-1] - d_in) ** 0.5 / mean_out

    def save(self, file_path: str) -> None:
        with open(file_path, "w") as f:
            json.dump({"scaling_factor": self.scaling_factor, "has_whitening": False,
                       "target_factor": self.target_factor, "d_in": self.d_in}, f)  # fmt: skip

    def load(self, file_path: Any) -> None:
        super().load(file_path)
        with open(file_path) as f:
            data = json.load(f)
        self.target_factor, self.d_in = data["target_factor"], data["d_in"]


__all__ = [
    "PairedScaler",
    "TrainingSAE",
    "TrainingTranscoder",
    "TrainingTranscoderConfig",
    "frequency_loss",
]
