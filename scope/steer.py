"""Steering: add, clamp or ablate SAE features at their own hooks, for exactly one run.

Interventions are hooks at each SAE's own hook point (``blocks.L.hook_resid_post`` and so on):

- ``add``: x += strength * W_dec[f] / |W_dec[f]| (``unit="absolute"``), or strength times the
  norm of x at that position along the same direction (``unit="norm"``), or x += strength *
  max_f * W_dec[f] (``unit="max"``): what the feature writes when it fires at strength times
  its recorded max ``max_f`` (``Steer.max_act``: a number; a store's is read where a spec is
  resolved, ``scope.steer_spec.resolve``, and steering never opens a store), the same
  intervention however the SAE's decoder rows are scaled (Gemma Scope's have unit norm; SAEs
  trained elsewhere often do not).
- ``clamp``: encode x, set feature f to ``strength``, decode, and keep the SAE's error term. As
  decoding is linear this is x += (strength - a_f(x)) * W_dec[f]: nothing else changes. a_f(x)
  is read with ``scope.acts.encode``, so clamping a feature to the value that function gives
  on the same tensor adds exactly zero.
- ``ablate``: clamp to 0.

A transcoder is steered at its output hook (``Steer.hook_name``); a clamp there reads the
feature's activation from what the transcoder read at its input hook in the same forward
(a ``Reader`` there hands it over), and decodes through ``scope.codec.feature_write``, so
SAEs of every architecture the codec serves clamp exactly.

Positions: the prompt, the generated tokens, or all; BOS never. A position is counted from the
first forward pass of a run: one ``with steering(...)`` block, or one ``generate`` call, where
each later forward continues the sequence (a KV cache feeds one new token at a time). Every run
builds fresh hooks, so positions never carry over from one run to the next, and the hooks are
removed when the run ends, also after an exception.

One serialisable form names a steer by its SAE's key for every face (an HTTP request, the
CLI, the lab, saved experiments): ``scope.steer_spec.SteerSpec``, resolved into ``Steer``
objects against the loaded SAEs.

Batches: every row runs with the same steers (``build_hooks``), or row i with its own list
(``build_row_hooks``). Steers that differ only in strength share one hook with a strength per
row, so the points of a strength sweep run as one batch through the same steering math.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import KW_ONLY, dataclass
from typing import TYPE_CHECKING, Any, NamedTuple

import torch
from jaxtyping import Float, Int

from scope.acts import enable_hooks, site_input
from scope.codec import codec_of, encode, feature_write
from scope.errors import ScopeError
from scope.fit import check_fit
from scope.sae import sae_info, sae_key

if TYPE_CHECKING:
    from scope.identity import SAEInfo

MODES = ("add", "clamp", "ablate")
UNITS = ("absolute", "max", "norm")
POSITIONS = ("prompt", "generated", "all")
# Past these the residual stream is swamped: almost surely a typo (e.g. 8000 for 8). Absolute
# strengths depend on the model's scale (Gemma 3 270M's residual norms are ~25,000, a small
# Gemma's a few hundred), so their real check is at the first forward: what a steer writes may
# be at most WRITE_LIMIT times the median norm of the activation it is added to.
STRENGTH_LIMITS = {"absolute": 1e6, "max": 200.0, "norm": 50.0}
WRITE_LIMIT = STRENGTH_LIMITS["norm"]


@dataclass(frozen=True)
class Steer:
    """One intervention on one feature: ``Steer(sae, 1234, strength=8, mode="add")``."""

    sae: Any
    """The sae-lens SAE whose feature is steered; the hook is the SAE's own."""
    feature: int
    """The feature's index in the SAE, 0 .. d_sae - 1."""
    strength: float = 0.0
    """add: how far along the unit decoder direction (unit "max": a multiple of the recorded
    max activation, decoded); clamp: the activation to set."""
    _: KW_ONLY
    mode: str = "add"
    """add, clamp or ablate."""
    unit: str = "absolute"
    """add only: absolute, max (the feature's recorded max, ``max_act``) or norm (of x)."""
    positions: str = "all"
    """prompt, generated or all. BOS is never steered."""
    max_act: float | None = None
    """unit max: the feature's recorded max activation (``scope.steer_spec.resolve`` reads it
    from a store; ``scope.steer_spec.with_maxes`` fills it in for a list of steers); unused by
    other units."""

    def __post_init__(self) -> None:
        d_sae = self.sae.cfg.d_sae
        if isinstance(self.feature, bool) or not isinstance(self.feature, int):
            raise ScopeError(f"feature {self.feature!r} must be an integer index")
        if not 0 <= self.feature < d_sae:
            raise ScopeError(
                f"feature {self.feature} is out of range: {self.key} has features 0..{d_sae - 1}"
            )
        for name, allowed in (("mode", MODES), ("unit", UNITS), ("positions", POSITIONS)):
            if getattr(self, name) not in allowed:
                raise ScopeError(
                    f"{name} {getattr(self, name)!r} is not one of {', '.join(allowed)}"
                )
        if not math.isfinite(self.strength):
            raise ScopeError(f"strength {self.strength} is not a finite number: give e.g. 8 or -4")
        limit = STRENGTH_LIMITS[self.unit]
        if abs(self.strength) > limit:
            raise ScopeError(
                f"strength {self.strength} is absurd for unit {self.unit!r} (limit ±{limit:g}); "
                "typical values are a few times the feature's max activation"
            )
        if self.unit != "absolute" and self.mode != "add":
            raise ScopeError(
                f"unit {self.unit!r} applies to mode 'add' only; clamp values are activations"
            )
        if self.max_act is not None and not (math.isfinite(self.max_act) and self.max_act > 0):
            raise ScopeError(
                f"max_act {self.max_act} must be a positive number: the feature's recorded max"
            )

    @property
    def key(self) -> str:
        """The SAE's short key, e.g. ``L2.res.256`` (``describe(store.saes)``: the store's)."""
        return sae_info(self.sae).key

    @property
    def hook_name(self) -> str:
        """The hook point the SAE writes, where the intervention happens (a transcoder's
        output hook; an SAE's one hook)."""
        return codec_of(self.sae).write_hook

    @property
    def read_hook(self) -> str:
        """The hook point the SAE reads: the feature's activation is measured there."""
        return codec_of(self.sae).read_hook

    def describe(self, recorded: Mapping[str, SAEInfo] | None = None) -> dict[str, Any]:
        """The steer as a plain dict. ``sae`` is the key ``recorded`` (a store's ``saes``) has
        this SAE under (so results join with its ``features`` table), else the short key."""
        info = sae_info(self.sae)
        return {
            "sae": sae_key(self.sae, recorded),
            "release": info.release,
            "sae_id": info.sae_id,
            "hook": info.hook_out,
            "feature": self.feature,
            "mode": self.mode,
            "strength": self.strength,
            "unit": self.unit,
            "positions": self.positions,
        }


