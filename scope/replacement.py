"""The frozen replacement model as a linear map, and its rows by batched backward passes.

With attention patterns and normalisation scales held at the prompt's values (``scope.attribute``)
and every MLP replaced by a transcoder whose codes and error terms are held, the residual stream
is linear in what the sources write: each layer's attention is ``post(W_O pattern W_V ln1(x))``
with every norm a fixed per-position scale, and each transcoder adds only its skip term
``W_skip read(x)`` to what it passes on. ``Replacement.rows`` computes the direct effect of every
source (each active feature, each error term, each token embedding) on a batch of targets (a
feature's pre-activation or a vector read from the final normalised residual stream) by running
that linear map's transpose down the layers, many targets at once: what ``torch.autograd.grad``
over the frozen model computes row by row (``scope.attribute`` with ``direct=True``), as one
matrix product per weight and layer for the whole batch. Each target joins at its own layer (the
batch is sorted by layer, so only targets already joined are carried) and only the positions up
to the batch's last target are carried (attention looks back only).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch
from jaxtyping import Float, Int

from scope.attribute import Frozen
from scope.codec import codec_of
from scope.errors import ScopeError

if TYPE_CHECKING:
    from sae_lens import SAE, HookedSAETransformer

_RMS = ("RMSNorm", "RMSNormPre")
_LN = ("LayerNorm", "LayerNormPre")
_MID = ("hook_mlp_in", "hook_resid_mid")
_NORMED = ("ln2.hook_normalized", "ln2.hook_out")
"""A transcoder's read after the pre-MLP norm: before its weight, or after it (the MLP's input
exactly, ``scope.identity.MLP_INPUT``, what Gemma Scope's transcoders and ``scope train`` read)."""
_REFUSED_FLAGS = ("parallel_attn_mlp", "use_split_qkv_input", "use_attn_in", "attn_only")


class _Norm:
    """A normalisation with its scale held: ``x -> center?(x) / scale * w``, transposed."""

    def __init__(self, module: Any, scale: torch.Tensor | None, name: str) -> None:
        kind = type(module).__name__
        if kind == "Identity":
            self.scale = None
        elif kind in _RMS + _LN:
            if scale is None:
                raise ScopeError(f"{name}: its scale was not held in the frozen forward")
            self.scale = scale.reshape(-1, 1)  # [pos, 1]
        else:
            raise ScopeError(f"{name} is a {kind}: attribution graphs know RMS and layer norms")
        self.center = kind in _LN
        w = getattr(module, "w", None)
        self.w = w.detach() if isinstance(w, torch.Tensor) else None

    def t(
        self, g: torch.Tensor, *, weight: bool = True, at: torch.Tensor | None = None
    ) -> torch.Tensor:
        """The transpose applied to ``g`` [..., pos, d], or to ``g`` [k, d] at positions
        ``at`` [k] (``weight=False``: up to ``hook_normalized``, before the weight)."""
        if self.scale is None:
            return g
        if weight and self.w is not None:
            g = g * self.w
        g = g / (self.scale[at] if at is not None else self.scale[: g.shape[-2]])
        return g - g.mean(-1, keepdim=True) if self.center else g


