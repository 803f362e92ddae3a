"""`scope explain`: explain and score a store's features with a local or served model."""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from scope.cli.common import DeviceOpt, LogEvery, RecordedStoreOpt, app, err, friendly, out
from scope.errors import ScopeError

if TYPE_CHECKING:
    from scope.store import Store


def parse_features(text: str) -> list[int]:
    """``"0-99,1234"`` -> [0, ..., 99, 1234]."""
    found: list[int] = []
    for part in filter(None, (p.strip() for p in text.split(","))):
        m = re.fullmatch(r"(\d+)(?:-(\d+))?", part)
        if m is None:
            raise ScopeError(f"--features {text!r}: give indices and ranges, e.g. 0-99,1234")
        lo, hi = int(m.group(1)), int(m.group(2) or m.group(1))
        if hi < lo:
            raise ScopeError(f"--features {part!r}: a range goes up, e.g. 10-20")
        found += range(lo, hi + 1)
    return list(dict.fromkeys(found))


def targets(
    store: Store, saes: list[str], features: str | None, live: bool, labelled: bool
) -> list[tuple[str, int]]:
    """The (sae key, feature) pairs the options select, checked against the store."""
    keys = saes or list(store.saes)
    for key in keys:
        if key not in store.saes:
            raise ScopeError(f"--sae {key}: the store has {', '.join(store.saes)}")
    if sum(map(bool, (features, live, labelled))) != 1:
        raise ScopeError("say which features: --features 0-99,1234, --live or --labelled")
    if features:
        wanted = parse_features(features)
        found = []
        for key in keys:
            d_sae = store.saes[key].d_sae
            bad = [f for f in wanted if f >= d_sae]
            if bad:
                raise ScopeError(f"--features: {key} has features 0..{d_sae - 1}, not {bad[0]}")
            found += [(key, f) for f in wanted]
        live_rows = store.sql(
            "select sae, feature from features where count > 0 and sae in (select unnest(?))",
            [keys],
        ).fetchall()
        alive = {(str(s), int(f)) for s, f in live_rows}
        dead = [t for t in found if t not in alive]
        if dead:
            err.print(
                f"skipping {len(dead)} features that never fired (nothing to explain), e.g. "
                f"{dead[0][0]}/{dead[0][1]}",
                highlight=False,
            )
        return [t for t in found if t in alive]
    query = (
        "select sae, feature from features where count > 0 and sae in (select unnest(?)) "
        "order by sae, feature"
        if live
        else "select distinct sae, feature from labels where sae in (select unnest(?)) "
        "order by sae, feature"
    )
    if labelled and "labels" not in store.views:
        return []
    return [(str(s), int(f)) for s, f in store.sql(query, [keys]).fetchall()]


def make_model(spec: str, subject: Any, subject_name: str, device: str | None) -> Any:
    """An explainer or scorer: an http(s) URL (``URL#model`` picks a model) is an endpoint;
    anything else a model loaded here (the store's own model is reused, not loaded twice)."""
    from scope.explain import HTTPModel, LocalModel

    if spec.startswith(("http://", "https://")):
        url, _, name = spec.partition("#")
        return HTTPModel(url, name or None)
    if spec == subject_name:
        return LocalModel(subject, spec)
    from scope.model import load_model

    with out.status(f"loading {spec}"):
        return LocalModel(load_model(spec, device=device), spec)


