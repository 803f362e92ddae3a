"""Full-text search over a store's explanations, labels and notes, ranked by BM25.

The index is SQLite's FTS5 (in Python's standard library, offline), built in memory from the
store's side tables at each query: thousands of rows index in milliseconds.
"""

from __future__ import annotations

import re
import sqlite3
from dataclasses import dataclass

from scope.store import Store


@dataclass(frozen=True, kw_only=True)
class Hit:
    """A feature whose explanation, label or notes match a query."""

    sae: str
    feature: int
    text: str
    """The matching text (an explanation, or label and notes)."""
    source: str
    """``explanation`` (with its explainer) or ``label``."""
    score: float
    """BM25 relevance: larger is better."""


def search(store: Store, query: str, limit: int = 50) -> list[Hit]:
    """Features whose explanations, labels or notes match the words of ``query`` (every word,
    any order, prefixes of the last word too), best first."""
    words = re.findall(r"\w+", query.lower())
    if not words:
        return []
    rows: list[tuple[str, int, str, str]] = []
    if "explanations" in store.views:
        rows += [
            (s, int(f), str(e), f"explanation ({x})")
            for s, f, e, x in store.sql(
                "select sae, feature, explanation, explainer from explanations"
            ).fetchall()
        ]
    if "labels" in store.views:
        rows += [
            (s, int(f), " · ".join(t for t in (lab, notes) if t), "label")
            for s, f, lab, notes in store.sql(
                "select sae, feature, label, notes from labels"
            ).fetchall()
        ]
    con = sqlite3.connect(":memory:")
    con.execute(
        "create virtual table docs using fts5(sae unindexed, feature unindexed, text, source unindexed)"
    )
    con.executemany("insert into docs values (?, ?, ?, ?)", rows)
    match = " ".join(f'"{w}"' for w in words[:-1]) + f' "{words[-1]}"*'
    found = con.execute(
        "select sae, feature, text, source, bm25(docs) from docs where docs match ? "
        "order by bm25(docs) limit ?",
        [match.strip(), limit * 4],
    ).fetchall()
    best: dict[tuple[str, int], Hit] = {}
    for sae, feature, text, source, rank in found:  # one hit per feature: its best text
        key = (sae, int(feature))
        if key not in best:
            best[key] = Hit(sae=sae, feature=int(feature), text=text, source=source, score=-rank)
    return list(best.values())[:limit]


__all__ = ["Hit", "search"]
