"""Reading a store: DuckDB views over one snapshot's Parquet tables, one connection per thread.

A ``Store`` pins the snapshot its manifest named when it was opened (or last refreshed), so
every query sees one consistent state while a recording goes on; ``refresh()`` moves to the
newest. Streamlit serves each session on its own thread: each thread gets its own DuckDB
connection (a connection is not safe to share between threads).
"""

from __future__ import annotations

import re
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq

from scope.errors import ScopeError, closest
from scope.identity import SAEInfo, recorded_key
from scope.store.explanations import feature_explanations
from scope.store.manifest import Manifest, read_manifest
from scope.store.schema import (
    ACTIVATING,
    FEATURES,
    INTERVALS,
    LABELS,
    LENS,
    SAMPLES,
    SIDE_TABLES,
    SNAPSHOT,
    TOPK,
    VOCAB,
    WINDOWS,
    WINDOWS_GLOB,
    activating_query,
    intervals_query,
    sql_files,
    sql_string,
)
from scope.store.view import Example, FeatureView

if TYPE_CHECKING:
    from sae_lens import SAE


def natural(key: str) -> list[tuple[int, int, str]]:
    """A sort key that puts L3.res.4k before L9.res.4k before L15.res.4k (numbers as numbers)."""
    return [(0, int(p), "") if p.isdigit() else (1, 0, p) for p in re.split(r"(\d+)", key)]


READ_ONLY = {"SELECT", "EXPLAIN"}


def check_read_only(con: duckdb.DuckDBPyConnection, query: str) -> None:
    """Refuse an empty query, or any statement that is not a query."""
    try:
        statements = con.extract_statements(query)
    except duckdb.Error as err:
        raise ScopeError(f"query failed: {err}") from err
    if not statements:
        raise ScopeError("the query is empty: give a SELECT, e.g. select * from saes")
    for st in statements:
        kind = st.type.name
        if kind not in READ_ONLY:
            raise ScopeError(
                f"{kind} statements are refused: a store is read-only to queries. Use "
                "SELECT (or WITH, DESCRIBE, SUMMARIZE, EXPLAIN); to export rows, use "
                "`scope sql ... --csv FILE` or `--json`"
            )


class Rows:
    """A query's result, fetched whole: ``.fetchall()``, ``.fetchone()``, ``.df()``,
    ``.arrow()``, ``.columns``; printing shows a table."""

    def __init__(self, table: pa.Table) -> None:
        self.table = table

    @property
    def columns(self) -> list[str]:
        return list(self.table.column_names)

    def __len__(self) -> int:
        return self.table.num_rows

    def fetchall(self) -> list[tuple[Any, ...]]:
        return list(zip(*(c.to_pylist() for c in self.table.columns), strict=True))

    def fetchone(self) -> tuple[Any, ...] | None:
        rows = Rows(self.table.slice(0, 1)).fetchall()
        return rows[0] if rows else None

    def arrow(self) -> pa.Table:
        return self.table

    def df(self) -> Any:
        """A pandas DataFrame."""
        return self.table.to_pandas()

    def __str__(self) -> str:
        return str(duckdb.connect().from_arrow(self.table))

    __repr__ = __str__


