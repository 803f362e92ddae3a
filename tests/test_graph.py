"""Attribution graphs: rows equal attribution in the replacement model (itself checked against
finite differences in test_attribute), logit rows equal finite differences of the demeaned
logit, pruning equals a brute-force (I - A)^-1 influence, and the JSON validates against a
field-for-field copy of circuit-tracer's pydantic models and round-trips through a store."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from conftest import PROMPT
from pydantic import BaseModel
from test_attribute import Replay, _printed
from typer.testing import CliRunner

from scope import ScopeError, Store, load_sae
from scope import testing as fixtures
from scope.attribute import Target, attribute
from scope.graph import (
    Graph,
    attribution_graph,
    graph_json,
    influence,
    load_graph,
    prune,
    save_graph,
)
from scope.identity import sae_info

TEXT = PROMPT[:40]


# circuit-tracer 0.5's circuit_tracer/frontend/graph_models.py, field for field: what its and
# Neuronpedia's graph pages read (circuit-tracer itself cannot be installed beside transformers 5)
class Metadata(BaseModel):
    slug: str
    scan: str
    transcoder_list: list[str]
    prompt_tokens: list[str]
    prompt: str
    node_threshold: float | None = None
    schema_version: int | None = 1


class QParams(BaseModel):
    pinnedIds: list[str]  # noqa: N815
    supernodes: list[list[str]]
    linkType: str  # noqa: N815
    clickedId: str  # noqa: N815
    sg_pos: str


class Node(BaseModel):
    node_id: str
    feature: int
    layer: str
    ctx_idx: int
    feature_type: str
    token_prob: float = 0.0
    is_target_logit: bool = False
    run_idx: int = 0
    reverse_ctx_idx: int = 0
    jsNodeId: str  # noqa: N815
    clerp: str = ""
    influence: float | None = None
    activation: float | None = None


class Link(BaseModel):
    source: str
    target: str
    weight: float


class Model(BaseModel):
    metadata: Metadata
    qParams: QParams  # noqa: N815
    nodes: list[Node]
    links: list[dict]


@pytest.fixture(scope="module")
def transcoders(tmp_path_factory, tiny_model):
    root = tmp_path_factory.mktemp("graph-tc")
    folders = fixtures.build_transcoders(tiny_model, root, d_sae=32, firing_rate=0.08)
    return [load_sae(f, device="cpu") for f in folders]


@pytest.fixture(scope="module")
def graph(tiny_model, transcoders) -> Graph:
    return attribution_graph(tiny_model, transcoders, TEXT)


def test_feature_rows_equal_attribution_in_the_replacement_model(tiny_model, transcoders, graph):
    assert graph.n_features > 40 and graph.adjacency.shape[
        0
    ] == graph.n_features + 5 * graph.n_pos + len(graph.logit_tokens)
    for i in (graph.n_features - 1, graph.n_features // 2):
        layer, pos, feature = graph.active[i].tolist()
        a = attribute(tiny_model, transcoders, TEXT, Target(kind="feature", sae=f"L{layer}.tc.32",
                      feature=feature, position=pos), direct=True)  # fmt: skip
        row = graph.adjacency[i]
        for r in a.df().itertuples():
            j = graph.index("feature", layer=int(r.sae[1]), pos=r.position, feature=r.feature)
            assert row[j].item() == pytest.approx(r.attribution, rel=1e-4, abs=1e-6)
        for n in range(graph.n_layers):
            e = graph.index("error", layer=n)
            torch.testing.assert_close(row[e : e + graph.n_pos], a.errors[n], rtol=1e-4, atol=1e-6)
        t = graph.index("token")
        torch.testing.assert_close(row[t : t + graph.n_pos], a.embeddings, rtol=1e-4, atol=1e-6)
        assert row[graph.index("feature", layer=layer, pos=pos, feature=feature) :].abs().sum() > 0
        later = graph.active[:, 0] >= layer
        assert (row[: graph.n_features][later] == 0).all()  # nothing at its layer or later


def test_logit_rows_equal_finite_differences(tiny_model, transcoders, graph):
    tokens = torch.tensor([graph.tokens])
    replay = Replay(tiny_model, transcoders, tokens)
    k = 0
    vocab = graph.logit_tokens[k]
    vec = tiny_model.W_U[:, vocab] - tiny_model.W_U.mean(1)
    row = graph.adjacency[graph.index("logit", feature=k)]
    base = float(replay.run(replay.codes)[0][0, -1] @ vec)
    for i in row[: graph.n_features].abs().topk(3).indices.tolist():
        layer, pos, feature = graph.active[i].tolist()
        moved = replay.moved(layer, pos, feature, 0.5 * float(graph.activations[i]))
        change = float(replay.run(moved)[0][0, -1] @ vec) - base
        assert change / 0.5 == pytest.approx(float(row[i]), rel=1e-3, abs=1e-6)
    probs = torch.softmax(tiny_model(tokens)[0, -1], -1)
    assert graph.logit_tokens[0] == int(probs.argmax())
    torch.testing.assert_close(
        graph.logit_probs, probs[graph.logit_tokens].detach(), rtol=1e-5, atol=1e-6
    )


def test_influence_and_pruning_against_brute_force(graph):
    a = graph.adjacency
    norm = a.abs() / a.abs().sum(1, keepdim=True).clamp(min=1e-10)
    weights = torch.zeros(a.shape[0])
    weights[-len(graph.logit_tokens) :] = graph.logit_probs
    eye = torch.eye(a.shape[0], dtype=torch.float64)
    brute = weights.double() @ (torch.linalg.inv(eye - norm.double()) - eye)
    torch.testing.assert_close(influence(norm, weights).double(), brute, rtol=1e-4, atol=1e-7)
    everything = prune(graph, 1.0, 1.0)
    loose = prune(graph, 0.8, 0.98)
    tight = prune(graph, 0.5, 0.9)
    assert tight.nodes.sum() < loose.nodes.sum() < everything.nodes.sum()
    assert loose.nodes[-graph.n_pos - len(graph.logit_tokens) :].all()  # tokens and logits stay
    assert not (loose.edges & ~everything.edges).any()
    kept = loose.nodes[: graph.n_features]
    assert (loose.edges[: graph.n_features][kept].any(1)).all()  # each kept feature has an edge in
    with pytest.raises(ScopeError, match="node_threshold 1.5 must be between 0 and 1"):
        prune(graph, 1.5)


def test_json_validates_as_circuit_tracer_reads_it_and_round_trips_through_a_store(
    tmp_path, graph, app_store
):
    data = graph_json(graph, slug="fox", scan="tiny-gemma2")
    parsed = Model.model_validate(data)
    assert all(Link.model_validate(x) for x in parsed.links)
    ids = {n.node_id for n in parsed.nodes}
    # circuit-tracer's ids: a layer-0 feature f < n_layers at position p is "0_f_p", as is
    # layer f's error node at p; kept as circuit-tracer writes them, the only repeats allowed
    seen: dict[str, list[str]] = {}
    for n in parsed.nodes:
        seen.setdefault(n.node_id, []).append(n.feature_type)
    repeats = {k: v for k, v in seen.items() if len(v) > 1}
    assert all(sorted(v) == ["cross layer transcoder", "mlp reconstruction error"] and
               k.startswith("0_") and int(k.split("_")[1]) < graph.n_layers
               for k, v in repeats.items())  # fmt: skip
    assert all(x["source"] in ids and x["target"] in ids for x in parsed.links)
    kinds = {n.feature_type for n in parsed.nodes}
    assert kinds >= {"cross layer transcoder", "embedding", "logit"}
    assert sum(n.is_target_logit for n in parsed.nodes) == 1
    assert len([n for n in parsed.nodes if n.feature_type == "embedding"]) == graph.n_pos
    assert parsed.metadata.prompt_tokens == graph.pieces and parsed.metadata.slug == "fox"
    feature = next(n for n in parsed.nodes if n.feature_type == "cross layer transcoder")
    layer, f, pos = (int(x) for x in feature.node_id.split("_"))
    assert feature.activation == pytest.approx(
        float(graph.activations[graph.index("feature", layer=layer, pos=pos, feature=f)])
    )
    store = tmp_path / "store"
    shutil.copytree(app_store, store)
    path = save_graph(store, data, edge_threshold=0.98)
    assert path == store / "graphs" / "fox.json"
    assert load_graph(store, "fox") == json.loads(json.dumps(data))
    row = Store(store).sql("select slug, n_nodes, n_links, top_logit from graphs").fetchall()
    assert row == [
        (
            "fox",
            len(data["nodes"]),
            len(data["links"]),
            f"{parsed.nodes[-1].clerp}" if parsed.nodes[-1].is_target_logit else row[0][3],
        )
    ]
    assert row[0][3].startswith('Output "')
    with pytest.raises(ScopeError, match="has no graph 'dog'"):
        load_graph(store, "dog")


def test_a_graph_needs_a_transcoder_at_every_layer(tiny_model, transcoders):
    with pytest.raises(ScopeError, match=r"layers \[3\] have none"):
        attribution_graph(tiny_model, transcoders[:3], TEXT)


def test_cli_writes_the_graph_and_files_it_in_the_store(tmp_path, tiny_dir, transcoders, app_store):
    from scope.cli import app

    store = tmp_path / "store"
    shutil.copytree(app_store, store)
    args = ["attribute", "--model", str(tiny_dir), "--prompt", TEXT, "--top", "3",
            "--graph", str(tmp_path / "g.json"), "--store", str(store)]  # fmt: skip
    for s in transcoders:
        args += ["--sae", sae_info(s).source]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert any(line.startswith("graph: ") and "g.json" in line for line in _printed(result.output))
    Model.model_validate_json((tmp_path / "g.json").read_text())
    assert load_graph(store, "g") == json.loads((tmp_path / "g.json").read_text())


def test_max_feature_nodes_keeps_the_most_influential_rows_unchanged(
    tiny_model, transcoders, graph
):
    half = graph.n_features // 3
    small = attribution_graph(tiny_model, transcoders, TEXT, max_feature_nodes=half, batch_size=16)
    assert small.n_features == half
    keep = [graph.index("feature", layer=a, pos=b, feature=c) for a, b, c in small.active.tolist()]
    rest = list(range(graph.n_features, graph.adjacency.shape[0]))
    cols = torch.tensor(keep + rest)
    torch.testing.assert_close(
        small.adjacency[:half], graph.adjacency[keep][:, cols], rtol=1e-5, atol=1e-6
    )
    torch.testing.assert_close(
        small.adjacency[-len(graph.logit_tokens) :],
        graph.adjacency[-len(graph.logit_tokens) :][:, cols],
    )
    # the first round takes the features with the most direct influence on the logits
    direct = (graph.adjacency[-len(graph.logit_tokens):, : graph.n_features].abs()
              / graph.adjacency[-len(graph.logit_tokens):].abs().sum(1, keepdim=True))  # fmt: skip
    first = (graph.logit_probs @ direct).argsort(descending=True)[:16].tolist()
    assert set(first) <= set(keep)
    Model.model_validate(graph_json(small))


@pytest.mark.parametrize("read", ["ln2.hook_normalized", "ln2.hook_out"])
def test_rows_on_gemma3_with_transcoders_reading_the_normalised_mlp_input(tmp_path, read):
    """Gemma 3's shape (one KV head for four query heads, qk-norm, local and global layers)
    with transcoders reading the pre-MLP norm's output before its weight
    (``ln2.hook_normalized``) or after it (``ln2.hook_out``, the MLP's input: what Gemma Scope's
    transcoders and ``scope train --site transcoder`` read): the batched rows of
    ``scope.replacement`` equal ``scope.attribute``'s autograd through the frozen model, one
    target at a time."""
    from scope import load_model

    model = load_model(fixtures.build_gemma3(tmp_path / "g3", n_layers=3), device="cpu")
    folders = fixtures.build_transcoders(model, tmp_path / "tc", d_sae=32, firing_rate=0.1,
                                         read=read)  # fmt: skip
    saes = [load_sae(f, device="cpu") for f in folders]
    g = attribution_graph(model, saes, TEXT, batch_size=8)
    assert g.n_features > 20
    checked = 0
    for i in range(g.n_features - 1, 0, -max(g.n_features // 5, 1)):
        layer, pos, feature = g.active[i].tolist()
        if layer == 0:
            continue
        a = attribute(model, saes, TEXT, Target(kind="feature", sae=f"L{layer}.tc.32",
                      feature=feature, position=pos), direct=True)  # fmt: skip
        row = g.adjacency[i]
        for r in a.df().itertuples():
            j = g.index("feature", layer=int(r.sae[1]), pos=r.position, feature=r.feature)
            assert row[j].item() == pytest.approx(r.attribution, rel=1e-4, abs=1e-6)
        t = g.index("token")
        torch.testing.assert_close(row[t : t + g.n_pos], a.embeddings, rtol=1e-4, atol=1e-6)
        for n in range(g.n_layers):
            e = g.index("error", layer=n)
            torch.testing.assert_close(row[e : e + g.n_pos], a.errors[n], rtol=1e-4, atol=1e-6)
        checked += 1
    assert checked >= 3
