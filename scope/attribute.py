"""Why did the model say that: which features of which SAEs caused an output.

``attribute(model, saes, prompt, target)`` explains one number the model computed on a prompt
(a token's logit or log-probability, a logit difference, a feature's activation) by every
active feature of every SAE given, at every position: its activation times the gradient of
the target with respect to it, in the model *frozen* at the prompt's values:

- attention patterns and normalisation scales (``hook_pattern``, every RMSNorm's
  ``hook_scale``) and Gemma 2's final logit soft cap (as the ratio ``cap(z) / z``) are held at
  what they were, so gradients flow only through the linear paths between them;
- each SAE's hook is replaced by ``decode(codes) + error`` where the error term
  ``x - decode(codes)`` is held: the model computes exactly what it computed, and the error
  term is a source of its own.

With ``direct=True`` the SAEs' codes are held too (gradients do not flow back through their
encoders): the *replacement model* of attribution graphs (``scope.graph``), where each number
is a direct effect, and, with transcoders at every layer, the target is exactly the sum of
every source's share: features, error terms, token embeddings and biases. With ``direct=False``
(the default) a feature's attribution also counts what it does through later SAEs' features.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from jaxtyping import Float, Int

from scope.acts import counted_mask, enable_hooks, site_input
from scope.codec import codec_of, decode, encode
from scope.errors import ScopeError
from scope.identity import hook_site, sae_info, sae_keys

if TYPE_CHECKING:
    import pandas as pd
    from sae_lens import SAE, HookedSAETransformer

KINDS = ("logit", "logprob", "logit_diff", "feature")


@dataclass(frozen=True, kw_only=True)
class Target:
    """What to explain. ``Target()`` is the most likely next token's logit at the last
    position; ``parse_target`` reads the CLI's spelling."""

    kind: str = "logit"
    """logit, logprob, logit_diff (``token`` minus ``other``) or feature."""
    token: int | None = None
    """logit, logprob, logit_diff: the token id; None: the most likely one at ``position``."""
    other: int | None = None
    """logit_diff: the token id subtracted."""
    position: int = -1
    """Where: a position in the prompt's tokens (BOS is 0), negative from the end."""
    sae: str | None = None
    """feature: the SAE's key (e.g. ``L2.res.1k``)."""
    feature: int | None = None
    """feature: its index in that SAE."""

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ScopeError(f"target kind {self.kind!r} is not one of {', '.join(KINDS)}")
        if self.kind == "logit_diff" and (self.token is None or self.other is None):
            raise ScopeError("a logit difference needs two tokens: e.g. ' Yes' - ' No'")
        if self.kind == "feature" and (self.sae is None or self.feature is None):
            raise ScopeError("a feature target needs its SAE key and index: e.g. L2.res.1k/17@5")


@dataclass(frozen=True, kw_only=True)
class Explained:
    """The target as resolved on the prompt, and its value there."""

    label: str
    """e.g. ``logit(" Paris") @ 7`` or ``L2.res.1k/17 @ 5``."""
    value: float
    """The target's value in the model (equal in the frozen model)."""
    target: Target
    """The target with its token and position filled in."""


@dataclass(frozen=True, kw_only=True)
class Attribution:
    """Every active feature's share of the target, and the other sources' shares."""

    target: Explained
    tokens: list[str]
    """The prompt's tokens, BOS first."""
    keys: list[str]
    """Each SAE's key, in the order given."""
    features: list[Float[torch.Tensor, "n 4"]]
    """Per SAE: rows (position, feature, activation, attribution) of its active features."""
    errors: list[Float[torch.Tensor, " pos"]]
    """Per SAE: its error term's share at each position."""
    embeddings: Float[torch.Tensor, " pos"]
    """The token embeddings' share at each position."""
    biases: float
    """The share of every bias (SAE decoders' b_dec, the model's b_O, b_V, b_U, ...)."""
    direct: bool
    """True: direct effects in the replacement model (codes held)."""

    @property
    def error_share(self) -> float:
        return float(sum(e.sum() for e in self.errors))

    @property
    def embedding_share(self) -> float:
        return float(self.embeddings.sum())

    @property
    def feature_share(self) -> float:
        return float(sum(f[:, 3].sum() for f in self.features))

    def df(self) -> pd.DataFrame:
        """One row per (sae, feature, position): sae, feature, position, token, activation,
        attribution; largest attribution (in absolute value) first."""
        import pandas as pd

        parts = []
        for key, rows in zip(self.keys, self.features, strict=True):
            pos = rows[:, 0].long().tolist()
            parts.append(
                pd.DataFrame(
                    {
                        "sae": key,
                        "feature": rows[:, 1].long().numpy(),
                        "position": pos,
                        "token": [self.tokens[p] for p in pos],
                        "activation": rows[:, 2].numpy(),
                        "attribution": rows[:, 3].numpy(),
                    }
                )
            )
        df = pd.concat(parts, ignore_index=True) if parts else pd.DataFrame()
        if df.empty:
            return df
        order = df["attribution"].abs().sort_values(ascending=False, kind="stable").index
        return df.loc[order].reset_index(drop=True)


