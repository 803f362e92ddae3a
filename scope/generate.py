"""Generation, plain or steered: the prompt as tokens, a seeded sampler, tokens as a stream.

- ``prompt_tokens`` formats a prompt (Gemma's chat template for -it models, or raw text);
  ``chat_tokens`` a conversation;
- ``sample_token`` picks the next token from logits and one uniform draw (``sample_rows``: a
  batch of rows at once, each with its own draw);
- ``generate`` yields continuation tokens one at a time (KV cache on) with steers active, with
  every random number from a ``torch.Generator`` seeded from ``Sampling.seed``: the global
  torch RNG is never touched, and two runs with the same seed draw the same numbers whatever
  their steers, so a baseline and a steered run differ only by the steering;
- ``generate_rows`` makes many such runs of one prompt as one batch (a row per run, each with
  its own steers and its own generator), as a strength sweep does; ``scope.batch.Batch`` makes
  runs of different prompts and settings together, step by step with each step's logits (a
  server streams it, with log-probabilities);
- ``text_stream`` turns a token stream into text pieces (``st.write_stream``, a terminal);
- ``compare`` generates the baseline and the steered continuation of one prompt.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

import torch
from jaxtyping import Float, Int

from scope.errors import ScopeError
from scope.model import model_source
from scope.steer import Steer, check_steers

if TYPE_CHECKING:
    from scope.store import Store


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
    return chat_tokens(model, [{"role": "user", "content": prompt}], chat, max_new_tokens)


def uses_chat(model: Any, chat: bool | None) -> bool:
    """Whether prompts to ``model`` go through its chat template: ``chat``, or when None, for
    -it models only."""
    name = model_source(model)
    return chat if chat is not None else name.rstrip("/").endswith("-it")


def chat_tokens(
    model: Any, messages: Sequence[dict[str, str]], chat: bool | None, max_new_tokens: int
) -> Int[torch.Tensor, "1 pos"]:
    """A conversation (``[{"role": "user", "content": ...}, ...]``) as tokens, BOS first: in
    the model's chat template with the model's turn opened when ``chat`` (None: for -it
    models), else the contents as plain text, one after another on their own lines. Refuses
    one that leaves no room for ``max_new_tokens`` in the context."""
    name = model_source(model)
    tok = model.tokenizer
    if uses_chat(model, chat):
        if not getattr(tok, "chat_template", None):
            raise ScopeError(f"{name} has no chat template: pass raw text (chat=False / --raw)")
        try:
            ids = tok.apply_chat_template(list(messages), add_generation_prompt=True, tokenize=True)
        except Exception as e:  # jinja's own errors, e.g. Gemma 2 has no system role
            raise ScopeError(f"{name}'s chat template refused the messages: {e}") from None
        if hasattr(ids, "keys"):  # a BatchEncoding in newer transformers
            ids = ids["input_ids"]
        tokens = torch.tensor([list(ids)], dtype=torch.long)
    else:
        text = "\n\n".join(m["content"] for m in messages)
        tokens = model.to_tokens(text, prepend_bos=True, truncate=False)  # count them all
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
    draws = torch.tensor([u], dtype=torch.float64)
    return int(
        sample_rows(logits[None], sampling, draws, None if counts is None else counts[None])[0]
    )


def sample_rows(
    logits: Float[torch.Tensor, "batch d_vocab"],
    sampling: Sampling,
    u: Float[torch.Tensor, " batch"],
    counts: Float[torch.Tensor, "batch d_vocab"] | None = None,
) -> Int[torch.Tensor, " batch"]:
    """``sample_token`` for every row of a batch at once, row i with its own draw ``u[i]``."""
    if sampling.temperature == 0:
        return logits.argmax(-1)
    scaled = logits.float() / sampling.temperature
    if sampling.freq_penalty and counts is not None:
        scaled = scaled - sampling.freq_penalty * counts
    probs = scaled.softmax(-1)
    order = None
    if sampling.top_p is not None and sampling.top_p < 1:
        probs, order = probs.sort(dim=-1, descending=True, stable=True)
        before = probs.cumsum(-1) - probs  # mass of the more likely tokens
        probs = probs.masked_fill(before > sampling.top_p, 0)
    cdf = probs.cumsum(-1)
    target = cdf[:, -1:] * u.to(cdf.device, cdf.dtype)[:, None]
    last = (cdf < cdf[:, -1:]).sum(-1)  # the last token with any probability
    index = torch.minimum(torch.searchsorted(cdf, target, right=True)[:, 0], last)
    return order.gather(-1, index[:, None])[:, 0] if order is not None else index


def end_tokens(tokenizer: Any) -> set[int]:
    """The tokens a generation stops at: <eos> and <end_of_turn>, where the tokenizer has them."""
    ends = {tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<end_of_turn>")}
    return {int(t) for t in ends - {None, tokenizer.unk_token_id}}


def generate(
    model: Any,
    tokens: Int[torch.Tensor, "1 pos"],
    sampling: Sampling,
    steers: Sequence[Steer] = (),
) -> Iterator[int]:
    """Continuation tokens of ``tokens``, one at a time, with ``steers`` on (unit-max steers
    carry their ``max_act``: ``scope.steer_spec.resolve``). The steers are checked now; the tokens come as the iterator
    is read. Each call is one run with fresh hooks, put on the model only for each forward
    pass, so the model is plain between tokens and after the run however it ends. Random
    numbers come from this run's generator seeded from ``sampling.seed``: the same seed draws
    the same numbers. (A batch of one: ``scope.batch.Batch`` makes many at once.)"""
    from scope.batch import Batch, Gen

    batch = Batch(model, [Gen(tokens, sampling, steers)])
    return (int(step.tokens[0]) for step in batch)


def generate_rows(
    model: Any,
    tokens: Int[torch.Tensor, "1 pos"],
    sampling: Sampling,
    rows: Sequence[Sequence[Steer]],
    *,
    seeds: Sequence[int] | None = None,
) -> list[list[int]]:
    """The continuations of ``tokens`` for a batch of ``len(rows)`` runs made together (one
    forward per token, KV cache on): row i runs with the steers ``rows[i]`` and draws its random
    numbers from its own generator seeded with ``seeds[i]`` (default ``sampling.seed``), so it
    gives what ``generate(model, tokens, sampling, rows[i])`` with that seed gives, up to
    rounding (a batch sums in another order than one row: ``scope.batch``). A row that reaches
    an end token stops there; the batch ends when every row has."""
    from scope.batch import Gen, run

    if not rows:
        raise ScopeError("no rows to generate: give at least one list of steers (empty: unsteered)")
    seeds = [sampling.seed] * len(rows) if seeds is None else list(seeds)
    if len(seeds) != len(rows):
        raise ScopeError(f"{len(seeds)} seeds for {len(rows)} rows: give one per row")
    gens = [
        Gen(tokens, replace(sampling, seed=seed), row)
        for row, seed in zip(rows, seeds, strict=True)
    ]
    return run(model, gens)


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
    """Each steer's ``describe(store.saes)``."""
    sampling: Sampling = field(default_factory=Sampling)
    """The settings both runs used."""


