"""`scope record`, `scope merge`, `scope feature` and `scope sql`: make a store, then read it."""

from __future__ import annotations

import functools
import signal
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from scope.cli.common import (
    CorpusOpt,
    CtxOpt,
    DeviceOpt,
    DtypeOpt,
    FieldOpt,
    HookOpt,
    LogEvery,
    RecordedStoreOpt,
    RequiredModelOpt,
    SaeOpt,
    app,
    err,
    friendly,
    load_model_and_saes,
    out,
)
from scope.errors import ScopeError

if TYPE_CHECKING:
    from scope.corpus import CorpusSpec
    from scope.record import RecordProgress, RecordSettings, RecordSummary
    from scope.store.view import Example


def parse_shard(text: str) -> tuple[int, int]:
    """``"1/4"`` -> (1, 4): which slice of the windows this run records."""
    try:
        i, n = (int(x) for x in text.split("/"))
    except ValueError:
        raise ScopeError(f"--shard {text!r}: use i/N, e.g. 0/4") from None
    return i, n


@contextmanager
def progress_bar(console: Console) -> Iterator[Callable[[RecordProgress], None]]:
    """A live bar (tokens done/total, tok/s, elapsed, ETA); yields the ``on_progress`` to pass
    to ``scope.record.record``. The ETA uses this session's rate, so a resumed run's earlier
    tokens do not make it look faster than it is."""
    bar = Progress(
        TextColumn("recording"),
        BarColumn(),
        TextColumn("{task.fields[tokens]} tokens"),
        TextColumn("{task.fields[rate]} tok/s"),
        TimeElapsedColumn(),
        TextColumn("ETA {task.fields[eta]}"),
        console=console,
    )
    if not console.is_terminal:  # a log file, CI, nohup: a plain line every few seconds
        yield log_lines(console)
        return
    with bar:
        task = bar.add_task("record", total=None, tokens="-", rate="-", eta="-")

        def show(p: RecordProgress) -> None:
            left = (p.total - p.tokens) / p.tokens_per_s if p.tokens_per_s > 0 else None
            bar.update(
                task,
                total=p.total,
                completed=p.tokens,
                tokens=f"{p.tokens:,}/{p.total:,}",
                rate=f"{p.tokens_per_s:,.0f}",
                eta=str(timedelta(seconds=round(left))) if left is not None else "-",
            )

        yield show


def log_lines(console: Console) -> Callable[[RecordProgress], None]:
    """An ``on_progress`` that prints "recorded N/M tokens (P%), R tok/s, ETA T" lines."""
    every = LogEvery()

    def show(p: RecordProgress) -> None:
        if not every.due(final=p.tokens >= p.total):
            return
        left = (p.total - p.tokens) / p.tokens_per_s if p.tokens_per_s > 0 else 0.0
        console.print(
            f"recorded {p.tokens:,}/{p.total:,} tokens ({p.tokens / max(p.total, 1):.0%}), "
            f"{p.tokens_per_s:,.0f} tok/s, ETA {timedelta(seconds=round(left))}",
            highlight=False,
        )

    return show


