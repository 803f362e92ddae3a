"""Overview: the model, the corpus, each SAE with its L0 and density histograms, evaluations."""

from __future__ import annotations

import html

import plotly.express as px
import streamlit as st
from explorer import feature_link, recording_progress, store

from scope.store import explore

DEAD_FLAG = 0.10
DENSE_FLAG = 0.01
DUP_FLAG = 0.01  # flag duplicates when more than this share of the live features are in a group

s = store()
view = explore.overview(s)
m = view.model

st.title("Overview")
st.caption(f"store `{s.root}` · snapshot {s.version.name} · state {s.manifest.state}")
recording_progress(s)
cols = st.columns([1.6, 1, 1, 1])  # room for a model name like gemma-3-270m
cols[0].metric("model", str(m["name"]).rsplit("/", 1)[-1], help=str(m["name"]))
cols[1].metric("layers × d_model", f"{m['n_layers']} × {m['d_model']}")
if s.manifest.state == "complete":
    recorded = sum(p["tokens"] for p in view.parts)
else:  # a snapshot of a recording going on: what its tables hold
    recorded = max(int(t) for t in view.saes.df()["tokens"])
cols[2].metric("tokens recorded", f"{recorded:,}", help="in the snapshot shown")
if s.manifest.state == "complete" or not s.manifest.parts:
    cols[3].metric("documents", f"{sum(p['documents'] for p in view.parts):,}")
else:  # the part being recorded, as far as the snapshot goes
    part, m_ = s.manifest.parts[-1], s.manifest
    done = part.next if m_.tables_version == m_.state_version else 0  # else an older snapshot
    cols[3].metric("windows recorded", f"{done:,} of {part.windows:,}")

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

st.subheader("Health")
health = explore.health(s).df()
health.insert(
    1,
    "flags",
    [
        " ".join(
            flag
            for flag, bad in (
                ("many dead", r.dead_frac > DEAD_FLAG),
                ("many dense", r.dense_frac > DENSE_FLAG),
                ("duplicates", max(r.dup_decoder, r.dup_examples) > DUP_FLAG * (r.width - r.dead)),
            )
            if bad
        )
        or "ok"
        for r in health.itertuples()
    ],
)
st.dataframe(
    health,
    hide_index=True,
    width="stretch",
    column_config={
        "flags": st.column_config.TextColumn(
            help=f"many dead: over {DEAD_FLAG:.0%} never fired; many dense: over "
            f"{DENSE_FLAG:.0%} fire on more than the dense threshold of tokens; duplicates: over "
            f"{DUP_FLAG:.0%} of the live features are in a duplicate group (by decoder or examples)"
        ),
        "dead_frac": st.column_config.NumberColumn("dead %", format="percent"),
        "dense_frac": st.column_config.NumberColumn("dense %", format="percent"),
        "dup_decoder": st.column_config.NumberColumn(
            "dup (decoder)",
            help=f"features whose nearest feature's decoder cosine is above "
            f"{explore.DUPLICATE_COS}",
        ),
        "dup_examples": st.column_config.NumberColumn(
            "dup (examples)",
            help="live features whose top examples are exactly another feature's",
        ),
    },
)
dups = explore.duplicates(s).df()
if len(dups):
    with st.expander(f"Duplicate groups ({len(dups)})"):
        lines = []
        for r in dups.head(200).itertuples():
            links = ", ".join(feature_link(r.sae, int(f), f"{r.sae}/{int(f)}") for f in r.features)
            if r.kind == "decoder":
                what = f"decoder cosine {r.cos:.3f}"
            else:
                toks = sorted({t.strip() or repr(t) for t in r.tokens})[:8]
                what = f"the same {len(r.tokens)} top examples (on {html.escape(', '.join(toks))})"
            lines.append(f"- {links}: {what}")
        st.markdown("\n".join(lines), unsafe_allow_html=True)

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

st.subheader("Explanations")
if "explanations" in s.views:
    summary = s.sql(
        """select e.sae, count(distinct e.feature) as explained, any_value(f.live) as live,
                  avg(e.detection) as mean_detection, avg(e.fuzzing) as mean_fuzzing,
                  count(distinct e.explainer) as explainers
           from explanations e
           join (select sae, count(*) filter (where count > 0) as live from features group by sae)
                f using (sae)
           group by e.sae order by e.sae"""
    ).df()
    st.dataframe(summary, hide_index=True, width="stretch")
    scores = s.sql(
        """select detection, fuzzing from explanations
           where detection is not null or fuzzing is not null"""
    ).df()
    long = scores.melt(var_name="score", value_name="balanced accuracy").dropna()
    fig = px.histogram(long, x="balanced accuracy", color="score", barmode="overlay",
                       nbins=20, range_x=[0, 1], opacity=0.6)  # fmt: skip
    fig.update_layout(title="Explanation scores (0.5 is chance)", height=300,
                      margin=dict(t=40, b=10))  # fmt: skip
    st.plotly_chart(fig, width="stretch")
else:
    st.caption(
        "No explanations yet: `scope explain --store ... --explainer ...` adds them here "
        "(and to each feature page and the search)."
    )