class _Layer:
    """One block's transposed pieces: attention (with its norms) and the transcoder's skip."""

    def __init__(self, model: Any, sae: SAE, held: dict[str, torch.Tensor], n: int) -> None:
        block, cfg = model.blocks[n], model.cfg
        name = f"blocks.{n}"
        self.ln1 = _Norm(block.ln1, held.get(f"{name}.ln1.hook_scale"), f"{name}.ln1")
        post = getattr(block, "ln1_post", None) if cfg.use_normalization_before_and_after else None
        self.post = (
            _Norm(post, held.get(f"{name}.ln1_post.hook_scale"), f"{name}.ln1_post")
            if post is not None
            else None
        )
        pattern = held.get(f"{name}.attn.hook_pattern")
        if pattern is None:
            raise ScopeError(f"{name}: its attention pattern was not held in the frozen forward")
        self.pattern = pattern[0].transpose(-1, -2)  # [heads, key, query]
        attn = block.attn
        grouped = hasattr(attn, "_W_V") and not cfg.ungroup_grouped_query_attention
        w_v = (attn._W_V if grouped else attn.W_V).detach()  # [kv heads, d_model, d_head]
        self.n_heads, self.kv = int(attn.W_O.shape[0]), int(w_v.shape[0])
        self.d_head = int(w_v.shape[-1])
        self.w_o = attn.W_O.detach().reshape(-1, attn.W_O.shape[-1])  # [heads * d_head, d_model]
        self.w_v = w_v.transpose(1, 2).reshape(-1, w_v.shape[1])  # [kv * d_head, d_model]
        codec = codec_of(sae)
        read = codec.read_hook.removeprefix(f"{name}.")
        if codec.write_hook != f"{name}.hook_mlp_out" or read not in (*_MID, *_NORMED):
            raise ScopeError(
                f"transcoder {codec.read_hook} -> {codec.write_hook}: attribution graphs take "
                f"transcoders reading {name}.hook_mlp_in (or ln2.hook_normalized, or "
                f"ln2.hook_out) and writing {name}.hook_mlp_out"
            )
        self.read = (
            None if read in _MID else _Norm(block.ln2, held.get(f"{name}.ln2.hook_scale"), read)
        )
        self.read_weight = read == "ln2.hook_out"  # after the norm's weight, not before it
        skip = getattr(sae, "W_skip", None)
        self.skip = skip.detach() if codec.skip and skip is not None else None  # [d_out, d_in]

    def read_t(self, g: torch.Tensor, at: torch.Tensor | None = None) -> torch.Tensor:
        """From the transcoder's input back to the residual stream it was read from."""
        return g if self.read is None else self.read.t(g, weight=self.read_weight, at=at)

    def skip_t(self, g: torch.Tensor) -> torch.Tensor:
        """``g`` at the MLP's output -> at the residual stream before it (the skip path)."""
        return g if self.skip is None else g + self.read_t(g @ self.skip)

    def attention_t(self, g: torch.Tensor) -> torch.Tensor:
        """``g`` after the attention's residual add -> before it."""
        b, p, _ = g.shape
        out = g if self.post is None else self.post.t(g)
        gz = (out.reshape(b * p, -1) @ self.w_o.T).reshape(b, p, self.n_heads, self.d_head)
        gv = self.pattern[:, :p, :p] @ gz.transpose(1, 2)  # [b, heads, key, d_head]
        gv = gv.reshape(b, self.kv, self.n_heads // self.kv, p, self.d_head).sum(2)
        gx = gv.permute(0, 2, 1, 3).reshape(b * p, -1) @ self.w_v
        return g + self.ln1.t(gx.reshape(b, p, -1))


class Replacement:
    """The frozen replacement model of one prompt (``run``: ``scope.attribute.frozen_forward``
    with ``direct=True`` over ``saes``, a transcoder per layer in layer order): the sources'
    columns are the active features (layer by layer, in ``located`` order), then the error
    terms (layer-major, by position), then the token embeddings (by position)."""

    def __init__(
        self,
        model: HookedSAETransformer,
        saes: Sequence[SAE],
        run: Frozen,
        located: list[Int[torch.Tensor, "n 2"]],
    ) -> None:
        cfg = model.cfg
        refused = [f for f in _REFUSED_FLAGS if getattr(cfg, f, False)]
        if refused or getattr(cfg, "clip_qkv", None) is not None:
            raise ScopeError(
                f"attribution graphs need blocks of attention then MLP on the residual stream; "
                f"this model sets {refused or ['clip_qkv']}"
            )
        if cfg.original_architecture in ("Olmo2ForCausalLM", "Olmo3ForCausalLM"):
            raise ScopeError("attribution graphs do not handle post-norm (OLMo 2/3) blocks")
        assert run.embed is not None
        self.layers = [_Layer(model, sae, run.held, n) for n, sae in enumerate(saes)]
        self.final = _Norm(model.ln_final, run.held.get("ln_final.hook_scale"), "ln_final")
        self.n_pos = int(run.embed.shape[1])
        self.embed = run.embed.detach()[0]
        self.errors = [e.detach()[0] for e in run.errors]
        self.located = located
        counts = [len(p) for p in located]
        self.offsets = torch.tensor([0, *counts]).cumsum(0).tolist()
        self.n_features = self.offsets[-1]
        self.n_sources = self.n_features + (len(saes) + 1) * self.n_pos
        # per layer and position: the columns of its active features and their decoder rows
        # times their activations
        self.cells: list[list[tuple[int, int, torch.Tensor]]] = []
        for n, (p, sae) in enumerate(zip(located, saes, strict=True)):
            acts = run.codes[n].detach()[0][p[:, 0], p[:, 1]]
            rows = sae.W_dec.detach()[p[:, 1]] * acts[:, None]  # [n_L, d_out]
            per_pos = torch.bincount(p[:, 0], minlength=self.n_pos).tolist()
            start, cells = 0, []
            for pos, k in enumerate(per_pos):
                if k:
                    cells.append((pos, self.offsets[n] + start, rows[start : start + k].T))
                start += k
            self.cells.append(cells)

    def rows(
        self,
        layers: Int[torch.Tensor, " b"],
        positions: Int[torch.Tensor, " b"],
        vectors: Float[torch.Tensor, "b d"],
    ) -> Float[torch.Tensor, "b sources"]:
        """Each target's direct effects: target ``i`` reads ``vectors[i]`` from layer
        ``layers[i]``'s transcoder input at ``positions[i]`` (a feature's encoder column), or,
        where ``layers[i]`` is the number of layers, from the final normalised residual stream
        (an unembedding column)."""
        order = layers.argsort(descending=True, stable=True)
        layers, positions, vectors = layers[order], positions[order], vectors[order]
        b, n_layers = len(layers), len(self.layers)
        p = int(positions.max()) + 1
        out = torch.zeros(b, self.n_sources, dtype=vectors.dtype, device=vectors.device)
        g = torch.zeros(b, p, vectors.shape[-1], dtype=vectors.dtype, device=vectors.device)
        rows = torch.arange(b, device=vectors.device)
        top = layers == n_layers
        g[rows[top], positions[top]] = self.final.t(vectors[top], at=positions[top])
        errors_at = self.n_features
        for n in range(n_layers - 1, -1, -1):
            live = int((layers > n).sum())  # targets above this layer (a prefix: sorted)
            layer = self.layers[n]
            if live:
                h = g[:live]
                for pos, col, dec in self.cells[n]:
                    if pos < p:
                        out[:live, col : col + dec.shape[1]] = h[:, pos] @ dec
                col = errors_at + n * self.n_pos
                out[:live, col : col + p] = (h * self.errors[n][:p]).sum(-1)
                g[:live] = layer.skip_t(h)
            here = (layers == n).nonzero().flatten()
            if len(here):
                g[here, positions[here]] += layer.read_t(vectors[here], at=positions[here])
            live = int((layers >= n).sum())
            if live:
                g[:live] = layer.attention_t(g[:live])
        col = errors_at + n_layers * self.n_pos
        out[:, col : col + p] = (g * self.embed[:p]).sum(-1)
        unsorted = torch.empty_like(out)
        unsorted[order] = out
        return unsorted


__all__ = ["Replacement"]