@app.command()
@friendly
def record(
    model: RequiredModelOpt,
    sae: SaeOpt = None,
    corpus: CorpusOpt = None,
    store: Annotated[str, typer.Option(help="Store folder to create, add to or resume.")] = "",
    field: FieldOpt = "text",
    tokens: Annotated[
        str | None, typer.Option(help="Token budget, e.g. 2M or 500k (default: all).")
    ] = None,
    ctx: CtxOpt = 128,
    k: Annotated[int, typer.Option(help="Top windows kept per feature.")] = 20,
    samples: Annotated[int, typer.Option(help="Interval samples per activation bin.")] = 5,
    batch_size: Annotated[
        int | None, typer.Option(help="Windows per batch (default: fit memory).")
    ] = None,
    shard: Annotated[
        str, typer.Option(help="Record slice i/N of the windows (merge with `scope merge`).")
    ] = "0/1",
    resume: Annotated[
        bool, typer.Option(help="Continue an interrupted run of this store.")
    ] = False,
    checkpoint_seconds: Annotated[
        float, typer.Option(help="Save resumable state this often.")
    ] = 60.0,
    overlap: Annotated[
        bool | None,
        typer.Option(
            "--overlap/--no-overlap",
            help="Fold each batch into the state while the next one's forward runs "
            "(default: on a GPU).",
            show_default=False,
        ),
    ] = None,
    device: DeviceOpt = None,
    dtype: DtypeOpt = None,
    hook: HookOpt = None,
    ray: Annotated[
        str | None,
        typer.Option(
            "--ray", help="Record on a Ray cluster: auto, local, or its address (HOST:PORT)."
        ),
    ] = None,
    workers: Annotated[
        int | None, typer.Option(help="--ray: workers (default: one per GPU, or per --threads).")
    ] = None,
    shards: Annotated[
        int | None, typer.Option(help="--ray: shards of the corpus (default: 4 per worker).")
    ] = None,
    threads: Annotated[
        int | None, typer.Option(help="--ray without GPUs: CPU threads per worker.")
    ] = None,
    snapshots: Annotated[
        bool,
        typer.Option(
            "--snapshots",
            help="Make every checkpoint a snapshot `scope app` can show (the first after "
            "15 s of recording), not only the end.",
        ),
    ] = False,
    serve: Annotated[
        bool,
        typer.Option(
            "--serve",
            help="Serve the explorer (as `scope app`) from the first snapshot on while the "
            "recording goes on, and after it ends until Ctrl-C (implies --snapshots).",
        ),
    ] = False,
    port: Annotated[
        int, typer.Option(help="--serve: the explorer's port.", min=1, max=65535)
    ] = 8501,
) -> None:
    """Record every feature of the SAEs over a corpus in one pass into a store.

    Ctrl-C or SIGTERM stops after the current batch, everything saved; --resume continues.
    With --serve the explorer shows the recording as it goes. With --ray the corpus is recorded
    as shards on a Ray cluster and merged as they finish."""
    from scope.corpus import CorpusSpec, parse_tokens
    from scope.record import RecordSettings

    if not store:
        raise ScopeError("give --store FOLDER: where the recording goes")
    if not sae:
        raise ScopeError("give --sae at least once")
    spec = CorpusSpec(
        paths=tuple(corpus or ()), field=field, ctx=ctx, max_tokens=parse_tokens(tokens)
    )
    settings = RecordSettings(
        ctx=ctx,
        k=k,
        samples=samples,
        batch_size=batch_size,
        shard=parse_shard(shard),
        checkpoint_seconds=checkpoint_seconds,
        overlap=overlap,
        snapshots=snapshots or serve,
    )
    if ray is not None:
        if serve or snapshots:
            raise ScopeError(
                "--serve and --snapshots go without --ray: a --ray store is readable from its "
                "first merged shard on, so serve it with `scope app --store` beside the run"
            )
        from scope.cli.scale import record_on_cluster
        from scope.record.distributed import RayOptions
        from scope.record.shard_worker import Loader

        options = RayOptions(
            address=ray, workers=workers, shards=shards, threads=threads, device=device
        )
        load = Loader(model=model, saes=tuple(sae), dtype=dtype, hook=hook)
        record_on_cluster(load, spec, store, settings, options, resume=resume)
        return
    if workers is not None or shards is not None or threads is not None:
        raise ScopeError("--workers, --shards and --threads go with --ray: add --ray auto or local")
    explorer = None
    if serve:
        from scope.cli.serve import Explorer

        explorer = Explorer(store, port, model, device)
        # SIGTERM while the model loads ends this process through ``finally``, explorer and all
        signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        if explorer is not None and has_snapshot(Path(store)):
            explorer.start()  # a run continued: what it recorded is shown while the model loads
        loaded, saes_ = load_model_and_saes(model, sae, device=device, dtype=dtype, hook=hook)
        on_snapshot = explorer.start if explorer is not None else None
        summary = record_session(loaded, saes_, spec, store, settings, resume, on_snapshot)
        _print_summary(summary)
        if explorer is not None:
            out.print("the recording is complete; the explorer serves it until Ctrl-C")
            explorer.serve()
    finally:
        if explorer is not None:
            explorer.stop()


