"""`scope eval`: L0, FVU, loss recovered, KL and dead/dense features per SAE, side by side."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.table import Table

from scope.cli.common import (
    CorpusOpt,
    CtxOpt,
    DeviceOpt,
    DtypeOpt,
    FieldOpt,
    HookOpt,
    RequiredModelOpt,
    SaeOpt,
    app,
    friendly,
    load_model_and_saes,
    out,
)
from scope.errors import ScopeError


@app.command("eval")
@friendly
def eval_(
    model: RequiredModelOpt,
    sae: SaeOpt = None,
    corpus: CorpusOpt = None,
    field: FieldOpt = "text",
    tokens: Annotated[str, typer.Option(help="Corpus tokens to evaluate on, e.g. 200k.")] = "100k",
    ctx: CtxOpt = 128,
    batch_size: Annotated[int, typer.Option(help="Windows per forward pass.", min=1)] = 8,
    store: Annotated[
        str | None, typer.Option(help="A recorded store: name SAEs by its keys, save the rows.")
    ] = None,
    plot: Annotated[
        str | None, typer.Option(help="Write delta loss against L0 to this .html file.")
    ] = None,
    device: DeviceOpt = None,
    dtype: DtypeOpt = None,
    hook: HookOpt = None,
) -> None:
    """Evaluate SAEs on a corpus slice: sparsity, reconstruction, and what splicing costs."""
    from scope.cli.steer import check_output
    from scope.corpus import CorpusSpec, parse_tokens
    from scope.evals import evaluate
    from scope.store import Store

    if not sae:
        raise ScopeError("give --sae at least once")
    check_output(plot, "--plot", folder=False)
    spec = CorpusSpec(
        paths=tuple(corpus or ()), field=field, ctx=ctx, max_tokens=parse_tokens(tokens)
    )
    opened = Store(store) if store else None
    loaded, saes = load_model_and_saes(model, sae, device=device, dtype=dtype, hook=hook)
    with out.status(f"evaluating {len(saes)} SAEs"):
        report = evaluate(loaded, saes, spec, batch_size=batch_size, store=opened)
    table = Table(
        title=f"{report.rows[0].tokens:,} tokens, {report.rows[0].predictions:,} predictions"
    )
    columns = (
        "SAE",
        "L0",
        "FVU",
        "cos",
        "loss clean",
        "loss SAE",
        "delta",
        "recovered",
        "KL",
        "dead",
        "dense",
    )
    for col in columns:
        table.add_column(col, justify="left" if col == "SAE" else "right", no_wrap=col == "SAE")
    for r in report.rows:
        table.add_row(r.sae, f"{r.l0:.1f}", f"{r.fvu:.3f}", f"{r.cossim:.3f}",
                      f"{r.ce_loss_without_sae:.3f}", f"{r.ce_loss_with_sae:.3f}", f"{r.delta_loss:.3f}",
                      f"{r.ce_loss_score:.3f}", f"{r.kl_div_with_sae:.3f}", str(r.dead), str(r.dense))  # fmt: skip
    out.print(table)
    if plot:
        report.figure().write_html(plot)
        out.print(f"figure: {plot}")
    if opened is not None:
        out.print(f"saved to {opened.root}/evals/ (the evals table)")
