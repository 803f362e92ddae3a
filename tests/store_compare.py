"""Two stores compared table by table, to the bit."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from scope import ScopeError
from scope.record import record
from scope.store import Store

TABLES = [
    ("features", "sae, feature"),
    ("topk", "sae, feature, rank"),
    ("hist", "sae, feature, bin"),
    ("samples", "sae, feature, bin, key"),
    ("intervals", "sae, feature, interval, window_id"),
    ("l0", "sae, l0"),
    ("saes", "sae"),
    ("lens", "sae, feature"),
    ("windows", "window_id"),
]


def stopped_then_resumed(model: Any, saes: Any, spec: Any, store: Path, settings: Any) -> None:
    """Record into ``store`` stopped as the third batch is asked for (the stop request's
    message checked), then resume it to the end, with the same settings."""
    asked: list[int] = []

    def stop_at_third() -> str | None:
        asked.append(1)
        return "a test" if len(asked) == 3 else None

    with pytest.raises(ScopeError, match="stopped by a test after 12/"):
        record(model, saes, spec, store, settings, should_stop=stop_at_third)
    record(model, saes, spec, store, settings, resume=True)


def assert_identical(a: Path, b: Path) -> None:
    """Every table of the two stores holds the same rows, floats equal to the last bit."""
    sa, sb = Store(a), Store(b)
    for name, order in TABLES:
        ta = sa.sql(f"select * from {name} order by {order}").fetchall()
        tb = sb.sql(f"select * from {name} order by {order}").fetchall()
        assert ta, f"{name} is empty: the comparison would be vacuous"
        assert len(ta) == len(tb), f"{name}: {len(ta)} rows vs {len(tb)}"
        for ra, rb in zip(ta, tb, strict=True):
            assert ra == rb, f"{name} differs: {ra} vs {rb}"
