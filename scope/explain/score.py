"""Which examples an explainer sees, which ones score it, and the scores.

For a feature, its store rows give the windows:

- shown to the explainer: the even ranks of its top-k windows and half of each interval's
  random windows (every fifth of its activation range);
- held out for scoring (never shown): the odd ranks and the other interval windows, so the
  positives span the activation range;
- non-activating: as many stretches of text as there are positives, each the longest run of
  tokens of a window on which the feature is exactly 0 (at least ``MIN_QUIET`` tokens, cut to
  an example's length): hard negatives from the top windows of its nearest features by decoder
  cosine (``lens.neighbours``), the rest from windows drawn at random from the store.

Every window's per-token activations are computed again through the model and the SAE (the
one forward -> encode path, ``scope.acts.sae_acts``): exact values, and a negative is checked
to be one. Scores are balanced accuracies: the mean of the fraction of positives answered Yes
and of negatives answered No; an unreadable answer counts as wrong.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from scope.acts import sae_acts
from scope.explain.prompts import CONTEXT, Shown, detection_question, fuzzing_question, window

if TYPE_CHECKING:
    from scope.store import Store


@dataclass(frozen=True, kw_only=True)
class Sets:
    """One feature's examples, split."""

    shown: list[Shown]
    """Given to the explainer, strongest first."""
    positives: list[Shown]
    """Held out: activating windows across the range."""
    negatives: list[Shown]
    """Windows where the feature is 0 everywhere (hard ones first)."""
    shown_ids: list[int]
    positive_ids: list[int]
    negative_ids: list[int]
    negative_spans: list[tuple[int, int]]
    """Where each negative lies in its window's tokens (BOS and specials left out)."""
    hard: int
    """How many negatives came from the nearest features' top windows."""


@dataclass(frozen=True, kw_only=True)
class Score:
    """A balanced accuracy and what it was counted over."""

    accuracy: float | None
    """(TPR + TNR) / 2; None when there was nothing to score."""
    n_pos: int
    n_neg: int
    unreadable: int


def balanced_accuracy(labels: Sequence[bool], answers: Sequence[bool | None]) -> Score:
    """Balanced accuracy of ``answers`` against ``labels``; an unreadable answer is wrong."""
    pos = [a is True for lab, a in zip(labels, answers, strict=True) if lab]
    neg = [a is False for lab, a in zip(labels, answers, strict=True) if not lab]
    unreadable = sum(a is None for a in answers)
    if not pos or not neg:
        return Score(accuracy=None, n_pos=len(pos), n_neg=len(neg), unreadable=unreadable)
    acc = 0.5 * (sum(pos) / len(pos) + sum(neg) / len(neg))
    return Score(accuracy=acc, n_pos=len(pos), n_neg=len(neg), unreadable=unreadable)


@torch.no_grad()
def window_acts(
    store: Store, model: Any, sae: Any, feature: int, ids: Sequence[int], batch: int = 16
) -> dict[int, Shown]:
    """The feature on every token of each window, recomputed; BOS and specials left out."""
    if not ids:
        return {}
    rows = store.sql(
        "select window_id, tokens from windows where window_id in (select unnest(?))", [list(ids)]
    ).fetchall()
    found = {int(w): list(t) for w, t in rows}
    device = next(model.parameters()).device
    out: dict[int, Shown] = {}
    order = [i for i in ids if i in found]
    for start in range(0, len(order), batch):
        chunk = order[start : start + batch]
        width = max(len(found[w]) for w in chunk)
        tokens = torch.zeros(len(chunk), width, dtype=torch.long)
        for r, w in enumerate(chunk):
            tokens[r, : len(found[w])] = torch.tensor(found[w])
        lengths = torch.tensor([len(found[w]) for w in chunk])
        got = sae_acts(model, [sae], tokens.to(device), lengths.to(device))
        acts = got.codes[0][..., feature].float().cpu()
        counted = got.counted.cpu()
        for r, w in enumerate(chunk):
            keep = [i for i in range(len(found[w])) if counted[r, i]]
            text = store.tokens_text([found[w][i] for i in keep])
            out[w] = Shown(tokens=text, acts=[float(acts[r, i]) for i in keep])
    return out


