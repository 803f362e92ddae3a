"""Steering lab: features from a feature page ("Steer with this") or added here, each with mode,
strength and positions; baseline and steered continuations side by side, streamed; sweeps over
strengths with their charts, saved to the store as experiments."""

from __future__ import annotations

import html
from functools import partial
from typing import Any

import steerlist
import streamlit as st
from explorer import feature_link, kept_text_area, model_or_reason, store

from scope.errors import ScopeError
from scope.generate import Sampling, compare
from scope.steer import MODES, POSITIONS, Steer
from scope.steer_spec import resolve
from scope.store import explore
from scope.sweep import SweepPoint, experiments, parse_strengths, sweep

s = store()
st.title("Steering lab")
loaded = model_or_reason()
steers = steerlist.rows()
UNIT_CHOICES = ["max", "absolute", "norm"]


def recorded_max(key: str, feature: int) -> float:
    row = s.sql("select max from features where sae = ? and feature = ?", [key, feature]).fetchone()
    return float(row[0]) if row else 0.0


def row_widget(rid: int, widget: Any, name: str, **kwargs: Any) -> None:
    """One field of a steered row: keyed by the row's id, written back to the row on change."""
    widget(name, key=steerlist.widget_key(rid, name), label_visibility="collapsed",
           on_change=steerlist.edited, args=(rid, name), **kwargs)  # fmt: skip


# keyed and tracked, so a rerun (adding a row) never opens or closes it under the user
with st.expander("Add a feature", expanded=not steers, key="add_feature", on_change="rerun"):
    cols = st.columns([2, 1, 1, 1, 1, 1])
    keys = list(s.saes)
    key = cols[0].selectbox("SAE", keys)
    first_live = explore.live_neighbour(s, key, -1, 1) or 0  # not a dead feature
    feature = cols[1].number_input("feature", 0, s.saes[key].d_sae - 1, first_live)
    mode = cols[2].selectbox("mode", MODES)
    unit = cols[3].selectbox(
        "unit",
        UNIT_CHOICES,
        help="max: the feature firing at this multiple of its recorded max (what it writes "
        "there); absolute: along its unit decoder direction; norm: a fraction of the "
        "activation's norm",
        disabled=mode != "add",
    )
    strength = cols[4].number_input(
        "strength", value=1.0 if mode == "add" else 0.0, step=0.5, disabled=mode == "ablate"
    )
    positions = cols[5].selectbox("positions", POSITIONS, index=POSITIONS.index("all"))
    if st.button("Add"):
        steerlist.add(key, int(feature), mode=mode, strength=float(strength),
                      unit=unit if mode == "add" else "absolute", positions=positions)  # fmt: skip
        st.rerun()

st.subheader("Features steered")
if not steers:
    st.caption("none yet: open a feature and press “Steer with this”, or add one above")
else:
    WIDTHS = [3, 2, 2, 2, 2, 1]
    for col, head in zip(st.columns(WIDTHS), ["feature (its max on the corpus)", "mode", "strength", "unit", "positions", ""],
                         strict=True):  # fmt: skip
        col.caption(head)
for spec in steers:
    rid = spec["id"]
    top = recorded_max(spec["sae"], spec["feature"])
    cols = st.columns(WIDTHS, vertical_alignment="center")
    cols[0].markdown(
        f"{feature_link(spec['sae'], spec['feature'])} <small>max {top:.2f}</small>",
        unsafe_allow_html=True,
    )
    field = partial(row_widget, rid)

    with cols[1]:
        field(st.selectbox, "mode", options=MODES, index=MODES.index(spec["mode"]))
    with cols[2]:
        if spec["mode"] == "ablate":
            st.caption("0 (ablate)")
        else:
            field(st.number_input, "strength", value=float(spec["strength"]), step=0.5)
    with cols[3]:
        if spec["mode"] == "add":
            unit_now = spec["unit"] if spec["unit"] in UNIT_CHOICES else "absolute"
            field(st.selectbox, "unit", options=UNIT_CHOICES, index=UNIT_CHOICES.index(unit_now))
        else:
            st.caption("activation" if spec["mode"] == "clamp" else "–")
    with cols[4]:
        field(
            st.selectbox, "positions", options=POSITIONS, index=POSITIONS.index(spec["positions"])
        )
    cols[5].button(
        "✕", key=steerlist.widget_key(rid, "remove"), help="remove",
        on_click=steerlist.remove, args=(rid,),
    )  # fmt: skip
    if spec["mode"] == "add" and spec["unit"] == "max":
        cols[0].caption(f"{spec['strength']:g}× max = {spec['strength'] * top:.2f}")

