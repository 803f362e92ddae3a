"""`scope feature` and `scope sql`: read a recorded store from the command line."""

from __future__ import annotations

import functools
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.markup import escape

from scope.cli.common import RecordedStoreOpt, app, err, friendly, out
from scope.errors import ScopeError

if TYPE_CHECKING:
    from scope.store.view import Example


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
    from scope.store.schema import N_INTERVALS
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
        say(f"interval examples ({N_INTERVALS} equal parts of the max, highest first):")
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
