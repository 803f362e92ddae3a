"""The ``explanations`` side table: one row per explanation of a feature, with its scores.

``scope explain`` writes it (``scope.explain``); the feature page, ``scope feature``,
``Store.feature`` and search read it. A feature keeps one explanation per explainer and method
(the newest), shown best first.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import TYPE_CHECKING

import pyarrow as pa

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


SCHEMA = pa.schema(
    [("sae", pa.string()), ("feature", pa.int32()), ("explanation", pa.string()),
     ("explainer", pa.string()), ("scorer", pa.string()), ("method", pa.string()),
     ("prompt_hash", pa.string()), ("detection", pa.float64()), ("fuzzing", pa.float64()),
     ("n_pos", pa.int32()), ("n_neg", pa.int32()), ("n_shown", pa.int32()),
     ("hard_negatives", pa.int32()), ("unreadable", pa.int32()), ("created", pa.float64())]
)  # fmt: skip
COLUMNS = [f.name for f in fields(Explanation)]
assert SCHEMA.names == COLUMNS


def feature_explanations(store: Store, key: str, feature: int) -> list[Explanation]:
    """A feature's explanations, the newest per explainer and method, best score first."""
    if "explanations" not in store.views:
        return []
    rows = store.sql(
        f"""select {", ".join(COLUMNS)} from explanations where sae = ? and feature = ?
            qualify row_number() over (partition by explainer, method order by created desc) = 1""",
        [key, feature],
    ).fetchall()
    found = [Explanation(**dict(zip(COLUMNS, r, strict=True))) for r in rows]
    return sorted(found, key=lambda e: -e.score)


__all__ = ["COLUMNS", "SCHEMA", "Explanation", "feature_explanations"]
