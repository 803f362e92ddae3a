"""What the explorer asks of a store: the overview, search, and walking between live features.

Plain functions over ``Store`` (no Streamlit here), so the app's pages stay thin, notebooks can
call the same things, and the benchmark times exactly what a page runs.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import Any

from scope.errors import ScopeError
from scope.store.explanations import best_explanation_sql, search_text
from scope.store.reader import Rows, Store, natural
from scope.store.schema import EVALS, LABELS, sql_string

SORTS = {
    "hits": "hits",
    "max": "max",
    "density": "density",
    "mean": "mean",
    "feature": "feature",
    "relevance": "relevance",
}


@dataclass(frozen=True, kw_only=True)
class Query:
    """A feature search. Every criterion given must hold; none given lists every feature."""

    sae: str | None = None
    """Only this SAE's features (a store key); None searches every SAE."""
    index: int | None = None
    """Only this feature index."""
    text: str = ""
    """A token or a few words: features whose top examples fire on it or whose logit lens
    promotes it. Case and surrounding spaces are ignored."""
    whole: bool = True
    """Match the activating token whole (``east`` finds `` east`` and ``East``, never
    ``least``); False: the activating token, or the text just before it, contains the text."""
    label: str = ""
    """Words of the feature's explanations, label or notes (full text: every word, the last
    as a prefix; ranked by BM25 under the "relevance" sort)."""
    min_density: float = 0.0
    """Firing on at least this fraction of tokens (0 keeps dead features out only if > 0)."""
    max_density: float = 1.0
    """Firing on at most this fraction (Neuronpedia hides dense features above ~1%)."""
    min_max: float = 0.0
    """Max activation at least this."""
    sort: str = "hits"
    """hits (the share of the feature's top-example activation on matching tokens, then the
    number of matching examples, then max), density, max, mean or feature."""
    descending: bool = True
    limit: int = 200
    """Rows returned at most."""

    def __post_init__(self) -> None:
        if self.sort not in SORTS:
            raise ScopeError(f"sort {self.sort!r} is not one of {', '.join(SORTS)}")
        for name in ("min_density", "max_density", "min_max"):
            value = getattr(self, name)
            if not math.isfinite(value) or value < 0:
                raise ScopeError(f"{name} {value} must be a number >= 0")
        if self.min_density > self.max_density:
            raise ScopeError(
                f"min_density {self.min_density} is above max_density {self.max_density}: swap them"
            )
        if not 1 <= self.limit <= 100_000:
            raise ScopeError(f"limit {self.limit} must be 1..100000")


