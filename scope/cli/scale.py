"""`scope record --ray`: one progress bar for the whole run and a summary per worker."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING

from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from scope.cli.common import LogEvery, err, out
from scope.cli.record import _print_summary

if TYPE_CHECKING:
    from scope.corpus import CorpusSpec
    from scope.record import RecordSettings
    from scope.record.distributed import RayOptions
    from scope.record.scale_report import ScaleProgress, ScaleSummary
    from scope.record.shard_worker import LoadFn


def record_on_cluster(
    load: LoadFn,
    corpus: CorpusSpec,
    store: str | Path,
    settings: RecordSettings,
    options: RayOptions,
    *,
    resume: bool,
) -> None:
    """Run ``record_on_ray`` under a progress bar, then print the summary and the workers."""
    from scope.record.distributed import record_on_ray

    with status_bar(err) as on_progress:
        summary = record_on_ray(
            load, corpus, store, settings, options, resume=resume, on_progress=on_progress
        )
    if summary.record.already_recorded:
        out.print(
            f"nothing to do: {escape(summary.record.store)} holds every shard of this run (--resume)"
        )
        return
    _print_summary(summary.record)
    print_workers(summary)


def _eta(p: ScaleProgress) -> str:
    if p.total is None or p.tokens_per_s <= 0:
        return "-"
    return str(timedelta(seconds=round(max(p.total - p.tokens, 0) / p.tokens_per_s)))


def _tokens(p: ScaleProgress) -> str:
    return f"{p.tokens:,}/~{p.total:,}" if p.total is not None else f"{p.tokens:,}"


@contextmanager
def status_bar(console: Console) -> Iterator[Callable[[ScaleProgress], None]]:
    """A live bar over the whole run (shards merged, tokens, tok/s over all workers, ETA);
    without a terminal, a line every few seconds. Yields the ``on_progress`` to pass on."""
    if not console.is_terminal:
        yield _log_lines(console)
        return
    bar = Progress(
        TextColumn("recording on Ray"),
        BarColumn(),
        TextColumn("shards {task.fields[shards]}"),
        TextColumn("{task.fields[tokens]} tokens"),
        TextColumn("{task.fields[rate]} tok/s"),
        TimeElapsedColumn(),
        TextColumn("ETA {task.fields[eta]}"),
        console=console,
    )
    with bar:
        task = bar.add_task("record", total=None, shards="-", tokens="-", rate="-", eta="-")

        def show(p: ScaleProgress) -> None:
            bar.update(
                task,
                total=p.total,
                completed=p.tokens,
                shards=f"{p.shards_done}/{p.shards}",
                tokens=_tokens(p),
                rate=f"{p.tokens_per_s:,.0f}",
                eta=_eta(p),
            )

        yield show


def _log_lines(console: Console) -> Callable[[ScaleProgress], None]:
    every = LogEvery()

    def show(p: ScaleProgress) -> None:
        if not every.due(final=p.shards_done >= p.shards):
            return
        console.print(
            f"recorded {_tokens(p)} tokens, {p.shards_done}/{p.shards} shards merged, "
            f"{len(p.running)} recording, {p.tokens_per_s:,.0f} tok/s, ETA {_eta(p)}",
            highlight=False,
        )

    return show


def print_workers(summary: ScaleSummary) -> None:
    """One row per worker: where it ran, what it recorded, how fast, restarts."""
    before = summary.shards - summary.shards_recorded
    table = Table(
        title=f"{summary.shards_recorded} shards recorded by {len(summary.workers)} workers"
        + (f" ({before} merged before --resume)" if before else "")
    )
    for col in ("worker", "node", "device", "threads", "shards", "tokens", "tok/s", "restarts"):
        table.add_column(col)
    for w in summary.workers:
        table.add_row(
            str(w.worker),
            escape(w.node),
            w.device,
            str(w.threads),
            str(w.shards),
            f"{w.tokens:,}",
            f"{w.tokens / w.seconds:,.0f}" if w.seconds else "-",
            str(w.restarts),
        )
    out.print(table)
