"""Attribution graphs over transcoders at every layer, in circuit-tracer's graph JSON.

The replacement model is the model frozen at the prompt (``scope.attribute``) with every MLP
replaced by its transcoder, codes and error terms held: linear in what the sources write.
Nodes, in circuit-tracer's order: every active feature (layer, position, feature), an error
node per (layer, position), a token-embedding node per position, and the top output logits
at the last position (most likely first, until their probabilities reach 0.95, at most 10).
``adjacency[t, s]`` is the direct effect of source ``s`` on target ``t``: a feature's
pre-activation (its encoder column read from the transcoder's input) or a logit (the
normalised residual stream read through the demeaned unembedding column, before any soft
cap), as circuit-tracer computes them.

``prune`` keeps the nodes and edges that carry most of the influence on the logits (node
threshold 0.8, edge threshold 0.98, as circuit-tracer defines them), and ``graph_json``
writes what Neuronpedia's and circuit-tracer's graph pages read. The workbench computes the
graph itself: circuit-tracer (PyPI) pins transformers <= 4.57.3 and huggingface-hub < 1.0,
which cannot be installed beside the workbench's transformers 5.
"""

from __future__ import annotations

import re
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import torch
from jaxtyping import Float, Int

from scope.attribute import frozen_forward, frozen_logits, gradients_for, prompt_tokens
from scope.codec import codec_of
from scope.errors import ScopeError
from scope.identity import hook_site, sae_info
from scope.replacement import Replacement

if TYPE_CHECKING:
    from sae_lens import SAE, HookedSAETransformer

NODE_THRESHOLD = 0.8
EDGE_THRESHOLD = 0.98


@dataclass(frozen=True, kw_only=True)
class Graph:
    """Direct effects between every node of the replacement model on one prompt."""

    prompt: str
    tokens: list[int]
    """The prompt's token ids, BOS first."""
    pieces: list[str]
    """Each token as text."""
    n_layers: int
    active: Int[torch.Tensor, "n 3"]
    """Feature nodes: (layer, position, feature), in layer, position, feature order."""
    activations: Float[torch.Tensor, " n"]
    logit_tokens: list[int]
    logit_pieces: list[str]
    logit_probs: Float[torch.Tensor, " k"]
    adjacency: Float[torch.Tensor, "nodes nodes"]
    """Rows are targets, columns sources; features, errors (layer-major), tokens, logits."""
    saes: list[str]
    """The transcoders' sources (folders or release/ids), layer by layer."""

    @property
    def n_pos(self) -> int:
        return len(self.tokens)

    @property
    def n_features(self) -> int:
        return int(self.active.shape[0])

    def index(self, kind: str, *, layer: int = 0, pos: int = 0, feature: int = 0) -> int:
        """A node's row/column: kind feature, error, token or logit (``feature`` = its rank)."""
        errors = self.n_features
        tokens = errors + self.n_layers * self.n_pos
        if kind == "feature":
            hit = (self.active == torch.tensor([layer, pos, feature])).all(-1).nonzero()
            if not len(hit):
                raise ScopeError(
                    f"feature {feature} at layer {layer}, position {pos} is not active"
                )
            return int(hit[0, 0])
        if kind == "error":
            return errors + layer * self.n_pos + pos
        if kind == "token":
            return tokens + pos
        return tokens + self.n_pos + feature


def layer_transcoders(model: HookedSAETransformer, saes: Sequence[SAE]) -> list[SAE]:
    """The transcoders ordered by layer, one per layer of ``model``, or a ScopeError saying
    what is missing."""
    by_layer: dict[int, SAE] = {}
    for sae in saes:
        codec = codec_of(sae)
        if not codec.transcoder:
            raise ScopeError(
                f"an attribution graph needs transcoders; the SAE at {codec.read_hook} is a "
                f"{codec.architecture} SAE: give one transcoder per layer"
            )
        if codec.out_norm != "none" or codec.unit_rows:
            raise ScopeError(f"transcoder at {codec.read_hook}: decoder rows scale at run time")
        layer = hook_site(codec.write_hook)[0]
        if layer is None or layer in by_layer:
            raise ScopeError(f"two transcoders write layer {layer}: give one per layer")
        by_layer[layer] = sae
    missing = [n for n in range(model.cfg.n_layers) if n not in by_layer]
    if missing:
        raise ScopeError(
            f"an attribution graph needs a transcoder at every layer; layers {missing} have "
            f"none ({model.cfg.n_layers} layers)"
        )
    return [by_layer[n] for n in range(model.cfg.n_layers)]