def missing_max(s: Steer) -> ScopeError:
    """The error for a unit-max steer without its max (``max_act``)."""
    return ScopeError(
        f"{s.key}/{s.feature}: unit 'max' needs a recorded store (--store), or the feature's "
        "max as max_act"
    )


class RowSteer(NamedTuple):
    """One steer on some rows of a batch, each row at its own strength."""

    steer: Steer
    """What is done and where; its own ``strength`` is the first row's."""
    rows: slice | list[int]
    """The batch rows it applies to: a slice when they are consecutive (every row: ``slice(None)``)."""
    amounts: torch.Tensor
    """[len(rows)] float64: per row, add's strength (times the recorded max for unit "max"),
    or clamp's value."""


class Intervention:
    """The hook for all steers at one hook point, for one run. It counts the positions it has
    seen, so with a KV cache it sees the prompt first and then one generated token per call;
    a second forward of several positions is a new sequence and is refused (build new hooks).
    Each steer applies to its rows of the batch at its row's strength (``build_row_hooks``)."""

    def __init__(
        self,
        groups: list[RowSteer],
        prompt_len: int,
        batch: int | None,
        starts: Sequence[int] | None = None,
    ) -> None:
        self.groups = groups
        """The steers at this hook point with their rows, applied in order."""
        self.prompt_len = prompt_len
        """Positions before this are the prompt; from it on, generated tokens."""
        self.batch = batch
        """The batch size the rows were built for; None: any (every steer on every row)."""
        self.starts = list(starts) if starts is not None and any(starts) else None
        """Per row, the position of its BOS (a left-padded batch: the padding before it is not
        the row's, and is never steered); None: every row starts at 0."""
        self.seen = 0
        """Positions seen so far in this run (a batch that drops rows carries it over)."""
        self.reads: dict[str, torch.Tensor] = {}
        """A transcoder's input at this forward, by read hook (filled by its ``Reader``): a
        clamp at its output hook encodes what it read."""
        self._placed: dict[tuple[int, torch.device, torch.dtype], torch.Tensor] = {}
        """Per group, device and dtype: its amounts (float) or rows (long), made once."""

    @property
    def steers(self) -> list[Steer]:
        """The steers at this hook point, in the order they apply."""
        return [g.steer for g in self.groups]

    def read_hooks(self) -> list[str]:
        """The transcoders' input hooks this intervention needs a ``Reader`` at."""
        return sorted({s.read_hook for s in self.steers if s.read_hook != s.hook_name})

    def span(self, steer: Steer, start: int, stop: int, first: int = 0) -> slice:
        """The positions of ``start .. stop - 1`` that ``steer`` touches in a row whose BOS is at
        ``first``, relative to ``start``."""
        lo, hi = max(start, first + 1), stop  # never BOS, nor the padding before it
        if steer.positions == "prompt":
            hi = min(hi, self.prompt_len)
        elif steer.positions == "generated":
            lo = max(lo, self.prompt_len)
        return slice(lo - start, max(hi, lo) - start)

    def amount(self, i: int, like: torch.Tensor) -> Float[torch.Tensor, "rows 1 1"]:
        """Group ``i``'s amounts [rows, 1, 1] on ``like``'s device and dtype (once per run)."""
        key = (i, like.device, like.dtype)
        if key not in self._placed:
            amounts = self.groups[i].amounts.to(like.dtype)  # rounded once, as a Python float is
            self._placed[key] = amounts.to(like.device).view(-1, 1, 1)
        return self._placed[key]

    def index(self, i: int, device: torch.device) -> Int[torch.Tensor, " rows"]:
        """Group ``i``'s rows (not consecutive) as an index on ``device`` (once per run)."""
        key = (i, device, torch.long)
        if key not in self._placed:
            self._placed[key] = torch.tensor(self.groups[i].rows, device=device)
        return self._placed[key]

    def row_firsts(self, n_rows: int) -> list[int]:
        """Each row's BOS position in a batch of ``n_rows``."""
        return self.starts if self.starts is not None else [0] * n_rows

    def check_scale(self, x: torch.Tensor, hook_name: str) -> None:
        """Refuse a steer whose write would swamp the activation: more than WRITE_LIMIT times
        its median norm over the row's sequence (BOS, whose norm is outsized, left out), row by
        row, so a row is refused exactly when it would be alone."""
        norms = x.detach().float().norm(dim=-1)  # [rows, pos]
        firsts = self.row_firsts(x.shape[0])
        scales = [float(_after_bos(norms[r, f:]).median()) for r, f in enumerate(firsts)]
        for g in self.groups:
            steer = g.steer
            if steer.mode == "add" and steer.unit == "norm":
                continue  # already relative, and limited when built
            rows = list(range(x.shape[0]))[g.rows] if isinstance(g.rows, slice) else g.rows
            amounts = g.amounts.abs().tolist()
            writes = None
            if steer.mode != "add" or steer.unit == "max":
                xin = self.reads.get(steer.read_hook, x) if steer.read_hook != hook_name else x
                writes = feature_write(steer.sae, steer.feature, xin).detach().float().norm(dim=-1)
            for k, r in enumerate(rows):
                amount = amounts[k if len(amounts) > 1 else 0]
                if writes is not None and writes.dim() == 2:  # per position: the row's own
                    write = amount * float(writes[r, firsts[r] :].max())
                else:  # the same everywhere (a decoder row), or unit absolute
                    write = amount * (1.0 if writes is None else float(writes.max()))
                if write > WRITE_LIMIT * scales[r]:
                    strength = amount / (steer.max_act or 1.0) if steer.unit == "max" else amount
                    raise ScopeError(
                        f"{steer.key}/{steer.feature} at strength {strength:g} would write "
                        f"{write:,.0f} into {hook_name}, {write / max(scales[r], 1e-12):,.0f} times "
                        f"the activation's norm there ({scales[r]:,.0f}): past {WRITE_LIMIT:g}x the "
                        "model's own signal is gone. Give a smaller strength (a few times the "
                        "feature's max activation, or unit 'norm' for a fraction of the "
                        "activation's norm)"
                    )

    def __call__(self, act: torch.Tensor, hook: Any) -> torch.Tensor:
        start, n = self.seen, act.shape[1]
        if start and n > 1:
            raise ScopeError(
                f"the steering hooks at {hook.name} already ran over {start} positions and now "
                f"get {n} more at once: that is a new sequence. Steer each run in its own "
                "`with steering(...)` (or generate call) so positions start at 0"
            )
        if self.batch is not None and act.shape[0] != self.batch:
            raise ScopeError(
                f"the steering hooks at {hook.name} were built for {self.batch} rows but the "
                f"batch has {act.shape[0]}: build them for this batch's rows"
            )
        self.seen += n
        x = site_input(act)  # attn.hook_z: heads flattened, a view
        if start == 0:
            self.check_scale(x, hook.name)
        ragged = self.starts is not None and start <= max(self.starts)
        for i, g in enumerate(self.groups):
            # add works in x's dtype; clamp's value meets the SAE's codes in theirs
            amount = self.amount(i, x if g.steer.mode == "add" else g.steer.sae.W_enc)
            read = self.reads.get(g.steer.read_hook) if g.steer.read_hook != hook.name else None
            if ragged:  # rows whose sequences begin at different positions: each its own span
                self._apply_ragged(g, x, amount, read, start, n)
                continue
            where = self.span(g.steer, start, start + n)
            if where.start >= where.stop:
                continue
            if isinstance(g.rows, slice):
                xin = None if read is None else read[g.rows, where]
                _apply(g.steer, x[g.rows, where], amount, xin)  # a view: in place
            else:
                rows = self.index(i, x.device)
                xs = x[rows, where]  # a copy: written back
                _apply(g.steer, xs, amount, None if read is None else read[rows, where])
                x[rows, where] = xs
        return x.reshape(act.shape)

    def _apply_ragged(
        self,
        g: RowSteer,
        x: torch.Tensor,
        amount: torch.Tensor,
        read: torch.Tensor | None,
        start: int,
        n: int,
    ) -> None:
        """Steer group ``g``'s rows of a left-padded batch, the rows that begin at the same
        position together, each over its own positions."""
        rows = list(range(x.shape[0]))[g.rows] if isinstance(g.rows, slice) else g.rows
        firsts = self.row_firsts(x.shape[0])
        for first in sorted({firsts[r] for r in rows}):
            where = self.span(g.steer, start, start + n, first)
            if where.start >= where.stop:
                continue
            ks = [k for k, r in enumerate(rows) if firsts[r] == first]
            at = torch.tensor([rows[k] for k in ks], device=x.device)
            part = amount if amount.shape[0] == 1 else amount[torch.tensor(ks, device=x.device)]
            xs = x[at, where]  # a copy: written back
            _apply(g.steer, xs, part, None if read is None else read[at, where])
            x[at, where] = xs


