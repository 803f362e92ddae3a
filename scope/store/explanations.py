"""The ``explanations`` side table: one row per explanation of a feature, with its scores.

``scope explain`` writes it (``scope.explain``); the feature page, ``scope feature``,
``Store.feature`` and search read it. ``search_text`` ranks features by the words of their
explanations, labels and notes: SQLite's FTS5 (Python's standard library, offline) with BM25,
an index built in memory at each query (thousands of rows take milliseconds). A feature keeps one explanation per explainer and method
(the newest), shown best first.
"""

from __future__ import annotations

import re
import sqlite3
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING

from scope.store.schema import EXPLANATIONS, LABELS

if TYPE_CHECKING:
    from scope.store.reader import Store


@dataclass(frozen=True, kw_only=True)
class Explanation:
    """One explanation of a feature, with its scores."""

    sae: str
    feature: int
    explanation: str
    explainer: str
    """Who wrote it: ``http:<url>#<model>`` or ``local:<model>``."""
    scorer: str
    method: str
    prompt_hash: str
    """sha256 of the prompt, the explainer and the settings: the same inputs, the same hash."""
    detection: float | None
    """Balanced accuracy of "does this text contain it?" on held-out and non-activating
    windows (0.5 is chance)."""
    fuzzing: float | None
    """Balanced accuracy of "are the marked tokens where it fires?" (0.5 is chance)."""
    n_pos: int
    """Held-out activating windows scored."""
    n_neg: int
    """Non-activating windows scored."""
    n_shown: int
    hard_negatives: int
    """Of the negatives, how many came from the nearest features' top windows."""
    unreadable: int
    """Scorer answers that were neither Yes nor No (counted as wrong)."""
    created: float

    @property
    def score(self) -> float:
        """The mean of the scores there are (0 when none)."""
        got = [s for s in (self.detection, self.fuzzing) if s is not None]
        return sum(got) / len(got) if got else 0.0


COLUMNS = [f.name for f in fields(Explanation)]
assert EXPLANATIONS.names == COLUMNS, "scope.store.schema.EXPLANATIONS and Explanation disagree"


def feature_explanations(store: Store, key: str, feature: int) -> list[Explanation]:
    """A feature's explanations, the newest per explainer and method, best score first."""
    if EXPLANATIONS.name not in store.views:
        return []
    rows = store.sql(
        f"""select {", ".join(COLUMNS)} from explanations where sae = ? and feature = ?
            qualify row_number() over (partition by explainer, method order by created desc) = 1""",
        [key, feature],
    ).fetchall()
    found = [Explanation(**dict(zip(COLUMNS, r, strict=True))) for r in rows]
    return sorted(found, key=lambda e: -e.score)


def best_explanation_sql(store: Store) -> str:
    """SQL giving (sae, feature, explanation): each explained feature's best-scored one."""
    if EXPLANATIONS.name not in store.views:
        return "select null::varchar as sae, null::integer as feature, null::varchar as explanation where false"
    return (
        "select sae, feature, arg_max(explanation, coalesce(detection, 0) + coalesce(fuzzing, 0)) "
        "as explanation from explanations group by sae, feature"
    )


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


def search_text(store: Store, query: str, limit: int = 50) -> list[Hit]:
    """Features whose explanations, labels or notes match the words of ``query`` (every word,
    any order, prefixes of the last word too), best first."""
    words = re.findall(r"\w+", query.lower())
    if not words:
        return []
    rows: list[tuple[str, int, str, str]] = []
    if EXPLANATIONS.name in store.views:
        rows += [
            (s, int(f), str(e), f"explanation ({x})")
            for s, f, e, x in store.sql(
                "select sae, feature, explanation, explainer from explanations"
            ).fetchall()
        ]
    if LABELS.name in store.views:
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


__all__ = [
    "COLUMNS",
    "Explanation",
    "Hit",
    "best_explanation_sql",
    "feature_explanations",
    "search_text",
]
