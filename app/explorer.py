"""What every page of the explorer shares: its settings, the store, the model, links and shading.

Pages stay thin: data comes from ``scope.store`` (and ``scope.store.explore``), the model and
SAEs from ``scope.model`` / ``scope.sae``, steering from ``scope.steer`` / ``scope.generate``.
"""

from __future__ import annotations

import argparse
import html
import os
import sys
import time
from dataclasses import dataclass
from datetime import timedelta
from typing import Any
from urllib.parse import urlencode

import steerlist
import streamlit as st

from scope.errors import ScopeError
from scope.store import Store
from scope.store.progress import read_status
from scope.store.view import Example, example_html


@dataclass(frozen=True)
class Settings:
    """How the app was started: ``streamlit run app/Home.py -- --store S [--model M]``."""

    store: str
    model: str | None
    device: str | None
    explainer: str | None = None
    """An endpoint URL or a model to explain features with (the feature page's Explain)."""


def settings() -> Settings:
    """From the command line after ``--``, else SCOPE_STORE / SCOPE_MODEL / SCOPE_DEVICE /
    SCOPE_EXPLAINER."""
    ap = argparse.ArgumentParser(prog="app/Home.py", add_help=False)
    ap.add_argument("--store", default=os.environ.get("SCOPE_STORE"))
    ap.add_argument("--model", default=os.environ.get("SCOPE_MODEL"))
    ap.add_argument("--device", default=os.environ.get("SCOPE_DEVICE"))
    ap.add_argument("--explainer", default=os.environ.get("SCOPE_EXPLAINER"))
    args, _ = ap.parse_known_args(sys.argv[1:])
    return Settings(store=args.store or "", model=args.model, device=args.device,
                    explainer=args.explainer)  # fmt: skip


@st.cache_resource(show_spinner=False)
def _open_store(path: str) -> Store:
    return Store(path)


def store() -> Store:
    """The store, opened once per process and moved to its newest snapshot on every page run
    (a recording adding corpus, a label or a sweep written since show at once)."""
    path = settings().store
    if not path:
        st.error("No store given: start the app with `scope app --store runs/NAME`.")
        st.stop()
    try:
        opened = _open_store(path)
        opened.refresh()
    except ScopeError as err:
        st.error(str(err))
        st.stop()
    return opened


def recording_progress(s: Store) -> None:
    """Where a recording into the store stands (tokens done of the total, rate, time left) and
    which snapshot the page shows, when the store is not complete; nothing once it is."""
    status = read_status(s.root)
    if s.manifest.state == "complete" and (status is None or status.state == "complete"):
        return
    shown = f"This page shows snapshot {s.version.name}"
    if status is None:  # no word from the recording (a --ray run, or an older workbench)
        part = s.manifest.parts[-1] if s.manifest.parts else None
        so_far = f": {part.next:,} of {part.windows:,} windows" if part is not None else ""
        st.info(f"The recording into this store is not finished{so_far}. {shown}.")
        return
    of = f"{status.tokens:,} of {status.total:,} tokens ({status.fraction:.0%})"
    in_snapshot = (
        f" ({status.snapshot_tokens:,} tokens)"
        if status.snapshot == s.version.name and status.snapshot_tokens is not None
        else ""
    )
    if status.running():
        eta = status.eta_seconds
        left = str(timedelta(seconds=round(eta))) if eta is not None else "estimating"
        rate = f"{status.tokens_per_s:,.0f} tokens/s" if status.tokens_per_s > 0 else "starting"
        now = "writing a snapshot" if status.writing else f"{rate} · ETA {left}"
        ago = max(0, round(time.time() - status.updated))
        st.progress(min(status.fraction, 1.0), text=f"Recording: {of} · {now} ({ago} s ago)")
        note, button = st.columns([5, 1], vertical_alignment="center")
        note.caption(
            f"{shown}{in_snapshot}; the recording writes a newer one every checkpoint: "
            "refresh to see it."
        )
        if button.button("Refresh", icon=":material/refresh:"):
            st.rerun()
    elif status.state == "complete":
        st.info(f"The recording finished ({of}): refresh to see its last snapshot.")
    else:
        st.warning(
            f"The recording stopped at {of}. {shown}{in_snapshot}. Run the same `scope record "
            "... --resume` (or `./dev demo`) again to continue it."
        )


@dataclass(frozen=True)
class Loaded:
    """The model and the store's SAEs, loaded on the first page that needs them."""

    model: Any
    saes: dict[str, Any]
    """Store key -> sae-lens SAE."""