def _after_bos(norms: torch.Tensor) -> torch.Tensor:
    """A row's norms from its BOS on, BOS left out unless it is all there is."""
    return norms[1:] if norms.shape[0] > 1 else norms


class Reader:
    """The hook at a transcoder's input that hands each forward's activation to the
    ``Intervention`` at its output hook (which the same forward reaches later)."""

    def __init__(self, target: Intervention) -> None:
        self.target = target

    def __call__(self, act: torch.Tensor, hook: Any) -> None:
        self.target.reads[hook.name] = site_input(act)


def _apply(
    steer: Steer,
    xs: Float[torch.Tensor, "rows pos d_out"],
    amount: Float[torch.Tensor, "rows 1 1"],
    xin: Float[torch.Tensor, "rows pos d_in"] | None = None,
) -> None:
    """Steer ``xs`` in place (a view of the write hook's activation), each row by its own
    amount. ``xin``: what a transcoder read at these positions (an SAE reads ``xs`` itself)."""
    xin = xs if xin is None else xin
    if steer.mode == "add":
        if steer.unit == "max":  # the feature's own write at `amount`, decoded
            xs += amount * feature_write(steer.sae, steer.feature, xin).to(xs.dtype)
            return
        w_dec = steer.sae.W_dec[steer.feature].to(xs.dtype)
        direction = w_dec / w_dec.float().norm().clamp(min=1e-12).to(xs.dtype)
        if steer.unit == "norm":
            xs += amount * xs.float().norm(dim=-1, keepdim=True).to(xs.dtype) * direction
        else:
            xs += amount * direction
        return
    current = encode(steer.sae, xin)[..., steer.feature : steer.feature + 1]
    xs += (amount - current).to(xs.dtype) * feature_write(steer.sae, steer.feature, xin).to(
        xs.dtype
    )