def _salient_logits(
    probs: torch.Tensor, max_n_logits: int, desired_logit_prob: float
) -> torch.Tensor:
    top_p, top_i = probs.topk(min(max_n_logits, probs.shape[-1]))
    reached = (top_p.cumsum(0) >= desired_logit_prob).nonzero()
    keep = int(reached[0, 0]) + 1 if len(reached) else len(top_i)
    return top_i[:keep]


def attribution_graph(
    model: HookedSAETransformer,
    transcoders: Sequence[SAE],
    prompt: str,
    *,
    max_n_logits: int = 10,
    desired_logit_prob: float = 0.95,
    batch_size: int = 128,
    max_feature_nodes: int | None = None,
) -> Graph:
    """The attribution graph of ``prompt`` (module docstring): active features' rows by
    batched backward passes through the frozen replacement model (``scope.replacement``:
    ``batch_size`` rows a pass, each batch of nearby positions). ``max_feature_nodes`` keeps
    that many features, chosen as circuit-tracer chooses them: in rounds, the unvisited
    features with the most influence on the logits through the rows computed so far."""
    saes = layer_transcoders(model, transcoders)
    tokens = prompt_tokens(model, prompt)
    n_pos, n_layers = tokens.shape[1], model.cfg.n_layers
    with gradients_for(model, saes):
        run = frozen_forward(model, saes, tokens, direct=True)
    assert run.resid is not None and run.embed is not None
    with torch.no_grad():
        h = run.resid[0, -1].detach()
        probs = torch.softmax(frozen_logits(model, h).float(), -1)
        logit_ids = _salient_logits(probs, max_n_logits, desired_logit_prob)
        W_U = model.unembed.W_U  # noqa: N806
        demeaned = (W_U[:, logit_ids] - W_U.mean(1, keepdim=True)).T  # [k, d_model]
        located = [torch.nonzero(c.detach()[0]) for c in run.codes]  # [n_L, 2] (pos, feature)
        active = torch.cat(
            [torch.cat([torch.full_like(p[:, :1], n), p], 1) for n, p in enumerate(located)]
        )
        acts = torch.cat(
            [run.codes[n].detach()[0][p[:, 0], p[:, 1]] for n, p in enumerate(located)]
        )
        replacement = Replacement(model, saes, run, located)
        # every active feature's target: its encoder column read at its layer and position
        encoders = torch.cat([saes[n].W_enc.detach()[:, p[:, 1]].T for n, p in enumerate(located)])

        def rows(targets: torch.Tensor) -> torch.Tensor:
            """Direct effects of every source on active features ``targets`` [B]."""
            at = active[targets]
            return replacement.rows(at[:, 0], at[:, 1], encoders[targets]).float().cpu()

        n_active = len(active)
        n_src = n_active + (n_layers + 1) * n_pos
        k = len(logit_ids)
        last = torch.full((k,), n_layers, device=h.device)  # the final residual stream
        logit_rows = replacement.rows(last, torch.full_like(last, n_pos - 1), demeaned)
        logit_rows = logit_rows.float().cpu()  # [k, sources]
        limit = n_active if max_feature_nodes is None else min(max_feature_nodes, n_active)
        chosen: list[torch.Tensor] = []
        feature_rows: list[torch.Tensor] = []
        visited = torch.zeros(n_active, dtype=torch.bool)
        while int(visited.sum()) < limit:
            if limit == n_active:
                queue = torch.arange(n_active)
            else:  # the most influential features not yet visited, by the rows so far
                score = _partial_influence(
                    torch.cat([*feature_rows, logit_rows]), torch.cat([*chosen, torch.arange(
                        n_src, n_src + len(logit_ids))]), probs[logit_ids].float(), n_src,
                )[:n_active]  # fmt: skip
                score[visited] = -1
                queue = score.argsort(descending=True)[
                    : min(4 * batch_size, limit - int(visited.sum()))
                ]
            # batches of nearby positions: a batch carries positions up to its last target's
            queue = queue[active[queue, 1].cpu().argsort(stable=True)]
            for start in range(0, len(queue), batch_size):
                batch = queue[start : start + batch_size]
                feature_rows.append(rows(batch))
                chosen.append(batch)
                visited[batch] = True
        picked = torch.cat(chosen) if chosen else torch.zeros(0, dtype=torch.long)
        order = picked.argsort()
        selected = picked[order]
        columns = torch.cat([selected, torch.arange(n_active, n_src)])
        n_feat = len(selected)
        n_nodes = n_feat + (n_layers + 1) * n_pos + len(logit_ids)
        adjacency = torch.zeros(n_nodes, n_nodes)
        if n_feat:
            adjacency[:n_feat, : len(columns)] = torch.cat(feature_rows)[order][:, columns]
        adjacency[n_nodes - len(logit_ids) :, : len(columns)] = logit_rows[:, columns]
        active, acts = active[selected], acts[selected]
    return Graph(
        prompt=prompt,
        tokens=tokens[0].tolist(),
        pieces=[model.tokenizer.decode([t]) for t in tokens[0].tolist()],
        n_layers=n_layers,
        active=active.cpu(),
        activations=acts.float().cpu(),
        logit_tokens=logit_ids.tolist(),
        logit_pieces=[model.tokenizer.decode([t]) for t in logit_ids.tolist()],
        logit_probs=probs[logit_ids].cpu(),
        adjacency=adjacency,
        saes=[sae_info(s).source or sae_info(s).key for s in saes],
    )