# ---------------------------------------------------------------- targets

_DIFF = re.compile(r'^\s*"(.+)"\s*-\s*"(.+)"\s*(?:@\s*(-?\d+))?\s*$', re.S)
_TOKEN = re.compile(r'^\s*"(.+)"\s*(?:@\s*(-?\d+))?\s*$', re.S)
_FEATURE = re.compile(r"^\s*(\S+)/(\d+)\s*(?:@\s*(-?\d+))?\s*$")


def token_id(model: HookedSAETransformer, text: str) -> int:
    """The one token ``text`` is in the model's tokenizer, or a ScopeError naming its pieces."""
    ids = model.to_tokens(text, prepend_bos=False)[0].tolist()
    if len(ids) != 1:
        pieces = [model.tokenizer.decode([i]) for i in ids]
        raise ScopeError(
            f"target {text!r} is {len(ids)} tokens in this tokenizer ({pieces}): give one token, "
            'e.g. " Paris" with its leading space'
        )
    return int(ids[0])


def parse_target(model: HookedSAETransformer, spec: str | None) -> Target:
    """Read a target as the CLI spells it:

    - nothing: the most likely next token's logit at the last position;
    - ``" Paris"`` (quotes keep spaces; ``@5`` picks a position): that token's logit;
    - ``logprob:" Paris"``: its log-probability;
    - ``" Yes" - " No"``: a logit difference;
    - ``L2.res.1k/17@5``: that feature's activation at position 5 (default: the last).
    """
    if spec is None or not spec.strip():
        return Target()
    text = spec.strip()
    kind = "logit"
    if text.startswith("logprob:"):
        kind, text = "logprob", text.removeprefix("logprob:")
    if m := _DIFF.match(text):
        if kind != "logit":
            raise ScopeError(f"target {spec!r}: logprob: takes one token, not a difference")
        pos = int(m.group(3)) if m.group(3) else -1
        return Target(
            kind="logit_diff",
            token=token_id(model, m.group(1)),
            other=token_id(model, m.group(2)),
            position=pos,
        )
    if m := _TOKEN.match(text):
        pos = int(m.group(2)) if m.group(2) else -1
        return Target(kind=kind, token=token_id(model, m.group(1)), position=pos)
    if kind == "logit" and (m := _FEATURE.match(text)):
        pos = int(m.group(3)) if m.group(3) else -1
        return Target(kind="feature", sae=m.group(1), feature=int(m.group(2)), position=pos)
    raise ScopeError(
        f"target {spec!r} is not understood: give a token in quotes ('\" Paris\"'), "
        '\'logprob:" Paris"\', a difference (\'" Yes" - " No"\') or a feature '
        "('L2.res.1k/17@5')"
    )


# ---------------------------------------------------------------- the frozen forward


