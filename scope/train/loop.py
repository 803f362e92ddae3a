"""The training loop: sae-lens' own JumpReLU training, one SAE (or transcoder) per hook, over
cached rows.

Each SAE is a ``sae_lens.JumpReLUTrainingSAE`` (by default Gemma Scope 2's quadratic L0
penalty around the target L0; the recipe options of ``TrainSettings`` pick sae-lens' other
sparsity losses, its L0 warm-up and pre-activation (dead-feature) loss, and add the
workbench's frequency penalty, ``scope.train.losses``) driven by its own
``sae_lens.SAETrainer`` through the trainer's public seams
(``step``, ``maybe_reset_sparsity``, ``save_checkpoint``, ``load_trainer_state``), in lockstep
as sae-lens' ``MultiSAETrainer`` drives them: its loss, optimizer, schedules, gradient
clipping and activation scaling are sae-lens'; this module chooses the batches, shows
progress and writes resumable checkpoints.

A transcoder (``scope.train.losses.TrainingTranscoder``) is the same SAE with a decoder that
writes its output hook; the same trainer drives it over paired rows ``[input | target]``
(``scope.train.cache.load_rows``), the same loop, checkpoints and resumption.

Inputs are scaled by sae-lens' ``expected_average_only_in`` factor (mean norm -> sqrt(d_in))
during training (a transcoder's target by a factor of its own: ``PairedScaler``); ``finish``
folds the scaling into the weights as sae-lens does at the end of a fit. With
``TrainSettings.standardize`` each dimension is first standardised, and folded back too
(``scope.train.standardize``).

Resuming: a checkpoint holds every SAE's weights (safetensors, fp32), its trainer's Adam
moments, schedules, firing statistics and scaling factor, and the step. The batch order is a
function of (seed, epoch, step) alone, so a resumed run sees the batches an uninterrupted run
would and ends with bitwise the same weights on the same machine and build (the same tensors
through the same kernels); across machines only to rounding (see TOOLING: kernels differ).
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np
import torch

from scope.errors import ScopeError
from scope.interrupt import stop_on_signals
from scope.train.cache import ActivationCache, load_rows
from scope.train.settings import TrainSettings
from scope.train.standardize import Standardizer

if TYPE_CHECKING:
    from sae_lens.saes.sae import TrainStepOutput
    from sae_lens.training.sae_trainer import SAETrainer

    from scope.train.losses import TrainingSAE

NORM_BATCHES = 8
"""Batches the activation scaling factor is estimated from (the first of epoch 0)."""
THRESHOLD_SAMPLE = 4096
"""Rows the initial threshold is set from."""
STATE = "state.json"


class StepReport(NamedTuple):
    """What the loop reports after each step, for a progress bar."""

    step: int
    """Steps done."""
    steps: int
    """Steps in the whole run."""
    tokens: int
    """Tokens trained on so far (each SAE sees each of them)."""
    seconds: float
    """Training time so far, over every run that resumed it."""
    l0: dict[str, float]
    """Per hook: mean features firing per token in this step's batch."""
    fvu: dict[str, float]
    """Per hook: fraction of variance unexplained on this step's batch (of the standardised
    rows with ``settings.standardize``, where every dimension weighs alike)."""
    dead: dict[str, int]
    """Per hook: features that have not fired for sae-lens' dead-feature window (the ones
    ``pre_act_loss`` works on)."""


@dataclass
class Training:
    """The SAEs being trained, their trainers, and how far they got."""

    settings: TrainSettings
    cache: ActivationCache
    saes: dict[str, TrainingSAE]
    """Per input hook: the SAE, or a ``TrainingTranscoder``."""
    trainers: dict[str, SAETrainer]
    step: int
    seconds: float
    checkpoints: Path
    standard: dict[str, Standardizer] = field(default_factory=dict)
    """Per input hook, with ``settings.standardize``: the per-dimension standardisation its
    batches get (``scope.train.standardize``)."""

    @property
    def steps_per_epoch(self) -> int:
        return self.cache.state.rows // self.settings.batch_size

    @property
    def steps(self) -> int:
        return self.steps_per_epoch * self.settings.epochs


def batch_rows(settings: TrainSettings, rows: int, step: int) -> np.ndarray:
    """The cache rows of batch ``step``: epoch ``step // steps_per_epoch`` visits the rows in
    a permutation seeded by (seed, epoch); rows left over after the last full batch of an
    epoch are skipped in that epoch. Sorted, so reads from the memmap go forward."""
    per_epoch = rows // settings.batch_size
    epoch, k = divmod(step, per_epoch)
    gen = torch.Generator().manual_seed(settings.seed * 1_000_003 + epoch)
    perm = torch.randperm(rows, generator=gen)
    return np.sort(perm[k * settings.batch_size : (k + 1) * settings.batch_size].numpy())


