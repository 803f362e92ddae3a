"""Which features fire on a text: each token with its strongest features across SAEs, from the
one activation path (``scope.acts``). BOS and other special tokens are never shown."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from jaxtyping import Int

from scope.acts import sae_acts
from scope.errors import ScopeError
from scope.identity import sae_info, sae_key, sae_keys

if TYPE_CHECKING:
    from sae_lens import SAE, HookedSAETransformer

    from scope.store import Store


@dataclass(frozen=True, kw_only=True)
class FeatureHit:
    """One feature firing on one token."""

    sae: str
    """The SAE's key (the store's own key when a store is given)."""
    feature: int
    act: float

    @property
    def address(self) -> str:
        return f"{self.sae}/{self.feature}"


@dataclass(frozen=True, kw_only=True)
class TokenFeatures:
    """A token of the text and the features firing on it, strongest first."""

    position: int
    """Position in the tokens (BOS is 0 and never shown)."""
    token: str
    features: list[FeatureHit]


@dataclass(frozen=True, kw_only=True)
class TextActivations:
    """Every feature of every SAE on every token of a text (one forward pass)."""

    tokens: list[str]
    """The text's tokens, BOS first."""
    keys: list[str]
    """Each SAE's key (the store's own when a store was given)."""
    codes: list[torch.Tensor]
    """Per SAE: feature activations [pos, d_sae] (fp32, CPU)."""
    counted: list[int]
    """Positions shown: BOS and other special tokens excluded."""

    def strip(self, sae: str, feature: int) -> list[float]:
        """One feature's activation on every token (a heat strip over the text)."""
        return self.codes[self.keys.index(sae)][:, feature].tolist()


def text_tokens(
    model: HookedSAETransformer, text: str, what: str = "the text", to: str = "inspect"
) -> Int[torch.Tensor, "1 pos"]:
    """``text`` as [1, pos] token ids, BOS first, as recorded; refuses an empty text or one
    longer than the model's context (``what`` names it in the error, ``to`` says what for)."""
    if not text.strip():
        raise ScopeError(f"{what} is empty: give some text to {to}")
    tokens = model.to_tokens(text, prepend_bos=True, truncate=False)
    if tokens.shape[1] > model.cfg.n_ctx:
        raise ScopeError(
            f"{what} is {tokens.shape[1]} tokens, more than the context of "
            f"{model.cfg.model_name} ({model.cfg.n_ctx}): shorten it"
        )
    return tokens


@torch.no_grad()
def activations(
    model: HookedSAETransformer, saes: Sequence[SAE], text: str, *, store: Store | None = None
) -> TextActivations:
    """Run ``text`` (BOS first, as recorded) through the model and every SAE once."""
    tokens = text_tokens(model, text, "the text", "inspect")
    if store is not None:
        keys = [sae_key(s, store.saes) for s in saes]
    else:
        keys = sae_keys([sae_info(s) for s in saes])
    out = sae_acts(model, list(saes), tokens)
    ids = tokens[0].tolist()
    return TextActivations(
        tokens=[model.tokenizer.decode([i]) for i in ids],
        keys=keys,
        codes=[c[0].float().cpu() for c in out.codes],
        counted=torch.nonzero(out.counted[0]).flatten().tolist(),
    )


def top_features(
    acts: TextActivations, *, top: int = 5, hide: Mapping[str, set[int]] | None = None
) -> list[TokenFeatures]:
    """Each counted token with its ``top`` features across SAEs by activation, leaving out the
    features in ``hide`` (SAE key -> indices, e.g. the store's dense features)."""
    if top < 1:
        raise ScopeError(f"--top {top} must be at least 1")
    codes = torch.cat(acts.codes, dim=-1)  # [pos, sum of d_sae]
    widths = [c.shape[-1] for c in acts.codes]
    first = [sum(widths[:i]) for i in range(len(widths))]
    if hide:
        codes = codes.clone()
        for i, key in enumerate(acts.keys):
            if hide.get(key):
                codes[:, [first[i] + f for f in hide[key]]] = 0
    owner = torch.cat([torch.full((w,), i) for i, w in enumerate(widths)])
    values, index = codes.topk(min(top, codes.shape[-1]), dim=-1)
    rows = []
    for pos in acts.counted:
        hits = [
            FeatureHit(
                sae=acts.keys[int(owner[j])], feature=int(j) - first[int(owner[j])], act=float(v)
            )
            for v, j in zip(values[pos], index[pos], strict=True)
            if v > 0
        ]
        rows.append(TokenFeatures(position=pos, token=acts.tokens[pos], features=hits))
    return rows


def inspect(
    model: HookedSAETransformer,
    saes: Sequence[SAE],
    text: str,
    *,
    top: int = 5,
    store: Store | None = None,
) -> list[TokenFeatures]:
    """Every counted token of ``text`` (BOS first, as recorded) with its ``top`` features
    across ``saes`` by activation. With a ``store``, SAEs are named by the store's keys."""
    if top < 1:
        raise ScopeError(f"--top {top} must be at least 1")
    return top_features(activations(model, saes, text, store=store), top=top)


__all__ = [
    "FeatureHit",
    "TextActivations",
    "TokenFeatures",
    "activations",
    "inspect",
    "top_features",
]