def build_hooks(steers: Sequence[Steer], prompt_len: int) -> list[tuple[str, Intervention]]:
    """Fresh (hook name, Intervention) pairs for ONE run, one per hook point, that apply
    ``steers`` to every row of any batch; positions count from the first forward they see.
    Unit-max steers carry their max (``max_act``). ``steering`` and ``generate`` build
    their own per run."""
    return _build([steers], prompt_len, every_row=True)


def build_row_hooks(
    rows: Sequence[Sequence[Steer]], prompt_len: int, starts: Sequence[int] | None = None
) -> list[tuple[str, Intervention]]:
    """Like ``build_hooks`` for a batch of ``len(rows)`` sequences where row i runs with the
    steers ``rows[i]`` (none: unsteered). Steers that differ only in strength share one
    hook: ``rows=[[Steer(sae, f, strength=s)] for s in (0, 4, 8)]`` is a strength sweep.
    ``starts``: for a left-padded batch of prompts of different lengths, where each row's BOS
    is (its padding is never steered, and "prompt" means its own tokens); the prompts all end
    at ``prompt_len``."""
    if starts is not None and len(starts) != len(rows):
        raise ScopeError(f"{len(starts)} starts for {len(rows)} rows: give one per row")
    return _build(rows, prompt_len, every_row=False, starts=starts)


