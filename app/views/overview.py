"""Overview: the model, the corpus, each SAE with its L0 and density histograms, evaluations."""

from __future__ import annotations

import plotly.express as px
import streamlit as st
from explorer import store

from scope.store import explore

s = store()
view = explore.overview(s)
m = view.model

st.title("Overview")
st.caption(f"store `{s.root}` · snapshot {s.version.name} · state {s.manifest.state}")
cols = st.columns([1.6, 1, 1, 1])  # room for a model name like gemma-3-270m
cols[0].metric("model", str(m["name"]).rsplit("/", 1)[-1], help=str(m["name"]))
cols[1].metric("layers × d_model", f"{m['n_layers']} × {m['d_model']}")
cols[2].metric("tokens recorded", f"{sum(p['tokens'] for p in view.parts):,}")
cols[3].metric("documents", f"{sum(p['documents'] for p in view.parts):,}")

st.subheader("Corpus")
st.dataframe(view.parts, hide_index=True, width="stretch")

st.subheader("SAEs")
st.dataframe(
    view.saes.df(),
    hide_index=True,
    width="stretch",
    column_config={
        "mean_l0": st.column_config.NumberColumn("mean L0", format="%.1f"),
        "dead": st.column_config.NumberColumn("dead", help="never fired on the corpus"),
        "dense": st.column_config.NumberColumn(
            "dense", help="fired on more than the dense threshold of tokens"
        ),
    },
)

left, right = st.columns(2)
l0 = view.l0.df()
fig = px.bar(l0, x="l0", y="count", color="sae", barmode="overlay", opacity=0.6,
             labels={"l0": "features firing on a token (L0)", "count": "tokens"})  # fmt: skip
fig.update_layout(title="L0 per token", height=340, margin=dict(t=40, b=10))
left.plotly_chart(fig, width="stretch")
density = view.density.df()
fig = px.bar(density, x="log10_density", y="count", color="sae", barmode="overlay", opacity=0.6,
             labels={"log10_density": "log10 density (fraction of tokens)", "count": "features"})  # fmt: skip
fig.update_layout(title="Feature density (live features)", height=340, margin=dict(t=40, b=10))
right.plotly_chart(fig, width="stretch")

if view.evals is not None:
    st.subheader("Evaluations")
    st.dataframe(view.evals.df(), hide_index=True, width="stretch")
else:
    st.caption("No evaluations yet: `scope eval ... --store` adds them here.")
