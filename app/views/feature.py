"""A feature's dashboard: stats, activation histogram, top and interval examples with every
token shaded, logit lens, nearest features, Neuronpedia link, label and notes, and a way into
the steering lab. Opens directly from ``/feature?sae=KEY&feature=N``."""

from __future__ import annotations

import random
from typing import Any

import plotly.graph_objects as go
import steerlist
import streamlit as st
from explorer import (
    TOKEN_CSS,
    example_row,
    explainer_model,
    feature_link,
    model_or_reason,
    model_quietly,
    settings,
    store,
)

from scope.errors import ScopeError
from scope.inspect import activations
from scope.record.tables import written_directions
from scope.store import explore, set_label
from scope.store.schema import N_INTERVALS
from scope.store.view import shaded, visible

LENS_K = 10


@st.cache_data(show_spinner=False, max_entries=4)
def corpus_ids(root: str, version: str) -> list[int]:
    """The tokens of the recorded corpus (cached per snapshot)."""
    return explore.corpus_tokens(store())


def corpus_lens(
    loaded: Any, key: str, feature: int, ids: list[int]
) -> tuple[list[tuple[str, float]], list[tuple[str, float]]]:
    """The feature's logit lens over the corpus' tokens only: promoted and suppressed."""
    direction = written_directions(loaded.saes[key], loaded.model)[feature]
    w_u = loaded.model.W_U.detach().to(direction.dtype)[:, ids]
    logits = (direction @ w_u).float()
    k = min(LENS_K, len(ids))
    out = []
    for largest in (True, False):
        found = logits.topk(k, largest=largest)
        names = s.tokens_text([ids[i] for i in found.indices.tolist()])
        out.append(list(zip(names, found.values.tolist(), strict=True)))
    return out[0], out[1]


def stored_lens_within(
    key: str, feature: int, ids: set[int]
) -> tuple[list[tuple[str, float]], list[tuple[str, float]]]:
    """The stored lens (top and bottom of the whole vocabulary), only the tokens in ``ids``."""
    row = s.sql(
        "select top_ids, top_logits, bottom_ids, bottom_logits from lens "
        "where sae = ? and feature = ?",
        [key, feature],
    ).fetchone()
    if row is None:
        return [], []
    out = []
    for found, values in ((row[0], row[1]), (row[2], row[3])):
        kept = [(i, v) for i, v in zip(found, values, strict=True) if i in ids]
        names = s.tokens_text([i for i, _ in kept])
        out.append([(n, v) for n, (_, v) in zip(names, kept, strict=True)])
    return out[0], out[1]


s = store()
keys = list(s.saes)
params = st.query_params
sae = params.get("sae", keys[0])
if sae not in keys:
    st.error(f"No SAE {sae!r} in this store; it has {', '.join(keys)}.")
    sae = keys[0]
try:  # no feature named (the sidebar's link): the SAE's first live feature, not a dead one
    index = int(params.get("feature", explore.live_neighbour(s, sae, -1, 1) or 0))
except ValueError:
    st.error(f"feature {params.get('feature')!r} is not a number.")
    index = 0
if not 0 <= index < s.saes[sae].d_sae:
    st.error(f"feature {index} is out of range: {sae} has features 0..{s.saes[sae].d_sae - 1}.")
    index = 0


def go_to(key: str, feature: int | None) -> None:
    if feature is not None:
        st.query_params.update({"sae": key, "feature": str(feature)})


if st.session_state.get("feature_shown") != (sae, index):  # opened by URL, link or button
    st.session_state.update(feature_shown=(sae, index), feature_sae=sae, feature_index=index)

