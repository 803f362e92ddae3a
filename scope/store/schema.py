"""The store's format in one place: every table's name, where its files lie, its columns and
their types, the side tables, and the constants readers and writers share.

Writers shape what they write with ``Table.conform`` (the recording's snapshot tables, the
windows, labels, sweeps, evaluations, explanations, graphs); the reader makes one DuckDB view
per table under the same name; the SQL of the derived tables (``activating``, ``intervals``) is
defined here, so the recording that writes ``activating`` and the reader that computes it for
older stores run the same query.

    runs/wiki/
      manifest.json                 MANIFEST
      vocab.parquet                 VOCAB
      windows/part-000.parquet      WINDOWS (``windows_file``)
      vNNNNNN/<table>.parquet       SNAPSHOT tables and ACTIVATING
      vNNNNNN/lens/<sae>.parquet    LENS (``lens_file``)
      vNNNNNN/state/<sae>.safetensors  the resumable recording state
      <side table>/<name>.parquet   SIDE tables, kept across recordings
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa

MANIFEST = "manifest.json"
"""The store's manifest (``scope.store.manifest``): the only file ever replaced."""

N_INTERVALS = 5
"""Interval examples split a feature's activation range into this many equal parts (fifths of
its max); interval 0 is the lowest."""
PER_INTERVAL = 5
"""Random windows shown per interval."""


@dataclass(frozen=True)
class Table:
    """One table of the store: the view readers query under ``name`` and its columns."""

    name: str
    """The view's name (``select * from features``); also its file or folder name."""
    columns: pa.Schema | None
    """Column names and types, in order; None: whatever its writer gives (``cards``)."""
    about: str
    """What a row is, for the docs and ``scope sql`` users."""

    @property
    def file(self) -> str:
        """The table's file name inside its folder: ``<name>.parquet``."""
        return f"{self.name}.parquet"

    @property
    def names(self) -> list[str]:
        """The column names, in order."""
        return list(self.columns.names) if self.columns is not None else []

    def conform(self, table: pa.Table) -> pa.Table:
        """``table`` with exactly these columns, in this order and of these types (a writer
        calls this before writing). A missing or unknown column is refused: the format lives
        here, so a new column is declared here first."""
        if self.columns is None:
            return table
        have, want = set(table.column_names), set(self.columns.names)
        if have != want:
            missing, extra = sorted(want - have), sorted(have - want)
            raise ValueError(
                f"the {self.name} table was given columns {table.column_names}: missing "
                f"{missing}, unknown {extra}; its columns are declared in scope.store.schema"
            )
        return table.select(self.columns.names).cast(self.columns)

    def from_rows(self, rows: Sequence[Mapping[str, Any]]) -> pa.Table:
        """The table of ``rows`` (dicts by column name), conformed (``conform``); no rows give
        an empty table with these columns."""
        if not rows and self.columns is not None:
            return self.columns.empty_table()
        return self.conform(pa.Table.from_pylist(list(rows)))


def _schema(*columns: tuple[str, pa.DataType]) -> pa.Schema:
    return pa.schema(list(columns))


_S, _I16, _I32, _I64 = pa.string(), pa.int16(), pa.int32(), pa.int64()
_F32, _F64, _B = pa.float32(), pa.float64(), pa.bool_()

# ---------------------------------------------------------------- snapshot tables (vNNNNNN/)

FEATURES = Table("features", _schema(
    ("sae", _S), ("feature", _I32), ("count", _I64), ("density", _F64), ("max", _F32),
    ("mean", _F64), ("std", _F64), ("dead", _B), ("dense", _B),
), "a feature: tokens it fired on, density, max, mean and std where it fires, dead, dense")  # fmt: skip
TOPK = Table("topk", _schema(
    ("sae", _S), ("feature", _I32), ("rank", _I32), ("window_id", _I64), ("act", _F32),
    ("pos", _I32), ("acts", pa.list_(_F32)),
), "a top window of a feature: its max (act), where (pos), the feature on every token (acts)")  # fmt: skip
SAMPLES = Table("samples", _schema(
    ("sae", _S), ("feature", _I32), ("bin", _I16), ("bin_lo", _F64), ("bin_hi", _F64),
    ("key", _I64), ("window_id", _I64), ("pos", _I32), ("act", _F32),
), "a random window of a feature per log-spaced activation bin (reservoir key): what "
   "intervals are drawn from")  # fmt: skip
HIST = Table("hist", _schema(
    ("sae", _S), ("feature", _I32), ("bin", _I16), ("lo", _F64), ("hi", _F64), ("count", _I64),
), "a log-spaced bin of a feature's activation and how many tokens fell in it")  # fmt: skip
L0 = Table("l0", _schema(("sae", _S), ("l0", _I32), ("count", _I64)),
           "tokens by the number of features firing on them")  # fmt: skip
