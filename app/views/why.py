"""Why: which features made the model say that. A prompt, a target (one of the top next tokens,
or a logit difference), the store's features ranked by attribution (``scope.attribute``), drawn
layer by position, and an ablation check: the prompt re-run with the top features ablated."""

from __future__ import annotations

import html

import graphview
import steerlist
import streamlit as st
from explorer import feature_link, model_or_reason, store

from scope.attribute import Target, attribute, measure, prompt_tokens, token_id
from scope.codec import codec_of
from scope.errors import ScopeError
from scope.graph import (
    EDGE_THRESHOLD,
    NODE_THRESHOLD,
    attribution_graph,
    layer_transcoders,
    prune,
)
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
transcoders = {layer: k for k, sae in saes.items() if codec_of(sae).transcoder
               and (layer := hook_site(codec_of(sae).write_hook)[0]) is not None}  # fmt: skip
why_not = ""
try:
    ordered = layer_transcoders(model, [saes[k] for k in transcoders.values()])
except ScopeError as err:
    ordered, why_not = [], str(err)
if ordered:  # an attribution graph: every feature's direct effects in the replacement model
    knobs = st.columns(3)
    node_t = knobs[0].slider("node threshold", 0.1, 1.0, NODE_THRESHOLD, 0.01, key="why_node_t",
                            help="keep the nodes that hold this share of the influence on the "
                            "output (circuit-tracer's node threshold)")  # fmt: skip
    edge_t = knobs[1].slider("edge threshold", 0.1, 1.0, EDGE_THRESHOLD, 0.01, key="why_edge_t",
                            help="then the edges that hold this share of the edge influence")  # fmt: skip
    most = int(knobs[2].number_input("feature nodes at most", 16, 8192, 512, step=16))
    made = st.session_state.get("why_graph")
    if made is None or made[0] != (prompt, most):
        with st.spinner("attributing every active feature (batched backward passes)"):
            built = attribution_graph(model, ordered, prompt, max_feature_nodes=most)
        made = st.session_state["why_graph"] = ((prompt, most), built)
    graph = made[1]
    drawn = graphview.from_graph(graph, prune(graph, node_t, edge_t), transcoders)
    counts = drawn.nodes["kind"].value_counts()
    caption = (
        f"{counts.get('feature', 0)} of {graph.n_features} feature nodes, "
        f"{counts.get('error', 0)} error nodes and {len(drawn.edges)} edges kept; the output "
        "nodes are the top next tokens. Click a node to pick it below."
    )
else:  # one target's attributions, features joined to it
    share = st.slider(
        "keep the features that hold this share of all |attribution|", 0.1, 1.0, 0.8, 0.05,
        help="pruning: features sorted by |attribution|, kept until their sum reaches the share",
    )  # fmt: skip
    mag = df["attribution"].abs()
    kept = df[(mag.cumsum() / mag.sum()).shift(fill_value=0) < share]
    layers = {k: hook_site(codec_of(saes[k]).write_hook)[0] or 0 for k in keys}
    drawn = graphview.from_attribution(
        kept, layers, model.cfg.n_layers, result.tokens, result.target.label
    )
    caption = (
        f"{len(kept)} of {len(df)} active features shown, each joined to the target by its "
        f"attribution. Edges between features need a transcoder at every layer ({why_not})."
    )
event = st.plotly_chart(
    graphview.figure(drawn), use_container_width=True, on_select="rerun",
    selection_mode="points", key="why_chart",
)  # fmt: skip
st.caption(caption)
features = drawn.nodes[drawn.nodes["kind"] == "feature"].sort_values(
    "influence", key=lambda v: v.abs(), ascending=False
)
clicked = [p.get("customdata") for p in (event.selection.points if event else [])]
picked = [int(c) for c in clicked if isinstance(c, int) and c in set(features["index"])]
if picked:
    st.session_state["why_node"] = picked[0]
if len(features):
    by_index = {int(r.index): r for r in features.itertuples()}
    if st.session_state.get("why_node") not in by_index:
        st.session_state.pop("why_node", None)
    node = by_index[
        st.selectbox(
            "node", list(by_index), key="why_node",
            format_func=lambda i: f"{by_index[i].label} @ {by_index[i].position} "
            f"{visible(result.tokens[int(by_index[i].position)])!r}",
        )
    ]  # fmt: skip
    cols = st.columns([3, 1])
    label = s.label(str(node.sae), int(node.feature))[0]
    cols[0].markdown(
        f"{feature_link(str(node.sae), int(node.feature))} at position {node.position}, "
        f"activation {node.activation:.3f}" + (f": {html.escape(visible(label))}" if label else ""),
        unsafe_allow_html=True,
    )
    if cols[1].button("Steer with this", icon=":material/tune:", key="why_steer"):
        steerlist.add(str(node.sae), int(node.feature))
        st.switch_page(st.session_state["pages"]["lab"], query_params=steerlist.params())

st.subheader("Ablation check")
n_ablate = st.number_input("ablate the top features (by attribution, positive ones)", 1, 50, 5)
if st.button("Run the ablation check", type="primary", key="why_ablate"):
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
