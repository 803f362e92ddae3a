"""Strength sweeps: a steered continuation per point, with metrics, saved as an experiment.
The baseline and the points generate as one batch (``generate_rows``: a row per point, each
with its strength and the same seed) and are measured as one batch.

For each point (strength, and optionally mode or SAE/layer):
- ``target_act``: the target feature's activation at its hook, after the intervention, averaged
  over the generated tokens (does the intervention land?);
- ``text_act``: the same feature read by the unsteered model on the steered text (does the
  text itself now carry the feature?);
- ``kl``: mean KL(steered || baseline) of the next-token distributions along the continuation;
- ``loss``: mean cross-entropy of the steered continuation under the unsteered model (fluency).

A sweep saved to a store is a row per point in its ``experiments`` side table
(``scope.store.schema.EXPERIMENTS``) beside the sweep's JSON; ``experiments`` reads them back.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pyarrow as pa
import torch
from jaxtyping import Int

from scope.acts import encode, site_input
from scope.errors import ScopeError
from scope.generate import Sampling, generate_rows, prompt_tokens
from scope.sae import sae_key
from scope.steer import Steer, attach, build_row_hooks, check_steers
from scope.steer_spec import SteerSpec, with_maxes
from scope.store.schema import EXPERIMENTS

if TYPE_CHECKING:
    from scope.store import Store


@dataclass(frozen=True, kw_only=True)
class SweepPoint:
    """One steered continuation of the sweep's prompt and its metrics."""

    strength: float
    """The steer's strength at this point."""
    mode: str
    """add, clamp or ablate."""
    sae: str
    """The SAE's key: the store's own when the sweep ran with one that recorded it (so
    ``experiments.sae`` joins ``features.sae``), else the short key."""
    hook: str
    """The hook point steered."""
    text: str
    """The continuation, special tokens skipped."""
    tokens: list[int]
    """The continuation's tokens."""
    target_act: float
    """The feature's mean activation at its hook over the continuation, steering on."""
    text_act: float
    """The same read by the unsteered model on the steered text."""
    kl: float
    """Mean KL(steered || baseline) of the next-token distributions along the continuation."""
    loss: float
    """Mean cross-entropy of the continuation under the unsteered model."""
    unit: str = "absolute"
    """The steer's unit (add only): absolute, max or norm."""
    positions: str = "all"
    """Where it steered: prompt, generated or all."""
    feature: int | None = None
    """The feature steered (the sweep's own; in a saved table, its ``feature`` column)."""

    def spec(self) -> SteerSpec:
        """The point's steer as a ``SteerSpec``: run it again with ``resolve``."""
        if self.feature is None:
            raise ScopeError("this point does not say its feature: take it from its sweep")
        return SteerSpec(sae=self.sae, feature=self.feature, strength=self.strength,
                         mode=self.mode, unit=self.unit, positions=self.positions)  # fmt: skip


PointFn = Callable[[SweepPoint, int, int], None]
"""``on_point(point, index, total)``: called as each point of a sweep is done."""


@dataclass(frozen=True, kw_only=True)
class Sweep:
    """All points of a sweep, and how they were made."""

    prompt: str
    """The prompt every point continues."""
    feature: int
    """The feature steered."""
    sampling: Sampling
    """The settings of every generation, baseline included."""
    baseline: str
    """The unsteered continuation."""
    points: list[SweepPoint] = field(default_factory=list)
    """In the order they ran: by SAE, then mode, then strength."""
    id: str = ""
    """The experiment's id (time and a random suffix): its file names under experiments/."""

    def table(self) -> pa.Table:
        """One row per point, with the experiment id, feature and prompt, and the point's
        ``SteerSpec`` in its CLI form (``spec``)."""
        return EXPERIMENTS.from_rows(
            [
                {**vars(p), "experiment": self.id, "feature": self.feature, "prompt": self.prompt}
                | {"spec": str(p.spec())}
                for p in self.points
            ]
        )

    def figure(self) -> Any:
        """A plotly figure: target activation, KL and loss against strength, a line per series."""
        from plotly.subplots import make_subplots

        fig = make_subplots(rows=3, cols=1, shared_xaxes=True, vertical_spacing=0.06,
                            subplot_titles=("target feature activation", "KL to baseline", "loss under unsteered model"))  # fmt: skip
        series: dict[str, list[SweepPoint]] = {}
        for p in self.points:
            series.setdefault(f"{p.sae} {p.mode}", []).append(p)
        for i, (name, pts) in enumerate(series.items()):
            pts = sorted(pts, key=lambda p: p.strength)
            xs = [p.strength for p in pts]
            texts = [p.text[:120] for p in pts]
            for row, metric in enumerate(("target_act", "kl", "loss"), start=1):
                fig.add_scatter(x=xs, y=[getattr(p, metric) for p in pts], name=name, legendgroup=name,
                                showlegend=row == 1, mode="lines+markers", hovertext=texts, row=row, col=1,
                                line={"color": f"hsl({(i * 67) % 360},60%,45%)"})  # fmt: skip
        fig.update_xaxes(title_text="strength", row=3, col=1)
        fig.update_layout(title=f"feature {self.feature}: {self.prompt[:60]!r}", height=720)
        return fig

    def save(self, folder: str | Path) -> Path:
        """Write the sweep as the side table ``experiments`` of ``folder`` (a store folder, where
        it becomes the ``experiments`` view, or any folder): Parquet rows plus JSON metadata."""
        from scope.store.writer import add_side_table

        meta = {"id": self.id, "prompt": self.prompt, "feature": self.feature,
                "sampling": vars(self.sampling), "baseline": self.baseline}  # fmt: skip
        return add_side_table(folder, EXPERIMENTS.name, self.id, self.table(), meta)