def _build(
    rows: Sequence[Sequence[Steer]],
    prompt_len: int,
    every_row: bool,
    starts: Sequence[int] | None = None,
) -> list[tuple[str, Intervention]]:
    for s in (s for row in rows for s in row):
        if s.unit == "max" and s.max_act is None:
            raise missing_max(s)
    # per hook point: the j-th steer of a row at that hook, by everything but its strength
    found: dict[str, dict[tuple[Any, ...], tuple[Steer, list[int], list[float]]]] = {}
    for r, row in enumerate(rows):
        count: dict[str, int] = {}
        for s in row:
            j = count[s.hook_name] = count.get(s.hook_name, -1) + 1
            key = (j, id(s.sae), s.feature, s.mode, s.unit, s.positions)
            _, where, amounts = found.setdefault(s.hook_name, {}).setdefault(key, (s, [], []))
            where.append(r)
            amounts.append(_amount(s))
    hooks = []
    for hook, groups in found.items():
        made = []
        for key in sorted(groups, key=lambda k: k[0]):  # stable: each row keeps its order
            s, where, amounts = groups[key]
            rows_at = slice(None) if every_row else _rows(where)
            made.append(RowSteer(s, rows_at, torch.tensor(amounts, dtype=torch.float64)))
        batch = None if every_row else len(rows)
        hooks.append((hook, Intervention(made, prompt_len, batch, starts)))
    return hooks


