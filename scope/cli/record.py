"""`scope record`, `scope merge`, `scope feature` and `scope sql`: make a store, then read it."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import timedelta
from typing import TYPE_CHECKING, Annotated

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from scope.cli.common import (
    DeviceOpt,
    DtypeOpt,
    HookOpt,
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
    from scope.record import RecordProgress, RecordSummary


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


@app.command()
@friendly
def record(
    model: RequiredModelOpt,
    sae: SaeOpt = None,
    corpus: Annotated[
        list[str] | None,
        typer.Option(
            help="Text file, folder, .jsonl, .parquet or saved dataset. Repeat for several."
        ),
    ] = None,
    store: Annotated[str, typer.Option(help="Store folder to create, add to or resume.")] = "",
    field: Annotated[
        str, typer.Option(help="The .jsonl field / .parquet column with the text.")
    ] = "text",
    tokens: Annotated[
        str | None, typer.Option(help="Token budget, e.g. 2M or 500k (default: all).")
    ] = None,
    ctx: Annotated[int, typer.Option(help="Window length in tokens, BOS included.")] = 128,
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
    device: DeviceOpt = None,
    dtype: DtypeOpt = None,
    hook: HookOpt = None,
) -> None:
    """Record every feature of the SAEs over a corpus in one pass into a store.

    Ctrl-C or SIGTERM stops after the current batch, everything saved; --resume continues."""
    from scope.corpus import CorpusSpec, parse_tokens
    from scope.record import RecordSettings, stop_on_signals
    from scope.record import record as run_record

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
    )
    loaded, saes_ = load_model_and_saes(model, sae, device=device, dtype=dtype, hook=hook)
    with stop_on_signals() as should_stop, progress_bar(err) as on_progress:
        summary = run_record(
            loaded,
            saes_,
            spec,
            store,
            settings,
            resume=resume,
            on_progress=on_progress,
            should_stop=should_stop,
        )
    _print_summary(summary)


def _print_summary(summary: RecordSummary) -> None:
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
        out.print("skipped: " + "; ".join(f"{n} {why}" for why, n in summary.skipped.items()))


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


@app.command()
@friendly
def feature(
    address: Annotated[str, typer.Argument(help="SAE/INDEX, e.g. L12.res.16k/1234.")],
    store: RecordedStoreOpt,
    examples: Annotated[int, typer.Option(help="Top examples to show.")] = 5,
) -> None:
    """Print a feature's statistics, top examples and logit lens."""
    from scope.store import Store

    view = Store(store).feature(address)
    out.print(
        f"[bold]{escape(view.sae)}/{view.index}[/]  fires on {view.density:.3%} of tokens "
        f"({view.count:,}), max {view.max:.2f}, mean {view.mean:.2f}"
    )
    if view.neuronpedia_url:
        out.print(view.neuronpedia_url)
    if view.top_tokens:
        out.print("promotes: " + "  ".join(t for t, _ in view.top_tokens), markup=False)
        out.print("suppresses: " + "  ".join(t for t, _ in view.bottom_tokens), markup=False)
    for ex in view.top[:examples]:
        shown = [escape(t.replace("\n", "↵")) for t in ex.tokens]  # one line, markup-safe
        text = "".join(f"[reverse]{t}[/]" if i == ex.pos else t for i, t in enumerate(shown) if i)
        out.print(f"{ex.act:8.2f}  {text}", highlight=False, markup=True)


@app.command()
@friendly
def sql(
    query: Annotated[
        str,
        typer.Argument(
            help="SQL over features, topk, intervals, hist, l0, saes, lens, windows, vocab."
        ),
    ],
    store: RecordedStoreOpt,
) -> None:
    """Query a store with DuckDB SQL."""
    from scope.store import Store

    print(Store(store).sql(query))