def _partial_influence(
    rows: torch.Tensor, row_nodes: torch.Tensor, probs: torch.Tensor, n_src: int
) -> torch.Tensor:
    """Influence on the logits of each source through the computed ``rows`` only (row i is
    node ``row_nodes[i]``; logit nodes are numbered from ``n_src``): the sources' scores."""
    normal = _row_normalised(rows)
    weight = torch.zeros(len(row_nodes))
    weight[row_nodes >= n_src] = probs[row_nodes[row_nodes >= n_src] - n_src]
    total = torch.zeros(n_src)
    feature_rows = row_nodes < n_src
    for _ in range(1000):
        step = weight @ normal  # [n_src]
        if not step.any():
            break
        total += step
        weight = torch.zeros(len(row_nodes))
        weight[feature_rows] = step[row_nodes[feature_rows]]
    return total[: int(n_src)]


# ---------------------------------------------------------------- pruning


def _row_normalised(a: torch.Tensor) -> torch.Tensor:
    m = a.abs()
    return m / m.sum(1, keepdim=True).clamp(min=1e-10)


def influence(a: torch.Tensor, weights: torch.Tensor, max_steps: int = 1000) -> torch.Tensor:
    """``weights @ (a + a^2 + a^3 + ...)``: the influence of each node on the weighted
    targets through paths of every length (``a`` is nilpotent: the graph is acyclic)."""
    total = torch.zeros_like(weights)
    step = weights @ a
    for _ in range(max_steps):
        if not step.any():
            return total
        total += step
        step = step @ a
    raise ScopeError("influence did not converge: the graph has a cycle")


def _kept(scores: torch.Tensor, threshold: float) -> torch.Tensor:
    """The smallest score among the top scores that together hold ``threshold`` of the total."""
    ordered = scores.sort(descending=True).values
    share = ordered.cumsum(0) / ordered.sum().clamp(min=1e-30)
    i = min(int(torch.searchsorted(share, torch.tensor(threshold))), len(ordered) - 1)
    return ordered[i]


class Pruned(NamedTuple):
    nodes: torch.Tensor
    """Boolean [nodes]: kept."""
    edges: torch.Tensor
    """Boolean [nodes, nodes]: kept (rows targets, columns sources)."""
    cumulative: torch.Tensor
    """Each node's cumulative share of influence when nodes are sorted by influence."""