def compare(
    model: Any,
    prompt: str,
    steers: Sequence[Steer],
    *,
    sampling: Sampling | None = None,
    store: Store | None = None,
    on_token: Callable[[str, int], None] | None = None,
    **sampling_kw: Any,
) -> Comparison:
    """Generate from ``prompt`` without and with ``steers``; ``on_token(which, token)`` streams
    ("baseline" or "steered"); ``store`` names each steer's SAE by its key there. Sampling
    settings come as ``sampling=`` or keywords (seed=0, ...)."""
    if sampling is not None and sampling_kw:
        raise ScopeError(
            f"give sampling settings as sampling= or as keywords ({', '.join(sampling_kw)}), not both"
        )
    sampling = sampling or Sampling(**sampling_kw)
    tokens = prompt_tokens(model, prompt, sampling.chat, sampling.max_new_tokens)
    ready = check_steers(model, steers)  # before the baseline runs
    out: dict[str, list[int]] = {}
    for which, active in (("baseline", []), ("steered", ready)):
        out[which] = []
        for token in generate(model, tokens, sampling, active):
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
        steers=[s.describe(store.saes if store is not None else None) for s in steers],
        sampling=sampling,
    )


__all__ = [
    "Comparison",
    "Sampling",
    "chat_tokens",
    "compare",
    "generate",
    "generate_rows",
    "prompt_tokens",
    "uses_chat",
    "sample_rows",
    "sample_token",
    "text_stream",
]