@dataclass(kw_only=True)
class Frozen:
    """What one forward pass of the frozen model leaves to differentiate (batch of one)."""

    embed: torch.Tensor | None = None
    """The residual stream's input (blocks.0.hook_resid_pre) [1, pos, d_model], a leaf."""
    codes: list[torch.Tensor] = field(default_factory=list)
    """Per SAE: codes [1, pos, d_sae], zero at BOS and special tokens; their .grad is kept."""
    errors: list[torch.Tensor] = field(default_factory=list)
    """Per SAE: the held error term at its write hook [1, pos, d_out], a leaf."""
    inputs: list[torch.Tensor] = field(default_factory=list)
    """Per SAE: what it read [1, pos, d_in] (with gradient)."""
    resid: torch.Tensor | None = None
    """The normalised final residual stream (after ln_final) [1, pos, d_model]."""
    biases: list[torch.Tensor] = field(default_factory=list)
    """The bias parameters whose shares are counted (gradients on while attributing)."""
    held: dict[str, torch.Tensor] = field(default_factory=dict)
    """Every held pattern and normalisation scale, by hook name (``scope.replacement``)."""


def _check_saes(model: HookedSAETransformer, saes: Sequence[SAE]) -> None:
    writes: dict[str, int] = {}
    for i, sae in enumerate(saes):
        codec = codec_of(sae)
        layer, _ = hook_site(codec.write_hook)
        if layer is not None and layer >= model.cfg.n_layers:
            raise ScopeError(
                f"SAE at {codec.write_hook} is past the model's {model.cfg.n_layers} layers: "
                "pick an SAE trained on this model"
            )
        if codec.write_hook in writes:
            raise ScopeError(
                f"two SAEs write {codec.write_hook} (numbers {writes[codec.write_hook] + 1} and "
                f"{i + 1}): attribute with one SAE per hook"
            )
        writes[codec.write_hook] = i


@contextmanager
def gradients_for(model: HookedSAETransformer, saes: Sequence[SAE]) -> Iterator[list[Any]]:
    """Gradients off for every weight but the biases (whose shares are counted), restored
    after; the biases' .grad cleared."""
    modules = [model, *saes]
    saved = [(p, p.requires_grad) for m in modules for p in m.parameters()]
    biases = [
        p for m in modules for n, p in m.named_parameters() if n.rsplit(".", 1)[-1].startswith("b_")
    ]
    try:
        for p, _ in saved:
            p.requires_grad_(False)
        for p in biases:
            p.requires_grad_(True)
            p.grad = None
        yield biases
    finally:
        for p in biases:
            p.grad = None
        for p, flag in saved:
            p.requires_grad_(flag)


def frozen_hooks(
    model: HookedSAETransformer,
    saes: Sequence[SAE],
    tokens: Int[torch.Tensor, "1 pos"],
    run: Frozen,
    *,
    direct: bool,
) -> list[tuple[Any, Any]]:
    """Forward hooks that freeze patterns and scales, make the embedding a leaf, and splice
    each SAE as ``decode(codes) + held error``, filling ``run`` as the forward goes."""
    counted = counted_mask(model, tokens)[..., None]  # [1, pos, 1]
    read: dict[int, torch.Tensor] = {}
    run.codes = [torch.empty(0)] * len(saes)
    run.errors = [torch.empty(0)] * len(saes)
    run.inputs = [torch.empty(0)] * len(saes)

    def freeze(act: torch.Tensor, hook: Any) -> torch.Tensor:
        run.held[hook.name] = act.detach()
        return run.held[hook.name]

    def embed(act: torch.Tensor, hook: Any) -> torch.Tensor:
        run.embed = act.detach().requires_grad_(True)
        return run.embed

    def reader(i: int) -> Any:
        def fn(act: torch.Tensor, hook: Any) -> None:
            read[i] = site_input(act)

        return fn

    def writer(i: int) -> Any:
        sae = saes[i]
        transcoder = codec_of(sae).transcoder

        def fn(act: torch.Tensor, hook: Any) -> torch.Tensor:
            site = site_input(act)
            x = read.pop(i) if transcoder else site
            codes = encode(sae, x.detach() if direct else x) * counted.to(x.dtype)
            if direct:
                codes = codes.detach().requires_grad_(True)
            else:
                codes.retain_grad()
            out = decode(sae, codes, x).to(site.dtype)
            error = (site - out).detach().requires_grad_(True)
            run.codes[i], run.errors[i], run.inputs[i] = codes, error, x
            return (out + error).reshape(act.shape)

        return fn

    hooks: list[tuple[Any, Any]] = [
        (lambda name: name.endswith(("hook_pattern", "hook_scale")), freeze),
        ("blocks.0.hook_resid_pre", embed),
    ]
    for i, sae in enumerate(saes):
        codec = codec_of(sae)
        if codec.transcoder:
            hooks.append((codec.read_hook, reader(i)))
        hooks.append((codec.write_hook, writer(i)))
    return hooks


