"""The checks `scope train`'s SAE and transcoder tests share: an activation cache killed
part-way and built again equals one built whole; training killed (a crash after a step, or a
signal) and resumed ends bitwise equal to an uninterrupted run (weights, Adam moments, input
scaling); a standardised run folds back into raw-activation weights that compute what the
trained module did on its standardised rows."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import numpy as np
import pytest
import torch

from scope.corpus import CorpusSpec
from scope.train import TrainSettings, build_cache, loop
from scope.train.cache import ActivationCache


def cache_resumes(model, hooks: tuple[str, ...], spec: CorpusSpec, tmp: Path) -> ActivationCache:
    """Build the cache whole, and again killed at its third batch then resumed; assert both
    hold the same rows of every hook, and give the whole one."""
    whole = build_cache(model, hooks, spec, tmp / "whole")
    calls = [0]

    def die(_):
        calls[0] += 1
        if calls[0] == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        build_cache(model, hooks, spec, tmp / "cut", on_batch=die)
    resumed = build_cache(model, hooks, spec, tmp / "cut")
    assert resumed.state.rows == whole.state.rows == spec.max_tokens
    for hook in hooks:
        assert np.array_equal(resumed.rows(hook), whole.rows(hook))
    return whole


def training_resumes(
    settings: TrainSettings,
    cache: ActivationCache,
    tmp: Path,
    signals: tuple[tuple[int, int], ...] = ((signal.SIGINT, 7),),
) -> dict[str, torch.Tensor]:
    """Train uninterrupted (12 steps), killed after step 5 (the step-3 checkpoint survives), and
    stopped by each ``(signal, step)``; assert every resumed run ends bitwise equal to the
    uninterrupted one, and give its state."""
    a = loop.run(loop.start(settings, cache, tmp / "ckpt-a"))
    assert a.step == a.steps == 12
    # killed after step 5: the checkpoint at step 3 survives, steps 4-5 are redone
    loop.run(loop.start(settings, cache, tmp / "ckpt-b"), stop_after=5)
    b = loop.start(settings, cache, tmp / "ckpt-b")
    assert b.step == 3
    resumed_runs = [loop.run(b)]
    # a signal at a step: the step finishes, a checkpoint is written, then KeyboardInterrupt
    for sig, at in signals:

        def stop(r: loop.StepReport, sig: int = sig, at: int = at) -> None:
            if r.step == at:
                os.kill(os.getpid(), sig)

        folder = tmp / f"ckpt-{sig}"
        with pytest.raises(KeyboardInterrupt):
            loop.run(loop.start(settings, cache, folder), on_step=stop)
        c = loop.start(settings, cache, folder)
        assert c.step == at
        resumed_runs.append(loop.run(c))
    expected = training_state(a)
    for other in resumed_runs:
        got = training_state(other)
        assert got.keys() == expected.keys()
        assert all(torch.equal(got[k], expected[k]) for k in expected)
    return expected


def training_state(t: loop.Training) -> dict[str, torch.Tensor]:
    """Every trainer's weights, Adam moments and input/target scale factors (where set)."""
    out = {}
    for hook, trainer in t.trainers.items():
        for k, v in trainer.sae.state_dict().items():
            out[f"{hook}/{k}"] = v.clone()
        for i, st in trainer.optimizer.state_dict()["state"].items():
            out[f"{hook}/adam{i}"] = torch.cat(
                [st["exp_avg"].flatten(), st["exp_avg_sq"].flatten()]
            )
        scaler = trainer.activation_scaler
        factors = [f for f in (scaler.scaling_factor, getattr(scaler, "target_factor", None))
                   if f is not None]  # fmt: skip
        if factors:
            out[f"{hook}/scale"] = torch.tensor(factors)
    return out


@torch.no_grad()
def standardised_and_folded(t: loop.Training, hook: str, rows: np.ndarray) -> None:
    """With ``standardize``: the module's training rows are its raw rows standardised by hand
    (each dimension's mean and standard deviation over the first batches), and after
    ``loop.finish`` the module reads and writes raw rows giving the codes and output (in raw
    units) the trained module gave on the standardised, scaled rows."""
    assert t.settings.standardize
    d_in = t.cache.spec.d_in[hook]
    first = np.concatenate(loop.first_rows(t))
    raw_first = loop.module_batch(t.settings, t.cache, hook, np.sort(first)).double()
    mean, std = raw_first.mean(0), raw_first.std(0)
    z = loop.training_batch(t, hook, np.sort(first)).double()
    assert torch.allclose(z, (raw_first - mean) / std, atol=1e-4)
    assert float(z.mean(0).abs().max()) < 1e-4 and torch.allclose(
        z.std(0), torch.ones_like(std), atol=1e-4
    )

    trainer, module = t.trainers[hook], t.saes[hook]
    scaler = trainer.activation_scaler
    both = scaler(loop.training_batch(t, hook, rows))
    x = both[:, :d_in]
    codes = module.encode(x)
    assert float((codes > 0).float().mean()) > 0.02  # it fires: the comparison has teeth
    out_factor = getattr(scaler, "target_factor", None) or scaler.scaling_factor
    out = (module.output(x, codes) if t.settings.transcoders else module.decode(codes)) / out_factor
    out_mean, out_std = (mean, std) if not t.settings.transcoders else (mean[d_in:], std[d_in:])
    want = out.double() * out_std + out_mean

    folded = loop.finish(t)[hook].sae
    raw = loop.module_batch(t.settings, t.cache, hook, rows)
    got_codes = folded.encode(raw[:, :d_in])
    same = (got_codes > 0) == (codes > 0)
    assert float(same.float().mean()) > 0.999  # a code within rounding of its threshold aside
    both_fire = (got_codes > 0) & (codes > 0)
    assert torch.allclose(got_codes[both_fire], codes[both_fire], rtol=1e-3, atol=1e-3)
    got = (
        folded.output(raw[:, :d_in], got_codes)
        if t.settings.transcoders
        else folded.decode(got_codes)
    )
    err = (got.double() - want).norm(dim=1) / want.norm(dim=1)
    agree = same.all(1)
    assert float(err[agree].max()) < 1e-4, float(err[agree].max())