def _amount(s: Steer) -> float:
    """What a steer's hook applies: add's strength (times the max for unit "max"), clamp's value."""
    if s.mode == "ablate":
        return 0.0
    if s.mode == "add" and s.unit == "max":
        return s.strength * float(s.max_act or 0.0)
    return s.strength


def _rows(where: list[int]) -> slice | list[int]:
    """Consecutive rows as a slice (steered through a view), others as they are."""
    if where == list(range(where[0], where[-1] + 1)):
        return slice(where[0], where[-1] + 1)
    return where


def check_steers(model: Any, steers: Sequence[Steer]) -> list[Steer]:
    """Raise a ScopeError now, before anything runs, for a steer that cannot run on ``model``:
    an SAE that does not fit it, or unit max without its max (``max_act``). Gives the steers."""
    for s in steers:
        check_fit(model, s.sae)
    build_hooks(steers, 1)
    return list(steers)


@contextmanager
def attach(model: Any, hooks: Sequence[tuple[str, Any]]) -> Iterator[None]:
    """Put ``(hook name, fn(act, hook))`` pairs on ``model``'s hook points for the block, after
    any hooks already there, and take exactly these off at the end, however it ends. An
    ``Intervention`` steering a transcoder brings a ``Reader`` at the transcoder's input. Plain
    PyTorch hook handles: cheap enough to wrap every forward pass of a generation, and
    independent of transformer-lens' nesting of ``model.hooks`` contexts."""
    handles = []
    readers = [
        (read, Reader(fn))
        for _, fn in hooks
        if isinstance(fn, Intervention)
        for read in fn.read_hooks()
    ]
    hooks = [*readers, *hooks]
    enable_hooks(model, [name for name, _ in hooks])
    try:
        for name, fn in hooks:
            point = model.hook_dict.get(name)
            if point is None:
                raise ScopeError(f"{model.cfg.model_name} has no hook {name!r}: pick an SAE for it")
            handles.append(point.register_forward_hook(_as_torch_hook(fn, point)))
        yield
    finally:
        for handle in handles:
            handle.remove()


def _as_torch_hook(fn: Any, point: Any) -> Any:
    def call(module: Any, inputs: Any, output: torch.Tensor) -> Any:
        return fn(output, hook=point)

    return call


@contextmanager
def steering(
    model: Any, steers: Sequence[Steer], *, prompt_len: int
) -> Iterator[list[tuple[str, Intervention]]]:
    """``with steering(model, steers, prompt_len=n): model(tokens)`` runs ``model`` with the
    steers on (unit-max steers carry their ``max_act``). Each ``with`` is one run: fresh hooks
    whose positions start at 0 (positions from ``prompt_len`` on count as generated), removed
    when the block ends, also on an exception. Gives the (hook name, Intervention) pairs."""
    hooks = build_hooks(check_steers(model, steers), prompt_len)
    with attach(model, hooks):
        yield hooks


__all__ = [
    "MODES",
    "POSITIONS",
    "UNITS",
    "Intervention",
    "Reader",
    "Steer",
    "attach",
    "RowSteer",
    "build_hooks",
    "build_row_hooks",
    "check_steers",
    "missing_max",
    "steering",
]
