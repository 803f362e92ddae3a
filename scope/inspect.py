"""Which features fire on a text: each token with its strongest features across SAEs, from the
one activation path (``scope.acts``). BOS and other special tokens are never shown."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from scope.acts import sae_acts
from scope.errors import ScopeError
from scope.identity import sae_info, sae_key, sae_keys

if TYPE_CHECKING:
    from sae_lens import SAE, HookedSAETransformer


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


@torch.no_grad()
def inspect(
    model: HookedSAETransformer,
    saes: Sequence[SAE],
    text: str,
    *,
    top: int = 5,
    store: Any = None,
) -> list[TokenFeatures]:
    """Every counted token of ``text`` (BOS first, as recorded) with its ``top`` features
    across ``saes`` by activation. With a ``store``, SAEs are named by the store's keys."""
    if not text.strip():
        raise ScopeError("the text is empty: give some text to inspect")
    if top < 1:
        raise ScopeError(f"--top {top} must be at least 1")
    tokens = model.to_tokens(text, prepend_bos=True, truncate=False)
    if tokens.shape[1] > model.cfg.n_ctx:
        raise ScopeError(
            f"the text is {tokens.shape[1]} tokens, more than the context of "
            f"{model.cfg.model_name} ({model.cfg.n_ctx}): shorten it"
        )
    if store is not None:
        keys = [sae_key(s, store.saes) for s in saes]
    else:
        keys = sae_keys([sae_info(s) for s in saes])
    out = sae_acts(model, list(saes), tokens)
    codes = torch.cat(out.codes, dim=-1)[0].float()  # [pos, sum of d_sae]
    owner = torch.cat([torch.full((c.shape[-1],), i) for i, c in enumerate(out.codes)])
    first = torch.tensor([0] + [c.shape[-1] for c in out.codes]).cumsum(0)
    k = min(top, codes.shape[-1])
    values, index = codes.topk(k, dim=-1)
    ids = tokens[0].tolist()
    rows = []
    for pos in torch.nonzero(out.counted[0]).flatten().tolist():
        hits = [
            FeatureHit(sae=keys[int(owner[j])], feature=int(j - first[owner[j]]), act=float(v))
            for v, j in zip(values[pos], index[pos], strict=True)
            if v > 0
        ]
        rows.append(
            TokenFeatures(position=pos, token=model.tokenizer.decode([ids[pos]]), features=hits)
        )
    return rows


__all__ = ["FeatureHit", "TokenFeatures", "inspect"]
