"""The steered features: one list that every page of the explorer shares (the feature page's
"Steer with this", the inspector's rows and the lab add to it; the lab edits it), kept in the
URL in the steering spec's own form (``steer=L12.res.16k/1234:4xmax``, repeated; see
``scope.steer_spec.SteerSpec``), so every link inside the
app, a page opened in a new tab, a bookmark and the browser's Back all carry the same list.

Each row is a dict (sae, feature, mode, strength, unit, positions) with an ``id`` made when it is
added. The lab's widgets for a row are keyed by that id, never by the row's place in the list:
keyed by place, removing a row handed its widgets' settings to the row below it.
"""

from __future__ import annotations

from typing import Any

import streamlit as st

from scope.errors import ScopeError
from scope.identity import SAEInfo
from scope.steer_spec import SteerSpec

FIELDS = ("sae", "feature", "mode", "strength", "unit", "positions")
PARAM = "steer"


def spec(row: dict[str, Any]) -> SteerSpec:
    """A row as the steer it runs: the lab keeps a row's strength and unit while its mode is
    ablate or clamp (so switching back restores them); the spec drops what the mode ignores."""
    mode = row["mode"]
    return SteerSpec(
        sae=row["sae"], feature=int(row["feature"]), mode=mode,
        strength=0.0 if mode == "ablate" else float(row["strength"]),
        unit=row["unit"] if mode == "add" else "absolute", positions=row["positions"],
    )  # fmt: skip


def encode(row: dict[str, Any]) -> str:
    """A row as it reads in the URL: the steering spec's own form, ``L12.res.16k/1234:4xmax``."""
    return str(spec(row))


def decode(text: str, saes: dict[str, SAEInfo]) -> dict[str, Any]:
    """A row from the URL (``SteerSpec.parse``), checked against the store's SAEs."""
    try:
        found = SteerSpec.parse(text)
    except ScopeError as err:
        raise ScopeError(f"steer {text!r} in the URL: {err}") from None
    if found.sae not in saes:
        raise ScopeError(
            f"steer {text!r}: no SAE {found.sae!r} in this store (it has {', '.join(saes)})"
        )
    d_sae = saes[found.sae].d_sae
    if found.feature >= d_sae:
        raise ScopeError(f"steer {text!r}: {found.sae} has features 0..{d_sae - 1}")
    return found.to_dict()


def sync(saes: dict[str, SAEInfo]) -> None:
    """Every page run, first: a list brought by the URL (a link, a new tab, Back) becomes the
    session's; then the session's list is written to the URL (navigating by the sidebar drops
    the query, and this puts the list back)."""
    state = st.session_state
    given = st.query_params.get_all(PARAM)
    if given and given != state.get("steer_url"):
        adopted = []
        for text in given:
            try:
                adopted.append({"id": _new_id(), **decode(text, saes)})
            except ScopeError as err:
                st.warning(f"{err}; it is left out", icon=":material/link_off:")
        state["steers"] = adopted
    publish()


def publish() -> None:
    """Write the list to the URL as it is now."""
    encoded = [encode(r) for r in rows()]
    if encoded:
        if st.query_params.get_all(PARAM) != encoded:
            st.query_params[PARAM] = encoded
    elif PARAM in st.query_params:
        del st.query_params[PARAM]
    st.session_state["steer_url"] = encoded


def params() -> dict[str, list[str]]:
    """The list as query parameters, for links and page switches that keep it."""
    encoded = [encode(r) for r in rows()]
    return {PARAM: encoded} if encoded else {}


def rows() -> list[dict[str, Any]]:
    """The session's steered features, in the order they were added."""
    state = st.session_state
    found: list[dict[str, Any]] = state.setdefault("steers", [])
    for row in found:  # rows put in the list by hand (a notebook, a test) get an id too
        if "id" not in row:
            row["id"] = _new_id()
    return found


def _new_id() -> int:
    state = st.session_state
    made = int(state.get("steer_ids", 0))
    state["steer_ids"] = made + 1
    return made


def add(
    sae: str,
    feature: int,
    *,
    mode: str = "add",
    strength: float = 1.0,
    unit: str = "max",
    positions: str = "all",
) -> dict[str, Any]:
    """Add a steered feature at the end of the list; returns its row."""
    row = {"id": _new_id(), "sae": sae, "feature": int(feature), "mode": mode,
           "strength": float(strength), "unit": unit, "positions": positions}  # fmt: skip
    rows().append(row)
    return row


def find(row_id: int) -> dict[str, Any] | None:
    return next((r for r in rows() if r["id"] == row_id), None)


def remove(row_id: int) -> None:
    """Remove the row with this id (a button's callback); the others keep their settings."""
    st.session_state["steers"] = [r for r in rows() if r["id"] != row_id]


def widget_key(row_id: int, field: str) -> str:
    """The key of the lab's widget for one field of one row."""
    return f"steer-{row_id}-{field}"


def edited(row_id: int, field: str) -> None:
    """A row's widget changed (its callback): copy the widget's value into the row."""
    row = find(row_id)
    if row is not None:
        value = st.session_state[widget_key(row_id, field)]
        row[field] = float(value) if field == "strength" else value


__all__ = [
    "FIELDS",
    "PARAM",
    "add",
    "decode",
    "edited",
    "encode",
    "find",
    "params",
    "publish",
    "remove",
    "rows",
    "spec",
    "sync",
    "widget_key",
]