def frozen_forward(
    model: HookedSAETransformer,
    saes: Sequence[SAE],
    tokens: Int[torch.Tensor, "1 pos"],
    *,
    direct: bool,
    biases: list[torch.Tensor] | None = None,
) -> Frozen:
    """One forward pass of the frozen model (gradients on), to the normalised final residual
    stream. Call inside ``gradients_for`` so only what is wanted gets gradients."""
    _check_saes(model, saes)
    enable_hooks(model, [codec_of(s).read_hook for s in saes])
    run = Frozen(biases=biases or [])
    hooks = frozen_hooks(model, saes, tokens, run, direct=direct)
    with torch.enable_grad(), model.hooks(fwd_hooks=hooks):
        resid = model(tokens, stop_at_layer=model.cfg.n_layers)
        run.resid = model.ln_final(resid)
    return run


def frozen_logits(model: HookedSAETransformer, h: Float[torch.Tensor, "... d_model"]) -> Any:
    """Logits from the normalised residual ``h``, Gemma 2's soft cap held as its ratio
    ``cap(z) / z`` at these values: equal to the model's logits, linear in ``h``."""
    z = h @ model.unembed.W_U + model.unembed.b_U
    cap = float(model.cfg.output_logits_soft_cap or 0)
    if cap <= 0:
        return z
    zd = z.detach()
    ratio = torch.where(zd == 0, torch.ones_like(zd), cap * torch.tanh(zd / cap) / zd)
    return z * ratio


def _position(target: Target, n: int) -> int:
    pos = target.position + n if target.position < 0 else target.position
    if not 0 <= pos < n:
        raise ScopeError(
            f"target position {target.position} is outside the prompt's {n} tokens "
            f"(0..{n - 1}, or -1 for the last)"
        )
    return pos


def _target_value(
    model: HookedSAETransformer,
    saes: Sequence[SAE],
    keys: list[str],
    run: Frozen,
    target: Target,
    tokens: list[str],
) -> tuple[torch.Tensor, Explained]:
    pos = _position(target, len(tokens))
    if target.kind == "feature":
        if target.sae not in keys:
            raise ScopeError(f"target SAE {target.sae!r} is not among the SAEs given: {keys}")
        i = keys.index(target.sae)
        sae = saes[i]
        assert target.feature is not None
        if not 0 <= target.feature < sae.cfg.d_sae:
            raise ScopeError(
                f"target feature {target.feature} is out of range: {target.sae} has "
                f"features 0..{sae.cfg.d_sae - 1}"
            )
        x = run.inputs[i]
        value = encode(sae, x[:, pos : pos + 1])[0, 0, target.feature]
        resolved = Target(kind="feature", sae=target.sae, feature=target.feature, position=pos)
        label = f"{target.sae}/{target.feature} @ {pos} ({tokens[pos]!r})"
        return value, Explained(label=label, value=float(value.detach()), target=resolved)
    assert run.resid is not None
    logits = frozen_logits(model, run.resid[0, pos])
    token = target.token if target.token is not None else int(logits.argmax())
    piece = model.tokenizer.decode([token])
    if target.kind == "logit":
        value, label = logits[token], f"logit({piece!r}) @ {pos}"
    elif target.kind == "logprob":
        value, label = torch.log_softmax(logits, -1)[token], f"logprob({piece!r}) @ {pos}"
    else:
        assert target.other is not None
        other = model.tokenizer.decode([target.other])
        value = logits[token] - logits[target.other]
        label = f"logit({piece!r}) - logit({other!r}) @ {pos}"
    resolved = Target(kind=target.kind, token=token, other=target.other, position=pos)
    return value, Explained(label=label, value=float(value.detach()), target=resolved)