def search(store: Store, query: Query) -> Rows:
    """Features matching ``query``: sae, feature, label, explanation (the best-scored one),
    density, max, mean, relevance (of the explanation, label or notes to ``query.label``),
    hits (top examples that fire on the text), share (their part of the activation summed over
    the top examples), context (the strongest matching example's text up to its activating token), lens (rank of
    the text among the promoted tokens, or null)."""
    where: list[str] = ["true"]
    params: list[Any] = []
    if query.sae is not None:
        if query.sae not in store.saes:
            raise ScopeError(f"no SAE {query.sae!r} in this store (it has {', '.join(store.saes)})")
        where.append("f.sae = ?")
        params.append(query.sae)
    if query.index is not None:
        where.append("f.feature = ?")
        params.append(query.index)
    where.append("f.density >= ? and f.density <= ? and f.max >= ?")
    params += [query.min_density, query.max_density, query.min_max]
    text = query.text.strip().lower()
    matched = (
        "null::bigint as hits, null::double as share, null::varchar as context, null::int as lens"
    )
    join = ""
    if text:
        # whole: the activating token is the text; else it, or the few tokens up to it,
        # contain it. share: the matching examples' part of the feature's top-example mass
        hit = (
            "lower(trim(a.text)) = ?"
            if query.whole
            else "(contains(lower(a.text), ?) or contains(lower(a.context), ?))"
        )
        join = f"""
          left join (select a.sae, a.feature, count(*) filter (where {hit}) as hits,
                            sum(k.act) filter (where {hit}) / nullif(sum(k.act), 0) as share,
                            arg_max(a.context, k.act) filter (where {hit}) as context
                     from activating a join topk k using (sae, feature, rank)
                     group by all) a using (sae, feature)
          left join (select sae, feature, min(i) as lens from (
                       select sae, feature, unnest(top_ids) as token,
                              unnest(range(len(top_ids))) + 1 as i from lens)
                     join vocab using (token) where lower(trim(text)) = ? group by all
                    ) l using (sae, feature)"""
        n = 1 if query.whole else 2
        params = [text] * (3 * n) + [text] + params
        where.append("(a.hits > 0 or l.lens is not null)")
        matched = "coalesce(a.hits, 0) as hits, coalesce(a.share, 0) as share, a.context, l.lens"
    label_join, label_cols = "", "null as label"
    if LABELS.name in store.views:
        label_join = "left join labels lb using (sae, feature)"
        label_cols = "lb.label"
    label_cols += ", ex.explanation"
    label_join += f" left join ({best_explanation_sql(store)}) ex using (sae, feature)"
    relevance = "null::double as relevance"
    if query.label.strip():
        hits = search_text(store, query.label, limit=query.limit * 10)
        rows = ", ".join(f"({sql_string(f'{h.sae}/{h.feature}')}, {h.score!r})" for h in hits)
        label_join += (
            f" join (values {rows}) rel(address, relevance) on rel.address = f.sae || '/' || f.feature"
            if hits
            else " join (select null as address, null as relevance where false) rel on true"
        )
        relevance = "rel.relevance"
    sort = "relevance" if query.label.strip() and query.sort == "hits" and not text else query.sort
    order = SORTS[sort]
    direction = "desc" if query.descending else "asc"
    order_by = f"{order} {direction} nulls last"
    if sort == "hits":
        order_by = (
            f"share {direction} nulls last, hits {direction} nulls last, lens asc nulls last, "
            f"max {direction}"
        )
    sql = f"""
        select f.sae, f.feature, {label_cols}, f.density, f.max, f.mean, {matched}, {relevance}
        from features f {join} {label_join}
        where {" and ".join(where)}
        order by {order_by}, f.sae, f.feature
        limit {int(query.limit)}"""
    return store.sql(sql, params)


def live_neighbour(store: Store, sae: str, feature: int, step: int) -> int | None:
    """The next (step=1) or previous (step=-1) live feature of ``sae`` after ``feature``,
    wrapping around; None when the SAE has no live feature."""
    if step not in (1, -1):
        raise ValueError("step is 1 or -1")
    cmp, agg = (">", "min") if step == 1 else ("<", "max")
    row = store.sql(
        f"""select coalesce(
              (select {agg}(feature) from features where sae = ? and not dead and feature {cmp} ?),
              (select {agg}(feature) from features where sae = ? and not dead))""",
        [sae, feature, sae],
    ).fetchone()
    return None if row is None or row[0] is None else int(row[0])


def random_live(store: Store, sae: str, rng: random.Random | None = None) -> int | None:
    """A live feature of ``sae`` drawn uniformly; None when none fired."""
    row = store.sql("select count(*) from features where sae = ? and not dead", [sae]).fetchone()
    n = int(row[0]) if row else 0
    if n == 0:
        return None
    i = (rng or random.Random()).randrange(n)
    found = store.sql(
        f"select feature from features where sae = ? and not dead order by feature "
        f"limit 1 offset {i}",
        [sae],
    ).fetchone()
    return int(found[0]) if found else None


@dataclass(frozen=True)
class Overview:
    """What the overview page shows."""

    model: dict[str, Any]
    """The model's identity: name, n_layers, d_model, d_vocab."""
    parts: list[dict[str, Any]]
    """Each corpus added: paths, documents, tokens, windows, skipped."""
    saes: Rows
    """sae, hook, width, tokens, mean_l0, dead, dense, release (or source), neuronpedia_id."""
    l0: Rows
    """sae, l0, count: tokens by number of features firing."""
    density: Rows
    """sae, log10_density (bin start), count: live features by density."""
    evals: Rows | None
    """The store's evaluations, when it has some."""