@torch.no_grad()
def measure(
    model: Any, tokens: Int[torch.Tensor, "1 pos"], cont: list[int], steer: Steer
) -> dict[str, float]:
    """Metrics of one steered continuation ``cont`` of ``tokens`` (see the module docstring)."""
    return measure_rows(model, tokens, [cont], [steer])[0]


@torch.no_grad()
def measure_rows(
    model: Any,
    tokens: Int[torch.Tensor, "1 pos"],
    conts: Sequence[list[int]],
    steers: Sequence[Steer],
) -> list[dict[str, float]]:
    """``measure`` of many continuations of ``tokens`` at once, continuation i steered by
    ``steers[i]``: one steered and one plain forward over the batch (shorter continuations
    padded at the end, where causal attention keeps the padding out of every metric)."""
    n_prompt, longest = tokens.shape[1], max(len(c) for c in conts)
    seq = tokens.repeat(len(conts), 1)
    tail = torch.zeros(len(conts), longest, dtype=seq.dtype)
    for i, cont in enumerate(conts):
        tail[i, : len(cont)] = torch.tensor(cont, dtype=seq.dtype)
    seq = torch.cat([seq, tail.to(seq.device)], dim=1)
    hooks = sorted({s.read_hook for s in steers})  # where each feature's activation is read
    got: dict[str, torch.Tensor] = {}

    def grab(act: torch.Tensor, hook: Any) -> None:
        got[hook.name] = act.detach().clone()

    steering = build_row_hooks([[s] for s in steers], n_prompt)
    with attach(model, [*steering, *((h, grab) for h in hooks)]):  # grab sees the steered act
        steered_logits = model(seq)
    after = dict(got)
    with attach(model, [(h, grab) for h in hooks]):
        base_logits = model(seq)
    out = []
    for i, (cont, steer) in enumerate(zip(conts, steers, strict=True)):
        span = slice(n_prompt, n_prompt + len(cont))  # the continuation
        f, hook = steer.feature, steer.read_hook
        target = encode(steer.sae, site_input(after[hook])[i, span])[..., f].float().mean().item()
        text = encode(steer.sae, site_input(got[hook])[i, span])[..., f].float().mean().item()
        pred = slice(n_prompt - 1, n_prompt + len(cont) - 1)  # positions that predict it
        logp_s = torch.log_softmax(steered_logits[i, pred].float(), dim=-1)
        logp_b = torch.log_softmax(base_logits[i, pred].float(), dim=-1)
        kl = (logp_s.exp() * (logp_s - logp_b)).sum(-1).mean().item()
        loss = -logp_b.gather(-1, seq[i, span, None]).mean().item()
        out.append({"target_act": target, "text_act": text, "kl": kl, "loss": loss})
    return out


MAX_POINTS = 1000
"""More strengths than this in one sweep is almost surely a typo (each is a generation)."""


def parse_strengths(text: str) -> list[float]:
    """``-20:80:10`` -> -20, -10, ..., 80 (end included); ``0,4,8`` -> 0, 4, 8."""
    try:
        if ":" in text:
            start, stop, step = (float(x) for x in text.split(":"))
            if step <= 0:
                raise ValueError
            n = int(round((stop - start) / step))
            if n + 1 > MAX_POINTS:
                raise ScopeError(
                    f"--strengths {text!r} is {n + 1:,} points, each a generation: use a "
                    f"larger step (at most {MAX_POINTS} points)"
                )
            return [round(start + i * step, 10) for i in range(n + 1)]
        return [float(x) for x in text.split(",") if x.strip()]
    except (ValueError, OverflowError):
        raise ScopeError(
            f"--strengths {text!r}: use START:STOP:STEP (step > 0) or a list like 0,4,8"
        ) from None