def prompt_tokens(model: HookedSAETransformer, prompt: str | torch.Tensor) -> torch.Tensor:
    """The prompt as [1, pos] token ids, BOS first (a tensor is taken as it is)."""
    if isinstance(prompt, torch.Tensor):
        return prompt.reshape(1, -1).to(model.cfg.device)
    from scope.inspect import text_tokens

    return text_tokens(model, prompt, "the prompt", "explain")


@torch.no_grad()
def measure(
    model: HookedSAETransformer,
    prompt: str | torch.Tensor,
    target: Target,
    saes: Sequence[SAE] = (),
) -> float:
    """The target's value in the model as it runs (with whatever hooks are attached, e.g.
    ``scope.steer.steering``): for checking how ablations move what was attributed. A
    feature target needs its SAE among ``saes`` (named by their short keys)."""
    tokens = prompt_tokens(model, prompt)
    pos = _position(target, tokens.shape[1])
    if target.kind == "feature":
        keys = sae_keys([sae_info(s) for s in saes])
        if target.sae not in keys:
            raise ScopeError(f"target SAE {target.sae!r} is not among the SAEs given: {keys}")
        sae = saes[keys.index(target.sae)]
        read = codec_of(sae).read_hook
        enable_hooks(model, [read])
        _, cache = model.run_with_cache(tokens, names_filter=read)
        return float(encode(sae, site_input(cache[read])[:, pos])[0, target.feature])
    logits = model(tokens)[0, pos].float()
    token = target.token if target.token is not None else int(logits.argmax())
    if target.kind == "logit":
        return float(logits[token])
    if target.kind == "logprob":
        return float(torch.log_softmax(logits, -1)[token])
    assert target.other is not None
    return float(logits[token] - logits[target.other])


def attribute(
    model: HookedSAETransformer,
    saes: Sequence[SAE],
    prompt: str | torch.Tensor,
    target: Target | str | None = None,
    *,
    direct: bool = False,
    keys: Sequence[str] | None = None,
) -> Attribution:
    """Each active feature's attribution to ``target`` on ``prompt``: activation x gradient in
    the frozen model (module docstring), and the shares of the error terms, the token
    embeddings and the biases. ``target`` is a ``Target``, a string as ``parse_target`` reads
    it, or None (the most likely next token's logit). ``keys`` names the SAEs (default: their
    short keys)."""
    if not saes:
        raise ScopeError("give at least one SAE to attribute to")
    names = list(keys) if keys is not None else sae_keys([sae_info(s) for s in saes])
    if not isinstance(target, Target):
        target = parse_target(model, target)
    tokens = prompt_tokens(model, prompt)
    pieces = [model.tokenizer.decode([t]) for t in tokens[0].tolist()]
    with gradients_for(model, saes) as biases:
        run = frozen_forward(model, saes, tokens, direct=direct, biases=biases)
        value, explained = _target_value(model, saes, names, run, target, pieces)
        value.backward()
        bias_share = float(sum((b.detach() * b.grad).sum() for b in biases if b.grad is not None))
    assert run.embed is not None and run.embed.grad is not None
    features, errors = [], []
    for codes, error in zip(run.codes, run.errors, strict=True):
        grad = codes.grad if codes.grad is not None else torch.zeros_like(codes)
        c = codes.detach()[0]
        pos, feat = torch.nonzero(c, as_tuple=True)
        share = (c * grad[0])[pos, feat]
        rows = torch.stack([pos.to(c.dtype), feat.to(c.dtype), c[pos, feat], share], dim=-1)
        features.append(rows.float().cpu())
        egrad = error.grad if error.grad is not None else torch.zeros_like(error)
        errors.append((error.detach() * egrad)[0].sum(-1).float().cpu())
    return Attribution(
        target=explained,
        tokens=pieces,
        keys=names,
        features=features,
        errors=errors,
        embeddings=(run.embed.detach() * run.embed.grad)[0].sum(-1).float().cpu(),
        biases=bias_share,
        direct=direct,
    )


__all__ = [
    "KINDS",
    "Attribution",
    "Explained",
    "Frozen",
    "Target",
    "attribute",
    "frozen_forward",
    "frozen_hooks",
    "frozen_logits",
    "gradients_for",
    "measure",
    "parse_target",
    "prompt_tokens",
    "token_id",
]
