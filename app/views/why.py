"""Why: which features made the model say that. A prompt, a target (one of the top next tokens,
or a logit difference), the store's features ranked by attribution (``scope.attribute``), drawn
layer by position, and an ablation check: the prompt re-run with the top features ablated."""

from __future__ import annotations

import html

import plotly.graph_objects as go
import streamlit as st
from explorer import feature_link, model_or_reason, store

from scope.attribute import Target, attribute, measure, prompt_tokens, token_id
from scope.errors import ScopeError
from scope.identity import hook_site
from scope.steer import Steer, steering
from scope.store.view import visible

s = store()
st.title("Why did the model say that")
loaded = model_or_reason()
if loaded is None:
    st.stop()
model, saes = loaded.model, loaded.saes
keys = list(saes)
prompt = st.text_area(
    "prompt",
    value=st.session_state.get("inspect_text", "The Golden Gate Bridge is in San"),
    height=80,
)
try:
    tokens = prompt_tokens(model, prompt)
except ScopeError as err:
    st.error(str(err))
    st.stop()
logits = model(tokens)[0, -1].detach().float()
probs = logits.softmax(-1)
top = probs.topk(5)
choices = [f"{visible(model.tokenizer.decode([int(t)]))!r}  p={float(p):.3f}"
           for p, t in zip(top.values, top.indices, strict=True)]  # fmt: skip
cols = st.columns([2, 1, 1])
kind = cols[0].radio("target", ["next token", "logit difference"], horizontal=True)
if kind == "next token":
    pick = cols[1].selectbox("token", range(len(choices)), format_func=lambda i: choices[i])
    target = Target(kind="logit", token=int(top.indices[pick]))
else:
    first = cols[1].text_input("token", value=model.tokenizer.decode([int(top.indices[0])]))
    second = cols[2].text_input("minus token", value=model.tokenizer.decode([int(top.indices[1])]))
    try:
        target = Target(
            kind="logit_diff", token=token_id(model, first), other=token_id(model, second)
        )
    except ScopeError as err:
        st.error(str(err))
        st.stop()

result = attribute(model, list(saes.values()), tokens, target, keys=keys)
df = result.df()
st.markdown(
    f"**{visible(result.target.label)}** = {result.target.value:.3f} · features "
    f"{result.feature_share:+.3f} · error terms {result.error_share:+.3f} · embeddings "
    f"{result.embedding_share:+.3f} · biases {result.biases:+.3f}"
)
if df.empty:
    st.info("No feature of the store's SAEs is active on this prompt.")
    st.stop()

st.subheader("Top features by attribution")
n_top = st.slider("features listed", 5, 50, 15)
lines = []
for r in df.head(n_top).itertuples():
    label = s.label(str(r.sae), int(r.feature))[0]
    lines.append(
        f"| {feature_link(str(r.sae), int(r.feature))} | {r.position} | "
        f"<code>{html.escape(visible(str(r.token)))}</code> "
        f"| {r.activation:.2f} | {r.attribution:+.4f} | {html.escape(visible(label))} |"
    )
st.markdown(  # links open in place (feature_link's <a target=_self>); the text is escaped
    "| feature | pos | token | activation | attribution | label |\n|---|---:|---|---:|---:|---|\n"
    + "\n".join(lines),
    unsafe_allow_html=True,
)

st.subheader("Layer by position")
share = st.slider(
    "keep the features that hold this share of all |attribution|", 0.1, 1.0, 0.8, 0.05,
    help="pruning: features sorted by |attribution|, kept until their sum reaches the share",
)  # fmt: skip
mag = df["attribution"].abs()
kept = df[(mag.cumsum() / mag.sum()).shift(fill_value=0) < share]
layer = [hook_site(str(saes[k].cfg.metadata.hook_name))[0] or 0 for k in kept["sae"]]
# features sharing a (layer, position) cell stand in a column above it, strongest lowest
rank = kept.assign(layer=layer).groupby(["layer", "position"]).cumcount()
height = [y + 0.8 * r / max(int(rank.max()), 1) for y, r in zip(layer, rank, strict=True)]
fig = go.Figure(
    go.Scatter(
        x=kept["position"], y=height, mode="markers",
        marker={"size": 8 + 30 * kept["attribution"].abs() / mag.max(),
                "color": kept["attribution"], "colorscale": "RdBu", "cmid": 0,
                "showscale": True, "colorbar": {"title": "attribution"}},
        text=[f"{r.sae}/{r.feature} @ {r.position} {r.token!r}: {r.attribution:+.4f}"
              for r in kept.itertuples()],
        hoverinfo="text",
    )
)  # fmt: skip
fig.update_layout(
    height=420, margin={"t": 10, "b": 40}, xaxis_title="position", yaxis_title="layer",
    xaxis={"tickvals": list(range(len(result.tokens))),
           "ticktext": [visible(t) for t in result.tokens]},
    yaxis={"tickvals": sorted(set(layer)), "ticktext": [f"L{n}" for n in sorted(set(layer))]},
)  # fmt: skip
st.plotly_chart(fig, use_container_width=True)
st.caption(f"{len(kept)} of {len(df)} active features shown")

st.subheader("Ablation check")
n_ablate = st.number_input("ablate the top features (by attribution, positive ones)", 1, 50, 5)
if st.button("Run the ablation check", type="primary"):
    chosen = df[df["attribution"] > 0].drop_duplicates(["sae", "feature"]).head(int(n_ablate))
    steers = [Steer(saes[str(r.sae)], int(r.feature), mode="ablate") for r in chosen.itertuples()]
    before = measure(model, tokens, result.target.target)
    with steering(model, steers, prompt_len=tokens.shape[1]):
        after = measure(model, tokens, result.target.target)
    predicted = float(chosen["attribution"].sum())
    st.session_state["why_ablation"] = (before, after, predicted, len(steers))
if "why_ablation" in st.session_state:
    before, after, predicted, n = st.session_state["why_ablation"]
    st.markdown(
        f"With {n} features ablated at every position the target moved from **{before:.3f}** to "
        f"**{after:.3f}** ({after - before:+.3f}); their attributions predict about "
        f"{-predicted:+.3f}."
    )
