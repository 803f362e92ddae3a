"""Prompt inspector: which features fire on my text. Each token with its top features across
the store's SAEs (BOS hidden, dense features optionally hidden), and a heat strip per feature."""

from __future__ import annotations

import html
from dataclasses import replace
from typing import Any

import steerlist
import streamlit as st
import torch
from explorer import TOKEN_CSS, feature_link, feature_url, kept_text_area, model_or_reason, store

from scope.errors import ScopeError
from scope.inspect import activations, top_features
from scope.store.view import shaded, visible


def scaled(codes: torch.Tensor, maxes: torch.Tensor) -> torch.Tensor:
    """Activations [pos, d_sae] over each feature's recorded max (1 where that max is 0 and
    the feature fires: it never fired on the corpus)."""
    return torch.where(maxes > 0, codes / maxes.clamp(min=1e-12), (codes > 0).float())


def feature_names(s: Any, wanted: set[tuple[str, int]]) -> dict[tuple[str, int], str]:
    """Each feature's label, else the token its strongest top example fires on."""
    if not wanted:
        return {}
    pairs = sorted(wanted)
    chosen = "(select unnest(?::varchar[]) as sae, unnest(?::int[]) as feature)"
    args = [[k for k, _ in pairs], [f for _, f in pairs]]
    out = {
        (key, feature): repr(text.strip() or text)[1:-1] if text else ""
        for key, feature, text in s.sql(
            f"select sae, feature, text from activating join {chosen} using (sae, feature) "
            "where rank = 0",
            args,
        ).fetchall()
    }
    if "labels" in s.views:
        for key, feature, label in s.sql(
            f"select sae, feature, label from labels join {chosen} using (sae, feature)", args
        ).fetchall():
            if label:
                out[(key, feature)] = label
    return out


s = store()
st.title("Prompt inspector")
loaded = model_or_reason()
if loaded is None:
    st.stop()
given = st.query_params.get("text")
if given and "inspect_text" not in st.session_state:  # opened by a link, a bookmark or Back
    st.session_state.update(inspect_text=given, inspected=True)
text = kept_text_area(
    "text", "inspect_text", "The Golden Gate Bridge is in San Francisco.", height=100
)
cols = st.columns([1, 1, 1.4, 2, 0.8], vertical_alignment="bottom")
top = cols[0].number_input("features per token", 1, 20, 5)
rank = cols[1].selectbox(
    "rank by",
    ["fraction of max", "activation"],
    help="fraction of max: each feature's activation over its max on the recorded corpus, so "
    "SAEs whose activations run large (deep layers) do not crowd out the rest; activation: "
    "the raw value",
)
hide_dense = cols[2].toggle(
    "hide dense features",
    value=True,
    help="features firing on more than the store's dense threshold of tokens",
)
keys = list(s.saes)
chosen = cols[3].multiselect("SAEs", keys, default=keys, placeholder="every SAE")
if not cols[4].button("Inspect", type="primary") and "inspected" not in st.session_state:
    st.stop()
st.session_state["inspect_text"] = text
try:
    acts = activations(loaded.model, list(loaded.saes.values()), text, store=s)
except ScopeError as err:
    st.error(str(err))
    st.stop()
st.session_state["inspected"] = True
st.query_params["text"] = text  # Back from a feature's page returns to this analysis
hide: dict[str, set[int]] = {}
if hide_dense:
    for key, feature in s.sql("select sae, feature from features where dense").fetchall():
        hide.setdefault(key, set()).add(feature)
maxes = {
    key: torch.tensor([m for (m,) in s.sql(
        "select max from features where sae = ? order by feature", [key]).fetchall()])
    for key in acts.keys
}  # fmt: skip
by_fraction = rank == "fraction of max"
shown_acts = replace(
    acts,
    keys=[k for k in acts.keys if k in chosen],
    codes=[
        scaled(c, maxes[k]) if by_fraction else c
        for k, c in zip(acts.keys, acts.codes, strict=True)
        if k in chosen
    ],
)
if not shown_acts.keys:
    st.info("Choose at least one SAE.")
    st.stop()
rows = top_features(shown_acts, top=int(top), hide=hide)
names = feature_names(s, {(h.sae, h.feature) for r in rows for h in r.features})


def raw(key: str, feature: int, pos: int) -> float:
    return float(acts.codes[acts.keys.index(key)][pos, feature])


def cell(key: str, feature: int, pos: int) -> str:
    value = raw(key, feature, pos)
    peak = float(maxes[key][feature])
    frac = f" ({value / peak:.0%})" if peak > 0 else ""
    name = html.escape(names.get((key, feature), "")).replace("|", "&#124;")  # a table cell
    return f"{feature_link(key, feature)} <small>{name}</small> {value:.2f}{frac}"


st.subheader("Features on each token")
st.caption(
    "each feature's activation, and in brackets its fraction of the feature's max on the "
    "recorded corpus; beside the id, its label or the token its strongest example fires on"
)
table = [
    {"pos": r.position, "token": visible(r.token),
     "features": " · ".join(cell(h.sae, h.feature, r.position) for h in r.features)}
    for r in rows
]  # fmt: skip
st.markdown(
    "| pos | token | top features |\n|---:|---|---|\n"
    + "\n".join(f"| {t['pos']} | `{t['token']}` | {t['features'] or '–'} |" for t in table),
    unsafe_allow_html=True,
)
listed = list(dict.fromkeys((h.sae, h.feature) for r in rows for h in r.features))
if listed:
    pick = st.columns([3, 1], vertical_alignment="bottom")
    steer = pick[0].selectbox(
        "feature to steer",
        listed,
        format_func=lambda kf: f"{kf[0]}/{kf[1]} {names.get(kf, '')}",
    )
    if pick[1].button("Steer with this", icon=":material/tune:"):
        steerlist.add(steer[0], steer[1])
        st.switch_page(st.session_state["pages"]["lab"], query_params=steerlist.params())

st.subheader("Heat strips")
st.caption(
    "the strongest features over the whole text, each shaded on every token (hover for values)"
)
best: dict[tuple[str, int], float] = {}
for r in rows:
    for h in r.features:
        best[(h.sae, h.feature)] = max(best.get((h.sae, h.feature), 0.0), h.act)
strips = []
shown = acts.counted
for (key, feature), _ in sorted(best.items(), key=lambda kv: -kv[1])[:12]:
    values = acts.strip(key, feature)
    peak = max(values[p] for p in shown)
    body = shaded([acts.tokens[p] for p in shown], [values[p] for p in shown], peak)
    strips.append(
        f'<div class="ex"><a href="{html.escape(feature_url(key, feature))}" target="_self">'
        f"<span class='act'>{key}/{feature}</span></a> {body}</div>"
    )
st.html(TOKEN_CSS + "".join(strips))
