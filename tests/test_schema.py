"""The store's format lives in scope.store.schema: what a recording writes, what the reader's
views give and what side-table writers add match it column for column, and the store stands
below generation and steering in the import graph."""

from __future__ import annotations

import ast
import subprocess
import sys
from dataclasses import fields
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from scope.store import Store, schema
from scope.store.schema import (
    EVALS,
    EXPERIMENTS,
    LABELS,
    LENS,
    N_INTERVALS,
    PER_INTERVAL,
    SNAPSHOT,
    VOCAB,
    WINDOWS,
    WINDOWS_GLOB,
)

ROOT = Path(__file__).resolve().parents[1]


def same_columns(got: pa.Schema, table: schema.Table) -> None:
    """The same names in the same order, of equal types (a list's item may be named
    ``element`` in Parquet: the type is the same)."""
    assert got.names == table.names, table.name
    for name, a, b in zip(got.names, got.types, table.columns.types, strict=True):
        assert a == b, f"{table.name}.{name}: {a} != {b}"


def test_a_recorded_store_is_what_the_schema_declares(app_store):
    store = Store(app_store)
    version = store.version
    for table in (*SNAPSHOT, schema.ACTIVATING):
        same_columns(pq.read_schema(version / table.file), table)
    for path in (version / LENS.name).glob("*.parquet"):
        same_columns(pq.read_schema(path), LENS)
    for path in (app_store / WINDOWS.name).glob(WINDOWS_GLOB):
        same_columns(pq.read_schema(path), WINDOWS)
    same_columns(pq.read_schema(app_store / VOCAB.file), VOCAB)
    # every view the reader makes is a declared table, and reads as declared
    assert store.views <= set(schema.TABLES)
    for name in store.views - {t.name for t in schema.SIDE}:
        same_columns(store.sql(f"select * from {name} limit 0").arrow().schema, schema.TABLES[name])


def test_intervals_follow_the_shared_constants(app_store):
    store = Store(app_store)
    rows = store.sql(
        "select interval, count(*) as n, max(act / f.max) as top from intervals i "
        "join features f using (sae, feature) group by sae, feature, interval"
    ).fetchall()
    assert rows and {i for i, _, _ in rows} <= set(range(N_INTERVALS))
    assert max(n for _, n, _ in rows) <= PER_INTERVAL
    for interval, _, top in rows:  # each window's max lies in its part of the feature's max
        assert top <= (interval + 1) / N_INTERVALS + 1e-6 or interval == N_INTERVALS - 1


def test_conform_orders_casts_and_refuses_undeclared_columns():
    rows = [{"updated": 1, "notes": "", "label": "x", "feature": 3, "sae": "L2.res.256"}]
    table = LABELS.from_rows(rows)
    same_columns(table.schema, LABELS)
    assert table.to_pylist() == [
        {"sae": "L2.res.256", "feature": 3, "label": "x", "notes": "", "updated": 1.0}
    ]
    same_columns(LABELS.from_rows([]).schema, LABELS)
    bad = {k: v for k, v in rows[0].items() if k != "updated"} | {"colour": "red"}
    with pytest.raises(ValueError, match=r"missing \['updated'\], unknown \['colour'\]"):
        LABELS.from_rows([bad])
    assert schema.CARDS.conform(pa.table({"any": [1]})).column_names == ["any"]


def test_side_table_writers_write_the_declared_columns():
    from scope.evals import EvalReport, EvalRow
    from scope.store.explanations import COLUMNS, Explanation
    from scope.sweep import SweepPoint

    numbers = {f.name: (0.5 if f.type == "float" else 1) for f in fields(EvalRow)}
    row = EvalRow(**{**numbers, "sae": "L2.res.256", "hook": "h", "sha256": "ab"})
    same_columns(EvalReport(rows=[row], corpus="c", corpus_paths=["a"]).table().schema, EVALS)
    assert {f.name for f in fields(SweepPoint)} <= set(EXPERIMENTS.names)
    assert COLUMNS == [f.name for f in fields(Explanation)] == schema.EXPLANATIONS.names


GENERATION = ("scope.generate", "scope.sweep", "scope.steer", "scope.steer_spec", "scope.serve")


def test_the_store_imports_nothing_that_generates_or_steers():
    # at import time, whatever the import order (a fresh interpreter)
    code = (
        "import sys, scope.store, scope.store.schema, scope.store.explore;"
        f"print([m for m in sys.modules if m.startswith({GENERATION!r})])"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=ROOT, check=True)  # fmt: skip
    assert out.stdout.strip() == "[]", out.stderr
    # and in any function (an import inside a body runs only when called)
    allowed = ("scope.store", "scope.errors", "scope.identity")
    for path in sorted((ROOT / "scope" / "store").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            else:
                continue
            for name in names:
                if name == "scope" or name.startswith("scope."):
                    assert name.startswith(allowed), f"{path.name} imports {name}"