class Store:
    """A recorded store, opened read-only. ``Store("runs/wiki").feature("L12.res.16k/1234")``.

    Safe to use from many threads, and while a recording writes the store."""

    def __init__(self, path: str | Path) -> None:
        self.root = Path(path).expanduser().resolve()  # the views and the allowed folder agree
        self._local = threading.local()
        self._lock = threading.Lock()
        self._connections: dict[int, duckdb.DuckDBPyConnection] = {}  # every thread's
        self._generation = 0  # bumped by refresh() and close(): threads reconnect lazily
        self._vocab: list[str] | None = None
        self.manifest, self.version = self._open()
        self._side = self._side_files()

    def _open(self) -> tuple[Manifest, Path]:
        manifest = read_manifest(self.root)
        if manifest is None:
            raise ScopeError(
                f"{self.root} is not a store (no manifest.json): record one with `scope record`"
            )
        if not manifest.tables_version:
            part = manifest.parts[-1] if manifest.parts else None
            done = f" ({part.next}/{part.windows} windows so far)" if part else ""
            raise ScopeError(
                f"{self.root} has no finished snapshot yet: its first recording is still running or "
                f"was interrupted{done}; finish it with `scope record ... --resume`"
            )
        return manifest, self.root / manifest.tables_version

    def refresh(self) -> bool:
        """Move to the newest snapshot (and side tables written since); True if it changed.
        Each thread moves at its next query: a query running meanwhile in another thread
        finishes on the snapshot it started with."""
        manifest, version = self._open()
        side = self._side_files()
        changed = version != self.version
        if changed or side != self._side:
            with self._lock:
                self.manifest, self.version, self._side = manifest, version, side
                self._generation += 1
        return changed

    def _side_files(self) -> tuple[str, ...]:
        """The side tables' files now: a new one (a first label, a sweep) needs new views."""
        return tuple(
            str(p) for name in SIDE_TABLES for p in sorted((self.root / name).glob("*.parquet"))
        )

    def close(self) -> None:
        """Close every thread's connection; the next query opens a fresh one."""
        with self._lock:
            for con in self._connections.values():
                con.close()
            self._connections.clear()
            self._generation += 1

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def con(self) -> duckdb.DuckDBPyConnection:
        """This thread's connection, with the views of the current snapshot."""
        mine = getattr(self._local, "con", None)
        if mine is not None and self._local.generation == self._generation:
            return mine
        with self._lock:
            if mine is not None:  # made for an older snapshot: only this thread uses it
                self._connections.pop(id(mine), None)
                mine.close()
            generation = self._generation
        con = self._connect()
        with self._lock:
            self._connections[id(con)] = con
        self._local.con, self._local.generation = con, generation
        return con

    def _connect(self) -> duckdb.DuckDBPyConnection:
        con = duckdb.connect()
        version = self.version

        def view(name: str, source: str) -> None:
            con.execute(f"create view {name} as select * from {source}")

        def parquet(path: Path) -> str:
            return f"read_parquet({sql_string(str(path))})"

        for table in SNAPSHOT:
            view(table.name, parquet(version / table.file))
        lens = sql_files(version / LENS.name, "*.parquet")
        view(LENS.name, f"read_parquet({lens}, union_by_name=true)")
        view(WINDOWS.name, f"read_parquet({sql_files(self.root / WINDOWS.name, WINDOWS_GLOB)})")
        view(VOCAB.name, parquet(self.root / VOCAB.file))
        if (version / ACTIVATING.file).is_file():
            view(ACTIVATING.name, parquet(version / ACTIVATING.file))
        else:  # recorded before the table was written at the end of a recording
            query = activating_query(TOPK.name, WINDOWS.name, VOCAB.name)
            con.execute(f"create view {ACTIVATING.name} as {query}")
        for name in SIDE_TABLES:  # present once written; refresh() picks up files added later
            files = sql_files(self.root / name, "*.parquet")
            if files is not None:
                view(name, f"read_parquet({files}, union_by_name=true)")
        con.execute(
            f"create view {INTERVALS.name} as {intervals_query(SAMPLES.name, FEATURES.name)}"
        )
        # readers read the store and nothing else (DuckDB resolves the views' files at query
        # time, so the store's folder stays allowed); what may run is checked in ``sql``
        con.execute("set allowed_directories = [?]", [str(self.root)])
        con.execute("set enable_external_access = false")
        con.execute("set lock_configuration = true")
        return con

    @property
    def views(self) -> set[str]:
        """The tables this store has now (side tables appear once something wrote them)."""
        rows = self.con.execute("select view_name from duckdb_views() where not internal")
        return {name for (name,) in rows.fetchall()}

    @property
    def saes(self) -> dict[str, SAEInfo]:
        """SAE key -> identity (release, id, hook, width, sha256, Neuronpedia id), keys in
        natural order (L3.res.4k, L9.res.4k, L15.res.4k)."""
        return {k: self.manifest.saes[k] for k in sorted(self.manifest.saes, key=natural)}

    def key_of(self, sae: SAE) -> str | None:
        """The key this store recorded ``sae`` under (found by its weights), or None."""
        return recorded_key(sae, self.manifest.saes)

    def sql(self, query: str, params: list[Any] | None = None) -> Rows:
        """Run a read-only query (SELECT, WITH, DESCRIBE, SUMMARIZE, EXPLAIN...) over the
        tables above and fetch the result whole. Statements that could write (COPY, ATTACH,
        EXPORT, CREATE, SET, ...) are refused: the store is read-only to readers, and files
        outside it cannot be read."""
        try:
            check_read_only(self.con, query)
            relation = self.con.sql(query, params=params)
            return Rows(relation.to_arrow_table() if relation is not None else pa.table({}))
        except duckdb.IOException as err:
            if not self.version.is_dir():
                raise ScopeError(
                    f"the snapshot {self.version.name} of {self.root} was replaced by a newer "
                    "recording and removed: call refresh() (or open the Store again)"
                ) from err
            raise ScopeError(f"could not read {self.root}: {err}") from err
        except duckdb.Error as err:
            raise ScopeError(f"query failed: {err}") from err

    def _parse(self, address: str) -> tuple[str, int]:
        key, _, index = address.rpartition("/")
        saes = self.manifest.saes
        if not key and address in saes:
            raise ScopeError(f"feature {address!r} has no index: give SAE/INDEX, e.g. {address}/0")
        if key not in saes:
            near = closest(key, list(saes))
            raise ScopeError(
                f"feature {address!r}: no SAE {key!r} in this store (it has "
                f"{', '.join(saes)}){'; did you mean ' + near[0] if near else ''}"
            )
        d_sae = saes[key].d_sae
        if not index.isdigit():
            raise ScopeError(
                f"feature {address!r}: the index {index!r} is not a number; give 0..{d_sae - 1}"
            )
        if not 0 <= int(index) < d_sae:
            raise ScopeError(f"feature {address!r}: index must be 0..{d_sae - 1} for {key}")
        return key, int(index)

    def tokens_text(self, ids: list[int]) -> list[str]:
        """Token ids as text, from the store's own vocabulary (no tokenizer needed)."""
        if self._vocab is None:
            rows = self.sql("select text from vocab order by token").fetchall()
            self._vocab = [text or "" for (text,) in rows]
        return [self._vocab[i] if 0 <= i < len(self._vocab) else "" for i in ids]

    def _examples(self, rows: list[tuple[Any, ...]], with_acts: bool) -> list[Example]:
        return [
            Example(
                window=window_id,
                doc=doc,
                offset=offset,
                act=act,
                pos=pos,
                tokens=self.tokens_text(list(token_ids)),
                acts=list(acts) if with_acts else None,
            )  # fmt: skip
            for window_id, act, pos, acts, doc, offset, token_ids in rows
        ]

    def label(self, key: str, feature: int) -> tuple[str, str]:
        """(label, notes) of a feature, read fresh from the labels side table (edits made
        after this Store was opened show at once); empty strings when it has none."""
        path = self.root / LABELS.name / LABELS.file
        if not path.is_file():
            return "", ""
        table = pq.read_table(
            path, filters=[("sae", "=", key), ("feature", "=", feature)], columns=["label", "notes"]
        )
        if table.num_rows == 0:
            return "", ""
        return table["label"][0].as_py() or "", table["notes"][0].as_py() or ""

    def feature(self, address: str) -> FeatureView:
        """Stats, top examples, interval examples, histogram, logit lens and neighbours."""
        key, f = self._parse(address)
        args = [key, f]
        stats = self.sql(
            "select count, density, max, mean, std from features where sae = ? and feature = ?",
            args,
        ).fetchall()[0]
        top = self.sql(
            """select k.window_id, k.act, k.pos, k.acts, w.doc, w.offset, w.tokens
                from topk k join windows w using (window_id) where k.sae = ? and k.feature = ?
                order by k.rank""",
            args,
        ).fetchall()
        inter = self.sql(
            """select i.interval, i.window_id, i.act, i.pos, null, w.doc, w.offset, w.tokens
                from intervals i join windows w using (window_id) where i.sae = ? and i.feature = ?
                order by i.interval desc, i.act desc""",
            args,
        ).fetchall()
        intervals: dict[int, list[Example]] = {}
        for row in inter:
            intervals.setdefault(row[0], []).extend(self._examples([row[1:]], with_acts=False))
        hist = self.sql(
            "select lo, hi, count from hist where sae = ? and feature = ? order by bin", args
        ).fetchall()
        found = self.sql("select * from lens where sae = ? and feature = ?", args)
        rows = found.fetchall()
        lens: dict[str, Any] = dict(zip(found.columns, rows[0], strict=True)) if rows else {}
        np_id = self.manifest.saes[key].neuronpedia_id

        def pairs(a: str, b: str, text: bool = False) -> list[Any]:
            first = lens.get(a) or []
            names = self.tokens_text(first) if text else first
            return list(zip(names, lens.get(b) or [], strict=True))

        label, notes = self.label(key, f)
        return FeatureView(
            sae=key,
            index=f,
            count=stats[0],
            density=stats[1],
            max=stats[2],
            mean=stats[3],
            std=stats[4],
            top=self._examples(top, with_acts=True),
            intervals=intervals,
            histogram=[(lo, hi, c) for lo, hi, c in hist],
            top_tokens=pairs("top_ids", "top_logits", text=True),
            bottom_tokens=pairs("bottom_ids", "bottom_logits", text=True),
            neighbours=pairs("neighbours", "neighbour_cos"),
            neuronpedia_url=f"https://www.neuronpedia.org/{np_id}/{f}" if np_id else None,
            label=label,
            notes=notes,
            explanations=tuple(feature_explanations(self, key, f)),
        )


__all__ = ["Rows", "Store", "check_read_only", "natural"]