def prune(
    graph: Graph, node_threshold: float = NODE_THRESHOLD, edge_threshold: float = EDGE_THRESHOLD
) -> Pruned:
    """Keep the nodes that hold ``node_threshold`` of the influence on the logits (weighted by
    their probabilities; tokens and logits always), then the edges that hold
    ``edge_threshold`` of the edge influence, then drop features and errors left without an
    edge out and features without an edge in, until nothing changes."""
    for name, t in (("node_threshold", node_threshold), ("edge_threshold", edge_threshold)):
        if not 0.0 <= t <= 1.0:
            raise ScopeError(f"{name} {t} must be between 0 and 1")
    a = graph.adjacency
    n_fixed = graph.n_pos + len(graph.logit_tokens)  # tokens and logits, always kept
    weights = torch.zeros(a.shape[0])
    weights[-len(graph.logit_tokens) :] = graph.logit_probs
    node_score = influence(_row_normalised(a), weights)
    nodes = node_score >= _kept(node_score, node_threshold)
    nodes[-n_fixed:] = True
    kept = a.clone()
    kept[~nodes] = 0
    kept[:, ~nodes] = 0
    normal = _row_normalised(kept)
    edge_score = normal * (influence(normal, weights) + weights)[:, None]
    edges = edge_score >= _kept(edge_score.flatten(), edge_threshold)
    nf = graph.n_features
    while True:
        before = nodes.clone()
        edges[~nodes] = False
        edges[:, ~nodes] = False
        nodes[:-n_fixed] &= edges[:, :-n_fixed].any(0)  # features and errors: an edge out
        nodes[:nf] &= edges[:nf].any(1)  # features: an edge in
        if torch.equal(nodes, before):
            break
    order = node_score.sort(descending=True)
    cumulative = torch.zeros_like(node_score)
    cumulative[order.indices] = order.values.cumsum(0) / order.values.sum().clamp(min=1e-30)
    return Pruned(nodes=nodes, edges=edges, cumulative=cumulative)


# ---------------------------------------------------------------- circuit-tracer's JSON


def _feature_node(layer: int, pos: int, feature: int, **extra: Any) -> dict[str, Any]:
    cantor = (layer + feature) * (layer + feature + 1) // 2 + feature
    return {"node_id": f"{layer}_{feature}_{pos}", "feature": cantor, "layer": str(layer),
            "ctx_idx": pos, "feature_type": "cross layer transcoder",
            "jsNodeId": f"{layer}_{feature}-0", **extra}  # fmt: skip


def slugify(text: str) -> str:
    """A file-safe slug of ``text`` (lowercase letters, digits and dashes)."""
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:60] or "graph"


