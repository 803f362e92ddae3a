"""`scope info` and `scope saes`: what a model and its SAEs are, and which SAEs fit."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer
from rich.markup import escape
from rich.table import Table

from scope.cli.common import (
    DeviceOpt,
    DtypeOpt,
    HookOpt,
    ModelOpt,
    RequiredModelOpt,
    SaeOpt,
    app,
    friendly,
    human,
    load_model_and_saes,
    out,
)
from scope.errors import ScopeError


@app.command()
@friendly
def info(
    model: ModelOpt = None,
    sae: SaeOpt = None,
    device: DeviceOpt = None,
    dtype: DtypeOpt = None,
    hook: HookOpt = None,
) -> None:
    """Print a model and SAEs, and whether each SAE fits the model."""
    from scope.fit import check_fit
    from scope.model import load_model
    from scope.sae import load_sae

    if not model and not sae:
        raise ScopeError("give --model, --sae, or both")
    loaded = None
    if model:
        with out.status(f"loading {model}"):
            loaded = load_model(model, device=device, dtype=dtype)
        out.print(_model_table(loaded))
    misfits = 0
    for spec in sae or []:
        s = load_sae(spec, device=device, dtype=dtype, hook=hook)
        table = _sae_table(s)
        if loaded is not None:
            try:
                check_fit(loaded, s)
                hook_name = s.cfg.metadata.hook_name
                table.add_row("fits", f"[green]yes[/]: {hook_name} of {loaded.cfg.model_name}")
            except ScopeError as e:
                table.add_row("fits", f"[red]no[/]: {escape(str(e))}")
                misfits += 1
        out.print(table)
    if misfits:  # scripts can check: 1 = an SAE does not fit (2 = bad input)
        raise typer.Exit(1)


def _model_table(loaded: Any) -> Table:
    from scope.model import model_info

    m = model_info(loaded)
    table = Table(title=f"model {m.name}", show_header=False)
    for label, value in (
        ("architecture", m.architecture),
        ("layers", m.n_layers),
        ("d_model", m.d_model),
        ("vocab", m.d_vocab),
        ("context", m.n_ctx),
        ("parameters", human(m.n_params)),
        ("dtype", m.dtype),
        ("device", m.device),
    ):
        table.add_row(label, escape(str(value)))
    return table


def _sae_table(sae: Any) -> Table:
    from scope.identity import sae_info

    i = sae_info(sae)
    table = Table(title=f"SAE {i.key}", show_header=False)
    for row, entry in (
        ("release", i.release),
        ("id", i.sae_id),
        ("source", i.source),
        ("hook", i.hook_name),
        ("site", i.site),
        ("d_in", i.d_in),
        ("width", i.d_sae),
        ("dtype", f"{i.dtype} (threshold float32)"),
        ("neuronpedia", i.neuronpedia_id),
    ):
        table.add_row(row, escape(str(entry)) if entry is not None else "-")
    return table


@app.command()
@friendly
def saes(
    model: Annotated[str, typer.Option("--model", "-m", help="Hub name or folder.")],
    local_only: Annotated[bool, typer.Option(help="Only SAEs already under saes/.")] = False,
    layer: Annotated[int | None, typer.Option(help="Only this layer.")] = None,
    site: Annotated[
        str | None, typer.Option(help="Only this site: res, mlp, att or tc (transcoders).")
    ] = None,
    width: Annotated[str | None, typer.Option(help="Only this width, e.g. 16k.")] = None,
    format: Annotated[
        str, typer.Option("--format", help="table, or tsv (never truncated, for scripts).")
    ] = "table",
) -> None:
    """List the SAEs that fit a model: sae-lens' registry (Gemma Scope for Gemma 2, Gemma Scope 2
    for every Gemma 3, transcoders as site tc) and the local saes/ library."""
    from scope.fit import list_saes
    from scope.identity import SITE_HOOKS
    from scope.model import resolve_source

    sites = [*SITE_HOOKS, *(["tc"] if "tc" not in SITE_HOOKS else [])]
    if site is not None and site not in sites:
        raise ScopeError(f"--site {site!r} is not one of {', '.join(sites)}")
    if format not in ("table", "tsv"):
        raise ScopeError(f"--format {format!r} is not one of table, tsv")
    source = resolve_source(model)
    target: Any = source  # a hub name: the registry is keyed by name, no download needed
    if Path(source).is_dir():  # a folder: load it to learn its hooks' widths
        from scope.model import load_model

        target = load_model(source, device="cpu")
    rows = [r for r in list_saes(target) if r.local or not local_only]
    rows = [
        r for r in rows
        if (layer is None or r.layer == layer) and (site is None or r.site == site)
        and (width is None or r.width == width)
    ]  # fmt: skip
    cells = [
        (r.release, r.sae_id, r.site or "-", r.width or "-", r.l0 or "-", r.hook_name or "-",
         r.neuronpedia_id or "-", "yes" if r.local else "",
         f"refused: {r.refused}" if r.refused else "yes")
        for r in rows
    ]  # fmt: skip
    columns = ("release", "id", "site", "width", "l0", "hook", "neuronpedia", "local", "served")
    if format == "tsv":
        print("\t".join(columns))
        for row in cells:
            print("\t".join(row))
        return
    table = Table(title=f"SAEs for {model} ({len(rows)})")
    for col in columns:
        table.add_column(col, overflow="fold")
    for row in cells:
        table.add_row(*(escape(c) for c in row))
    out.print(table)


@app.command()
@friendly
def inspect(
    text: Annotated[str, typer.Argument(help="The text to look into.")],
    model: RequiredModelOpt,
    sae: SaeOpt = None,
    top: Annotated[int, typer.Option(help="Features shown per token.")] = 5,
    store: Annotated[
        str | None, typer.Option(help="A recorded store: name SAEs by its keys, show labels.")
    ] = None,
    device: DeviceOpt = None,
    dtype: DtypeOpt = None,
    hook: HookOpt = None,
) -> None:
    """Which features fire on a text: every token (BOS hidden) with its strongest features."""
    from scope.inspect import inspect as inspect_text
    from scope.store import Store
    from scope.store.view import visible

    if not sae:
        raise ScopeError("give --sae at least once")
    opened = Store(store) if store else None
    loaded, saes_ = load_model_and_saes(model, sae, device=device, dtype=dtype, hook=hook)
    rows = inspect_text(loaded, saes_, text, top=top, store=opened)
    width = max((len(visible(r.token)) for r in rows), default=0)
    for r in rows:
        hits = "  ".join(
            f"{h.address} {h.act:.2f}"
            + (
                f" ({visible(label)})"
                if opened and (label := opened.label(h.sae, h.feature)[0])
                else ""
            )
            for h in r.features
        )
        out.print(
            f"{r.position:4d}  {visible(r.token):<{width}}  {hits or '-'}",
            markup=False,
            highlight=False,
            soft_wrap=True,
        )
