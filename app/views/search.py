"""Search: by index, by token or text (top examples and logit lens), by label or notes, with
filters on density and max; every row opens its feature page."""

from __future__ import annotations

import steerlist
import streamlit as st
from explorer import feature_url, store

from scope.errors import ScopeError
from scope.store import explore

s = store()
st.title("Search features")
keys = list(s.saes)
top = st.columns([3, 1.7, 2, 1.6, 1], vertical_alignment="bottom")
text = top[0].text_input("token or text", placeholder="e.g. Paris, ing, 1987",
                         help="features whose top examples fire on it, or whose logit lens promotes it")  # fmt: skip
whole = top[1].toggle(
    "whole tokens",
    value=True,
    help="on: the activating token is the text (east finds ' east', not 'least'); off: the "
    "activating token or the few tokens before it contain the text",
)
label = top[2].text_input(
    "explanation, label or notes",
    placeholder="e.g. compass directions",
    help="words of the features' explanations (scope explain), labels and notes: every word "
    "must occur, the last may be a prefix; ranked by relevance (BM25)",
)
sae = top[3].selectbox("SAE", ["all", *keys])
index = top[4].text_input("index", placeholder="1234")
cols = st.columns([2, 2, 2, 1.3, 1])
density = cols[0].select_slider(
    "density (fraction of tokens)",
    options=[0.0, 1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 0.1, 1.0],
    value=(0.0, 1.0),
    format_func=lambda v: "0" if v == 0 else f"{v:g}",
    help="an upper bound hides dense features; mind that a bound of 0.01 also hides "
    "interpretable features firing on 1-2% of tokens (common words, directions)",
)
min_max = cols[1].number_input("max activation at least", min_value=0.0, value=0.0)
sort = cols[2].selectbox(
    "sort by", list(explore.SORTS), help="hits: top examples matching the text"
)
descending = cols[3].toggle("descending", value=True)
limit = cols[4].number_input("rows", 10, 5000, 200, step=50)

if index.strip() and not index.strip().isdigit():
    st.error(f"index {index!r} is not a number: give a feature index such as 1234")
    st.stop()
try:
    rows = explore.search(
        s,
        explore.Query(
            sae=None if sae == "all" else sae,
            index=int(index) if index.strip() else None,
            text=text,
            whole=whole,
            label=label,
            min_density=density[0],
            max_density=density[1],
            min_max=min_max,
            sort=sort,
            descending=descending,
            limit=int(limit),
        ),  # fmt: skip
    ).df()
except ScopeError as err:
    st.error(str(err))
    st.stop()
rows["context"] = rows["context"].map(  # one line each: newlines and tabs made visible
    lambda c: c.replace("\n", "↵").replace("\t", "→") if isinstance(c, str) else c
)
rows.insert(
    0, "open", [feature_url(a, int(b)) for a, b in zip(rows["sae"], rows["feature"], strict=True)]
)
st.caption(
    f"{len(rows)} features"
    + (" (limit reached)" if len(rows) == limit else "")
    + " · select a row to open its page here; “open ↗” opens it in a new tab"
)
picked = st.dataframe(
    rows,
    hide_index=True,
    width="stretch",
    on_select="rerun",
    selection_mode="single-row",
    key="found",
    column_config={
        "open": st.column_config.LinkColumn("open", display_text="open ↗", width="small"),
        "density": st.column_config.NumberColumn(format="%.5f"),
        "max": st.column_config.NumberColumn(format="%.2f"),
        "mean": st.column_config.NumberColumn(format="%.2f"),
        "hits": st.column_config.NumberColumn(
            help="top examples whose activating token matches (or, with whole tokens off, the "
            "text before it)"
        ),
        "share": st.column_config.ProgressColumn(
            "share",
            format="percent",
            min_value=0.0,
            max_value=1.0,
            help="the matching examples' part of the feature's activation over its top "
            "examples: how much of what it fires on is this token",
        ),
        "context": st.column_config.TextColumn(
            help="the strongest matching example, up to its activating token"
        ),
        "lens": st.column_config.NumberColumn(
            help="rank of the token among the logit lens' promoted tokens"
        ),
    },
)
if picked.selection.rows:  # open the selected feature in place, keeping the steer list
    row = rows.iloc[picked.selection.rows[0]]
    st.switch_page(
        st.session_state["pages"]["feature"],
        query_params={"sae": row["sae"], "feature": str(int(row["feature"])), **steerlist.params()},
    )