SAES = Table("saes", _schema(
    ("sae", _S), ("tokens", _I64), ("mean_l0", _F64), ("dead", _I64), ("dense", _I64),
    ("d_sae", _I64),
), "an SAE: tokens recorded, mean L0, dead and dense features, width")  # fmt: skip
ACTIVATING = Table("activating", _schema(
    ("sae", _S), ("feature", _I32), ("rank", _I32), ("token", _I32), ("text", _S),
    ("context", _S),
), "a top window's activating token (at its max) and the text of up to six tokens ending there")  # fmt: skip
LENS = Table("lens", _schema(
    ("sae", _S), ("feature", _I32), ("top_ids", pa.list_(_I32)), ("top_logits", pa.list_(_F32)),
    ("bottom_ids", pa.list_(_I32)), ("bottom_logits", pa.list_(_F32)),
    ("neighbours", pa.list_(_I32)), ("neighbour_cos", pa.list_(_F32)),
), "logit lens (W_dec @ W_U) and the nearest features by decoder cosine; one file per SAE")  # fmt: skip

SNAPSHOT = (FEATURES, TOPK, SAMPLES, HIST, L0, SAES)
"""The tables a recording writes as ``vNNNNNN/<name>.parquet`` (and ACTIVATING, which stores
recorded before it existed lack: readers compute it with ``activating_query``)."""

# ---------------------------------------------------------------- store-wide tables

WINDOWS = Table("windows", _schema(
    ("window_id", _I64), ("part", _I32), ("doc", _S), ("offset", _I32), ("n_tokens", _I32),
    ("tokens", pa.list_(_I32)),
), "a corpus window: id ((document << 20) | chunk), corpus part, document, offset, tokens")  # fmt: skip
VOCAB = Table("vocab", _schema(("token", _I32), ("piece", _S), ("text", _S)),
              "a token id's piece and its text, so readers need no tokenizer")  # fmt: skip
INTERVALS = Table("intervals", _schema(
    ("sae", _S), ("feature", _I32), ("interval", _I32), ("window_id", _I64), ("pos", _I32),
    ("act", _F32),
), f"a view over samples: up to {PER_INTERVAL} windows per interval (0..{N_INTERVALS - 1}, "
   "equal parts of the feature's max)")  # fmt: skip

WINDOWS_GLOB = "part-*.parquet"
"""The windows files of every corpus part (inside ``windows/``)."""


def windows_file(index: int, shard: tuple[int, int] | None = None) -> str:
    """Corpus part ``index``'s windows file (shard (i, N) of it, while merging shards), relative
    to the store."""
    name = f"part-{index:03d}" + (f".shard-{shard[0]:04d}-of-{shard[1]:04d}" if shard else "")
    return f"{WINDOWS.name}/{name}.parquet"


def lens_file(key: str) -> str:
    """SAE ``key``'s lens file, relative to a snapshot folder."""
    return f"{LENS.name}/{key}.parquet"


# ---------------------------------------------------------------- side tables

EXPERIMENTS = Table("experiments", _schema(
    ("strength", _F64), ("mode", _S), ("sae", _S), ("hook", _S), ("text", _S),
    ("tokens", pa.list_(_I64)), ("target_act", _F64), ("text_act", _F64), ("kl", _F64),
    ("loss", _F64), ("unit", _S), ("positions", _S), ("feature", _I64), ("experiment", _S),
    ("prompt", _S), ("spec", _S),
), "a point of a steering sweep (``scope.sweep``), beside <experiment>.json")  # fmt: skip
EVALS = Table("evals", _schema(
    ("sae", _S), ("hook", _S), ("d_sae", _I64), ("sha256", _S), ("tokens", _I64),
    ("predictions", _I64), ("l0", _F64), ("l0_p10", _F64), ("l0_p50", _F64), ("l0_p90", _F64),
    ("fvu", _F64), ("explained_variance", _F64), ("cossim", _F64),
    ("ce_loss_without_sae", _F64), ("ce_loss_with_sae", _F64), ("ce_loss_with_ablation", _F64),
    ("delta_loss", _F64), ("ce_loss_score", _F64), ("kl_div_with_sae", _F64),
    ("kl_div_with_ablation", _F64), ("kl_div_score", _F64), ("dead", _I64), ("dense", _I64),
    ("corpus", _S), ("corpus_paths", _S),
), "an SAE evaluated on a corpus slice (``scope.evals``)")  # fmt: skip
CARDS = Table("cards", None, "SAE cards, as their writer gives them")
LABELS = Table("labels", _schema(
    ("sae", _S), ("feature", _I32), ("label", _S), ("notes", _S), ("updated", _F64),
), "a feature's label and notes (one file, labels.parquet)")  # fmt: skip
EXPLANATIONS = Table("explanations", _schema(
    ("sae", _S), ("feature", _I32), ("explanation", _S), ("explainer", _S), ("scorer", _S),
    ("method", _S), ("prompt_hash", _S), ("detection", _F64), ("fuzzing", _F64),
    ("n_pos", _I32), ("n_neg", _I32), ("n_shown", _I32), ("hard_negatives", _I32),
    ("unreadable", _I32), ("created", _F64),
), "an explanation of a feature with its scores (``scope explain``)")  # fmt: skip
GRAPHS = Table("graphs", _schema(
    ("slug", _S), ("prompt", _S), ("n_tokens", _I64), ("top_logit", _S), ("n_nodes", _I64),
    ("n_links", _I64), ("node_threshold", _F64), ("edge_threshold", _F64), ("scan", _S),
    ("transcoders", _S), ("created", _F64),
), "an attribution graph, beside its circuit-tracer JSON <slug>.json (``scope.graph``)")  # fmt: skip

