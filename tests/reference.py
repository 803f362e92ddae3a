"""Brute-force reference for recording: one window at a time through
run_with_cache_with_saes, statistics in float64 numpy with plain loops; and the check that a
store's tables equal it."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pytest
import torch

from scope.acts import enable_hooks
from scope.corpus import Windows
from scope.record.state import HIST_EDGES, SAMPLE_EDGES, sample_key
from scope.store import Store


@dataclass
class Reference:
    count: np.ndarray
    act_sum: np.ndarray
    act_sumsq: np.ndarray
    act_max: np.ndarray
    hist: dict[tuple[int, int], int]
    l0: dict[int, int]
    tokens: int
    top: dict[int, list[tuple[float, int, int, np.ndarray]]]  # f -> [(act, window, pos, acts)]
    samples: dict[tuple[int, int], list[tuple[int, int]]] = field(
        default_factory=dict
    )  # (f, bin) -> [(key, window)]


def reference(model, sae, windows: Windows, k: int, m: int) -> Reference:
    d = sae.cfg.d_sae
    meta = sae.cfg.metadata
    enable_hooks(model, [meta.hook_name])  # a transcoder may read hook_mlp_in
    # sae-lens attaches an SAE at its hook and a transcoder at its output hook
    hook = (meta.hook_name_out or meta.hook_name) + ".hook_sae_acts_post"
    special = set(model.tokenizer.all_special_ids)
    ref = Reference(np.zeros(d, np.int64), np.zeros(d), np.zeros(d), np.zeros(d), {}, {}, 0, {})
    cands: dict[int, list] = {f: [] for f in range(d)}
    samples: dict[tuple[int, int], list] = {}
    hist_edges, sample_edges = HIST_EDGES.numpy(), SAMPLE_EDGES.numpy()
    for w in range(len(windows)):
        n = int(windows.lengths[w])
        tokens = torch.tensor(windows.tokens[w, :n], dtype=torch.long)[None]
        with torch.no_grad():
            _, cache = model.run_with_cache_with_saes(
                tokens, saes=[sae], names_filter=lambda x: x == hook
            )
        acts = cache[hook][0].double().numpy()  # [n, d]
        counted = np.array([t not in special for t in tokens[0].tolist()])
        acts[~counted] = 0.0
        ref.tokens += int(counted.sum())
        for t in np.nonzero(counted)[0]:
            fired = np.nonzero(acts[t] > 0)[0]
            ref.l0[len(fired)] = ref.l0.get(len(fired), 0) + 1
            for f in fired:
                v = acts[t, f]
                ref.count[f] += 1
                ref.act_sum[f] += v
                ref.act_sumsq[f] += v * v
                ref.act_max[f] = max(ref.act_max[f], v)
                b = int(np.searchsorted(hist_edges, v, side="right"))
                ref.hist[(f, b)] = ref.hist.get((f, b), 0) + 1
        wid = int(windows.ids[w])  # (document index << 20) | chunk
        for f in np.nonzero(acts.max(0) > 0)[0]:
            pos = int(acts[:, f].argmax())
            cands[f].append((float(acts[pos, f]), wid, pos, acts[:, f].copy()))
            key = int(sample_key(torch.tensor([wid]), torch.tensor([int(f)]))[0])
            b = int(np.searchsorted(sample_edges, acts[pos, f], side="right"))
            samples.setdefault((int(f), b), []).append((key, wid))
    for f, c in cands.items():
        ref.top[f] = sorted(c, key=lambda x: (-x[0], x[1]))[:k]
    ref.samples = {slot: sorted(v)[:m] for slot, v in samples.items()}
    return ref


def assert_store_matches(store: Store, key: str, ref: Reference) -> None:
    """The store's tables for SAE ``key`` equal the reference: counts, histograms, L0s, tokens,
    top windows and samples exactly; means, maxima, stds and activations to float tolerance."""
    feats = store.sql(
        f"select count, mean, max, std from features where sae = '{key}' order by feature"
    ).fetchall()
    np.testing.assert_array_equal([r[0] for r in feats], ref.count)
    with np.errstate(invalid="ignore", divide="ignore"):
        ref_mean = np.where(ref.count > 0, ref.act_sum / ref.count, 0)
    np.testing.assert_allclose([r[1] for r in feats], ref_mean, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose([r[2] for r in feats], ref.act_max, rtol=1e-5, atol=1e-6)
    with np.errstate(invalid="ignore", divide="ignore"):
        ref_var = np.where(ref.count > 0, ref.act_sumsq / ref.count - ref_mean**2, 0)
    np.testing.assert_allclose(
        [r[3] for r in feats], np.sqrt(np.maximum(ref_var, 0)), rtol=1e-4, atol=1e-5
    )
    hist = {
        (f, b): c
        for f, b, c in store.sql(
            f"select feature, bin, count from hist where sae = '{key}'"
        ).fetchall()
    }
    assert hist == ref.hist
    l0 = dict(store.sql(f"select l0, count from l0 where sae = '{key}'").fetchall())
    assert l0 == ref.l0
    assert store.sql(f"select tokens from saes where sae = '{key}'").fetchall()[0][0] == ref.tokens
    rows = store.sql(
        f"select feature, rank, window_id, act, pos, acts from topk where sae = '{key}' order by feature, rank"
    ).fetchall()
    got: dict[int, list] = {}
    for f, _, w, act, pos, acts in rows:
        got.setdefault(f, []).append((act, w, pos, acts))
    for f, expected in ref.top.items():
        assert [g[1] for g in got.get(f, [])] == [e[1] for e in expected], f
        for g, e in zip(got.get(f, []), expected, strict=True):
            assert g[0] == pytest.approx(e[0], rel=1e-5) and g[2] == e[2]
            np.testing.assert_allclose(
                g[3], e[3], rtol=1e-5, atol=1e-5
            )  # every token of the window
    smp = store.sql(
        f"select feature, bin, key, window_id from samples where sae = '{key}' order by feature, bin, key"
    ).fetchall()
    got_s: dict[tuple[int, int], list] = {}
    for f, b, k, w in smp:
        got_s.setdefault((f, b), []).append((k, w))
    assert got_s == ref.samples
