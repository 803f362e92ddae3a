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
from dataclasses import asdict
from typing import Any, NamedTuple

import pyarrow as pa

from scope.errors import ScopeError
from scope.explain.models import Explainer
from scope.explain.score import Sets, detection, fuzzing, split
from scope.store import Store
from scope.store.explanations import Explanation
from scope.store.schema import EXPLANATIONS
from scope.store.writer import add_side_table

METHOD = "delphi-top-intervals"
"""How explanations are made: shown top and interval examples, detection and fuzzing."""
EMPTY_LIMIT = 3
"""Features in a row with no text from the explainer before the run stops."""
FLUSH_EVERY = 8
"""Features per file of the side table (a killed run loses at most this many)."""


class ExplainReport(NamedTuple):
    """What one ``explain_features`` call did."""

    made: list[Explanation]
    """The explanations it added, in the order they finished."""
    already: int
    """Targets skipped: this explainer had explained them (``redo`` explains them again)."""
    empty: list[tuple[str, int]]
    """Targets the explainer gave no text for (nothing stored; a later run tries again)."""


def done(store: Store, explainer: str) -> set[tuple[str, int]]:
    """(sae, feature) pairs this explainer already explained with METHOD."""
    if EXPLANATIONS.name not in store.views:
        return set()
    rows = store.sql(
        "select distinct sae, feature from explanations where explainer = ? and method = ?",
        [explainer, METHOD],
    ).fetchall()
    return {(str(s), int(f)) for s, f in rows}


def _one(
    explainer: Explainer, scorer: Explainer, key: str, feature: int, top: float, sets: Sets
) -> Explanation | None:
    """The feature's explanation and scores; None when the explainer gave no text."""
    prompt, text = explainer.explain(sets.shown, top)
    if not text:
        return None
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
) -> ExplainReport:
    """Explain and score ``targets`` ((sae key, feature) pairs) of the store at ``store_path``
    with ``explainer`` (scored by ``scorer``, default the explainer), ``model`` and ``saes``
    being the store's own (store key -> SAE)."""
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
            table = pa.Table.from_pylist([asdict(e) for e in pending], schema=EXPLANATIONS.columns)
            add_side_table(store_path, EXPLANATIONS.name, f"{run}-{chunk:05d}", table)
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

    empty: list[tuple[str, int]] = []

    def finished(result: Explanation | None, key: str, f: int) -> None:
        if progress:
            progress(len(made) + len(pending) + len(empty) + 1, len(todo))
        if result is None:
            empty.append((key, f))
            if len(empty) >= EMPTY_LIMIT and not made and not pending:
                raise ScopeError(
                    f"the explainer {explainer.name} returned no text for {len(empty)} features "
                    f"in a row ({', '.join(f'{k}/{i}' for k, i in empty)}): check that it serves "
                    "chat completions, or give a chat model"
                )
            return
        pending.append(result)
        if len(pending) >= FLUSH_EVERY:
            flush()

    if progress:
        progress(0, len(todo))
    try:
        if concurrency <= 1:
            for key, f, top, sets in prepared():
                finished(_one(explainer, scorer, key, f, top, sets), key, f)
        else:
            with ThreadPoolExecutor(concurrency) as pool:
                futures: list[tuple[Future[Explanation | None], str, int]] = []
                for key, f, top, sets in prepared():
                    fut = pool.submit(_one, explainer, scorer, key, f, top, sets)
                    futures.append((fut, key, f))
                    while futures and futures[0][0].done():  # in order, as they finish
                        done_fut, k, i = futures.pop(0)
                        finished(done_fut.result(), k, i)
                for fut, k, i in futures:
                    finished(fut.result(), k, i)
    finally:
        flush()  # whatever finished is kept, also on an error or Ctrl-C
    return ExplainReport(made=made, already=len(targets) - len(todo), empty=empty)


__all__ = ["METHOD", "ExplainReport", "Explanation", "done", "explain_features"]