SIDE = (EXPERIMENTS, EVALS, CARDS, LABELS, EXPLANATIONS, GRAPHS)
"""Side tables: each a folder of Parquet files (plus JSON where useful), written by
``scope.store.writer.add_side_table`` and never touched by a recording."""
SIDE_TABLES = tuple(t.name for t in SIDE)

TABLES = {t.name: t for t in (*SNAPSHOT, ACTIVATING, LENS, WINDOWS, VOCAB, INTERVALS, *SIDE)}
"""Every table a reader may have, by view name."""

# ---------------------------------------------------------------- SQL of the derived tables


def sql_string(text: str) -> str:
    """``text`` as a SQL string literal."""
    return "'" + text.replace("'", "''") + "'"


def sql_files(folder: Path, pattern: str) -> str | None:
    """The files matching ``pattern`` in ``folder`` as a SQL list of string literals (no glob
    left for DuckDB to expand, so ``[``, ``*`` or ``?`` in a path are only characters), or
    None when there are none."""
    found = sorted(folder.glob(pattern))
    return "[" + ", ".join(sql_string(str(f)) for f in found) + "]" if found else None


def activating_query(topk: str, windows: str, vocab: str) -> str:
    """SQL for the ``activating`` table from the sources of topk, windows and vocab: each top
    example's activating token (at its max) and the text of up to six tokens ending there.
    Written at the end of a recording; computed on the fly for stores recorded before."""
    return f"""
        with vv as (select list(text order by token) as v from {vocab}),
        hits as (select k.sae, k.feature, k.rank, w.tokens[k.pos + 1] as token,
                        w.tokens[greatest(k.pos - 5, 1) + 1 : k.pos + 1] as ids
                 from {topk} k join {windows} w using (window_id))
        select sae, feature, rank, token, vv.v[token + 1] as text,
               array_to_string(list_transform(ids, lambda x: vv.v[x + 1]), '') as context
        from hits, vv order by sae, feature, rank"""


def intervals_query(samples: str, features: str) -> str:
    """SQL for the ``intervals`` view: each sampled window's interval (its act in equal parts
    of the feature's max, N_INTERVALS of them), PER_INTERVAL windows per interval by
    reservoir key."""
    return f"""
        select sae, feature, interval, window_id, pos, act from (
          select *, row_number() over (partition by sae, feature, interval order by key) as n
          from (select s.*, least(floor(s.act / f.max * {N_INTERVALS}), {N_INTERVALS - 1})::int
                       as interval
                from {samples} s join {features} f using (sae, feature) where f.max > 0))
        where n <= {PER_INTERVAL}"""


__all__ = [
    "ACTIVATING",
    "CARDS",
    "EVALS",
    "EXPERIMENTS",
    "EXPLANATIONS",
    "FEATURES",
    "GRAPHS",
    "HIST",
    "INTERVALS",
    "L0",
    "LABELS",
    "LENS",
    "MANIFEST",
    "N_INTERVALS",
    "PER_INTERVAL",
    "SAES",
    "SAMPLES",
    "SIDE",
    "SIDE_TABLES",
    "SNAPSHOT",
    "TABLES",
    "TOPK",
    "VOCAB",
    "WINDOWS",
    "WINDOWS_GLOB",
    "Table",
    "activating_query",
    "intervals_query",
    "lens_file",
    "sql_files",
    "sql_string",
    "windows_file",
]