with st.sidebar:
    st.caption("Feature")
    picked = st.selectbox("SAE", keys, key="feature_sae")
    width = s.saes[picked].d_sae
    st.session_state["feature_index"] = min(st.session_state["feature_index"], width - 1)
    number = st.number_input("index", 0, width - 1, key="feature_index")
    if (picked, number) != (sae, index):
        go_to(picked, int(number))
        st.rerun()
    nav = st.columns(3)
    if nav[0].button("◀ prev", help="previous live feature", width="stretch"):
        go_to(sae, explore.live_neighbour(s, sae, index, -1))
        st.rerun()
    if nav[1].button("next ▶", help="next live feature", width="stretch"):
        go_to(sae, explore.live_neighbour(s, sae, index, 1))
        st.rerun()
    if nav[2].button("random", help="a random live feature", width="stretch"):
        go_to(sae, explore.random_live(s, sae, random.Random()))
        st.rerun()
    whole = st.toggle(
        "whole windows", help="show each example's whole window, not a few tokens around its max"
    )
    context = None if whole else st.slider("context tokens", 2, 40, 10)

try:
    view = s.feature(f"{sae}/{index}")
except ScopeError as err:
    st.error(str(err))
    st.stop()

st.markdown(TOKEN_CSS, unsafe_allow_html=True)
title = f"{view.address}" + (f" · {view.label}" if view.label else "")
st.title(title)
info = s.saes[sae]
st.caption(
    f"hook `{info.hook_name}`"
    + (f" → `{info.hook_out}`" if info.hook_out != info.hook_name else "")
    + " · "
    + (
        f"[open on Neuronpedia]({view.neuronpedia_url})"
        if view.neuronpedia_url
        else "no Neuronpedia id"
    )
)
cols = st.columns(5)
cols[0].metric("density", f"{view.density:.4%}", help="fraction of tokens where it fires")
cols[1].metric("tokens", f"{view.count:,}")
cols[2].metric("max", f"{view.max:.2f}")
cols[3].metric("mean", f"{view.mean:.2f}", help=f"± {view.std:.2f}, where it fires")
if cols[4].button(
    "Steer with this", icon=":material/tune:", type="primary", disabled=view.max <= 0
):
    steerlist.add(sae, index)
    st.switch_page(st.session_state["pages"]["lab"], query_params=steerlist.params())

if view.max <= 0:
    st.info("This feature never fired on the recorded corpus (dead).")


