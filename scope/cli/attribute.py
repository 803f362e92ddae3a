"""`scope attribute`: which features made the model say that (``scope.attribute``)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated, Any

import typer

from scope.cli.common import (
    DeviceOpt,
    DtypeOpt,
    HookOpt,
    RequiredModelOpt,
    SaeOpt,
    app,
    friendly,
    load_model_and_saes,
    out,
)
from scope.errors import ScopeError

if TYPE_CHECKING:
    from scope.store import Store


@app.command()
@friendly
def attribute(
    model: RequiredModelOpt,
    sae: SaeOpt = None,
    prompt: Annotated[str | None, typer.Option(help="The prompt to explain.")] = None,
    target: Annotated[
        str | None,
        typer.Option(
            help="What to explain: '\" Paris\"' (a logit; @5 for a position), "
            "'logprob:\" Paris\"', '\" Yes\" - \" No\"', or a feature 'L2.res.1k/17@5'. "
            "Default: the most likely next token's logit."
        ),
    ] = None,
    shieldgemma: Annotated[
        str | None,
        typer.Option(help="A user prompt for ShieldGemma: explain its Yes - No verdict."),
    ] = None,
    policy: Annotated[
        str, typer.Option(help="ShieldGemma's policy, e.g. 'No Harassment'.")
    ] = "No Harassment",
    top: Annotated[int, typer.Option(help="Rows shown.", min=1)] = 30,
    direct: Annotated[
        bool, typer.Option(help="Direct effects only: later SAEs' codes held (as graphs).")
    ] = False,
    graph: Annotated[
        str | None,
        typer.Option(
            help="Also write the attribution graph (transcoders at every layer) to this .json, "
            "in circuit-tracer's format; with --store, into its graphs/ too."
        ),
    ] = None,
    max_feature_nodes: Annotated[
        int | None,
        typer.Option(help="Graph: at most this many features, the most influential.", min=1),
    ] = None,
    node_threshold: Annotated[
        float, typer.Option(help="Graph pruning: node influence kept.")
    ] = 0.8,
    edge_threshold: Annotated[
        float, typer.Option(help="Graph pruning: edge influence kept.")
    ] = 0.98,
    store: Annotated[
        str | None, typer.Option(help="A recorded store: name SAEs by its keys, show labels.")
    ] = None,
    device: DeviceOpt = None,
    dtype: DtypeOpt = None,
    hook: HookOpt = None,
) -> None:
    """Why did the model say that: each active feature's attribution to a target."""
    from scope.attribute import attribute as run_attribution
    from scope.attribute import parse_target
    from scope.identity import sae_key
    from scope.shieldgemma import shieldgemma_prompt, verdict_target
    from scope.store import Store
    from scope.store.view import visible

    if not sae:
        raise ScopeError("give --sae at least once")
    if (prompt is None) == (shieldgemma is None):
        raise ScopeError("give --prompt TEXT, or --shieldgemma TEXT (with --policy)")
    if graph is not None and not graph.endswith(".json"):
        raise ScopeError(f"--graph {graph}: give a .json file to write the graph to")
    if shieldgemma is not None:
        if target is not None:
            raise ScopeError("--shieldgemma explains Yes - No: leave out --target")
        text = shieldgemma_prompt(shieldgemma, policy)
    else:
        assert prompt is not None
        text = prompt
    opened = Store(store) if store else None
    loaded, saes = load_model_and_saes(model, sae, device=device, dtype=dtype, hook=hook)
    goal = verdict_target(loaded) if shieldgemma is not None else parse_target(loaded, target)
    keys = [sae_key(s, opened.saes) for s in saes] if opened else None
    with out.status("attributing"):
        result = run_attribution(loaded, saes, text, goal, direct=direct, keys=keys)
    say = lambda line: out.print(line, markup=False, highlight=False, soft_wrap=True)  # noqa: E731
    say(f"target: {result.target.label} = {result.target.value:.4f}")
    say(
        f"shares: features {result.feature_share:+.4f}  errors {result.error_share:+.4f}  "
        f"embeddings {result.embedding_share:+.4f}  biases {result.biases:+.4f}"
    )
    if graph is not None:
        thresholds = (node_threshold, edge_threshold)
        _write_graph(loaded, saes, text, graph, thresholds, max_feature_nodes, opened)
    df = result.df().head(top)
    if df.empty:
        say("no feature is active on this prompt")
        return
    names = [
        f"{r.sae}/{r.feature} @ pos {r.position} ({visible(r.token)!r})" for r in df.itertuples()
    ]
    width = max(len(n) for n in names)
    for name, r in zip(names, df.itertuples(), strict=True):
        label = opened.label(str(r.sae), int(r.feature))[0] if opened else ""
        say(
            f"{name:<{width}}  {r.activation:8.3f}  {r.attribution:+9.4f}"
            + (f"  {visible(label)}" if label else "")
        )


def _write_graph(
    model: Any,
    saes: list[Any],
    text: str,
    path: str,
    thresholds: tuple[float, float],
    max_feature_nodes: int | None,
    store: Store | None,
) -> None:
    import json
    from pathlib import Path

    from scope.graph import attribution_graph, graph_json, save_graph

    with out.status("building the attribution graph"):
        node_threshold, edge_threshold = thresholds
        built = attribution_graph(model, saes, text, max_feature_nodes=max_feature_nodes)
        data = graph_json(
            built,
            slug=Path(path).stem,
            scan=str(model.cfg.model_name),
            node_threshold=node_threshold,
            edge_threshold=edge_threshold,
        )
    Path(path).write_text(json.dumps(data, indent=1))
    where = f" and {save_graph(store.root, data, edge_threshold=edge_threshold)}" if store else ""
    out.print(
        f"graph: {len(data['nodes'])} nodes, {len(data['links'])} links of "
        f"{built.n_features} active features -> {path}{where}",
        markup=False,
        highlight=False,
        soft_wrap=True,
    )