@contextmanager
def progress(console: Console) -> Iterator[Callable[[int, int], None]]:
    """A bar with ETA on a terminal; lines every few seconds otherwise."""
    if not console.is_terminal:
        every = LogEvery()

        def line(done: int, total: int) -> None:
            if every.due(final=done >= total):
                console.print(f"explained {done}/{total} features", highlight=False)

        yield line
        return
    bar = Progress(
        TextColumn("explaining"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
        TextColumn("ETA"), TimeRemainingColumn(), console=console,
    )  # fmt: skip
    with bar:
        task = bar.add_task("explain", total=None)
        yield lambda done, total: bar.update(task, completed=done, total=total)


@app.command()
@friendly
def explain(
    store: RecordedStoreOpt,
    explainer: Annotated[
        str,
        typer.Option(
            help="An OpenAI-compatible endpoint (http://127.0.0.1:8000, URL#MODEL picks a "
            "model; a key from $SCOPE_EXPLAINER_API_KEY or $OPENAI_API_KEY), or a model to "
            "load here (hub name or folder)."
        ),
    ],
    sae: Annotated[list[str] | None, typer.Option(help="Store key(s); default all.")] = None,
    features: Annotated[str | None, typer.Option(help="Indices and ranges: 0-99,1234.")] = None,
    live: Annotated[bool, typer.Option("--live", help="Every feature that fired.")] = False,
    labelled: Annotated[bool, typer.Option("--labelled", help="Every labelled feature.")] = False,
    scorer: Annotated[
        str | None, typer.Option(help="Who scores (same forms); default the explainer.")
    ] = None,
    examples: Annotated[int, typer.Option(help="Examples shown to the explainer.", min=2)] = 20,
    concurrency: Annotated[
        int, typer.Option(help="Features in flight at once (endpoints).", min=1)
    ] = 8,
    redo: Annotated[bool, typer.Option("--redo", help="Explain features already done.")] = False,
    sample: Annotated[
        int | None, typer.Option(help="Explain N of the selected features, drawn at random.", min=1)
    ] = None,
    model: Annotated[
        str | None, typer.Option(help="The store's model, if not where it was recorded from.")
    ] = None,
    device: DeviceOpt = None,
) -> None:
    """Explain features from their recorded examples and score each explanation by detection
    and fuzzing on held-out examples; results go to the store's explanations table."""
    from scope.explain import explain_features
    from scope.sae import open_recorded
    from scope.store import Store

    opened = Store(store)
    chosen = targets(opened, sae or [], features, live, labelled)
    if sample is not None and sample < len(chosen):
        import random

        chosen = sorted(random.Random(0).sample(chosen, sample))
    if not chosen:
        err.print("nothing to explain: no feature matches", highlight=False)
        return
    # endpoints first: an unreachable one fails before any model loads
    specs = [explainer] + ([scorer] if scorer else [])
    served = {s: make_model(s, None, "", device) for s in specs if s.startswith("http")}
    with out.status("loading the store's model and SAEs"):
        subject, saes = open_recorded(opened, model, device=device)
    name = model or opened.manifest.model.name
    who = served.get(explainer) or make_model(explainer, subject, name, device)
    judge = (served.get(scorer) or make_model(scorer, subject, name, device)) if scorer else who
    local = not explainer.startswith("http") or (scorer and not scorer.startswith("http"))
    with progress(err) as show:
        report = explain_features(
            store, chosen, model=subject, saes=saes, explainer=who, scorer=judge,
            examples=examples, concurrency=1 if local else concurrency, redo=redo, progress=show,
        )  # fmt: skip
    for e in report.made:
        det = "-" if e.detection is None else f"{e.detection:.2f}"
        fuz = "-" if e.fuzzing is None else f"{e.fuzzing:.2f}"
        out.print(
            f"{e.sae}/{e.feature}  detection {det}  fuzzing {fuz}  ({e.n_pos}+/{e.n_neg}-)  "
            f"{e.explanation}",
            markup=False, highlight=False, soft_wrap=True,
        )  # fmt: skip
    notes = [f"explained {len(report.made)} features into {store}/explanations"]
    if report.already:
        notes.append(f"{report.already} already explained by {who.name} (--redo: again)")
    if report.empty:
        notes.append(f"{len(report.empty)} got no text from the explainer (run again to retry)")
    err.print("; ".join(notes), highlight=False, soft_wrap=True)


__all__ = ["explain", "parse_features", "targets"]