def score(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def explain_now() -> None:
    """Explain and score this feature with the app's --explainer, then show the result."""
    from scope.explain import explain_features
    from scope.explain.models import HTTPModel, LocalModel

    loaded = model_or_reason()
    if loaded is None:
        return
    spec = settings().explainer or ""
    try:
        with st.spinner(f"explaining {view.address} with {spec} (and scoring it)"):
            if spec.startswith(("http://", "https://")):
                url, _, name = spec.partition("#")
                who: Any = HTTPModel(url, name or None)
            else:
                who = LocalModel(loaded.model if spec == s.manifest.model.name else
                                 explainer_model(spec), spec)  # fmt: skip
            explain_features(str(s.root), [(sae, index)], model=loaded.model, saes=loaded.saes,
                             explainer=who, redo=True)  # fmt: skip
    except ScopeError as err:
        st.error(str(err))
        return
    s.refresh()
    st.rerun()


with st.container(key="explanations"):
    if view.explanations:
        for e in view.explanations:
            st.markdown(
                f"**{visible(e.explanation)}**  \n"
                f"detection {score(e.detection)} · fuzzing {score(e.fuzzing)} "
                f"({e.n_pos} held-out / {e.n_neg} non-activating examples; 0.5 is chance) · "
                f"by `{e.explainer}`"
            )
    elif view.max > 0:
        st.caption("No explanation yet" + ("" if settings().explainer else
                   ": `scope explain`, or start the app with `--explainer` to explain it here"))  # fmt: skip
    if settings().explainer and view.max > 0 and st.button("Explain", icon=":material/psychology:"):
        explain_now()

left, right = st.columns([3, 2])
with left:
    st.subheader("Top examples")
    if view.top:
        rows = "".join(example_row(ex, view.max, context) for ex in view.top)
        st.html(f"{TOKEN_CSS}<div id='top-examples'>{rows}</div>")
    else:
        st.caption("none")
    st.subheader("Try it on your text")
    with st.form("try"):
        tried = st.text_area("your text", placeholder="a sentence to see this feature on",
                             height=80)  # fmt: skip
        run_it = st.form_submit_button("Show the feature on it")
    if run_it and tried.strip():
        model = model_quietly(load=True)
        if model is None:
            st.warning("The model could not be loaded: start the app with `--model`.")
        else:
            try:
                got = activations(model.model, [model.saes[sae]], tried, store=s)
            except ScopeError as err:
                st.error(str(err))
            else:
                values = got.strip(sae, index)
                peak = max(values[p] for p in got.counted)
                body = shaded([got.tokens[p] for p in got.counted],
                              [values[p] for p in got.counted], view.max)  # fmt: skip
                st.html(f"{TOKEN_CSS}<div class='ex' id='tried'><span class='act'>{peak:.2f}"
                        f"</span>{body}</div>")  # fmt: skip
                st.caption(f"shaded against the feature's max on the corpus ({view.max:.2f})")
    st.subheader("Examples by activation interval")
    for interval in sorted(view.intervals, reverse=True):
        lo, hi = interval * view.max / N_INTERVALS, (interval + 1) * view.max / N_INTERVALS
        exs = view.intervals[interval]
        with st.expander(
            f"{lo:.2f} – {hi:.2f} of the max · {len(exs)} examples",
            expanded=interval == max(view.intervals),
        ):
            st.html(TOKEN_CSS + "".join(example_row(ex, view.max, context) for ex in exs))

with right:
    st.subheader("Activation histogram")
    if view.histogram:
        fig = go.Figure(go.Bar(
            x=[(lo + hi) / 2 for lo, hi, _ in view.histogram],
            y=[c for _, _, c in view.histogram],
            width=[hi - lo for lo, hi, _ in view.histogram],
            marker_color="#ea580c",
            hovertemplate="%{x:.3f}: %{y} tokens<extra></extra>",
        ))  # fmt: skip
        fig.update_layout(height=260, margin=dict(t=10, b=10, l=10, r=10), xaxis_title="activation",
                          yaxis_title="tokens", bargap=0)  # fmt: skip
        st.plotly_chart(fig, width="stretch")
    st.subheader("Logit lens")
    over = st.radio(
        "tokens", ["in the corpus", "all"], horizontal=True, label_visibility="collapsed",
        help="in the corpus: only tokens that occur in the recorded corpus (rare byte and "
        "script fragments, which often have the largest logits, left out); all: the whole "
        "vocabulary",
    )  # fmt: skip
    promotes, suppresses = view.top_tokens, view.bottom_tokens
    if over == "in the corpus":
        ids = corpus_ids(str(s.root), s.version.name)
        loaded = model_quietly(load=st.session_state.get("lens_load", False))
        if loaded is not None:
            promotes, suppresses = corpus_lens(loaded, sae, index, ids)
        else:
            promotes, suppresses = stored_lens_within(sae, index, set(ids))
            note = st.columns([3, 2], vertical_alignment="center")
            note[0].caption(
                "the model is not loaded: these are the corpus tokens among the stored top "
                f"{LENS_K} of the whole vocabulary"
            )
            if note[1].button("load the model", help="for the lens over every corpus token"):
                st.session_state["lens_load"] = True
                st.rerun()
    lens = st.columns(2)
    lens[0].caption("promotes")
    lens[0].dataframe([{"token": visible(t), "logit": v} for t, v in promotes], hide_index=True,
                      column_config={"logit": st.column_config.NumberColumn(format="%.3f")})  # fmt: skip
    lens[1].caption("suppresses")
    lens[1].dataframe([{"token": visible(t), "logit": v} for t, v in suppresses], hide_index=True,
                      column_config={"logit": st.column_config.NumberColumn(format="%.3f")})  # fmt: skip
    st.subheader("Nearest features")
    st.caption("by cosine of decoder directions")
    st.markdown(
        " · ".join(f"{feature_link(sae, f, str(f))} ({c:.2f})" for f, c in view.neighbours)
        or "none",
        unsafe_allow_html=True,
    )
    st.subheader("Label and notes")
    with st.form("label"):
        label = st.text_input("label", value=view.label, placeholder="what this feature fires on")
        notes = st.text_area("notes", value=view.notes, height=90)
        if st.form_submit_button("Save"):
            set_label(s.root, sae, index, label, notes)
            st.toast(f"saved the label of {view.address}")
            st.rerun()
