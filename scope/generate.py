"""Generation, plain or steered: the prompt as tokens, a seeded sampler, tokens as a stream.

- ``prompt_tokens`` formats a prompt (Gemma's chat template for -it models, or raw text);
- ``sample_token`` picks the next token from logits and one uniform draw;
- ``generate`` yields continuation tokens one at a time (KV cache on) with steers active, with
  every random number from a ``torch.Generator`` seeded from ``Sampling.seed``: the global
  torch RNG is never touched, and two runs with the same seed draw the same numbers whatever
  their steers, so a baseline and a steered run differ only by the steering;
- ``text_stream`` turns a token stream into text pieces (``st.write_stream``, a terminal);
- ``compare`` generates the baseline and the steered continuation of one prompt.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from jaxtyping import Float, Int

from scope.errors import ScopeError
from scope.fit import check_fit
from scope.steer import Steer, attach, build_hooks, check_steers


@dataclass(frozen=True, kw_only=True)
class Sampling:
    """Generation settings, shared by the baseline and the steered run."""

    max_new_tokens: int = 40
    """How many tokens to generate at most."""
    temperature: float = 0.7
    """Logits are divided by this before sampling; 0 is greedy."""
    top_p: float | None = 0.9
    """Sample only from the most likely tokens that together make up this probability (the
    first always counts); None or 1 keeps all."""
    freq_penalty: float = 0.0
    """Subtracted from a token's (temperature-scaled) logit once per time it already occurs in
    the prompt or continuation; ignored when greedy."""
    seed: int = 0
    """Seeds this run's own random generator (never the global one)."""
    chat: bool | None = None
    """Wrap the prompt in Gemma's chat template: None does so for -it models only."""
    stop_at_eos: bool = True
    """Stop at <eos> or <end_of_turn>."""

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ScopeError(f"max_new_tokens {self.max_new_tokens} must be at least 1")
        if not math.isfinite(self.temperature) or self.temperature < 0:
            raise ScopeError(f"temperature {self.temperature} must be 0 (greedy) or more")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise ScopeError(f"top_p {self.top_p} must be in (0, 1]")
        if not math.isfinite(self.freq_penalty) or self.freq_penalty < 0:
            raise ScopeError(f"freq_penalty {self.freq_penalty} must be 0 (none) or more")


