"""Prompt inspector: which features fire on my text. Each token with its top features across
the store's SAEs (BOS hidden, dense features optionally hidden), and a heat strip per feature."""

from __future__ import annotations

import html

import streamlit as st
from explorer import TOKEN_CSS, feature_link, feature_url, kept_text_area, model_or_reason, store

from scope.errors import ScopeError
from scope.inspect import activations, top_features
from scope.store.view import shaded, visible

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
cols = st.columns([1, 1, 2])
top = cols[0].number_input("features per token", 1, 20, 5)
hide_dense = cols[1].toggle(
    "hide dense features",
    value=True,
    help="features firing on more than the store's dense threshold of tokens",
)
if not cols[2].button("Inspect", type="primary") and "inspected" not in st.session_state:
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
rows = top_features(acts, top=int(top), hide=hide)

st.subheader("Features on each token")
table = [
    {"pos": r.position, "token": visible(r.token),
     "features": " · ".join(f"{feature_link(h.sae, h.feature)} {h.act:.2f}" for h in r.features)}
    for r in rows
]  # fmt: skip
st.markdown(
    "| pos | token | top features |\n|---:|---|---|\n"
    + "\n".join(f"| {t['pos']} | `{t['token']}` | {t['features'] or '–'} |" for t in table),
    unsafe_allow_html=True,
)

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
for (key, feature), peak in sorted(best.items(), key=lambda kv: -kv[1])[:12]:
    values = acts.strip(key, feature)
    body = shaded([acts.tokens[p] for p in shown], [values[p] for p in shown], peak)
    strips.append(
        f'<div class="ex"><a href="{html.escape(feature_url(key, feature))}" target="_self">'
        f"<span class='act'>{key}/{feature}</span></a> {body}</div>"
    )
st.html(TOKEN_CSS + "".join(strips))
