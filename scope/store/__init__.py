"""Read a recorded store: per-feature views and SQL over its Parquet tables with DuckDB.

Tables (each has an ``sae`` column holding the SAE's short key, e.g. ``L12.res.16k``):

- ``features``: feature, count, density, max, mean, std (of its activation where it fires),
  dead, dense
- ``topk``: feature, rank, window_id, act (the window's max), pos (where), acts (per token)
- ``intervals``: feature, interval (0-4: fifths of the feature's max), window_id, pos, act;
  five random windows per interval
- ``samples``: the raw stratified sample ``intervals`` is drawn from
- ``hist``: feature, bin, lo, hi, count (log-spaced bins of the activation)
- ``l0``: l0, count (tokens by number of firing features)
- ``saes``: sae, tokens, mean_l0, dead, dense, d_sae
- ``lens``: feature, top_ids, top_logits, bottom_ids, bottom_logits (logit lens
  W_dec @ W_U), neighbours, neighbour_cos (nearest features by decoder cosine)
- ``windows``: window_id, part, doc, offset, n_tokens, tokens
- ``vocab``: token, piece, text
- ``experiments``: steering sweeps saved into the store (experiment, strength, mode, sae,
  target_act, text_act, kl, loss, text, ...), once there is one
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import duckdb

from scope.errors import ScopeError, closest
from scope.store.files import read_manifest

INTERVALS = 5
PER_INTERVAL = 5


@dataclass(frozen=True)
class Example:
    """A window shown for a feature: its text, where it came from and the activations."""

    window: int
    doc: str
    offset: int
    act: float
    pos: int
    tokens: list[str]
    acts: list[float] | None
    """The feature on every token (top examples); None for interval examples."""


@dataclass(frozen=True)
class FeatureView:
    """Everything the store knows about one feature."""

    sae: str
    index: int
    count: int
    density: float
    max: float
    mean: float
    std: float
    top: list[Example]
    intervals: dict[int, list[Example]]
    histogram: list[tuple[float, float, int]]
    top_tokens: list[tuple[str, float]]
    bottom_tokens: list[tuple[str, float]]
    neighbours: list[tuple[int, float]]
    neuronpedia_url: str | None


class Store:
    """A recorded store, opened read-only. ``Store("runs/wiki").feature("L12.res.16k/1234")``."""

    def __init__(self, path: str | Path) -> None:
        self.root = Path(path)
        manifest = read_manifest(self.root)
        if manifest is None:
            raise ScopeError(
                f"{self.root} is not a store (no manifest.json): record one with `scope record`"
            )
        if not manifest.get("tables_version"):
            part = manifest["parts"][-1] if manifest.get("parts") else None
            done = f" ({part['next']}/{part['windows']} windows so far)" if part else ""
            raise ScopeError(
                f"{self.root} has no finished snapshot yet: its first recording is still running or "
                f"was interrupted{done}; finish it with `scope record ... --resume`"
            )
        self.manifest = manifest
        self.version = self.root / manifest["tables_version"]
        self.con = duckdb.connect()
        self._vocab: list[str] | None = None
        for name in ("features", "topk", "samples", "hist", "l0", "saes"):
            self._view(name, f"read_parquet('{self.version / name}.parquet')")
        self._view("lens", f"read_parquet('{self.version}/lens/*.parquet', union_by_name=true)")
        self._view("windows", f"read_parquet('{self.root}/windows/part-*.parquet')")
        self._view("vocab", f"read_parquet('{self.root}/vocab.parquet')")
        if any((self.root / "experiments").glob("*.parquet")):  # steering sweeps saved here
            self._view(
                "experiments",
                f"read_parquet('{self.root}/experiments/*.parquet', union_by_name=true)",
            )
        self.con.execute(f"""
            create view intervals as
            select sae, feature, interval, window_id, pos, act from (
              select *, row_number() over (partition by sae, feature, interval order by key) as n
              from (select s.*, least(floor(s.act / f.max * {INTERVALS}), {INTERVALS - 1})::int
                           as interval
                    from samples s join features f using (sae, feature) where f.max > 0))
            where n <= {PER_INTERVAL}""")

    def _view(self, name: str, source: str) -> None:
        self.con.execute(f"create view {name} as select * from {source}")

    @property
    def saes(self) -> dict[str, dict[str, Any]]:
        """SAE key -> identity (release, id, hook, width, hashes, Neuronpedia id)."""
        return dict(self.manifest["saes"])

    def sql(self, query: str, params: list[Any] | None = None) -> duckdb.DuckDBPyRelation:
        """Run SQL over the tables above; ``.df()``, ``.fetchall()`` or ``.arrow()`` the result."""
        try:
            return self.con.sql(query, params=params)
        except duckdb.IOException as err:
            raise ScopeError(
                f"this snapshot of {self.root} was replaced by a newer recording and removed: open the Store again ({err})"
            ) from err
        except duckdb.Error as err:
            raise ScopeError(f"query failed: {err}") from err

    def _parse(self, address: str) -> tuple[str, int]:
        key, _, index = address.rpartition("/")
        if key not in self.manifest["saes"]:
            near = closest(key, list(self.manifest["saes"]))
            raise ScopeError(
                f"feature {address!r}: no SAE {key!r} in this store (it has "
                f"{', '.join(self.manifest['saes'])}){'; did you mean ' + near[0] if near else ''}"
            )
        d_sae = self.manifest["saes"][key]["d_sae"]
        if not index.isdigit() or not 0 <= int(index) < d_sae:
            raise ScopeError(f"feature {address!r}: index must be 0..{d_sae - 1} for {key}")
        return key, int(index)

    def _examples(self, rows: list[tuple], with_acts: bool) -> list[Example]:
        out = []
        for window_id, act, pos, acts, doc, offset, token_ids in rows:
            out.append(
                Example(
                    window=window_id,
                    doc=doc,
                    offset=offset,
                    act=act,
                    pos=pos,
                    tokens=self.tokens_text(list(token_ids)),
                    acts=list(acts) if with_acts else None,
                )
            )
        return out

    def tokens_text(self, ids: list[int]) -> list[str]:
        """Token ids as text, from the store's own vocabulary (no tokenizer needed)."""
        if self._vocab is None:
            rows = self.con.execute("select text from vocab order by token").fetchall()
            self._vocab = [text or "" for (text,) in rows]
        return [self._vocab[i] if 0 <= i < len(self._vocab) else "" for i in ids]

    def feature(self, address: str) -> FeatureView:
        """Stats, top examples, interval examples, histogram, logit lens and neighbours."""
        key, f = self._parse(address)
        stats = self.con.execute(
            "select count, density, max, mean, std from features where sae = ? and feature = ?",
            [key, f],
        ).fetchall()[0]
        top = self.con.execute(
            """select k.window_id, k.act, k.pos, k.acts, w.doc, w.offset, w.tokens
                from topk k join windows w using (window_id) where k.sae = ? and k.feature = ?
                order by k.rank""",
            [key, f],
        ).fetchall()
        inter = self.con.execute(
            """select i.interval, i.window_id, i.act, i.pos, null, w.doc, w.offset, w.tokens
                from intervals i join windows w using (window_id) where i.sae = ? and i.feature = ?
                order by i.interval desc, i.act desc""",
            [key, f],
        ).fetchall()
        intervals: dict[int, list[Example]] = {}
        for row in inter:
            intervals.setdefault(row[0], []).extend(self._examples([row[1:]], with_acts=False))
        hist = self.con.execute(
            "select lo, hi, count from hist where sae = ? and feature = ? order by bin", [key, f]
        ).fetchall()
        found = self.con.execute("select * from lens where sae = ? and feature = ?", [key, f])
        columns = [d[0] for d in found.description or []]
        rows = found.fetchall()  # fetch to the end: DuckDB refuses new work on an open result
        lens: dict[str, Any] = dict(zip(columns, rows[0], strict=True)) if rows else {}
        np_id = self.manifest["saes"][key].get("neuronpedia_id")

        def pairs(a: str, b: str, text: bool = False) -> list[Any]:
            first = lens.get(a) or []
            return list(
                zip(self.tokens_text(first) if text else first, lens.get(b) or [], strict=True)
            )

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
        )


__all__ = ["Example", "FeatureView", "Store"]
