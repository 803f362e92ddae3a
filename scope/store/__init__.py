"""Read a recorded store: per-feature views and SQL over its Parquet tables with DuckDB.

The format (tables, files, columns and their types, side tables, shared constants) is declared
once, in ``scope.store.schema``; the store imports nothing that generates or steers.

Tables (each has an ``sae`` column holding the SAE's short key, e.g. ``L12.res.16k``):

- ``features``: feature, count, density, max, mean, std (of its activation where it fires),
  dead, dense
- ``topk``: feature, rank, window_id, act (the window's max), pos (where), acts (per token)
- ``intervals``: feature, interval (0-4: fifths of the feature's max, ``N_INTERVALS``),
  window_id, pos, act; five random windows per interval (``PER_INTERVAL``)
- ``samples``: the raw stratified sample ``intervals`` is drawn from
- ``hist``: feature, bin, lo, hi, count (log-spaced bins of the activation)
- ``l0``: l0, count (tokens by number of firing features)
- ``saes``: sae, tokens, mean_l0, dead, dense, d_sae
- ``lens``: feature, top_ids, top_logits, bottom_ids, bottom_logits (logit lens
  W_dec @ W_U), neighbours, neighbour_cos (nearest features by decoder cosine)
- ``windows``: window_id, part, doc, offset, n_tokens, tokens
- ``vocab``: token, piece, text

Side tables, present once something wrote them (``scope.store.writer``), kept across every
later recording into the store:

- ``experiments``: steering sweeps (``scope.sweep``: experiment, strength, mode, sae,
  target_act, text_act, kl, loss, text, ...)
- ``labels``: sae, feature, label, notes, updated
- ``explanations``: sae, feature, explanation, explainer, detection, fuzzing, ... (``scope explain``)
- ``evals``: SAE evaluations; ``cards``: SAE cards
- ``graphs``: attribution graphs (slug, prompt, top_logit, n_nodes, ...), each beside its
  circuit-tracer JSON (``scope.graph.load_graph``)
"""

from scope.store import explore, schema
from scope.store.manifest import Manifest, read_manifest
from scope.store.reader import Rows, Store
from scope.store.view import Example, FeatureView
from scope.store.writer import StoreWriter, add_side_table, set_label

__all__ = [
    "explore",
    "schema",
    "Example",
    "FeatureView",
    "Manifest",
    "Rows",
    "Store",
    "StoreWriter",
    "add_side_table",
    "read_manifest",
    "set_label",
]
