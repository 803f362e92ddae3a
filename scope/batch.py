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

Rows leave the batch as they end (an end token, their length) or when ``drop`` is called (a
client went away, a stop sequence): their rows of the KV cache go, and so does the padding no
remaining row needs, so a finished row costs nothing more.
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


@dataclass(frozen=True)
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
    """``Batch(model, gens)``: step through many generations at once (``step``, or iterate).

    The steers are checked when it is made (a ScopeError for one that cannot run); the first
    ``step`` runs the prompts, and refuses a steer that would swamp its row's activation. The
    steering hooks are on the model only during each forward."""

    def __init__(self, model: Any, gens: Sequence[Gen], *, store: Any = None) -> None:
        if not gens:
            raise ScopeError("no rows to generate: give at least one prompt")
        self.model, self.gens = model, list(gens)
        self.steers = [check_steers(model, g.steers, store) for g in self.gens]
        """Each row's steers with their maxes filled in."""
        device = torch.device(model.cfg.device)
        lengths = [g.sampling.max_new_tokens for g in self.gens]
        self.draws = torch.zeros(len(gens), max(lengths), dtype=torch.float64)
        """Row i's uniform draws, from its own generator."""
        for i, (g, n) in enumerate(zip(self.gens, lengths, strict=True)):
            self.draws[i, :n] = gen._draws(g.sampling.seed, n)
        self.ends = [gen.end_tokens(model.tokenizer) if g.sampling.stop_at_eos else set()
                     for g in self.gens]  # fmt: skip
        self.made = [0] * len(gens)
        """Tokens each row has made."""
        self.rows = list(range(len(gens)))
        """The rows still in the batch, in batch order."""
        self.gone: set[int] = set()
        """Rows to leave the batch before the next forward."""
        widths = [int(g.tokens.shape[1]) for g in self.gens]
        self.width = max(widths)
        """The padded prompt's length: every prompt ends here."""
        self.firsts = [self.width - w for w in widths]
        """Each row's BOS position in the padded batch."""
        self.cut = 0
        """Leading (padding) positions dropped from the cache since the start."""
        self.cache: Any = None
        self.hooks: list[tuple[str, Intervention]] | None = None
        """The steering hooks for the rows now in the batch (built again when rows leave)."""
        self.last: torch.Tensor | None = None
        """The tokens drawn at the latest step, fed at the next."""
        self.counts: torch.Tensor | None = None
        """[rows, d_vocab] each token's count in the row's prompt and continuation, for rows
        with a frequency penalty (zeros for the others); None when no row has one."""
        self.device = device

    def drop(self, rows: Iterable[int]) -> None:
        """Stop generating these rows (nobody reads them); they leave before the next forward."""
        self.gone.update(r for r in rows if r in self.rows)

    @property
    def over(self) -> bool:
        """Whether no row is left to generate."""
        return not set(self.rows) - self.gone

    def __iter__(self) -> Iterator[Step]:
        while (step := self.step()) is not None:
            yield step

    @torch.inference_mode()
    def step(self) -> Step | None:
        """Run one forward and draw each row's next token; None when every row has ended."""
        if self.cache is not None:
            self._compact()
        elif self.gone:  # rows dropped before the prompt ran: they never join
            self.rows = [r for r in self.rows if r not in self.gone]
        if self.over:
            self.rows = []
            return None
        logits = self._prompt() if self.cache is None else self._next()
        tokens = self._sample(logits)
        ids = tokens.tolist()
        finish: list[str | None] = []
        for k, r in enumerate(self.rows):
            self.made[r] += 1
            ended = "stop" if ids[k] in self.ends[r] else None
            if ended is None and self.made[r] >= self.gens[r].sampling.max_new_tokens:
                ended = "length"
            finish.append(ended)
            if ended is not None:
                self.gone.add(r)
        if self.counts is not None:
            self.counts[torch.arange(len(self.rows), device=self.device), tokens] += 1
        self.last = tokens
        return Step(list(self.rows), tokens, logits, finish)

    def _prompt(self) -> torch.Tensor:
        """The first forward: the left-padded prompts."""
        from transformer_lens.cache.key_value_cache import TransformerLensKeyValueCache

        model, n = self.model, len(self.rows)
        pad = model.tokenizer.pad_token_id
        tokens = torch.full((n, self.width), 0 if pad is None else int(pad), dtype=torch.long)
        mask = torch.zeros((n, self.width), dtype=torch.long)
        for k, r in enumerate(self.rows):
            tokens[k, self.firsts[r] :] = self.gens[r].tokens[0].cpu()
            mask[k, self.firsts[r] :] = 1
        self.cache = TransformerLensKeyValueCache.init_cache(model.cfg, model.cfg.device, n)
        penalised = [r for r in self.rows if _penalised(self.gens[r].sampling)]
        if penalised:
            counts = torch.zeros(n, model.cfg.d_vocab, device=self.device)
            for k, r in enumerate(self.rows):
                if r in penalised:
                    own = self.gens[r].tokens[0].to(self.device)
                    counts[k] = torch.bincount(own, minlength=model.cfg.d_vocab).float()
            self.counts = counts
        return self._forward(tokens.to(self.device), mask.to(self.device))

    def _next(self) -> torch.Tensor:
        assert self.last is not None
        step = self.last[:, None]
        return self._forward(step, torch.ones_like(step))

    def _forward(self, tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        if self.hooks is None:
            seen = int(self.cache.previous_attention_mask.shape[1])
            self.hooks = build_row_hooks([self.steers[r] for r in self.rows], self.width - self.cut,
                                         starts=[self.firsts[r] - self.cut for r in self.rows])  # fmt: skip
            for _, fn in self.hooks:
                fn.seen = seen  # positions count on across the batch's forwards
        with attach(self.model, self.hooks):
            return self.model(tokens, past_kv_cache=self.cache, attention_mask=mask)[:, -1]

    def _sample(self, logits: torch.Tensor) -> torch.Tensor:
        """Each row's token from its own logits, settings and draw; rows with the same settings
        are sampled together (``sample_rows`` treats each row on its own)."""
        u = self.draws[torch.tensor(self.rows), torch.tensor([self.made[r] for r in self.rows])]
        kinds: dict[tuple[Any, ...], list[int]] = {}
        for k, r in enumerate(self.rows):
            s = self.gens[r].sampling
            kinds.setdefault((s.temperature, s.top_p, s.freq_penalty), []).append(k)
        if len(kinds) == 1:
            return gen.sample_rows(logits, self.gens[self.rows[0]].sampling, u, self.counts)
        out = torch.empty(len(self.rows), dtype=torch.long, device=logits.device)
        for ks in kinds.values():
            at = torch.tensor(ks, device=logits.device)
            counts = None if self.counts is None else self.counts[at]
            sampling = self.gens[self.rows[ks[0]]].sampling
            out[at] = gen.sample_rows(logits[at], sampling, u[ks], counts).to(out.dtype)
        return out

    def _compact(self) -> None:
        """Take the rows that left out of the cache, and the padding no row needs any more."""
        if not self.gone & set(self.rows):
            return
        keep = [k for k, r in enumerate(self.rows) if r not in self.gone]
        self.rows = [self.rows[k] for k in keep]
        self.hooks = None
        if not keep:
            return
        at = torch.tensor(keep, device=self.device)
        mask = self.cache.previous_attention_mask[at]
        cut = int(mask.any(0).long().argmax())  # leading columns that are padding in every row
        self.cut += cut
        self.cache.previous_attention_mask = mask[:, cut:]
        for entry in self.cache.entries:
            entry.past_keys = entry.past_keys[at.to(entry.past_keys.device), cut:]
            entry.past_values = entry.past_values[at.to(entry.past_values.device), cut:]
        assert self.last is not None
        self.last = self.last[at]
        if self.counts is not None:
            self.counts = self.counts[at]


def _penalised(s: gen.Sampling) -> bool:
    return bool(s.freq_penalty) and s.temperature > 0


def run(model: Any, gens: Sequence[Gen], *, store: Any = None) -> list[list[int]]:
    """Each gen's continuation, made as one batch (``Batch``)."""
    out: list[list[int]] = [[] for _ in gens]
    for step in Batch(model, gens, store=store):
        for r, token in zip(step.rows, step.tokens.tolist(), strict=True):
            out[r].append(token)
    return out


__all__ = ["Batch", "Gen", "Step", "run"]