def has_snapshot(store: Path) -> bool:
    """Whether the store has a snapshot readers can open."""
    from scope.store.manifest import read_manifest

    try:
        manifest = read_manifest(store) if store.is_dir() else None
    except ScopeError:
        return False
    return manifest is not None and manifest.tables_version is not None


def record_session(
    model: Any,
    saes: list[Any],
    spec: CorpusSpec,
    store: str,
    settings: RecordSettings,
    resume: bool,
    on_snapshot: Callable[[str], None] | None,
) -> RecordSummary:
    """Open, record and finish a recording session under a progress bar; the first Ctrl-C (or
    SIGTERM) stops it after the batch, everything saved, a second at once."""
    from scope.record import RecordingSession, stop_on_signals

    try:
        with (
            stop_on_signals(say_stopping) as should_stop,
            progress_bar(err) as on_progress,
            RecordingSession.open(
                model, saes, spec, store, settings, resume=resume, on_snapshot=on_snapshot
            ) as session,
        ):
            session.record(on_progress, should_stop)
            return session.finish()
    except KeyboardInterrupt:
        raise ScopeError(
            f"stopped at once by a second Ctrl-C: the store keeps what its last checkpoint saved "
            f"(one every {settings.checkpoint_seconds:g} s, --checkpoint-seconds): run the same "
            "command with --resume to continue from there"
        ) from None


def say_stopping(signal_name: str) -> None:
    """What the first Ctrl-C (or SIGTERM) prints at once: the stop waits for the batch."""
    err.print(
        f"{signal_name}: stopping after this batch, then saving; Ctrl-C again stops at once "
        "(keeping what the last checkpoint saved)",
        highlight=False,
    )


def _print_summary(summary: RecordSummary) -> None:
    if summary.already_recorded:
        out.print(f"nothing to do: {escape(summary.store)} already holds this corpus (--resume)")
        return
    table = Table(
        title=f"recorded {summary.tokens:,} tokens in {summary.seconds:,.1f} s "
        f"({summary.tokens / max(summary.seconds, 1e-9):,.0f} tok/s) into {summary.store}"
    )
    for col in ("SAE", "tokens in store", "mean L0", "dead", "dense", "width"):
        table.add_column(col)
    for s in summary.saes:
        table.add_row(
            s["sae"],
            f"{s['tokens']:,}",
            f"{s['mean_l0']:.1f}",
            str(s["dead"]),
            str(s["dense"]),
            str(s["d_sae"]),
        )
    out.print(table)
    if summary.skipped:
        out.print(f"skipped: {summary.skipped}", markup=False, highlight=False)


@app.command()
@friendly
def merge(
    shards: Annotated[list[str], typer.Argument(help="The shard stores (i/N for every i).")],
    store: Annotated[str, typer.Option(help="New folder for the merged store.")],
) -> None:
    """Merge shard stores into exactly what one pass would have recorded."""
    from scope.record.merge import merge_stores

    manifest = merge_stores(store, shards)
    out.print(f"merged {len(shards)} shards into {store}: {manifest.tokens_recorded:,} tokens")


SPARK = " ▁▂▃▄▅▆▇█"


def sparkline(counts: list[int]) -> str:
    """Counts as a one-line bar chart."""
    top = max(counts, default=0)
    return "".join(SPARK[round(c / top * (len(SPARK) - 1))] if top else " " for c in counts)


def example_line(ex: Example, context: int | None = None) -> str:
    """A window on one line: every control character visible, the max token in ⟦ ⟧ (which
    survives piping, unlike colour); ``context`` tokens either side of it, or all."""
    from scope.store.view import visible

    lo, hi = 1, len(ex.tokens)
    if context is not None:
        lo, hi = max(1, ex.pos - context), min(len(ex.tokens), ex.pos + context + 1)
    return "".join(
        f"⟦{visible(t)}⟧" if i == ex.pos else visible(t)
        for i, t in enumerate(ex.tokens[lo:hi], start=lo)
    )


