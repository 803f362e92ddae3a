"""What every page of the explorer shares: its settings, the store, the model, links and shading.

Pages stay thin: data comes from ``scope.store`` (and ``scope.store.explore``), the model and
SAEs from ``scope.model`` / ``scope.sae``, steering from ``scope.steer`` / ``scope.generate``.
"""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlencode

import streamlit as st

from scope.errors import ScopeError
from scope.store import Store
from scope.store.view import Example, example_html


@dataclass(frozen=True)
class Settings:
    """How the app was started: ``streamlit run app/Home.py -- --store S [--model M]``."""

    store: str
    model: str | None
    device: str | None


def settings() -> Settings:
    """From the command line after ``--``, else SCOPE_STORE / SCOPE_MODEL / SCOPE_DEVICE."""
    ap = argparse.ArgumentParser(prog="app/Home.py", add_help=False)
    ap.add_argument("--store", default=os.environ.get("SCOPE_STORE"))
    ap.add_argument("--model", default=os.environ.get("SCOPE_MODEL"))
    ap.add_argument("--device", default=os.environ.get("SCOPE_DEVICE"))
    args, _ = ap.parse_known_args(sys.argv[1:])
    return Settings(store=args.store or "", model=args.model, device=args.device)


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


@dataclass(frozen=True)
class Loaded:
    """The model and the store's SAEs, loaded on the first page that needs them."""

    model: Any
    saes: dict[str, Any]
    """Store key -> sae-lens SAE."""


@st.cache_resource(show_spinner="loading the model and SAEs (once per process)")
def _load(store_path: str, model_name: str, device: str | None) -> Loaded:
    from scope.identity import ModelIdentity
    from scope.model import load_model
    from scope.sae import load_recorded_sae

    opened = _open_store(store_path)
    model = load_model(model_name, device=device)
    recorded = opened.manifest.model
    if ModelIdentity.of(model, like=recorded).fingerprint != recorded.fingerprint:
        raise ScopeError(
            f"{model_name} is not the model this store was recorded with ({recorded.name}): "
            "its weights differ; start the app with --model naming that one"
        )
    saes = {
        key: load_recorded_sae(info, device=str(next(model.parameters()).device))
        for key, info in opened.saes.items()
    }
    return Loaded(model=model, saes=saes)


def model_or_reason() -> Loaded | None:
    """The loaded model and SAEs, or None after saying on the page why they are off and how to
    turn them on (every store page keeps working without them)."""
    s = settings()
    name = s.model or store().manifest.model.name
    try:
        return _load(settings().store, name, s.device)
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


def feature_url(sae: str, feature: int) -> str:
    """The URL that opens a feature's page (relative to the app)."""
    return "/feature?" + urlencode({"sae": sae, "feature": feature})


def feature_link(sae: str, feature: int, text: str | None = None) -> str:
    """A Markdown link to a feature's page."""
    return f"[{text or f'{sae}/{feature}'}]({feature_url(sae, feature)})"


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
    "Settings",
    "example_row",
    "feature_link",
    "feature_url",
    "model_or_reason",
    "settings",
    "store",
]