prompt = kept_text_area("prompt", "lab_prompt", "I think that", height=80)
with st.expander("Sampling"):
    knobs = st.columns(5)
    max_new = knobs[0].number_input("new tokens", 1, 512, 40)
    temperature = knobs[1].number_input("temperature", 0.0, 5.0, 0.7, step=0.1, help="0 is greedy")
    top_p = knobs[2].number_input("top p", 0.01, 1.0, 0.9, step=0.05)
    freq = knobs[3].number_input("frequency penalty", 0.0, 5.0, 0.0, step=0.1)
    seed = knobs[4].number_input("seed", 0, 2**31 - 1, 0)


def text_box(text: str, which: str) -> str:
    """A continuation as plain text (never Markdown: generated text is not markup)."""
    return (
        f'<div class="gen" data-which="{which}" style="white-space:pre-wrap;padding:0.6rem;'
        f'border:1px solid #e5e7eb;border-radius:6px;min-height:3rem">{html.escape(text)}</div>'
    )


def build() -> tuple[list[Steer], Sampling] | None:
    if loaded is None:
        return None
    try:
        built = resolve([steerlist.spec(d) for d in steers], loaded.saes, s)
        sampling = Sampling(max_new_tokens=int(max_new), temperature=float(temperature), top_p=float(top_p),
                            freq_penalty=float(freq), seed=int(seed))  # fmt: skip
    except ScopeError as err:
        st.error(str(err))
        return None
    return built, sampling


if loaded is not None and st.button("Generate", type="primary", disabled=not steers):
    ready = build()
    if ready:
        left, right = st.columns(2)
        left.caption("baseline")
        right.caption("steered")
        boxes = {"baseline": left.empty(), "steered": right.empty()}
        got: dict[str, list[int]] = {"baseline": [], "steered": []}
        tok = loaded.model.tokenizer

        def on_token(which: str, token: int) -> None:
            got[which].append(token)
            boxes[which].html(text_box(tok.decode(got[which], skip_special_tokens=True), which))

        try:
            result = compare(
                loaded.model, prompt, ready[0], sampling=ready[1], store=s, on_token=on_token
            )
        except ScopeError as err:
            st.error(str(err))
        else:
            boxes["baseline"].html(text_box(result.baseline, "baseline"))
            boxes["steered"].html(text_box(result.steered, "steered"))
            st.caption(
                f"done: {len(result.baseline_tokens)} baseline and {len(result.steered_tokens)} "
                f"steered tokens, seed {result.sampling.seed}"
            )

st.subheader("Sweep")
st.caption(
    "steer the first feature above at each strength; measure the feature downstream, KL to the baseline and the loss of the text"
)
cols = st.columns([3, 1])
strengths = cols[0].text_input(
    "strengths", value="0:8:1", help="a list (0,2,4) or start:stop:step (stop included)"
)
if loaded is not None and cols[1].button("Run sweep", disabled=not steers):
    ready = build()
    if ready:
        try:
            values = parse_strengths(strengths)
            bar = st.progress(0.0, text="sweeping")

            def shown(p: SweepPoint, i: int, n: int) -> None:
                bar.progress((i + 1) / n, text=f"strength {p.strength:g}")

            done = sweep(loaded.model, prompt, ready[0][0], values, sampling=ready[1], store=s,
                         save_to=s.root, on_point=shown)  # fmt: skip
        except ScopeError as err:
            st.error(str(err))
        else:
            bar.empty()
            s.refresh()  # the new experiment's table, listed below
            st.plotly_chart(done.figure(), width="stretch")
            st.success(f"saved as experiment {done.id}")

saved = experiments(s)
st.subheader(f"Saved sweeps ({len(saved)})")
for done in saved:
    with st.expander(
        f"{done.id} · feature {done.feature} · {done.prompt[:60]!r} · {len(done.points)} points"
    ):
        st.plotly_chart(done.figure(), width="stretch", key=f"fig-{done.id}")
        st.dataframe([{"strength": p.strength, "mode": p.mode, "sae": p.sae, "target_act": p.target_act,
                       "kl": p.kl, "loss": p.loss, "text": p.text} for p in done.points], hide_index=True)  # fmt: skip