BATCH_ROWS = 32
"""Rows per batch of a sweep by default: the baseline and up to 31 points generate together."""


def sweep(
    model: Any,
    prompt: str,
    steer: Steer,
    strengths: Sequence[float],
    *,
    modes: Sequence[str] | None = None,
    saes: Sequence[Any] | None = None,
    sampling: Sampling | None = None,
    store: Store | None = None,
    save_to: str | Path | None = None,
    on_point: PointFn | None = None,
    batch_size: int = BATCH_ROWS,
) -> Sweep:
    """Steer ``steer``'s feature at every strength (and mode, and SAE: other layers), measure
    each point, and save the sweep to ``save_to`` (default: the store's folder) if given.
    The baseline and the points generate together, ``batch_size`` rows a batch (strengths
    along the batch, every row with the same seed; 1 runs one generation at a time).
    ``on_point(point, index, total)`` is called as each point is done (a progress bar, a live
    plot); every point is checked before anything is generated."""
    sampling = sampling or Sampling()
    if not strengths:
        raise ScopeError("no strengths to sweep: give e.g. --strengths -20:80:10")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ScopeError(f"batch size {batch_size!r} must be a whole number of rows, at least 1")
    tokens = prompt_tokens(model, prompt, sampling.chat, sampling.max_new_tokens)
    plan = [  # a max given for the steer's own SAE says nothing of another's
        replace(steer, sae=sae, mode=mode, strength=strength,
                max_act=steer.max_act if sae is steer.sae else None)
        for sae in saes or [steer.sae]
        for mode in modes or [steer.mode]
        for strength in strengths
    ]  # fmt: skip
    plan = check_steers(model, with_maxes(plan, store))  # unit max: each SAE's own max
    recorded = store.saes if store is not None else None
    rows: list[Steer | None] = [None, *plan]  # None: the baseline
    baseline: list[int] = []
    points: list[SweepPoint] = []
    for lo in range(0, len(rows), batch_size):
        batch = rows[lo : lo + batch_size]
        conts = generate_rows(
            model, tokens, sampling, [[p] if p is not None else [] for p in batch]
        )
        steered = [(p, c) for p, c in zip(batch, conts, strict=True) if p is not None]
        if batch[0] is None:
            baseline = conts[0]
        if not steered:
            continue
        metrics = measure_rows(model, tokens, [c for _, c in steered], [p for p, _ in steered])
        for (point, cont), m in zip(steered, metrics, strict=True):
            done = SweepPoint(strength=point.strength, mode=point.mode, sae=sae_key(point.sae, recorded),
                              hook=point.hook_name, text=model.tokenizer.decode(cont, skip_special_tokens=True),
                              tokens=cont, unit=point.unit, positions=point.positions,
                              feature=point.feature, **m)  # fmt: skip
            points.append(done)
            if on_point:
                on_point(done, len(points) - 1, len(plan))
    result = Sweep(prompt=prompt, feature=steer.feature, sampling=sampling,
                   baseline=model.tokenizer.decode(baseline, skip_special_tokens=True), points=points,
                   id=time.strftime("%Y%m%d-%H%M%S-") + uuid.uuid4().hex[:6])  # fmt: skip
    target = save_to if save_to is not None else (store.root if store is not None else None)
    if target is not None:
        result.save(target)
    return result


def load_experiments(folder: str | Path) -> list[dict[str, Any]]:
    """Metadata of the sweeps saved under ``folder/experiments``, newest first."""
    found = sorted((Path(folder) / EXPERIMENTS.name).glob("*.json"), reverse=True)
    return [json.loads(p.read_text()) for p in found]


def experiments(store: Store) -> list[Sweep]:
    """The store's saved sweeps as ``Sweep`` objects (``.figure()``, ``.points``), newest first."""
    found = load_experiments(store.root)
    if not found or EXPERIMENTS.name not in store.views:
        return []
    rows = store.sql("select * from experiments order by experiment, strength").arrow().to_pylist()
    names = {f.name for f in fields(SweepPoint)}
    out = []
    for meta in found:
        points = [
            SweepPoint(**{k: v for k, v in r.items() if k in names})
            for r in rows
            if r["experiment"] == meta["id"]
        ]
        sampling = Sampling(**meta.get("sampling", {}))
        out.append(Sweep(prompt=meta["prompt"], feature=meta["feature"], sampling=sampling,
                         baseline=meta.get("baseline", ""), points=points, id=meta["id"]))  # fmt: skip
    return out