def prompt_tokens(
    model: Any, prompt: str, chat: bool | None, max_new_tokens: int
) -> Int[torch.Tensor, "1 pos"]:
    """The prompt as tokens, BOS first: in Gemma's chat template when ``chat`` (None: for -it
    models), else raw. Refuses an empty prompt or one that leaves no room in the context."""
    if not prompt or not prompt.strip():
        raise ScopeError("the prompt is empty: give some text to continue")
    name = str(getattr(model, "scope_source", model.cfg.model_name))
    use_chat = chat if chat is not None else name.rstrip("/").endswith("-it")
    tok = model.tokenizer
    if use_chat:
        if not getattr(tok, "chat_template", None):
            raise ScopeError(f"{name} has no chat template: pass raw text (chat=False / --raw)")
        ids = tok.apply_chat_template(
            [{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=True
        )
        if hasattr(ids, "keys"):  # a BatchEncoding in newer transformers
            ids = ids["input_ids"]
        tokens = torch.tensor([list(ids)], dtype=torch.long)
    else:
        tokens = model.to_tokens(prompt, prepend_bos=True, truncate=False)  # count them all
    total = tokens.shape[1] + max_new_tokens
    if total > model.cfg.n_ctx:
        raise ScopeError(
            f"the prompt is {tokens.shape[1]} tokens and {max_new_tokens} more are asked for: "
            f"{total} > the model's context of {model.cfg.n_ctx}. Shorten the prompt or max_new_tokens"
        )
    return tokens.to(model.cfg.device)


def sample_token(
    logits: Float[torch.Tensor, " d_vocab"],
    sampling: Sampling,
    u: float,
    counts: Float[torch.Tensor, " d_vocab"] | None = None,
) -> int:
    """The next token: the argmax at temperature 0, else the token where ``u`` (uniform in
    [0, 1)) falls in the cumulative distribution of softmax(logits / temperature - freq_penalty
    * counts), cut to ``top_p``. One draw per token, whatever the distribution."""
    if sampling.temperature == 0:
        return int(logits.argmax())
    scaled = logits.float() / sampling.temperature
    if sampling.freq_penalty and counts is not None:
        scaled = scaled - sampling.freq_penalty * counts
    probs = scaled.softmax(-1)
    order = None
    if sampling.top_p is not None and sampling.top_p < 1:
        probs, order = probs.sort(descending=True)
        before = probs.cumsum(-1) - probs  # mass of the more likely tokens
        probs = probs.masked_fill(before > sampling.top_p, 0)
    cdf = probs.cumsum(-1)
    target = cdf[-1:] * u
    last = (cdf < cdf[-1]).sum()  # the last token with any probability
    index = torch.searchsorted(cdf, target, right=True).clamp(max=last)
    return int(order[index] if order is not None else index)


def _end_tokens(tokenizer: Any) -> set[int]:
    ends = {tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<end_of_turn>")}
    return {int(t) for t in ends - {None, tokenizer.unk_token_id}}


def generate(
    model: Any,
    tokens: Int[torch.Tensor, "1 pos"],
    sampling: Sampling,
    steers: Sequence[Steer] = (),
    *,
    store: Any = None,
) -> Iterator[int]:
    """Continuation tokens of ``tokens``, one at a time, with ``steers`` on (``store`` for unit
    "max"). The steers are checked now; the tokens come as the iterator is read. Each call is
    one run with fresh hooks, put on the model only for each forward pass, so the model is
    plain between tokens and after the run however it ends. Random numbers come from this
    run's generator seeded from ``sampling.seed``: the same seed draws the same numbers."""
    for s in steers:
        check_fit(model, s.sae)
    hooks = build_hooks(steers, tokens.shape[1], store)
    generator = torch.Generator().manual_seed(sampling.seed)
    draws = torch.rand(sampling.max_new_tokens, generator=generator, dtype=torch.float64)
    return _tokens(model, tokens, sampling, hooks, draws.tolist())


@torch.inference_mode()
def _tokens(
    model: Any,
    tokens: Int[torch.Tensor, "1 pos"],
    sampling: Sampling,
    hooks: list[tuple[str, Any]],
    draws: list[float],
) -> Iterator[int]:
    from transformer_lens.cache.key_value_cache import TransformerLensKeyValueCache

    ends = _end_tokens(model.tokenizer) if sampling.stop_at_eos else set()
    cache = TransformerLensKeyValueCache.init_cache(model.cfg, model.cfg.device, 1)

    def next_logits(step: torch.Tensor) -> torch.Tensor:
        with attach(model, hooks):
            return model(step, past_kv_cache=cache)[0, -1]

    logits = next_logits(tokens)
    counts = None
    if sampling.freq_penalty and sampling.temperature > 0:
        counts = torch.bincount(tokens[0], minlength=logits.shape[-1]).float()
    for i, u in enumerate(draws):
        token = sample_token(logits, sampling, u, counts)
        yield token
        if token in ends or i + 1 == len(draws):
            return
        if counts is not None:
            counts[token] += 1
        logits = next_logits(torch.tensor([[token]], device=tokens.device))


def text_stream(tokenizer: Any, tokens: Iterable[int]) -> Iterator[str]:
    """The text of a token stream, piece by piece, for ``st.write_stream`` or a terminal: each
    piece is what the latest token adds to the decoded text (special tokens skipped); a
    character split across tokens waits for its last one. The pieces join to the decoded text."""
    ids: list[int] = []
    shown = text = ""
    for token in tokens:
        ids.append(token)
        text = tokenizer.decode(ids, skip_special_tokens=True)
        if text.endswith("\ufffd") or len(text) <= len(shown):
            continue
        yield text[len(shown) :]
        shown = text
    if len(text) > len(shown):  # bytes that never made a character
        yield text[len(shown) :]


@dataclass(frozen=True, kw_only=True)
class Comparison:
    """A baseline and a steered continuation of one prompt, same seed and sampling."""

    prompt: str
    """The prompt as given."""
    prompt_tokens: list[int]
    """The prompt as fed to the model (chat template included)."""
    baseline_tokens: list[int]
    """The continuation without steering."""
    steered_tokens: list[int]
    """The continuation with the steers on."""
    baseline: str
    """``baseline_tokens`` as text, special tokens skipped."""
    steered: str
    """``steered_tokens`` as text, special tokens skipped."""
    steers: list[dict[str, Any]] = field(default_factory=list)
    """Each steer's ``describe(store)``."""
    sampling: Sampling = field(default_factory=Sampling)
    """The settings both runs used."""


def compare(
    model: Any,
    prompt: str,
    steers: Sequence[Steer],
    *,
    sampling: Sampling | None = None,
    store: Any = None,
    on_token: Callable[[str, int], None] | None = None,
    **sampling_kw: Any,
) -> Comparison:
    """Generate from ``prompt`` without and with ``steers``; ``on_token(which, token)`` streams
    ("baseline" or "steered"). Sampling settings come as ``sampling=`` or keywords (seed=0, ...)."""
    if sampling is not None and sampling_kw:
        raise ScopeError(
            f"give sampling settings as sampling= or as keywords ({', '.join(sampling_kw)}), not both"
        )
    sampling = sampling or Sampling(**sampling_kw)
    tokens = prompt_tokens(model, prompt, sampling.chat, sampling.max_new_tokens)
    check_steers(model, steers, store)  # before the baseline runs
    out: dict[str, list[int]] = {}
    for which, active in (("baseline", ()), ("steered", steers)):
        out[which] = []
        for token in generate(model, tokens, sampling, active, store=store):
            out[which].append(token)
            if on_token:
                on_token(which, token)
    tok = model.tokenizer
    return Comparison(
        prompt=prompt,
        prompt_tokens=tokens[0].tolist(),
        baseline_tokens=out["baseline"],
        steered_tokens=out["steered"],
        baseline=tok.decode(out["baseline"], skip_special_tokens=True),
        steered=tok.decode(out["steered"], skip_special_tokens=True),
        steers=[s.describe(store) for s in steers],
        sampling=sampling,
    )


__all__ = [
    "Comparison",
    "Sampling",
    "compare",
    "generate",
    "prompt_tokens",
    "sample_token",
    "text_stream",
]