def split(
    store: Store, model: Any, sae: Any, key: str, feature: int, n_shown: int, seed: int = 0
) -> Sets:
    """The feature's shown, held-out and non-activating windows (see the module docstring)."""
    top = [
        int(w)
        for (w,) in store.sql(
            "select window_id from topk where sae = ? and feature = ? order by rank",
            [key, feature],
        ).fetchall()
    ]
    inter = store.sql(
        "select interval, window_id from intervals where sae = ? and feature = ? "
        "order by interval desc, act desc",
        [key, feature],
    ).fetchall()
    by_interval: dict[int, list[int]] = {}
    for interval, w in inter:
        by_interval.setdefault(int(interval), []).append(int(w))
    shown_ids = top[0::2] + [w for ws in by_interval.values() for w in ws[0::2]]
    shown_ids = list(dict.fromkeys(shown_ids))[:n_shown]
    held = top[1::2] + [w for ws in by_interval.values() for w in ws[1::2]]
    positive_ids = [w for w in dict.fromkeys(held) if w not in set(shown_ids)]
    acts = window_acts(store, model, sae, feature, shown_ids + positive_ids)
    shown = [window(acts[w].tokens, acts[w].acts) for w in shown_ids if w in acts]
    positives = [window(acts[w].tokens, acts[w].acts) for w in positive_ids if w in acts]

    # non-activating windows: the nearest features' top windows first, then random ones
    rng = random.Random(f"{seed}:{key}:{feature}")
    lens = store.sql(
        "select neighbours from lens where sae = ? and feature = ?", [key, feature]
    ).fetchall()
    near = [int(n) for n in (lens[0][0] or [])] if lens else []
    hard_pool = [
        int(w)
        for (w,) in store.sql(
            "select distinct window_id from topk where sae = ? and feature in "
            "(select unnest(?)) order by window_id",
            [key, near],
        ).fetchall()
    ] if near else []  # fmt: skip
    used = set(shown_ids) | set(positive_ids) | set(top)
    hard_pool = [w for w in hard_pool if w not in used]
    rng.shuffle(hard_pool)
    want = len(positives)
    negatives: list[Shown] = []
    negative_ids: list[int] = []
    spans: list[tuple[int, int]] = []
    hard = 0
    for pool, is_hard in (
        (hard_pool[: 4 * want], True),
        (_random_windows(store, rng, used, 4 * want), False),
    ):
        got = window_acts(store, model, sae, feature, pool)
        for w in pool:
            if len(negatives) >= want or (is_hard and hard >= (want + 1) // 2):
                break
            span = quiet_span(got[w].acts) if w in got else None
            if span is not None:
                lo, hi = span
                negatives.append(Shown(tokens=got[w].tokens[lo:hi], acts=got[w].acts[lo:hi]))
                negative_ids.append(w)
                spans.append(span)
                hard += is_hard
                used.add(w)
    return Sets(
        shown=shown, positives=positives, negatives=negatives, shown_ids=shown_ids,
        positive_ids=[w for w in positive_ids if w in acts], negative_ids=negative_ids,
        negative_spans=spans, hard=hard,
    )  # fmt: skip


MIN_QUIET = 8
"""The fewest tokens a non-activating example has."""


def quiet_span(acts: Sequence[float]) -> tuple[int, int] | None:
    """The longest run of tokens where the feature is 0, cut to an example's length, or None
    when it is shorter than MIN_QUIET."""
    best, start = (0, 0), None
    for i, a in enumerate([*acts, 1.0]):  # a sentinel closes the last run
        if a == 0.0 and start is None:
            start = i
        elif a != 0.0 and start is not None:
            if i - start > best[1] - best[0]:
                best = (start, i)
            start = None
    lo, hi = best
    if hi - lo < MIN_QUIET:
        return None
    return lo, min(hi, lo + 2 * CONTEXT + 1)


def _random_windows(store: Store, rng: random.Random, used: set[int], n: int) -> list[int]:
    ids = [int(w) for (w,) in store.sql("select window_id from windows").fetchall()]
    pool = [w for w in ids if w not in used]
    return rng.sample(pool, min(n, len(pool)))


def detection(explainer: Any, explanation: str, sets: Sets) -> Score:
    """Does each held-out positive and each negative contain the feature?"""
    examples = [(ex, True) for ex in sets.positives] + [(ex, False) for ex in sets.negatives]
    answers = explainer.judge([detection_question(explanation, ex) for ex, _ in examples])
    return balanced_accuracy([lab for _, lab in examples], answers)


def fuzzing(explainer: Any, explanation: str, sets: Sets, seed: int = 0) -> Score:
    """Are the marked tokens where the feature fires? Each held-out positive marked where it
    fires (Yes) and at as many random tokens where it does not (No)."""
    rng = random.Random(seed)
    questions, labels = [], []
    for ex in sets.positives:
        fired = [a > 0 for a in ex.acts]
        quiet = [i for i, a in enumerate(ex.acts) if a <= 0]
        if not any(fired) or not quiet:
            continue
        wrong = set(rng.sample(quiet, min(sum(fired), len(quiet))))
        questions += [
            fuzzing_question(explanation, ex, fired),
            fuzzing_question(explanation, ex, [i in wrong for i in range(len(ex.acts))]),
        ]
        labels += [True, False]
    answers = explainer.judge(questions) if questions else []
    return balanced_accuracy(labels, answers)


__all__ = ["Score", "Sets", "balanced_accuracy", "detection", "fuzzing", "split", "window_acts"]
