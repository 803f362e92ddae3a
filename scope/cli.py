"""The `scope` command."""

from __future__ import annotations

import functools
import logging
import os
import sys
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from scope.errors import ScopeError

app = typer.Typer(
    help="Gemma Scope Workbench: Gemma + JumpReLU SAEs, on your own machine.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
out = Console()
err = Console(stderr=True)
F = TypeVar("F", bound=Callable[..., Any])

ModelOpt = Annotated[
    str | None,
    typer.Option("--model", "-m", help="Hub name (google/gemma-2-2b) or local checkpoint folder."),
]
SaeOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--sae",
        "-s",
        help="RELEASE/ID (gemma-scope-2b-pt-res-canonical/layer_20/width_16k/"
        "canonical) or a folder. Repeat for several.",
    ),
]
DeviceOpt = Annotated[
    str | None, typer.Option(help="cuda, mps or cpu (default: the best there is).")
]
DtypeOpt = Annotated[str | None, typer.Option(help="float32 or bfloat16 (default: bf16 on GPU).")]
HookOpt = Annotated[
    str | None,
    typer.Option(
        help="Hook an SAE folder reads, when its path does not say (blocks.12.hook_resid_post)."
    ),
]


def friendly(fn: F) -> F:
    """Print a ScopeError as one clear message and exit 2, without a traceback."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except ScopeError as e:
            err.print(f"[bold red]error:[/] {escape(str(e))}", highlight=False, soft_wrap=True)
            raise typer.Exit(2) from None

    return wrapper  # type: ignore[return-value]


def quiet_libraries() -> None:
    """Library chatter (deprecations, progress bars) hides what the user asked for."""
    warnings.filterwarnings("ignore")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    logging.getLogger("transformers").setLevel(logging.ERROR)


def parse_sae_spec(spec: str) -> tuple[str, str | None]:
    """``RELEASE/ID`` -> (release, id); an existing folder -> (folder, None)."""
    if Path(spec).expanduser().is_dir():
        return spec, None
    if "/" not in spec:
        raise ScopeError(
            f"--sae {spec!r}: give RELEASE/ID (e.g. gemma-scope-2b-pt-res-canonical/"
            "layer_20/width_16k/canonical) or an existing folder"
        )
    release, sae_id = spec.split("/", 1)
    return release, sae_id


def _human(n: int) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= size:
            return f"{n / size:.2f}{unit}"
    return str(n)


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
    from scope.model import load_model, model_info
    from scope.sae import load_sae, sae_info

    quiet_libraries()
    if not model and not sae:
        raise ScopeError("give --model, --sae, or both")
    loaded = None
    if model:
        with out.status(f"loading {model}"):
            loaded = load_model(model, device=device, dtype=dtype)
        m = model_info(loaded)
        table = Table(title=f"model {m.name}", show_header=False)
        for label, value in (
            ("architecture", m.architecture),
            ("layers", m.n_layers),
            ("d_model", m.d_model),
            ("vocab", m.d_vocab),
            ("context", m.n_ctx),
            ("parameters", _human(m.n_params)),
            ("dtype", m.dtype),
            ("device", m.device),
        ):
            table.add_row(label, escape(str(value)))
        out.print(table)
    for spec in sae or []:
        release, sae_id = parse_sae_spec(spec)
        s = load_sae(release, sae_id, device=device, dtype=dtype, hook=hook)
        i = sae_info(s)
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
        if loaded is not None:
            try:
                check_fit(loaded, s)
                table.add_row("fits", f"[green]yes[/]: {i.hook_name} of {loaded.cfg.model_name}")
            except ScopeError as e:
                table.add_row("fits", f"[red]no[/]: {escape(str(e))}")
        out.print(table)


@app.command()
@friendly
def saes(
    model: Annotated[str, typer.Option("--model", "-m", help="Hub name or folder.")],
    local_only: Annotated[bool, typer.Option(help="Only SAEs already under saes/.")] = False,
) -> None:
    """List the SAEs that fit a model: sae-lens' registry and the local saes/ library."""
    from scope.fit import list_saes
    from scope.model import resolve_source

    quiet_libraries()
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


def _parse_shard(text: str) -> tuple[int, int]:
    try:
        i, n = (int(x) for x in text.split("/"))
    except ValueError:
        raise ScopeError(f"--shard {text!r}: use i/N, e.g. 0/4") from None
    return i, n


@app.command()
@friendly
def record(
    model: Annotated[
        str, typer.Option("--model", "-m", help="Hub name or local checkpoint folder.")
    ],
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
    """Record every feature of the SAEs over a corpus in one pass into a store."""
    from scope.corpus import CorpusSpec, parse_tokens
    from scope.model import load_model
    from scope.record import RecordSettings
    from scope.record import record as run_record
    from scope.sae import load_sae

    quiet_libraries()
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
        shard=_parse_shard(shard),
        checkpoint_seconds=checkpoint_seconds,
    )
    with out.status(f"loading {model}"):
        loaded = load_model(model, device=device, dtype=dtype)
        saes_ = [load_sae(*parse_sae_spec(s), device=device, dtype=dtype, hook=hook) for s in sae]
    summary = run_record(loaded, saes_, spec, store, settings, resume=resume, progress=True)
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
    out.print(f"merged {len(shards)} shards into {store}: {manifest['tokens_recorded']:,} tokens")


@app.command()
@friendly
def feature(
    address: Annotated[str, typer.Argument(help="SAE/INDEX, e.g. L12.res.16k/1234.")],
    store: Annotated[str, typer.Option(help="A recorded store folder.")],
    examples: Annotated[int, typer.Option(help="Top examples to show.")] = 5,
) -> None:
    """Print a feature's statistics, top examples and logit lens."""
    from scope.store import Store

    view = Store(store).feature(address)
    out.print(
        f"[bold]{view.sae}/{view.index}[/]  fires on {view.density:.3%} of tokens "
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
    store: Annotated[str, typer.Option(help="A recorded store folder.")],
) -> None:
    """Query a store with DuckDB SQL."""
    from scope.store import Store

    print(Store(store).sql(query))


def _register() -> None:
    from scope import cli_steer  # noqa: F401  (adds steer and sweep to the app)


def main() -> None:
    sys.exit(app())


_register()

if __name__ == "__main__":
    main()
