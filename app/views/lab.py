"""Steering lab: features from a feature page ("Steer with this") or added here, each with mode,
strength and positions; baseline and steered continuations side by side, streamed; sweeps over
strengths with their charts, saved to the store as experiments."""

from __future__ import annotations

import html

import streamlit as st
from explorer import feature_link, kept_text_area, model_or_reason, store

from scope.errors import ScopeError
from scope.generate import Sampling, compare
from scope.steer import MODES, POSITIONS, Steer
from scope.store import explore
from scope.sweep import parse_strengths, sweep

s = store()
st.title("Steering lab")
loaded = model_or_reason()
steers: list[dict] = st.session_state.setdefault("steers", [])

with st.expander("Add a feature", expanded=not steers):
    cols = st.columns([2, 1, 1, 1, 1, 1])
    keys = list(s.saes)
    key = cols[0].selectbox("SAE", keys)
    feature = cols[1].number_input("feature", 0, int(s.saes[key]["d_sae"]) - 1, 0)
    mode = cols[2].selectbox("mode", MODES)
    unit = cols[3].selectbox(
        "unit",
        ["max", "absolute"],
        help="max: the feature firing at this multiple of its recorded max (what it writes there)",
        disabled=mode != "add",
    )
    strength = cols[4].number_input(
        "strength", value=1.0 if mode == "add" else 0.0, step=0.5, disabled=mode == "ablate"
    )
    positions = cols[5].selectbox("positions", POSITIONS, index=POSITIONS.index("all"))
    if st.button("Add"):
        steers.append({"sae": key, "feature": int(feature), "mode": mode, "strength": float(strength),
                       "unit": unit if mode == "add" else "absolute", "positions": positions})  # fmt: skip
        st.rerun()

st.subheader("Features steered")
if not steers:
    st.caption("none yet: open a feature and press “Steer with this”, or add one above")
for i, spec in enumerate(list(steers)):
    cols = st.columns([3, 2, 2, 2, 2, 1])
    cols[0].markdown(feature_link(spec["sae"], spec["feature"]))
    spec["mode"] = cols[1].selectbox(
        "mode", MODES, index=MODES.index(spec["mode"]), key=f"mode{i}", label_visibility="collapsed"
    )
    spec["strength"] = cols[2].number_input(
        "strength",
        value=float(spec["strength"]),
        step=0.5,
        key=f"strength{i}",
        label_visibility="collapsed",
        disabled=spec["mode"] == "ablate",
    )
    spec["unit"] = cols[3].selectbox(
        "unit",
        ["max", "absolute"],
        index=["max", "absolute"].index(spec["unit"]) if spec["mode"] == "add" else 1,
        key=f"unit{i}",
        label_visibility="collapsed",
        disabled=spec["mode"] != "add",
    )
    spec["positions"] = cols[4].selectbox(
        "positions",
        POSITIONS,
        index=POSITIONS.index(spec["positions"]),
        key=f"pos{i}",
        label_visibility="collapsed",
    )
    if cols[5].button("✕", key=f"remove{i}", help="remove"):
        steers.pop(i)
        st.rerun()

prompt = kept_text_area("prompt", "lab_prompt", "I think that", height=80)
with st.expander("Sampling"):
    cols = st.columns(5)
    max_new = cols[0].number_input("new tokens", 1, 512, 40)
    temperature = cols[1].number_input("temperature", 0.0, 5.0, 0.7, step=0.1, help="0 is greedy")
    top_p = cols[2].number_input("top p", 0.01, 1.0, 0.9, step=0.05)
    freq = cols[3].number_input("frequency penalty", 0.0, 5.0, 0.0, step=0.1)
    seed = cols[4].number_input("seed", 0, 2**31 - 1, 0)


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
        built = [
            Steer(loaded.saes[d["sae"]], d["feature"], 0.0 if d["mode"] == "ablate" else d["strength"],
                  mode=d["mode"], unit=d["unit"] if d["mode"] == "add" else "absolute", positions=d["positions"])
            for d in steers
        ]  # fmt: skip
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
            done = sweep(loaded.model, prompt, ready[0][0], values, sampling=ready[1], store=s, save_to=s.root,
                         on_point=lambda p, i, n: bar.progress((i + 1) / n, text=f"strength {p.strength:g}"))  # fmt: skip
        except ScopeError as err:
            st.error(str(err))
        else:
            bar.empty()
            s.refresh()  # the new experiment's table, listed below
            st.plotly_chart(done.figure(), width="stretch")
            st.success(f"saved as experiment {done.id}")

saved = explore.experiments(s)
st.subheader(f"Saved sweeps ({len(saved)})")
for done in saved:
    with st.expander(
        f"{done.id} · feature {done.feature} · {done.prompt[:60]!r} · {len(done.points)} points"
    ):
        st.plotly_chart(done.figure(), width="stretch", key=f"fig-{done.id}")
        st.dataframe([{"strength": p.strength, "mode": p.mode, "sae": p.sae, "target_act": p.target_act,
                       "kl": p.kl, "loss": p.loss, "text": p.text} for p in done.points], hide_index=True)  # fmt: skip
