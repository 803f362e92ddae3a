"""Turn recording state into the store's Parquet tables, and per-SAE tables that depend only
on the SAE and the model (logit lens, decoder neighbours)."""

from __future__ import annotations

import gc
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import torch

from scope.codec import codec_of
from scope.identity import hook_site
from scope.record.state import HIST_EDGES, SAMPLE_EDGES, FeatureState

if TYPE_CHECKING:
    from sae_lens import SAE, HookedSAETransformer

LENS_K = 10
NEIGHBOURS_K = 10
CHUNK = 1024


def bin_bounds(edges: torch.Tensor, index: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Lower and upper activation bound of bin ``index`` (bin 0 is below the first edge)."""
    e = np.concatenate([[0.0], edges.numpy(), [np.inf]])
    return e[index], e[index + 1]


def feature_table(sae: str, st: FeatureState, dense_threshold: float) -> pa.Table:
    count = st.count.cpu().numpy()
    tokens = max(int(st.tokens.item()), 1)
    with np.errstate(divide="ignore", invalid="ignore"):
        mean = np.where(count > 0, st.act_sum.cpu().numpy() / count, 0.0)
        var = np.where(count > 0, st.act_sumsq.cpu().numpy() / count - mean**2, 0.0)
    density = count / tokens
    return pa.table(
        {
            "sae": pa.array([sae] * len(count), pa.string()),
            "feature": np.arange(len(count), dtype=np.int32),
            "count": count,
            "density": density,
            "max": st.act_max.cpu().numpy(),
            "mean": mean,
            "std": np.sqrt(np.maximum(var, 0.0)),
            "dead": count == 0,
            "dense": density > dense_threshold,
        }
    )


@dataclass(frozen=True)
class WindowLengths:
    """Each recorded window's length, by id (ids are sparse: document << 20 | chunk)."""

    ids: np.ndarray
    """[n] int64, sorted."""
    lengths: np.ndarray
    """[n] int32."""

    def of(self, window: np.ndarray) -> np.ndarray:
        """The lengths of the windows ``window`` (ids that are in the store)."""
        return self.lengths[np.searchsorted(self.ids, window)]


def topk_table(sae: str, st: FeatureState, lengths: WindowLengths) -> pa.Table:
    """One row per (feature, rank): the window, its max, where, and the per-token acts. Ranks
    order each feature's slots by max activation, then by window id (lower first)."""
    win = st.top_win.cpu().numpy()
    act_all = st.top_act.cpu().numpy()
    f, j = np.nonzero(win >= 0)
    order = np.lexsort((win[f, j], -act_all[f, j], f))
    f, j = f[order], j[order]
    starts = np.searchsorted(f, f, side="left")
    rank = np.arange(len(f)) - starts
    w = win[f, j]
    acts = st.top_acts.cpu().numpy()[f, j]  # [n, T]
    n = lengths.of(w)
    flat = acts[np.arange(acts.shape[1]) < n[:, None]]  # each window's own tokens, row by row
    offsets = np.concatenate([[0], np.cumsum(n)]).astype(np.int32)
    return pa.table(
        {
            "sae": pa.array([sae] * len(f), pa.string()),
            "feature": f.astype(np.int32),
            "rank": rank.astype(np.int32),
            "window_id": w,
            "act": act_all[f, j],
            "pos": st.top_pos.cpu().numpy()[f, j].astype(np.int32),
            "acts": pa.ListArray.from_arrays(pa.array(offsets), pa.array(flat, pa.float32())),
        }
    )


def samples_table(sae: str, st: FeatureState) -> pa.Table:
    key, win = st.smp_key.cpu().numpy(), st.smp_win.cpu().numpy()
    f, b, j = np.nonzero(win >= 0)
    lo, hi = bin_bounds(SAMPLE_EDGES, b)
    return pa.table(
        {
            "sae": pa.array([sae] * len(f), pa.string()),
            "feature": f.astype(np.int32),
            "bin": b.astype(np.int16),
            "bin_lo": lo,
            "bin_hi": hi,
            "key": key[f, b, j],
            "window_id": win[f, b, j],
            "pos": st.smp_pos.cpu().numpy()[f, b, j].astype(np.int32),
            "act": st.smp_act.cpu().numpy()[f, b, j],
        }
    )


def hist_table(sae: str, st: FeatureState) -> pa.Table:
    hist = st.hist.cpu().numpy()
    f, b = np.nonzero(hist)
    lo, hi = bin_bounds(HIST_EDGES, b)
    return pa.table(
        {
            "sae": pa.array([sae] * len(f), pa.string()),
            "feature": f.astype(np.int32),
            "bin": b.astype(np.int16),
            "lo": lo,
            "hi": hi,
            "count": hist[f, b],
        }
    )


def l0_table(sae: str, st: FeatureState) -> pa.Table:
    hist = st.l0_hist.cpu().numpy()
    (l0,) = np.nonzero(hist)
    return pa.table(
        {
            "sae": pa.array([sae] * len(l0), pa.string()),
            "l0": l0.astype(np.int32),
            "count": hist[l0],
        }
    )


def sae_summary(sae: str, st: FeatureState, dense_threshold: float) -> dict[str, Any]:
    hist = st.l0_hist.cpu().double()
    tokens = int(st.tokens.item())
    mean_l0 = float((hist * torch.arange(len(hist))).sum() / max(tokens, 1))
    density = st.count.cpu().double() / max(tokens, 1)
    return {
        "sae": sae,
        "tokens": tokens,
        "mean_l0": mean_l0,
        "dead": int((st.count == 0).sum()),
        "dense": int((density > dense_threshold).sum()),
        "d_sae": st.d_sae,
    }


@torch.no_grad()
def written_directions(sae: SAE, model: HookedSAETransformer) -> torch.Tensor:
    """What each feature writes into the residual stream [d_sae, d_model]: its decoder row (a
    transcoder's, into its output hook), or for an attention SAE (which writes z,
    [heads x d_head]) that row through the layer's W_O.
    The logit lens is this times W_U."""
    w_dec = sae.W_dec.detach()
    layer, site = hook_site(codec_of(sae).write_hook)  # a transcoder writes its output hook
    if site != "att":
        return w_dec
    w_o = model.blocks[layer].attn.W_O.detach().to(w_dec.dtype)  # [heads, d_head, d_model]
    return torch.einsum("fhd,hdm->fm", w_dec.reshape(-1, *w_o.shape[:2]), w_o)


@torch.no_grad()
def lens_table(sae_key: str, sae: SAE, model: HookedSAETransformer) -> pa.Table:
    """Per feature: top and bottom tokens of W_dec @ W_U, and nearest features by decoder
    cosine. Chunked over features so the [features, vocab] product never exists whole."""
    w_dec = sae.W_dec.detach()
    w_out = written_directions(sae, model)
    w_u = model.W_U.detach().to(w_dec.dtype)
    unit = w_dec.float() / w_dec.float().norm(dim=-1, keepdim=True).clamp(min=1e-12)
    n = w_dec.shape[0]
    k_nb = min(NEIGHBOURS_K, n - 1)
    out: dict[str, list[torch.Tensor]] = {name: [] for name in ("ti", "tv", "bi", "bv", "ni", "nv")}
    for start in range(0, n, CHUNK):
        chunk = slice(start, min(start + CHUNK, n))
        logits = (w_out[chunk] @ w_u).float()  # [chunk, vocab]
        for (i, v), largest in ((("ti", "tv"), True), (("bi", "bv"), False)):
            found = logits.topk(LENS_K, dim=-1, largest=largest)
            out[i].append(found.indices)
            out[v].append(found.values)
        cos = unit[chunk] @ unit.T  # [chunk, d_sae]
        cos[torch.arange(cos.shape[0]), torch.arange(chunk.start, chunk.stop)] = -2.0  # not itself
        near = cos.topk(k_nb, dim=-1)
        out["ni"].append(near.indices)
        out["nv"].append(near.values)
    # kept on the device until the end: one copy to the host per column, not per chunk
    cat = {name: torch.cat(parts).cpu().numpy() for name, parts in out.items()}
    return pa.table(
        {
            "sae": pa.array([sae_key] * n, pa.string()),
            "feature": np.arange(n, dtype=np.int32),
            "top_ids": _lists(cat["ti"].astype(np.int32)),
            "top_logits": _lists(cat["tv"]),
            "bottom_ids": _lists(cat["bi"].astype(np.int32)),
            "bottom_logits": _lists(cat["bv"]),
            "neighbours": _lists(cat["ni"].astype(np.int32)),
            "neighbour_cos": _lists(cat["nv"]),
        }
    )


def _lists(matrix: np.ndarray) -> pa.Array:
    rows, cols = matrix.shape
    offsets = pa.array(np.arange(0, rows * cols + 1, cols, dtype=np.int32))
    return pa.ListArray.from_arrays(offsets, pa.array(matrix.reshape(-1)))


BYTE_PIECE = re.compile(r"<0x[0-9A-Fa-f]{2}>")
"""A byte-fallback token's piece (SentencePiece, Gemma)."""


def vocab_table(tokenizer: Any, d_vocab: int) -> pa.Table:
    """Every token id's piece and its text, so readers need no tokenizer."""
    ids = list(range(d_vocab))
    fast = getattr(tokenizer, "backend_tokenizer", None)
    gc_was_on = gc.isenabled()
    gc.disable()  # 256k one-token lists would set off collections of the whole heap (0.5 s)
    try:
        if fast is not None:  # the Rust tokenizer decodes 256k single tokens in parallel
            pieces: list[str | None] = [None] * d_vocab
            for piece, i in fast.get_vocab(with_added_tokens=True).items():
                if i < d_vocab:
                    pieces[i] = piece
            texts = fast.decode_batch([[i] for i in ids], skip_special_tokens=False)
        else:
            pieces = tokenizer.convert_ids_to_tokens(ids)
            texts = tokenizer.batch_decode([[i] for i in ids])
    finally:
        if gc_was_on:
            gc.enable()
    # a lone byte of a multi-byte character decodes to U+FFFD: show the byte itself (<0xC2>)
    texts = [
        p if t == "\ufffd" and p and BYTE_PIECE.fullmatch(p) else t
        for p, t in zip(pieces, texts, strict=True)
    ]
    return pa.table(
        {
            "token": np.arange(d_vocab, dtype=np.int32),
            "piece": pa.array([p if p is not None else "" for p in pieces], pa.string()),
            "text": pa.array(texts, pa.string()),
        }
    )
