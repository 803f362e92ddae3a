"""Steering: add, clamp or ablate SAE features during generation, baseline vs steered.

Interventions are hooks at each SAE's own hook point (``blocks.L.hook_resid_post`` and so on):

- ``add``: x += strength * W_dec[f] / |W_dec[f]|. The strength is absolute, or in units of the
  feature's recorded max activation (``unit="max"``, needs a store), or of the norm of x at
  that position (``unit="norm"``).
- ``clamp``: encode x, set feature f to ``strength``, decode, and keep the SAE's error term. As
  decoding is linear this is x += (strength - a_f(x)) * W_dec[f]: nothing else changes.
- ``ablate``: clamp to 0.

Positions: the prompt, the generated tokens, or all; BOS never. Hooks are removed when the call
ends, also after an exception, so the model is exactly as before.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import KW_ONLY, dataclass, field
from typing import Any

import torch

from scope.errors import ScopeError
from scope.fit import check_fit
from scope.sae import sae_info

MODES = ("add", "clamp", "ablate")
UNITS = ("absolute", "max", "norm")
POSITIONS = ("prompt", "generated", "all")
# Past these the residual stream is swamped: almost surely a typo (e.g. 8000 for 8).
STRENGTH_LIMITS = {"absolute": 5_000.0, "max": 200.0, "norm": 50.0}


@dataclass(frozen=True)
class Steer:
    """One intervention on one feature: ``Steer(sae, 1234, strength=8, mode="add")``."""

    sae: Any
    """The sae-lens SAE whose feature is steered; the hook is the SAE's own."""
    feature: int
    strength: float = 0.0
    """add: how far along the unit decoder direction; clamp: the activation to set."""
    _: KW_ONLY
    mode: str = "add"
    """add, clamp or ablate."""
    unit: str = "absolute"
    """add only: absolute, max (the feature's recorded max, needs a store) or norm (of x)."""
    positions: str = "all"
    """prompt, generated or all. BOS is never steered."""

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

    @property
    def key(self) -> str:
        return sae_info(self.sae).key

    @property
    def hook_name(self) -> str:
        return str(self.sae.cfg.metadata.hook_name)

    def describe(self) -> dict[str, Any]:
        info = sae_info(self.sae)
        return {
            "sae": info.key,
            "release": info.release,
            "sae_id": info.sae_id,
            "hook": info.hook_name,
            "feature": self.feature,
            "mode": self.mode,
            "strength": self.strength,
            "unit": self.unit,
            "positions": self.positions,
        }


@dataclass(frozen=True, kw_only=True)
class Sampling:
    """Generation settings, shared by the baseline and the steered run."""

    max_new_tokens: int = 40
    temperature: float = 0.7
    """0 is greedy."""
    top_p: float | None = 0.9
    freq_penalty: float = 0.0
    seed: int = 0
    chat: bool | None = None
    """Wrap the prompt in Gemma's chat template: None does so for -it models only."""
    stop_at_eos: bool = True

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ScopeError(f"max_new_tokens {self.max_new_tokens} must be at least 1")
        if not math.isfinite(self.temperature) or self.temperature < 0:
            raise ScopeError(f"temperature {self.temperature} must be 0 (greedy) or more")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise ScopeError(f"top_p {self.top_p} must be in (0, 1]")


def _max_activation(store: Any, steer: Steer) -> float:
    """The feature's recorded max, from the store's SAE with the same weights."""
    from scope.record.runner import weights_sha256

    sha = weights_sha256(steer.sae)
    key = next((k for k, v in store.saes.items() if v["sha256"] == sha), None)
    if key is None:
        raise ScopeError(
            f"the store {store.root} did not record this SAE ({steer.key}; it has "
            f"{', '.join(store.saes)}): record it, or steer with unit 'absolute'"
        )
    rows = store.sql(
        "select max from features where sae = ? and feature = ?", [key, steer.feature]
    ).fetchall()
    top = float(rows[0][0]) if rows else 0.0
    if top <= 0:
        raise ScopeError(
            f"{key}/{steer.feature} never fired in {store.root}: its max is 0, so unit 'max' means nothing"
        )
    return top


class Intervention:
    """The hook for all steers at one hook point. Tracks absolute positions across calls, so
    with a KV cache it sees the prompt first and then one generated token per call."""

    def __init__(self, steers: list[Steer], prompt_len: int, scales: dict[int, float]) -> None:
        self.steers = steers
        self.prompt_len = prompt_len
        self.scales = scales  # id(steer) -> multiplier for unit "max"
        self.seen = 0

    def __call__(self, act: torch.Tensor, hook: Any) -> torch.Tensor:
        n = act.shape[1]
        pos = torch.arange(self.seen, self.seen + n, device=act.device)
        self.seen += n
        x = act.flatten(2) if act.dim() == 4 else act  # attn.hook_z: heads flattened, a view
        for steer in self.steers:
            where = pos > 0  # never BOS
            if steer.positions == "prompt":
                where &= pos < self.prompt_len
            elif steer.positions == "generated":
                where &= pos >= self.prompt_len
            if not bool(where.any()):
                continue
            w_dec = steer.sae.W_dec[steer.feature].to(x.dtype)  # [d_in]
            xs = x[:, where]  # [batch, n_steered, d_in]
            if steer.mode == "add":
                direction = w_dec / w_dec.float().norm().clamp(min=1e-12).to(x.dtype)
                scale = steer.strength * self.scales.get(id(steer), 1.0)
                if steer.unit == "norm":
                    delta = scale * xs.float().norm(dim=-1, keepdim=True).to(x.dtype) * direction
                else:
                    delta = scale * direction
            else:
                value = 0.0 if steer.mode == "ablate" else steer.strength
                current = steer.sae.encode(xs)[..., steer.feature : steer.feature + 1]
                delta = (value - current).to(x.dtype) * w_dec
            x[:, where] = xs + delta
        return act


