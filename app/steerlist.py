"""The steered features of a session: one list that every page of the explorer shares (the
feature page's "Steer with this", the inspector's rows and the lab add to it; the lab edits it).

Each row is a dict (sae, feature, mode, strength, unit, positions) with an ``id`` made when it is
added. The lab's widgets for a row are keyed by that id, never by the row's place in the list:
keyed by place, removing a row handed its widgets' settings to the row below it.
"""

from __future__ import annotations

from typing import Any

import streamlit as st

FIELDS = ("sae", "feature", "mode", "strength", "unit", "positions")


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


__all__ = ["FIELDS", "add", "edited", "find", "remove", "rows", "widget_key"]
