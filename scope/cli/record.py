"""`scope record` and `scope merge`: make a store (`scope.cli.query` reads it)."""

from __future__ import annotations

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
