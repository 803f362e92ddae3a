"""The Why page's graph, layer by position: what to draw (nodes and edges, from a pruned
attribution graph or from one target's attributions) and the plotly figure that draws it.

Nodes stand at (position, layer): token embeddings below layer 0, features and error nodes at
their layer, the target or the top logits above the last layer; nodes sharing a cell spread
sideways; the outputs (all at the last position) spread along the top row, the most likely
at the last position. Edges are line segments from source to target, coloured by sign (blue pushes the
target up, red down) and as wide and as opaque as their share of the largest weight. Every node and edge
trace carries its graph indices in ``customdata``, so what is drawn can be read back.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pandas as pd
import plotly.graph_objects as go

from scope.graph import Graph, Pruned
from scope.store.view import visible

KINDS = {  # kind -> (marker symbol, colour, legend name)
    "feature": ("circle", "#4c78a8", "feature"),
    "error": ("square", "#9e9e9e", "error term"),
    "token": ("diamond", "#54a24b", "token"),
    "logit": ("star", "#e45756", "output"),
}
# edges by quarter of the largest |weight|: width and opacity (weak edges fade)
STROKES = ((0.6, 0.12), (1.2, 0.3), (2.2, 0.5), (3.5, 0.75))


@dataclass(frozen=True)
class Drawn:
    """What the figure shows: ``nodes`` (index, kind, layer, position, label, sae, feature,
    activation, influence) and ``edges`` (source, target, weight), both by graph index."""

    nodes: pd.DataFrame
    edges: pd.DataFrame
    n_layers: int
    pieces: list[str]


def from_graph(graph: Graph, pruned: Pruned, keys: dict[int, str]) -> Drawn:
    """The pruned attribution graph's nodes and edges (``keys``: layer -> the store's key)."""
    nf, n_pos = graph.n_features, graph.n_pos
    tokens_at = nf + graph.n_layers * n_pos
    rows = []
    for i in pruned.nodes.nonzero().flatten().tolist():
        node: dict[str, Any] = {"index": i, "sae": "", "feature": -1, "activation": float("nan"),
                                "influence": float(pruned.cumulative[i])}  # fmt: skip
        if i < nf:
            layer, pos, feature = graph.active[i].tolist()
            key = keys.get(layer, f"L{layer}")
            node |= {"kind": "feature", "layer": layer, "position": pos, "sae": key,
                     "feature": feature, "activation": float(graph.activations[i]),
                     "label": f"{key}/{feature}"}  # fmt: skip
        elif i < tokens_at:
            layer, pos = divmod(i - nf, n_pos)
            node |= {"kind": "error", "layer": layer, "position": pos,
                     "label": f"error L{layer}"}  # fmt: skip
        elif i < tokens_at + n_pos:
            pos = i - tokens_at
            node |= {"kind": "token", "layer": -1, "position": pos,
                     "label": f"token {visible(graph.pieces[pos])!r}"}  # fmt: skip
        else:
            k = i - tokens_at - n_pos
            node |= {"kind": "logit", "layer": graph.n_layers, "position": n_pos - 1,
                     "label": f"{visible(graph.logit_pieces[k])!r}<br>p={float(graph.logit_probs[k]):.2f}"}  # fmt: skip
        rows.append(node)
    targets, sources = pruned.edges.nonzero(as_tuple=True)
    edges = pd.DataFrame(
        {
            "source": sources.tolist(),
            "target": targets.tolist(),
            "weight": graph.adjacency[targets, sources].tolist(),
        }
    )
    return Drawn(pd.DataFrame(rows), edges, graph.n_layers, graph.pieces)


def from_attribution(
    df: pd.DataFrame, layers: dict[str, int], n_layers: int, pieces: list[str], target: str
) -> Drawn:
    """One target's attributions as a graph: each feature of ``df`` (rows of
    ``Attribution.df()``; ``layers``: key -> layer) a node with one edge, its attribution, to the
    target (index -1, above the last layer at the last position)."""
    nodes = pd.DataFrame(
        {
            "index": range(len(df)),
            "kind": "feature",
            "layer": [layers[k] for k in df["sae"]],
            "position": df["position"].to_numpy(),
            "sae": df["sae"].to_numpy(),
            "feature": df["feature"].to_numpy(),
            "activation": df["activation"].to_numpy(),
            "influence": df["attribution"].to_numpy(),
            "label": [f"{k}/{f}" for k, f in zip(df["sae"], df["feature"], strict=True)],
        }
    )
    top = {"index": -1, "kind": "logit", "layer": n_layers, "position": len(pieces) - 1,
           "sae": "", "feature": -1, "activation": float("nan"), "influence": float("nan"),
           "label": visible(target)}  # fmt: skip
    nodes = pd.concat([nodes, pd.DataFrame([top])], ignore_index=True)
    edges = pd.DataFrame(
        {"source": range(len(df)), "target": -1, "weight": df["attribution"].to_numpy()}
    )
    return Drawn(nodes, edges, n_layers, pieces)


def _placed(nodes: pd.DataFrame, n_pos: int) -> pd.DataFrame:
    """Each node's x: its position, spread sideways among the nodes of its cell; the outputs
    spread leftwards from the last position along the whole row, so their labels fit."""
    placed = nodes.sort_values(["layer", "position", "kind", "index"], kind="stable").copy()
    cell = placed.groupby(["layer", "position"])
    rank, size = cell.cumcount(), cell["index"].transform("size")
    step = (0.8 / size).clip(upper=0.3)
    placed["x"] = placed["position"] + (rank - (size - 1) / 2) * step
    out = placed["kind"] == "logit"
    k = int(out.sum())
    if k > 1:
        order = placed.loc[out, "index"].rank(method="first") - 1  # the most likely first
        placed.loc[out, "x"] = (n_pos - 1) * (1 - order / k)
    return placed


def figure(drawn: Drawn) -> go.Figure:
    """The graph drawn layer by position."""
    nodes = _placed(drawn.nodes, len(drawn.pieces))
    where = {int(r.index): (float(r.x), int(r.layer)) for r in nodes.itertuples()}
    fig = go.Figure()
    edges = drawn.edges
    top = float(edges["weight"].abs().max()) if len(edges) else 1.0
    for sign, rgb in ((1, "59,110,200"), (-1, "214,69,65")):
        side = edges[(edges["weight"] >= 0) == (sign > 0)]
        quarter = (side["weight"].abs() / max(top, 1e-30) * 4).clip(upper=3.999).astype(int)
        for q, (width, alpha) in enumerate(STROKES):
            part = side[quarter == q]
            if part.empty:
                continue
            xs: list[float | None] = []
            ys: list[float | None] = []
            data: list[Any] = []
            for e in part.itertuples():
                (x0, y0), (x1, y1) = where[int(e.source)], where[int(e.target)]
                xs += [x0, x1, None]
                ys += [y0, y1, None]
                data += [[int(e.source), int(e.target), float(e.weight)]] * 2 + [None]
            fig.add_trace(
                go.Scatter(
                    x=xs,
                    y=ys,
                    mode="lines",
                    line={"width": width, "color": f"rgba({rgb},{alpha})"},
                    customdata=data,
                    hoverinfo="skip",
                    showlegend=False,
                    name=f"edges {'+' if sign > 0 else '-'}{q}",
                )  # fmt: skip
            )
    for kind, (symbol, colour, name) in KINDS.items():
        part = nodes[nodes["kind"] == kind]
        if part.empty:
            continue
        hover = [
            f"{r.label} @ {r.position} {visible(drawn.pieces[int(r.position)])!r}"
            + (f"<br>activation {r.activation:.3f}" if r.kind == "feature" else "")
            + (f"<br>influence {r.influence:.3f}" if r.influence == r.influence else "")
            for r in part.itertuples()
        ]
        fig.add_trace(
            go.Scatter(
                x=part["x"], y=part["layer"], mode="markers+text" if kind == "logit" else "markers",
                marker={"symbol": symbol, "color": colour, "size": 13 if kind == "logit" else 10,
                        "line": {"width": 1, "color": "white"}},
                text=part["label"] if kind == "logit" else None, textposition="top center",
                textfont={"size": 11}, customdata=part["index"].tolist(), hovertext=hover,
                hoverinfo="text", name=name,
            )
        )  # fmt: skip
    n = drawn.n_layers
    layers = list(range(-1, n + 1))
    names = ["tokens", *[f"L{k}" for k in range(n)], "output"]
    fig.update_layout(
        height=max(420, 34 * (n + 2) + 120), margin={"t": 30, "b": 90, "l": 60, "r": 20},
        legend={"orientation": "h", "y": 1.02, "yanchor": "bottom", "x": 0},
        xaxis={"tickvals": list(range(len(drawn.pieces))), "tickangle": -45,
               "ticktext": [f"{visible(t)}" for t in drawn.pieces], "title": "position",
               "range": [-0.6, len(drawn.pieces) - 0.4], "showgrid": False},
        yaxis={"tickvals": layers, "ticktext": names, "title": "layer",
               "range": [-1.6, n + 0.9], "zeroline": False},
        plot_bgcolor="white", dragmode="pan",
    )  # fmt: skip
    return fig


__all__ = ["Drawn", "figure", "from_attribution", "from_graph"]