@app.command()
@friendly
def feature(
    address: Annotated[str, typer.Argument(help="SAE/INDEX, e.g. L12.res.16k/1234.")],
    store: RecordedStoreOpt,
    examples: Annotated[int, typer.Option(help="Top examples to show (0 for none).")] = 5,
) -> None:
    """Print a feature's statistics, histogram, logit lens, neighbours and examples."""
    from scope.store import Store
    from scope.store.view import visible

    if examples < 0:
        raise ScopeError(f"--examples {examples} must be 0 or more")
    view = Store(store).feature(address)
    say = functools.partial(out.print, markup=False, highlight=False, soft_wrap=True)
    say(
        f"{view.sae}/{view.index}{'  ' + visible(view.label) if view.label else ''}  fires on "
        f"{view.density:.3%} of tokens ({view.count:,}), max {view.max:.2f}, "
        f"mean {view.mean:.2f} ± {view.std:.2f}"
    )
    if view.neuronpedia_url:
        say(view.neuronpedia_url)
    for e in view.explanations:
        scores = "  ".join(
            f"{name} {value:.2f}"
            for name, value in (("detection", e.detection), ("fuzzing", e.fuzzing))
            if value is not None
        )
        say(f"explained: {visible(e.explanation)}  ({scores or 'not scored'}; {e.explainer})")
    if view.histogram:
        lo, hi = view.histogram[0][0], view.histogram[-1][1]
        say(f"histogram {lo:.3g} {sparkline([c for _, _, c in view.histogram])} {hi:.3g}")
    if view.top_tokens:
        say("promotes:   " + "  ".join(visible(t) for t, _ in view.top_tokens))
        say("suppresses: " + "  ".join(visible(t) for t, _ in view.bottom_tokens))
    if view.neighbours:
        say("neighbours: " + "  ".join(f"{n} ({c:.2f})" for n, c in view.neighbours))
    if examples:
        say("top examples:")
    for ex in view.top[:examples]:
        say(f"{ex.act:8.2f}  {example_line(ex, context=20)}")
    if examples and view.intervals:
        say("interval examples (fifths of the max, highest first):")
        for interval in sorted(view.intervals, reverse=True):
            for ex in view.intervals[interval][:2]:
                say(f"{interval} {ex.act:6.2f}  {example_line(ex, context=20)}")


@app.command()
@friendly
def sql(
    query: Annotated[
        str,
        typer.Argument(
            help="A read-only query over features, topk, intervals, samples, hist, l0, saes, "
            "lens, windows, vocab (and labels, experiments, evals once written)."
        ),
    ],
    store: RecordedStoreOpt,
    limit: Annotated[int, typer.Option(help="Rows to print or export (0: all).", min=0)] = 50,
    csv: Annotated[
        str | None, typer.Option("--csv", help="Write the rows to this CSV file.")
    ] = None,
    json: Annotated[bool, typer.Option("--json", help="Print the rows as JSON lines.")] = False,
) -> None:
    """Query a store with DuckDB SQL (SELECT only: the store is never written)."""
    import json as json_lib

    from scope.store import Rows, Store

    if csv is not None:
        target = Path(csv).expanduser()
        if target.is_dir() or not target.parent.is_dir():
            raise ScopeError(f"--csv {csv}: give a file path in an existing folder")
    table = Store(store).sql(query).arrow()
    total = table.num_rows
    shown = table if limit == 0 else table.slice(0, limit)
    if csv is not None:
        import pyarrow.csv as pa_csv

        pa_csv.write_csv(shown, csv)
        err.print(f"wrote {shown.num_rows:,} of {total:,} rows to {escape(csv)}", highlight=False)
    elif json:
        for row in shown.to_pylist():
            print(json_lib.dumps(row, default=str))
    else:
        print(Rows(shown))
    if shown.num_rows < total:
        err.print(f"{total - shown.num_rows:,} more rows: --limit 0 for all", highlight=False)
