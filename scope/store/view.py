"""One feature as the store knows it, and its dashboard as HTML (shown inline in Jupyter)."""

from __future__ import annotations

import html
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from scope.store.explanations import Explanation


@dataclass(frozen=True)
class Example:
    """A window shown for a feature: its text, where it came from and the activations."""

    window: int
    doc: str
    offset: int
    act: float
    """The feature's max over the window."""
    pos: int
    """Where the max is."""
    tokens: list[str]
    acts: list[float] | None
    """The feature on every token (top examples); None for interval examples."""


@dataclass(frozen=True)
class FeatureView:
    """Everything the store knows about one feature."""

    sae: str
    index: int
    count: int
    density: float
    max: float
    mean: float
    std: float
    top: list[Example]
    intervals: dict[int, list[Example]]
    """Interval (0 .. N_INTERVALS - 1 of ``scope.store.schema``, equal parts of the max) ->
    random windows whose max falls in it."""
    histogram: list[tuple[float, float, int]]
    """(lo, hi, count) of the activation over log-spaced bins."""
    top_tokens: list[tuple[str, float]]
    """Logit lens: the tokens the feature promotes most, with the logit."""
    bottom_tokens: list[tuple[str, float]]
    neighbours: list[tuple[int, float]]
    """Nearest features by decoder cosine."""
    neuronpedia_url: str | None
    label: str = ""
    notes: str = ""
    explanations: tuple[Explanation, ...] = ()
    """Its explanations with their scores, best first (``scope explain``)."""

    @property
    def address(self) -> str:
        return f"{self.sae}/{self.index}"

    def _repr_html_(self) -> str:
        return feature_html(self)


def visible(token: str) -> str:
    """A token as a person should see it: spaces, newlines, tabs and other control characters
    made visible (a terminal or page must never act on them)."""
    out = []
    for ch in token:
        if ch == " ":
            out.append("·")
        elif ch == "\n":
            out.append("↵")
        elif ch == "\t":
            out.append("→")
        elif ord(ch) < 32 or 127 <= ord(ch) < 160:
            out.append(f"\\x{ord(ch):02x}")
        else:
            out.append(ch)
    return "".join(out)


def shaded(tokens: list[str], acts: list[float], top: float, mark: int | None = None) -> str:
    """Tokens as HTML, each shaded by its activation relative to ``top`` (the value on hover and
    in ``data-act``), spaces, newlines and control characters made visible, ``mark`` boxed."""
    spans = []
    for i, (tok, a) in enumerate(zip(tokens, acts, strict=True)):
        alpha = min(max(a / top, 0.0), 1.0) if top > 0 else 0.0
        box = "outline:2px solid #9a3412;" if i == mark else ""
        spans.append(
            f'<span class="tok" title="{a:.3f}" data-act="{a:.3f}" style="background:'
            f"rgba(234,88,12,{alpha:.2f});{box}white-space:pre;font-family:ui-monospace,"
            f'monospace;border-radius:2px">{html.escape(visible(tok))}</span>'
        )
    return "<wbr>".join(spans)  # lines may break between tokens, never inside one


def example_html(ex: Example, top: float, context: int | None = None) -> str:
    """A window with every token shaded by its activation (value on hover), the max boxed;
    ``context`` tokens either side of the max, or the whole window. BOS is never shown."""
    acts = ex.acts or [ex.act if i == ex.pos else 0.0 for i in range(len(ex.tokens))]
    lo, hi = 1, len(ex.tokens)
    if context is not None:
        lo, hi = max(1, ex.pos - context), min(len(ex.tokens), ex.pos + context + 1)
    return shaded(ex.tokens[lo:hi], acts[lo:hi], top, mark=ex.pos - lo)


def feature_html(view: FeatureView) -> str:
    """The feature's dashboard: stats, logit lens, top and interval examples."""
    esc = html.escape
    head = f"<b>{esc(view.address)}</b>"
    if view.label:
        head += f" · {esc(view.label)}"
    stats = (
        f"density {view.density:.3%} ({view.count:,} tokens) · max {view.max:.2f} · "
        f"mean {view.mean:.2f} ± {view.std:.2f}"
    )
    link = (
        f' · <a href="{esc(view.neuronpedia_url)}" target="_blank">Neuronpedia</a>'
        if view.neuronpedia_url
        else ""
    )
    promotes = " ".join(f"<code>{esc(visible(t))}</code>" for t, _ in view.top_tokens)
    suppresses = " ".join(f"<code>{esc(visible(t))}</code>" for t, _ in view.bottom_tokens)
    rows = "".join(
        f"<tr><td style='text-align:right'>{ex.act:.2f}</td>"
        f"<td style='text-align:left'>{example_html(ex, view.max, context=12)}</td></tr>"
        for ex in view.top
    )
    intervals = "".join(
        f"<tr><td style='text-align:right'>{ex.act:.2f}</td>"
        f"<td style='text-align:left'>{example_html(ex, view.max, context=12)}</td></tr>"
        for i in sorted(view.intervals, reverse=True)
        for ex in view.intervals[i][:2]
    )
    return (
        f"<div style='font-family:sans-serif'><div>{head}</div><div>{stats}{link}</div>"
        f"<div>promotes: {promotes}</div><div>suppresses: {suppresses}</div>"
        f"<table><tr><th>max</th><th style='text-align:left'>top examples</th></tr>{rows}"
        f"<tr><th></th><th style='text-align:left'>interval examples</th></tr>{intervals}"
        "</table></div>"
    )


__all__ = ["Example", "FeatureView", "example_html", "feature_html", "shaded", "visible"]