def load_batch(cache: ActivationCache, hook: str, rows: np.ndarray) -> torch.Tensor:
    """Cached rows of ``hook`` as an fp32 tensor [batch, d_in]."""
    return load_rows(cache, [hook], rows)


def module_batch(
    settings: TrainSettings, cache: ActivationCache, hook: str, rows: np.ndarray
) -> torch.Tensor:
    """The batch the module reading ``hook`` trains on: its cached rows [batch, d_in], or for
    a transcoder its input and target rows side by side [batch, d_in + d_out]."""
    if not settings.transcoders:
        return load_batch(cache, hook, rows)
    return load_rows(cache, [hook, settings.target(hook)], rows)


def first_rows(t: Training) -> list[np.ndarray]:
    """The rows of the first batches of epoch 0, which sae-lens' scaling factor, the
    standardisation and the initial thresholds are estimated from."""
    n = min(NORM_BATCHES, t.steps_per_epoch)
    return [batch_rows(t.settings, t.cache.state.rows, k) for k in range(n)]


def training_batch(t: Training, hook: str, rows: np.ndarray) -> torch.Tensor:
    """What the module reading ``hook`` is given for ``rows``: ``module_batch``, standardised
    when the run standardises (before sae-lens' own scaling, which the trainer applies)."""
    batch = module_batch(t.settings, t.cache, hook, rows)
    standard = t.standard.get(hook)
    return batch if standard is None else standard.apply(batch)


def _standardize(t: Training) -> None:
    """With ``settings.standardize``: each module's standardisation, from the raw first
    batches (a function of the settings and cache: a resumed run gets it bitwise again)."""
    if not t.settings.standardize:
        return
    first = first_rows(t)
    for hook in t.saes:
        raw = torch.cat([module_batch(t.settings, t.cache, hook, idx) for idx in first])
        t.standard[hook] = Standardizer.of(raw, t.cache.spec.d_in[hook], t.settings.transcoders)


def _new_sae(
    settings: TrainSettings, cache: ActivationCache, hook: str, index: int, steps: int, device: str
) -> TrainingSAE:
    from sae_lens import JumpReLUTrainingSAEConfig

    from scope.train.losses import TrainingSAE, TrainingTranscoder, TrainingTranscoderConfig

    fields: dict[str, Any] = dict(
        d_in=cache.spec.d_in[hook],
        d_sae=settings.width,
        dtype="float32",
        device=device,
        apply_b_dec_to_input=False,  # Gemma Scope's convention: no b_dec at the input
        normalize_activations="expected_average_only_in",
        jumprelu_bandwidth=settings.bandwidth,
        jumprelu_ste_to_input=settings.ste_to_input,
        jumprelu_sparsity_loss_mode=settings.sparsity_loss,
        target_l0=settings.target_l0,
        l0_coefficient=settings.l0_coefficient,
        l0_warm_up_steps=round(settings.l0_warm_up * steps),
        pre_act_loss_coefficient=settings.pre_act_loss or None,
    )
    freq = dict(freq_penalty=settings.freq_penalty, freq_target=settings.freq_target)
    torch.manual_seed(settings.seed * 1_000_003 + index)  # the initial weights
    if settings.transcoders:
        out = settings.target(hook)
        tc_cfg = TrainingTranscoderConfig(**fields, d_out=cache.spec.d_in[out], skip=settings.skip)
        tc_cfg.metadata.hook_name, tc_cfg.metadata.hook_name_out = hook, out
        return TrainingTranscoder(tc_cfg, **freq)
    cfg = JumpReLUTrainingSAEConfig(**fields)
    cfg.metadata.hook_name = hook
    return TrainingSAE(cfg, **freq)


