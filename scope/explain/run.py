"""Explain and score many features of a store: resumable, idempotent, concurrent for endpoints.

Each finished feature's row goes into the store's ``explanations`` side table in small
batches, each file written atomically (``scope.store.writer.add_side_table``): a killed run
keeps every batch it finished, and running it again explains only what is missing (``redo``
explains again; the newest row per explainer and method is the one shown).
"""

from __future__ import annotations

import hashlib
import json
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass
from typing import Any

import pyarrow as pa

from scope.errors import ScopeError
from scope.explain.models import Explainer
from scope.explain.score import Sets, detection, fuzzing, split
from scope.store import Store
from scope.store.writer import add_side_table

METHOD = "delphi-top-intervals"
"""How explanations are made: shown top and interval examples, detection and fuzzing."""
FLUSH_EVERY = 8
"""Features per file of the side table (a killed run loses at most this many)."""


@dataclass(frozen=True, kw_only=True)
class Explanation:
    """One explanation of a feature, with its scores (a row of the ``explanations`` table)."""

    sae: str
    feature: int
    explanation: str
    explainer: str
    scorer: str
    method: str
    prompt_hash: str
    """sha256 of the prompt, the explainer and the settings: the same inputs, the same hash."""
    detection: float | None
    fuzzing: float | None
    n_pos: int
    n_neg: int
    n_shown: int
    hard_negatives: int
    unreadable: int
    """Scorer answers that were neither Yes nor No (counted as wrong)."""
    created: float


SCHEMA = pa.schema(
    [("sae", pa.string()), ("feature", pa.int32()), ("explanation", pa.string()),
     ("explainer", pa.string()), ("scorer", pa.string()), ("method", pa.string()),
     ("prompt_hash", pa.string()), ("detection", pa.float64()), ("fuzzing", pa.float64()),
     ("n_pos", pa.int32()), ("n_neg", pa.int32()), ("n_shown", pa.int32()),
     ("hard_negatives", pa.int32()), ("unreadable", pa.int32()), ("created", pa.float64())]
)  # fmt: skip


def done(store: Store, explainer: str) -> set[tuple[str, int]]:
    """(sae, feature) pairs this explainer already explained with METHOD."""
    if "explanations" not in store.views:
        return set()
    rows = store.sql(
        "select distinct sae, feature from explanations where explainer = ? and method = ?",
        [explainer, METHOD],
    ).fetchall()
    return {(str(s), int(f)) for s, f in rows}


def _one(
    explainer: Explainer, scorer: Explainer, key: str, feature: int, top: float, sets: Sets
) -> Explanation:
    prompt, text = explainer.explain(sets.shown, top)
    if not text:
        raise ScopeError(
            f"the explainer {explainer.name} returned no text for {key}/{feature}: check that it "
            "serves chat completions (or give a chat model)"
        )
    det, fuz = detection(scorer, text, sets), fuzzing(scorer, text, sets)
    settings = {"method": METHOD, "explainer": explainer.name, "style": explainer.style}
    digest = hashlib.sha256((prompt + json.dumps(settings, sort_keys=True)).encode())
    return Explanation(
        sae=key, feature=feature, explanation=text, explainer=explainer.name, scorer=scorer.name,
        method=METHOD, prompt_hash=digest.hexdigest(), detection=det.accuracy,
        fuzzing=fuz.accuracy, n_pos=det.n_pos, n_neg=det.n_neg, n_shown=len(sets.shown),
        hard_negatives=sets.hard, unreadable=det.unreadable + fuz.unreadable, created=time.time(),
    )  # fmt: skip


def explain_features(
    store_path: str,
    targets: Sequence[tuple[str, int]],
    *,
    model: Any,
    saes: dict[str, Any],
    explainer: Explainer,
    scorer: Explainer | None = None,
    examples: int = 20,
    concurrency: int = 1,
    redo: bool = False,
    progress: Callable[[int, int], None] | None = None,
) -> list[Explanation]:
    """Explain and score ``targets`` ((sae key, feature) pairs) of the store at ``store_path``
    with ``explainer`` (scored by ``scorer``, default the explainer), ``model`` and ``saes``
    being the store's own (store key -> SAE). Returns what this call added."""
    store = Store(store_path)
    scorer = scorer or explainer
    skip = set() if redo else done(store, explainer.name)
    todo = [(k, f) for k, f in targets if (k, f) not in skip]
    run = uuid.uuid4().hex[:12]
    made: list[Explanation] = []
    pending: list[Explanation] = []
    chunk = 0

    def flush() -> None:
        nonlocal chunk
        if pending:
            table = pa.Table.from_pylist([asdict(e) for e in pending], schema=SCHEMA)
            add_side_table(store_path, "explanations", f"{run}-{chunk:05d}", table)
            chunk += 1
            made.extend(pending)
            pending.clear()

    def prepared() -> Iterator[tuple[str, int, float, Sets]]:
        for key, f in todo:  # forward passes stay in this thread (hooks are per model)
            top = store.sql(
                "select max from features where sae = ? and feature = ?", [key, f]
            ).fetchall()
            sets = split(store, model, saes[key], key, f, examples)
            yield key, f, float(top[0][0]) if top else 0.0, sets

    def finished(result: Explanation) -> None:
        pending.append(result)
        if progress:
            progress(len(made) + len(pending), len(todo))
        if len(pending) >= FLUSH_EVERY:
            flush()

    if progress:
        progress(0, len(todo))
    try:
        if concurrency <= 1:
            for key, f, top, sets in prepared():
                finished(_one(explainer, scorer, key, f, top, sets))
        else:
            with ThreadPoolExecutor(concurrency) as pool:
                futures: list[Future[Explanation]] = []
                for key, f, top, sets in prepared():
                    futures.append(pool.submit(_one, explainer, scorer, key, f, top, sets))
                    while futures and futures[0].done():  # in order, as they finish
                        finished(futures.pop(0).result())
                for fut in futures:
                    finished(fut.result())
    finally:
        flush()  # whatever finished is kept, also on an error or Ctrl-C
    return made


__all__ = ["METHOD", "SCHEMA", "Explanation", "done", "explain_features"]