def overview(store: Store) -> Overview:
    """The store at a glance: model, corpus, each SAE with its L0 and density histograms."""
    m = store.manifest
    saes = store.sql(
        """select s.sae, s.d_sae as width, s.tokens, s.mean_l0, s.dead, s.dense
           from saes s order by s.sae"""
    )
    ident = store.saes
    rows = [
        {
            "sae": r["sae"],
            "hook": ident[r["sae"]].hook_name,
            **{k: r[k] for k in ("width", "tokens", "mean_l0", "dead", "dense")},
            "release": ident[r["sae"]].release or ident[r["sae"]].source,
            "neuronpedia_id": ident[r["sae"]].neuronpedia_id,
        }
        for r in sorted(saes.arrow().to_pylist(), key=lambda r: natural(r["sae"]))
    ]
    import pyarrow as pa

    density = store.sql(
        """select sae, floor(log10(density) * 4) / 4 as log10_density, count(*) as count
           from features where not dead group by all order by sae, log10_density"""
    )
    evals = None
    if EVALS.name in store.views:
        evals = store.sql("select * from evals order by sae")
    return Overview(
        model=vars(m.model),
        parts=[
            {
                "corpus": ", ".join(p.corpus),
                "documents": p.documents,
                "tokens": p.tokens,
                "windows": p.windows,
                "skipped": sum(p.skipped.values()),
            }
            for p in m.parts
        ],
        saes=Rows(pa.Table.from_pylist(rows)),
        l0=store.sql("select sae, l0, count from l0 order by sae, l0"),
        density=density,
        evals=evals,
    )


def corpus_tokens(store: Store) -> list[int]:
    """The token ids that occur in the recorded corpus (BOS, first in every window, left
    out), ascending: the vocabulary a feature's logit lens is restricted to by default."""
    rows = store.sql(
        "select distinct unnest(tokens[2:]) as token from windows order by token"
    ).fetchall()
    return [int(t) for (t,) in rows]


DUPLICATE_COS = 0.95
"""Features whose decoder directions have a cosine above this are counted as duplicates."""


def duplicates(store: Store, sae: str | None = None, cos: float = DUPLICATE_COS) -> Rows:
    """Groups of features that look like one feature: kind ``decoder`` (a feature and its
    nearest neighbour, decoder cosine above ``cos``: one row per pair) or ``examples`` (live
    features whose top examples are the same windows at the same positions: one row per
    group). Columns: sae, kind, features (list), cos (decoder pairs), tokens (the activating
    tokens of the shared examples)."""
    if not -1.0 <= cos <= 1.0:
        raise ScopeError(f"cos {cos} must be in -1..1")
    where, params = ("where sae = ?", [sae, sae]) if sae is not None else ("", [])
    return store.sql(
        f"""
        with pairs as (
          select sae, least(feature, neighbours[1]) as a, greatest(feature, neighbours[1]) as b,
                 neighbour_cos[1] as cos
          from lens {where}),
        decoder as (
          select distinct sae, 'decoder' as kind, [a, b] as features, cos, null::varchar[] as tokens
          from pairs where cos > {float(cos)!r}),
        sig as (
          select k.sae, k.feature, list(k.window_id || ':' || k.pos order by k.rank) as s,
                 list(a.text order by k.rank) as tokens
          from topk k join activating a using (sae, feature, rank)
          {where.replace("sae", "k.sae")} group by all),
        examples as (
          select sae, 'examples' as kind, list(feature order by feature) as features,
                 null::double as cos, any_value(tokens) as tokens
          from sig group by sae, s having count(*) > 1)
        select * from decoder union all select * from examples
        order by sae, kind, len(features) desc, features""",
        params,
    )


def health(store: Store, cos: float = DUPLICATE_COS) -> Rows:
    """Per SAE: width, dead and dense features (count and fraction of the width), and features
    in a duplicate group (``duplicates``) by decoder cosine and by identical top examples."""
    found = duplicates(store, cos=cos).arrow().to_pylist()
    counts: dict[tuple[str, str], set[int]] = {}
    for row in found:
        counts.setdefault((row["sae"], row["kind"]), set()).update(row["features"])
    rows = store.sql("select sae, d_sae, dead, dense from saes").fetchall()
    import pyarrow as pa

    table = [
        {
            "sae": key,
            "width": width,
            "dead": dead,
            "dead_frac": dead / width,
            "dense": dense,
            "dense_frac": dense / width,
            "dup_decoder": len(counts.get((key, "decoder"), set())),
            "dup_examples": len(counts.get((key, "examples"), set())),
        }
        for key, width, dead, dense in sorted(rows, key=lambda r: natural(r[0]))
    ]
    return Rows(pa.Table.from_pylist(table))


__all__ = [
    "DUPLICATE_COS",
    "Overview",
    "Query",
    "corpus_tokens",
    "duplicates",
    "health",
    "live_neighbour",
    "overview",
    "random_live",
    "search",
]