def dead_window(settings: TrainSettings, steps: int) -> int:
    """Steps without firing after which a feature counts as dead: ``dead_tokens`` in
    batches (rounded up), or a quarter of the run."""
    if settings.dead_tokens is None:
        return max(1, steps // 4)
    return -(-settings.dead_tokens // settings.batch_size)


def _new_trainer(settings: TrainSettings, sae: TrainingSAE, steps: int, device: str) -> SAETrainer:
    from sae_lens.config import SAETrainerConfig
    from sae_lens.training.sae_trainer import SAETrainer

    from scope.train.losses import PairedScaler

    cfg = SAETrainerConfig(
        total_training_samples=steps * settings.batch_size,
        train_batch_size_samples=settings.batch_size,
        lr=settings.lr,
        lr_end=settings.lr,  # the constant schedule decays from lr to 0 over the last steps
        lr_warm_up_steps=max(1, steps // 20),
        lr_decay_steps=steps // 5,
        device=device,
        dead_feature_window=dead_window(settings, steps),
        feature_sampling_window=max(1, steps // 4),
    )
    trainer = SAETrainer(cfg=cfg, sae=sae, data_provider=iter(()))
    if settings.transcoders:
        trainer.activation_scaler = PairedScaler(d_in=sae.cfg.d_in)
    return trainer


@torch.no_grad()
def _initialise(t: Training) -> None:
    """Before the first step: sae-lens' input scaling factor from the first batches (and a
    transcoder's target factor); b_dec at the mean of what is reconstructed (in scaled units)
    and b_enc = -mean(input) @ W_enc, so the encoder starts on centred inputs and the decoder
    on the mean (Gemma's residual stream has a large mean that b_dec would otherwise take
    thousands of steps to learn); then the thresholds where the target L0
    fires: the (1 - target/width) quantile of the initial pre-activations, over all features
    (``threshold_init="global"``, one value) or of each feature's own (``"per_feature"``)."""
    first = first_rows(t)
    n_norm = len(first)
    q = 1 - t.settings.target_l0 / t.settings.width
    for hook, trainer in t.trainers.items():
        batches = [training_batch(t, hook, idx) for idx in first]
        d_in = t.cache.spec.d_in[hook]
        trainer.activation_scaler.estimate_scaling_factor(
            d_in=d_in, data_provider=iter(batches), n_batches_for_norm_estimate=n_norm
        )
        both = trainer.activation_scaler(torch.cat(batches))
        x, target = (both[:, :d_in], both[:, d_in:]) if t.settings.transcoders else (both, both)
        sae = t.saes[hook]
        sae.b_dec.data.copy_(target.double().mean(0).to(sae.b_dec.dtype))
        sae.b_enc.data.copy_(-(x.double().mean(0).to(sae.b_enc.dtype) @ sae.W_enc))
        pre = x[:THRESHOLD_SAMPLE] @ sae.W_enc + sae.b_enc
        if t.settings.threshold_init == "per_feature":
            k = max(1, int(q * pre.shape[0]))
            sae.threshold.data.copy_(pre.kthvalue(k, dim=0).values.clamp(min=0.0))
        else:
            k = max(1, int(q * pre.numel()))
            sae.threshold.data.fill_(max(float(pre.flatten().kthvalue(k).values), 0.0))


def start(
    settings: TrainSettings, cache: ActivationCache, checkpoints: Path, device: str = "cpu"
) -> Training:
    """New SAEs and trainers for ``settings`` over ``cache``, or the ones in the latest
    checkpoint under ``checkpoints`` when it was written with the same settings and cache."""
    missing = [h for h in settings.cached if h not in cache.spec.hooks]
    if missing:
        raise ScopeError(f"the activation cache {cache.folder} has no rows for {missing}")
    if cache.state.rows < settings.batch_size:
        raise ScopeError(
            f"the activation cache holds {cache.state.rows:,} tokens, fewer than one batch "
            f"(--batch-size {settings.batch_size}): give more --tokens or a smaller --batch-size"
        )
    steps = cache.state.rows // settings.batch_size * settings.epochs
    saes = {h: _new_sae(settings, cache, h, i, steps, device) for i, h in enumerate(settings.hooks)}
    trainers = {h: _new_trainer(settings, s, steps, device) for h, s in saes.items()}
    t = Training(settings, cache, saes, trainers, step=0, seconds=0.0, checkpoints=checkpoints)
    _standardize(t)
    latest = latest_checkpoint(checkpoints)
    if latest is None:
        _initialise(t)
        return t
    state = json.loads((latest / STATE).read_text())
    if state["fingerprint"] != settings.fingerprint() or state["rows"] != cache.state.rows:
        raise ScopeError(
            f"the checkpoint {latest} was written by a run with other settings or another "
            f"cache: remove {checkpoints} to start over"
        )
    for hook, trainer in trainers.items():
        folder = latest / _folder(hook)
        trainer.load_trainer_state(folder)
        trainer.sae.load_weights_from_checkpoint(folder)
    t.step, t.seconds = int(state["step"]), float(state["seconds"])
    return t


def _folder(hook: str) -> str:
    return hook.replace("/", "_")


def latest_checkpoint(checkpoints: Path) -> Path | None:
    """The newest complete checkpoint folder (``step_<n>``) under ``checkpoints``, if any."""
    if not checkpoints.is_dir():
        return None
    done = [p for p in checkpoints.glob("step_*") if (p / STATE).is_file()]
    return max(done, key=lambda p: int(p.name.split("_")[1]), default=None)


def save_checkpoint(t: Training) -> Path:
    """Write a checkpoint of every SAE and trainer at the current step (to a temporary folder,
    renamed when complete), then drop older ones."""
    final = t.checkpoints / f"step_{t.step}"
    if (final / STATE).is_file():
        return final
    tmp = t.checkpoints / f"tmp_step_{t.step}"
    shutil.rmtree(tmp, ignore_errors=True)
    for hook, trainer in t.trainers.items():
        trainer.save_checkpoint(checkpoint_name=_folder(hook), base_path=tmp)
    state = {
        "step": t.step,
        "seconds": t.seconds,
        "rows": t.cache.state.rows,
        "fingerprint": t.settings.fingerprint(),
        "settings": asdict(t.settings),
    }
    (tmp / STATE).write_text(json.dumps(state, indent=2))
    os.replace(tmp, final)
    for old in t.checkpoints.glob("step_*"):
        if old != final:
            shutil.rmtree(old, ignore_errors=True)
    return final


@torch.no_grad()
def _batch_figures(out: TrainStepOutput) -> tuple[float, float]:
    """L0 and FVU of a training step's batch, in the units trained on (FVU does not depend on
    sae-lens' scaling, but is of the standardised rows when the run standardises)."""
    sae_in, sae_out, acts = out.sae_in, out.sae_out.detach(), out.feature_acts.detach()
    l0 = float((acts > 0).float().sum(-1).mean())
    var = ((sae_in - sae_in.mean(0)) ** 2).sum()
    return l0, float(((sae_out - sae_in) ** 2).sum() / var)


def run(
    t: Training,
    *,
    on_step: Callable[[StepReport], None] | None = None,
    stop_after: int | None = None,
) -> Training:
    """Train from ``t.step`` to the end (or to step ``stop_after``), checkpointing every
    ``checkpoint_every`` steps. Ctrl-C or SIGTERM ends the current step, writes a checkpoint
    and raises KeyboardInterrupt; the next ``start`` resumes there."""
    end = t.steps if stop_after is None else min(stop_after, t.steps)
    rows = t.cache.state.rows
    # stopped between steps, never inside one: a step updates every SAE, and a checkpoint
    # must not hold some SAEs a step ahead of the others
    with stop_on_signals() as should_stop:
        while t.step < end:
            t0 = time.perf_counter()
            idx = batch_rows(t.settings, rows, t.step)
            l0s, fvus, dead = {}, {}, {}
            for hook, trainer in t.trainers.items():
                trainer.maybe_reset_sparsity()
                out = trainer.step(training_batch(t, hook, idx))
                l0s[hook], fvus[hook] = _batch_figures(out)
                dead[hook] = int(trainer.dead_neurons.sum())
                trainer.n_training_steps += 1
            t.step += 1
            t.seconds += time.perf_counter() - t0
            if t.step % t.settings.checkpoint_every == 0 and t.step < t.steps:
                save_checkpoint(t)
            if on_step is not None:
                tokens = t.step * t.settings.batch_size
                on_step(StepReport(t.step, t.steps, tokens, t.seconds, l0s, fvus, dead))
            if should_stop():
                save_checkpoint(t)
                raise KeyboardInterrupt
    return t


class Finished(NamedTuple):
    """A trained SAE (or transcoder) in raw-activation units."""

    sae: TrainingSAE
    scaling_factor: float | None
    """The input scaling sae-lens trained with, now folded into the weights."""
    target_factor: float | None = None
    """A transcoder's target scaling, folded too."""


@torch.no_grad()
def finish(t: Training) -> dict[str, Finished]:
    """The trained SAEs in raw-activation units: sae-lens' end-of-fit metadata, and its
    scaling factor folded into the weights (``fold_activation_norm_scaling_factor``), as
    ``SAETrainer.fit`` ends, and the threshold projected onto >= 0. The training cannot go on
    after this."""
    from scope.train.losses import TrainingTranscoder

    out = {}
    for hook, trainer in t.trainers.items():
        trainer.set_final_sae_metadata()
        # sae-lens projects the threshold onto >= 0 before each step; do it after the last
        # one too, so the training encode (x * (x > t)) and Gemma Scope's (relu(x) * (x > t))
        # agree exactly
        trainer.sae.threshold.data.clamp_(min=0.0)
        scaler, sae = trainer.activation_scaler, trainer.sae
        factor, target = scaler.scaling_factor, getattr(scaler, "target_factor", None)
        if isinstance(sae, TrainingTranscoder) and factor is not None and target is not None:
            sae.fold_scaling(factor, target)
        elif factor is not None:
            sae.fold_activation_norm_scaling_factor(factor)
        scaler.scaling_factor = None
        if hook in t.standard:
            t.standard[hook].fold(sae)
        out[hook] = Finished(sae, factor, target)
    return out


__all__ = [
    "Finished",
    "StepReport",
    "Training",
    "batch_rows",
    "finish",
    "first_rows",
    "latest_checkpoint",
    "load_batch",
    "module_batch",
    "run",
    "save_checkpoint",
    "start",
    "training_batch",
]