def build_hooks(
    steers: list[Steer], prompt_len: int, store: Any = None
) -> list[tuple[str, Callable[..., Any]]]:
    """(hook name, function) pairs for ``model.hooks``; one Intervention per hook point."""
    scales = {id(s): _max_activation(store, s) for s in steers if s.unit == "max"} if store else {}
    missing = [s for s in steers if s.unit == "max" and id(s) not in scales]
    if missing:
        raise ScopeError(
            f"{missing[0].key}/{missing[0].feature}: unit 'max' needs a recorded store (--store)"
        )
    by_hook: dict[str, list[Steer]] = {}
    for s in steers:
        by_hook.setdefault(s.hook_name, []).append(s)
    return [(h, Intervention(group, prompt_len, scales)) for h, group in by_hook.items()]


def prompt_tokens(model: Any, prompt: str, chat: bool | None, max_new_tokens: int) -> torch.Tensor:
    """[1, pos] tokens of the prompt, BOS first; Gemma's chat template for -it models."""
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
        tokens = model.to_tokens(prompt, prepend_bos=True)
    total = tokens.shape[1] + max_new_tokens
    if total > model.cfg.n_ctx:
        raise ScopeError(
            f"the prompt is {tokens.shape[1]} tokens and {max_new_tokens} more are asked for: "
            f"{total} > the model's context of {model.cfg.n_ctx}. Shorten the prompt or max_new_tokens"
        )
    return tokens.to(model.cfg.device)


@torch.inference_mode()
def generate(
    model: Any,
    tokens: torch.Tensor,
    sampling: Sampling,
    fwd_hooks: list[tuple[str, Callable[..., Any]]] | None = None,
) -> Iterator[int]:
    """Sample continuation tokens one at a time (KV cache on), with ``fwd_hooks`` active.
    Seeded from ``sampling.seed``, so two calls with other hooks draw the same random numbers."""
    from transformer_lens.cache.key_value_cache import TransformerLensKeyValueCache
    from transformer_lens.utilities.logits_utils import sample_logits

    torch.manual_seed(sampling.seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(sampling.seed)
    eos = model.tokenizer.eos_token_id
    ends = {eos, model.tokenizer.convert_tokens_to_ids("<end_of_turn>")} - {
        None,
        model.tokenizer.unk_token_id,
    }
    cache = TransformerLensKeyValueCache.init_cache(model.cfg, model.cfg.device, 1)
    seq = tokens
    with model.hooks(fwd_hooks=fwd_hooks or []):
        logits = model(tokens, past_kv_cache=cache)[:, -1]
        for _ in range(sampling.max_new_tokens):
            nxt = sample_logits(
                logits.float(),
                top_p=sampling.top_p if sampling.temperature > 0 else None,
                temperature=sampling.temperature,
                freq_penalty=sampling.freq_penalty,
                tokens=seq,
            )
            token = int(nxt[0])
            yield token
            if sampling.stop_at_eos and token in ends:
                return
            step = nxt.view(1, 1).to(tokens.device)
            seq = torch.cat([seq, step], dim=1)
            logits = model(step, past_kv_cache=cache)[:, -1]


@dataclass(frozen=True)
class Comparison:
    """A baseline and a steered continuation of one prompt, same seed and sampling."""

    prompt: str
    prompt_tokens: list[int]
    baseline_tokens: list[int]
    steered_tokens: list[int]
    baseline: str
    steered: str
    steers: list[dict[str, Any]] = field(default_factory=list)
    sampling: Sampling = field(default_factory=Sampling)


def compare(
    model: Any,
    prompt: str,
    steers: list[Steer],
    *,
    sampling: Sampling | None = None,
    store: Any = None,
    on_token: Callable[[str, int], None] | None = None,
    **sampling_kw: Any,
) -> Comparison:
    """Generate from ``prompt`` without and with ``steers``; ``on_token(which, token)`` streams
    ("baseline" or "steered"). Sampling settings come as ``sampling=`` or keywords (seed=0, ...)."""
    sampling = sampling or Sampling(**sampling_kw)
    for s in steers:
        check_fit(model, s.sae)
    tokens = prompt_tokens(model, prompt, sampling.chat, sampling.max_new_tokens)
    hooks = build_hooks(steers, tokens.shape[1], store)
    out: dict[str, list[int]] = {}
    for which, fwd_hooks in (("baseline", []), ("steered", hooks)):
        out[which] = []
        for token in generate(model, tokens, sampling, fwd_hooks):
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
        steers=[s.describe() for s in steers],
        sampling=sampling,
    )