def graph_json(
    graph: Graph,
    *,
    slug: str | None = None,
    scan: str = "",
    node_threshold: float = NODE_THRESHOLD,
    edge_threshold: float = EDGE_THRESHOLD,
) -> dict[str, Any]:
    """The pruned graph as circuit-tracer's graph JSON (``frontend/graph_models.Model``)."""
    kept = prune(graph, node_threshold, edge_threshold)
    nf, n_pos = graph.n_features, graph.n_pos
    tokens_at = nf + graph.n_layers * n_pos
    nodes: dict[int, dict[str, Any]] = {}
    for i in kept.nodes.nonzero().flatten().tolist():
        score = float(kept.cumulative[i])
        if i < nf:
            layer, pos, feature = graph.active[i].tolist()
            nodes[i] = _feature_node(layer, pos, feature, influence=score,
                                     activation=float(graph.activations[i]))  # fmt: skip
        elif i < tokens_at:
            layer, pos = divmod(i - nf, n_pos)
            nodes[i] = {"node_id": f"0_{layer}_{pos}", "feature": -1, "layer": str(layer),
                        "ctx_idx": pos, "feature_type": "mlp reconstruction error",
                        "jsNodeId": f"{layer}_{pos}-0", "influence": score}  # fmt: skip
        elif i < tokens_at + n_pos:
            pos = i - tokens_at
            vocab = graph.tokens[pos]
            nodes[i] = {"node_id": f"E_{vocab}_{pos}", "feature": pos, "layer": "E",
                        "ctx_idx": pos, "feature_type": "embedding",
                        "jsNodeId": f"E_{vocab}-{pos}", "influence": score}  # fmt: skip
        else:
            k = i - tokens_at - n_pos
            vocab, p = graph.logit_tokens[k], float(graph.logit_probs[k])
            layer = str(graph.n_layers + 1)
            nodes[i] = {"node_id": f"{layer}_{vocab}_{n_pos - 1}", "feature": vocab,
                        "layer": layer, "ctx_idx": n_pos - 1, "feature_type": "logit",
                        "token_prob": p, "is_target_logit": k == 0,
                        "jsNodeId": f"L_{vocab}-{n_pos - 1}",
                        "clerp": f'Output "{graph.logit_pieces[k]}" (p={p:.3f})'}  # fmt: skip
    targets, sources = kept.edges.nonzero(as_tuple=True)
    links = [
        {"source": nodes[s]["node_id"], "target": nodes[t]["node_id"],
         "weight": float(graph.adjacency[t, s])}
        for t, s in zip(targets.tolist(), sources.tolist(), strict=True)
        if s in nodes and t in nodes
    ]  # fmt: skip
    linked = {x for link in links for x in (link["source"], link["target"])}
    used = [n for n in nodes.values()
            if n["node_id"] in linked or n["feature_type"] in ("embedding", "logit")]  # fmt: skip
    defaults = {"token_prob": 0.0, "is_target_logit": False, "run_idx": 0, "reverse_ctx_idx": 0,
                "clerp": "", "influence": None, "activation": None}  # fmt: skip
    return {
        "metadata": {
            "slug": slug or slugify(graph.prompt),
            "scan": scan,
            "transcoder_list": graph.saes,
            "prompt_tokens": graph.pieces,
            "prompt": graph.prompt,
            "node_threshold": node_threshold,
            "schema_version": 1,
        },
        "qParams": {
            "pinnedIds": [],
            "supernodes": [],
            "linkType": "both",
            "clickedId": "",
            "sg_pos": "",
        },  # fmt: skip
        "nodes": [{**defaults, **n} for n in used],
        "links": links,
    }


# ---------------------------------------------------------------- the store's graphs/ folder


def save_graph(root: str | Path, data: dict[str, Any], *, edge_threshold: float) -> Path:
    """Add a graph JSON to the store at ``root``: ``graphs/<slug>.json`` beside an index row
    ``graphs/<slug>.parquet`` (the ``graphs`` table: slug, prompt, top logit, node and link
    counts, thresholds, transcoders, when). Returns the JSON's path."""
    from scope.store.schema import GRAPHS
    from scope.store.writer import add_side_table

    meta = data["metadata"]
    logits = [n for n in data["nodes"] if n["feature_type"] == "logit"]
    top = next((n["clerp"] for n in logits if n["is_target_logit"]), "")
    row = {
        "slug": meta["slug"], "prompt": meta["prompt"], "n_tokens": len(meta["prompt_tokens"]),
        "top_logit": top, "n_nodes": len(data["nodes"]), "n_links": len(data["links"]),
        "node_threshold": meta["node_threshold"], "edge_threshold": edge_threshold,
        "scan": meta["scan"], "transcoders": ",".join(meta["transcoder_list"]),
        "created": time.time(),
    }  # fmt: skip
    name = slugify(meta["slug"])
    add_side_table(root, GRAPHS.name, name, GRAPHS.from_rows([row]), meta=data)
    return Path(root) / GRAPHS.name / f"{name}.json"


def load_graph(root: str | Path, slug: str) -> dict[str, Any]:
    """A graph JSON saved in the store at ``root`` by ``save_graph``."""
    import json

    path = Path(root) / "graphs" / f"{slugify(slug)}.json"
    if not path.is_file():
        raise ScopeError(f"the store {root} has no graph {slug!r}: see `select slug from graphs`")
    data: dict[str, Any] = json.loads(path.read_text())
    return data


__all__ = [
    "EDGE_THRESHOLD",
    "NODE_THRESHOLD",
    "Graph",
    "Pruned",
    "attribution_graph",
    "graph_json",
    "influence",
    "layer_transcoders",
    "load_graph",
    "prune",
    "save_graph",
    "slugify",
]