@st.cache_resource(show_spinner="loading the model and SAEs (once per process)")
def _load(store_path: str, model_name: str, device: str | None) -> Loaded:
    from scope.sae import open_recorded

    model, saes = open_recorded(_open_store(store_path), model_name, device=device)
    return Loaded(model=model, saes=saes)


@st.cache_resource(show_spinner="loading the explainer model (once per process)")
def explainer_model(name: str) -> Any:
    """A model to explain with, loaded once per process (``--explainer`` naming a model)."""
    from scope.model import load_model

    return load_model(name, device=settings().device)


def model_or_reason() -> Loaded | None:
    """The loaded model and SAEs, or None after saying on the page why they are off and how to
    turn them on (every store page keeps working without them)."""
    args = _load_args()
    try:
        loaded = _load(*args)
        _LOADED.add(args)
        return loaded
    except ScopeError as err:
        st.warning(
            f"The model is off: {err}\n\nStore pages (overview, features, search) work without "
            "it. Start the app with `--model` naming a local copy of the model to turn this "
            "page on.",
            icon=":material/power_off:",
        )
    except (OSError, RuntimeError) as err:  # no memory, no device
        st.warning(
            f"The model could not be loaded: {err}. Free memory or pass `--device cpu`.",
            icon=":material/power_off:",
        )
    return None


def kept_text_area(label: str, name: str, default: str, **kwargs: Any) -> str:
    """A text area whose text is ``st.session_state[name]`` and outlives the page (a visit to
    another page and back keeps it). The widget has its own stable key: a text area given
    ``value=`` from session state without one is a new widget whenever that text changes, and
    snaps back to the text before, so every second edit would be lost."""
    state = st.session_state
    box = f"{name}_box"
    if box not in state:  # first run, or the widget was away on another page
        state[box] = state.get(name, default)
    text = str(st.text_area(label, key=box, **kwargs))
    state[name] = text
    return text


_LOADED: set[tuple[str, str, str | None]] = set()
"""What this process has loaded (``_load``'s arguments): pages that only do more with the
model use it when it is there, and never start a load of gigabytes on their own."""


def _load_args() -> tuple[str, str, str | None]:
    s = settings()
    return s.store, s.model or store().manifest.model.name, s.device


def model_quietly(load: bool = False) -> Loaded | None:
    """The model and SAEs if this process has them already (``load``: load them now), else
    None without a word (for pages that work without them and do more with them)."""
    args = _load_args()
    if not load and args not in _LOADED:
        return None
    try:
        loaded = _load(*args)
    except (ScopeError, OSError, RuntimeError):
        return None
    _LOADED.add(args)
    return loaded


def feature_url(sae: str, feature: int) -> str:
    """The URL that opens a feature's page (relative to the app), carrying the steer list."""
    return "/feature?" + urlencode(
        {"sae": sae, "feature": feature, **steerlist.params()}, doseq=True
    )


def feature_link(sae: str, feature: int, text: str | None = None) -> str:
    """A link to a feature's page that opens in place (a new tab on the user's middle-click or
    Ctrl-click), as HTML: show it with ``st.markdown(..., unsafe_allow_html=True)`` or
    ``st.html`` (Streamlit opens Markdown links in a new tab)."""
    return (
        f'<a href="{html.escape(feature_url(sae, feature))}" target="_self">'
        f"{html.escape(text or f'{sae}/{feature}')}</a>"
    )


TOKEN_CSS = """<style>
.ex{line-height:1.9;margin:2px 0 6px 0;font-size:0.85rem}
.tok{position:relative;cursor:default}
.tok:hover::after{content:attr(data-act);position:absolute;left:0;top:-1.7em;z-index:20;
  background:#1f2937;color:#fff;font-size:0.7rem;padding:0 4px;border-radius:3px;white-space:pre}
.act{display:inline-block;min-width:3.6em;color:#666;font-size:0.8rem;font-family:monospace}
</style>"""


def example_row(ex: Example, top: float, context: int | None) -> str:
    """One example as a line: its max, then its tokens shaded (``scope.store.view``)."""
    return f'<div class="ex"><span class="act">{ex.act:.2f}</span>{example_html(ex, top, context)}</div>'


__all__ = [
    "TOKEN_CSS",
    "Loaded",
    "explainer_model",
    "Settings",
    "example_row",
    "feature_link",
    "feature_url",
    "kept_text_area",
    "model_or_reason",
    "model_quietly",
    "recording_progress",
    "settings",
    "store",
]
