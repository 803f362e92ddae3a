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
    SaeOpt,
    app,
    friendly,
    human,
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
) -> None:
    """List the SAEs that fit a model: sae-lens' registry and the local saes/ library."""
    from scope.fit import list_saes
    from scope.model import resolve_source

    source = resolve_source(model)
    target: Any = source  # a hub name: the registry is keyed by name, no download needed
    if Path(source).is_dir():  # a folder: load it to learn its hooks' widths
        from scope.model import load_model

        target = load_model(source, device="cpu")
    rows = [r for r in list_saes(target) if r.local or not local_only]
    table = Table(title=f"SAEs for {model} ({len(rows)})")
    for col in ("release", "id", "hook", "neuronpedia", "local"):
        table.add_column(col)
    for r in rows:
        table.add_row(
            r.release,
            r.sae_id,
            r.hook_name or "-",
            r.neuronpedia_id or "-",
            "yes" if r.local else "",
        )
    out.print(table)
