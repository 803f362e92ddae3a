"""Many generations as one batch: each row its own prompt, sampling settings, steers, seed and
length, one forward per token for all of them (KV cache on).

A row is what ``scope.generate.generate`` takes (``Gen``: prompt tokens, ``Sampling``, steers).
Prompts of different lengths are left-padded to the longest under an attention mask, so every
prompt ends where generation begins: transformer-lens then counts each row's positions (its
rotary angles) from the row's own BOS, masks the padding out of attention, and Gemma 2's sliding
window spans the same tokens as alone. Each row's steers see its own positions (``prompt``,
``generated``, ``all``; never its BOS nor its padding: ``scope.steer.build_row_hooks`` with the
rows' starts), each row draws from its own generator seeded with its ``Sampling.seed`` and
samples from its own logits with its own temperature, top-p and frequency penalty (counted over
its own prompt, not the padding), and stops at its own end tokens or length.

What "the same as alone" means: a row makes the tokens its lone ``generate`` makes, up to float
rounding. A batch of several rows (and padding) makes the matrix kernels sum in another order
than one row does, so the logits differ from a lone run's in the last bits (on a CPU, by ~1e-6:
not even rows with the same prompt are bitwise equal to a lone row). A token differs only where
that moves it across a boundary: a greedy pick between two logits within rounding of each
other, or a sampled draw within rounding of the edge between two tokens.

Rows may join a running batch (``join``): their prompts run in a forward of their own, then
their KV cache rows are put beside the others', the shorter side left-padded under the mask
(positions, and so rotary angles and the sliding window, are unchanged by padding). Rows leave
as they end (an end token, their length) or when ``drop`` is called (a client went away, a stop
sequence): their rows of the KV cache go, and so does the padding no remaining row needs, so a
finished row costs nothing more.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
from jaxtyping import Float, Int

import scope.generate as gen
from scope.errors import ScopeError
from scope.steer import Intervention, Steer, attach, build_row_hooks, check_steers


@dataclass(frozen=True, eq=False)
class Gen:
    """One generation, as ``generate(model, tokens, sampling, steers)`` would make it alone."""

    tokens: Int[torch.Tensor, "1 pos"]
    """The prompt, BOS first (``prompt_tokens``, ``chat_tokens``)."""
    sampling: gen.Sampling
    """Its settings: seed and ``max_new_tokens`` are its own."""
    steers: Sequence[Steer] = ()
    """Its steers (none: unsteered)."""


class Step(NamedTuple):
    """One forward of a batch: the rows in it and what each drew."""

    rows: list[int]
    """The rows that drew a token (indices into the batch's gens), in batch order."""
    tokens: Int[torch.Tensor, " k"]
    """Each of those rows' token."""
    logits: Float[torch.Tensor, "k d_vocab"]
    """The logits each token was drawn from, steering on, before any sampling setting."""
    finish: list[str | None]
    """Per row: "stop" (an end token), "length" (its last token), or None (it goes on)."""


class Batch:
    """``Batch(model, gens)``: step through many generations at once (``step``, or iterate);
    ``join`` adds more while it runs.

    The steers are checked when rows are given (a ScopeError for one that cannot run). The
    first step of rows runs their prompts, in a forward of their own, and refuses a steer that
    would swamp its row's activation; their KV cache rows then join the others' (the shorter
    side left-padded), and from the next step on every row makes its token in one forward. The
    steering hooks are on the model only during each forward."""

    def __init__(self, model: Any, gens: Sequence[Gen] = ()) -> None:
        self.model = model
        self.device = torch.device(model.cfg.device)
        self.gens: list[Gen] = []
        """Every row given so far; a row is its index here."""
        self.steers: list[list[Steer]] = []
        """Each row's steers with their maxes filled in."""
        self.draws: list[torch.Tensor] = []
        """Each row's uniform draws, from its own generator (float64)."""
        self.ends: list[set[int]] = []
        """Each row's end tokens (none without ``stop_at_eos``)."""
        self.made: list[int] = []
        """Tokens each row has made."""
        self.rows: list[int] = []
        """The rows in the KV cache, in batch order."""
        self.gone: set[int] = set()
        """Rows to leave the batch before the next forward."""
        self.pending: list[tuple[Gen, list[Steer]]] = []
        """Rows given at the start (with their checked steers), which the first ``step`` joins."""
        self.cache: Any = None
        self.hooks: list[tuple[str, Intervention]] | None = None
        """The steering hooks for the rows now in the batch (built again when rows change)."""
        self.last: torch.Tensor | None = None
        """The tokens drawn at the latest step by the rows in the cache, fed at the next."""
        self.counts: torch.Tensor | None = None
        """[rows, d_vocab] each token's count in the row's prompt and continuation, for rows
        with a frequency penalty (zeros for the others); None when no row has one."""
        if gens:
            self.pending = list(zip(gens, self._check(gens), strict=True))

    def drop(self, rows: Iterable[int]) -> None:
        """Stop generating these rows (nobody reads them); they leave before the next forward."""
        self.gone.update(r for r in rows if r in self.rows)

    @property
    def over(self) -> bool:
        """Whether no row is left to generate (rows may still join)."""
        return not self.pending and not set(self.rows) - self.gone

    def __iter__(self) -> Iterator[Step]:
        while (step := self.step()) is not None:
            yield step

    def step(self) -> Step | None:
        """Run one forward and draw each row's next token; None when every row has ended."""
        if self.pending:
            pending, self.pending = self.pending, []
            return self._join([g for g, _ in pending], [r for _, r in pending])
        if self.cache is None:
            return None
        with torch.inference_mode():
            self._compact()
            if not self.rows:
                return None
            assert self.last is not None
            if self.hooks is None:  # every row is past its prompt: positions count on
                seen = int(self.cache.previous_attention_mask.shape[1])
                self.hooks = build_row_hooks([self.steers[r] for r in self.rows], seen)
                for _, fn in self.hooks:
                    fn.seen = seen
            step = self.last[:, None]
            with attach(self.model, self.hooks):
                logits = self.model(
                    step, past_kv_cache=self.cache, attention_mask=torch.ones_like(step)
                )
            return self._draw(list(self.rows), logits[:, -1], self.counts, joined=None)

    def join(self, gens: Sequence[Gen]) -> Step:
        """Add ``gens`` and make their first tokens: their prompts, left-padded to the longest,
        run in a forward of their own; then they join the batch. Gives their step (their row
        ids in ``Step.rows``). A ScopeError (a steer that cannot run, or would swamp its row's
        activation) leaves the batch as it was."""
        if not gens:
            raise ScopeError("no rows to generate: give at least one prompt")
        return self._join(gens, self._check(gens))

    def _join(self, gens: Sequence[Gen], ready: list[list[Steer]]) -> Step:
        from transformer_lens.cache.key_value_cache import TransformerLensKeyValueCache

        model = self.model
        widths = [int(g.tokens.shape[1]) for g in gens]
        width = max(widths)
        pad = model.tokenizer.pad_token_id
        tokens = torch.full((len(gens), width), 0 if pad is None else int(pad), dtype=torch.long)
        mask = torch.zeros((len(gens), width), dtype=torch.long)
        for k, (g, w) in enumerate(zip(gens, widths, strict=True)):
            tokens[k, width - w :], mask[k, width - w :] = g.tokens[0].cpu(), 1
        cache = TransformerLensKeyValueCache.init_cache(model.cfg, model.cfg.device, len(gens))
        hooks = build_row_hooks(ready, width, starts=[width - w for w in widths])
        with torch.inference_mode():
            with attach(model, hooks):
                logits = model(tokens.to(self.device), past_kv_cache=cache,
                               attention_mask=mask.to(self.device))[:, -1]  # fmt: skip
            counts = None
            if any(_penalised(g.sampling) for g in gens):
                counts = torch.zeros(len(gens), model.cfg.d_vocab, device=self.device)
                for k, g in enumerate(gens):
                    if _penalised(g.sampling):
                        own = g.tokens[0].to(self.device)
                        counts[k] = torch.bincount(own, minlength=model.cfg.d_vocab).float()
            first = len(self.gens)  # the new rows' ids
            for g, steers in zip(gens, ready, strict=True):
                n = g.sampling.max_new_tokens
                self.gens.append(g)
                self.steers.append(steers)
                self.draws.append(draws(g.sampling.seed, n))
                self.ends.append(
                    gen.end_tokens(model.tokenizer) if g.sampling.stop_at_eos else set()
                )
                self.made.append(0)
            new = list(range(first, len(self.gens)))
            return self._draw(new, logits, counts, joined=cache)

    def _check(self, gens: Sequence[Gen]) -> list[list[Steer]]:
        for g in gens:
            if g.tokens.dim() != 2 or g.tokens.shape[0] != 1 or g.tokens.shape[1] < 1:
                raise ScopeError(f"prompt tokens of shape {tuple(g.tokens.shape)}: give [1, pos]")
        return [check_steers(self.model, g.steers) for g in gens]

    def _draw(
        self, rows: list[int], logits: torch.Tensor, counts: torch.Tensor | None, joined: Any
    ) -> Step:
        """Each of ``rows``' token from its own logits, settings and draw (rows with the same
        settings together: ``sample_rows`` treats each row on its own); then the rows that
        ended leave, and ``joined`` (new rows' cache) joins the batch's."""
        u = torch.stack([self.draws[r][self.made[r]] for r in rows])
        kinds: dict[tuple[Any, ...], list[int]] = {}
        for k, r in enumerate(rows):
            s = self.gens[r].sampling
            kinds.setdefault((s.temperature, s.top_p, s.freq_penalty), []).append(k)
        if len(kinds) == 1:
            tokens = gen.sample_rows(logits, self.gens[rows[0]].sampling, u, counts)
        else:
            tokens = torch.empty(len(rows), dtype=torch.long, device=logits.device)
            for ks in kinds.values():
                at = torch.tensor(ks, device=logits.device)
                part = None if counts is None else counts[at]
                sampling = self.gens[rows[ks[0]]].sampling
                tokens[at] = gen.sample_rows(logits[at], sampling, u[ks], part).to(tokens.dtype)
        ids = tokens.tolist()
        finish: list[str | None] = []
        for k, r in enumerate(rows):
            self.made[r] += 1
            ended = "stop" if ids[k] in self.ends[r] else None
            if ended is None and self.made[r] >= self.gens[r].sampling.max_new_tokens:
                ended = "length"
            finish.append(ended)
            if ended is not None:
                self.gone.add(r)
        if counts is not None:
            counts[torch.arange(len(rows), device=counts.device), tokens] += 1
        if joined is None:
            self.last, self.counts = tokens, counts
        else:
            self._merge(rows, joined, tokens, counts)
        return Step(rows, tokens, logits, finish)

    def _merge(
        self, rows: list[int], cache: Any, tokens: torch.Tensor, counts: torch.Tensor | None
    ) -> None:
        """Put new rows (their cache, last tokens and counts) after the batch's rows."""
        self.hooks = None
        if self.cache is None or not self.rows:
            self.cache, self.rows, self.last, self.counts = cache, rows, tokens, counts
            return
        old, new = self.cache, cache
        length = max(_length(old), _length(new))
        old_n = len(self.rows)
        for a, b in zip(old.entries, new.entries, strict=True):
            a.past_keys = torch.cat([_left(a.past_keys, length), _left(b.past_keys, length)])
            a.past_values = torch.cat([_left(a.past_values, length), _left(b.past_values, length)])
        old.previous_attention_mask = torch.cat([_left(old.previous_attention_mask, length),
                                                 _left(new.previous_attention_mask, length)])  # fmt: skip
        assert self.last is not None
        self.last = torch.cat([self.last, tokens])
        if self.counts is not None or counts is not None:
            vocab = self.model.cfg.d_vocab
            mine = (
                self.counts
                if self.counts is not None
                else torch.zeros(old_n, vocab, device=self.device)
            )
            theirs = (
                counts if counts is not None else torch.zeros(len(rows), vocab, device=self.device)
            )
            self.counts = torch.cat([mine, theirs])
        self.rows = self.rows + rows

    def _compact(self) -> None:
        """Take the rows that left out of the cache, and the padding no row needs any more."""
        if not self.gone & set(self.rows):
            return
        keep = [k for k, r in enumerate(self.rows) if r not in self.gone]
        self.rows = [self.rows[k] for k in keep]
        self.hooks = None
        if not keep:
            self.cache = None
            return
        at = torch.tensor(keep, device=self.device)
        mask = self.cache.previous_attention_mask[at]
        cut = int(mask.any(0).long().argmax())  # leading columns that are padding in every row
        self.cache.previous_attention_mask = mask[:, cut:]
        for entry in self.cache.entries:
            entry.past_keys = entry.past_keys[at.to(entry.past_keys.device), cut:]
            entry.past_values = entry.past_values[at.to(entry.past_values.device), cut:]
        assert self.last is not None
        self.last = self.last[at]
        if self.counts is not None:
            self.counts = self.counts[at]


def draws(seed: int, n: int) -> Float[torch.Tensor, " n"]:
    """The ``n`` uniform draws of a run seeded with ``seed``: its own generator, float64 (the
    same seed draws the same numbers, whatever else is in the batch)."""
    return torch.rand(n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _length(cache: Any) -> int:
    return int(cache.previous_attention_mask.shape[1])


def _left(x: torch.Tensor, length: int) -> torch.Tensor:
    """``x`` ([rows, pos, ...]) left-padded with zeros to ``length`` positions (masked out)."""
    if x.shape[1] == length:
        return x
    pad = torch.zeros(
        (x.shape[0], length - x.shape[1], *x.shape[2:]), dtype=x.dtype, device=x.device
    )
    return torch.cat([pad, x], dim=1)


def _penalised(s: gen.Sampling) -> bool:
    return bool(s.freq_penalty) and s.temperature > 0


def run(model: Any, gens: Sequence[Gen]) -> list[list[int]]:
    """Each gen's continuation, made as one batch (``Batch``)."""
    out: list[list[int]] = [[] for _ in gens]
    for step in Batch(model, gens):
        for r, token in zip(step.rows, step.tokens.tolist(), strict=True):
            out[r].append(token)
    return out


__all__ = ["Batch", "Gen", "Step", "draws", "run"]
