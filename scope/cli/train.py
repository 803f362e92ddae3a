"""`scope train`: JumpReLU SAEs (or transcoders) trained with sae-lens on a model's hooks over a
corpus, saved as a Gemma Scope release with cards."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
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
    LogEvery,
    RequiredModelOpt,
    app,
    err,
    friendly,
    out,
)
from scope.errors import ScopeError

if TYPE_CHECKING:
    from scope.train import CacheProgress, StepReport


TRANSCODER_SITES = ("transcoder", "tc")


def parse_layers(layers: list[str] | None, n_layers: int | None) -> list[int]:
    """--layer values as layer numbers: integers, or ``all`` (every layer of a model with
    ``n_layers``; None: not known yet, so layer 0 stands in for checking the other options)."""
    out: list[int] = []
    for value in layers or []:
        if value.strip().lower() == "all":
            out += list(range(n_layers)) if n_layers is not None else [0]
            continue
        try:
            out.append(int(value))
        except ValueError:
            raise ScopeError(
                f"--layer {value!r} is not a layer number: give e.g. --layer 6 (repeatable) or "
                "--layer all"
            ) from None
    return list(dict.fromkeys(out))


def hooks_from(
    layers: list[int] | None, site: str, hooks: list[str] | None
) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """--layer/--site or --hook as (hooks read, hooks written): the second is empty for SAEs;
    ``--site transcoder`` reads each layer's MLP input and writes its output."""
    from scope.identity import MLP_INPUT, SITE_HOOKS

    if layers and hooks:
        raise ScopeError("give --layer (with --site) or --hook, not both")
    if site in TRANSCODER_SITES:
        if hooks:
            raise ScopeError(
                "--site transcoder takes --layer (it reads blocks.L.ln2.hook_out and writes "
                "blocks.L.hook_mlp_out), not --hook"
            )
        chosen = layers or []
        return (
            tuple(MLP_INPUT.format(layer=layer) for layer in chosen),
            tuple(SITE_HOOKS["mlp"].format(layer=layer) for layer in chosen),
        )
    if hooks:
        return tuple(hooks), ()
    if site not in SITE_HOOKS:
        raise ScopeError(f"--site {site!r} is not one of {', '.join((*SITE_HOOKS, 'transcoder'))}")
    return tuple(SITE_HOOKS[site].format(layer=layer) for layer in layers or []), ()


def _short(hook: str) -> str:
    """``L6.res``; a transcoder (by the MLP input it reads) ``L6.tc``."""
    from scope.identity import MLP_INPUT, hook_site

    layer, site = hook_site(hook)
    return f"L{layer}.{'tc' if hook == MLP_INPUT.format(layer=layer) else site}"


@contextmanager
def progress(console: Console) -> Iterator[tuple[Callable[[Any], None], Callable[[Any], None]]]:
    """(on_cache, on_step) callbacks showing a live bar: caching (tokens, tok/s), then training
    (tokens, tok/s, each SAE's L0 and FVU on the latest batch). Plain lines without a terminal."""
    if not console.is_terminal:
        yield _log_lines(console)
        return
    bar = Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        TextColumn("{task.fields[tokens]} tokens {task.fields[rate]} tok/s"),
        TimeElapsedColumn(),
        TextColumn("{task.fields[figures]}"),
        console=console,
    )
    with bar:
        tasks: dict[str, Any] = {}

        def task(name: str) -> Any:
            if name not in tasks:
                tasks[name] = bar.add_task(name, total=None, tokens="-", rate="-", figures="")
            return tasks[name]

        def on_cache(p: CacheProgress) -> None:
            rate = p.rows / p.seconds if p.seconds > 0 else 0
            bar.update(task("caching"), tokens=f"{p.rows:,}", rate=f"{rate:,.0f}")

        def on_step(r: StepReport) -> None:
            rate = r.tokens / r.seconds if r.seconds > 0 else 0
            figures = "  ".join(
                f"{_short(h)} L0 {r.l0[h]:.0f} FVU {r.fvu[h]:.3f} dead {r.dead[h]}"
                for h in sorted(r.l0)
            )
            bar.update(
                task("training"),
                total=r.steps,
                completed=r.step,
                tokens=f"{r.tokens:,}",
                rate=f"{rate:,.0f}",
                figures=figures,
            )

        yield on_cache, on_step


def _log_lines(console: Console) -> tuple[Callable[[Any], None], Callable[[Any], None]]:
    every = LogEvery()

    def on_cache(p: CacheProgress) -> None:
        if every.due():
            rate = p.rows / p.seconds if p.seconds > 0 else 0
            console.print(f"cached {p.rows:,} tokens, {rate:,.0f} tok/s", highlight=False)

    def on_step(r: StepReport) -> None:
        if every.due(final=r.step == r.steps):
            figures = ", ".join(
                f"{_short(h)} L0 {r.l0[h]:.1f} FVU {r.fvu[h]:.3f} dead {r.dead[h]}"
                for h in sorted(r.l0)
            )
            console.print(
                f"step {r.step}/{r.steps}, {r.tokens:,} tokens, "
                f"{r.tokens / max(r.seconds, 1e-9):,.0f} tok/s: {figures}",
                highlight=False,
            )

    return on_cache, on_step


@app.command()
@friendly
def train(
    model: RequiredModelOpt,
    out_: Annotated[
        str, typer.Option("--out", help="Release folder to write, e.g. saes/my-sae-release.")
    ] = "",
    layer: Annotated[
        list[str] | None,
        typer.Option(help="Layer to train on; repeat for several, or 'all' for every layer."),
    ] = None,
    site: Annotated[
        str,
        typer.Option(
            help="res, mlp or att (with --layer), or transcoder: the MLP's input "
            "(blocks.L.ln2.hook_out) mapped to its output (blocks.L.hook_mlp_out)."
        ),
    ] = "res",
    skip: Annotated[
        bool,
        typer.Option(
            "--skip", help="Transcoders: learn an affine skip connection too (Gemma Scope 2's)."
        ),
    ] = False,
    hook: Annotated[
        list[str] | None, typer.Option(help="Hook name instead of --layer/--site; repeatable.")
    ] = None,
    width: Annotated[int, typer.Option(help="Features per SAE.")] = 4096,
    corpus: CorpusOpt = None,
    field: FieldOpt = "text",
    ctx: CtxOpt = 128,
    tokens: Annotated[
        str | None, typer.Option(help="Corpus tokens to cache and train on, e.g. 1M.")
    ] = None,
    target_l0: Annotated[float, typer.Option(help="Mean features per token to aim for.")] = 60.0,
    l0_coefficient: Annotated[float, typer.Option(help="Weight of the L0 penalty.")] = 1.0,
    epochs: Annotated[int, typer.Option(help="Passes over the cached tokens.")] = 4,
    batch_size: Annotated[int, typer.Option(help="Tokens per optimizer step.")] = 4096,
    lr: Annotated[float, typer.Option(help="Adam learning rate.")] = 5e-4,
    sparsity_loss: Annotated[
        str,
        typer.Option(
            help="sae-lens' L0 penalty: quadratic (around --target-l0, Gemma Scope 2's), step "
            "(L0 itself, Gemma Scope's) or tanh (Anthropic's)."
        ),
    ] = "quadratic",
    l0_warm_up: Annotated[
        float,
        typer.Option(help="Fraction of the run over which the L0 coefficient ramps up from 0."),
    ] = 0.0,
    pre_act_loss: Annotated[
        float,
        typer.Option(
            help="Weight of sae-lens' pre-activation loss, which lifts dead features' "
            "pre-activations toward their thresholds (0: off; e.g. 3e-3)."
        ),
    ] = 0.0,
    dead_tokens: Annotated[
        str | None,
        typer.Option(
            help="Tokens without firing after which a feature is dead for --pre-act-loss, "
            "e.g. 100k (default: a quarter of the run)."
        ),
    ] = None,
    freq_penalty: Annotated[
        float,
        typer.Option(
            help="Weight of the frequency penalty on features firing on more than "
            "--freq-target of a batch's tokens (0: off; e.g. 1)."
        ),
    ] = 0.0,
    freq_target: Annotated[
        float, typer.Option(help="Firing fraction above which --freq-penalty applies.")
    ] = 0.05,
    threshold_init: Annotated[
        str,
        typer.Option(
            help="global: every threshold starts at one value where --target-l0 fires; "
            "per_feature: each at its own quantile, so every feature starts alive."
        ),
    ] = "global",
    standardize: Annotated[
        bool,
        typer.Option(
            help="Train on each dimension standardised (mean 0, variance 1), folded back into "
            "raw-activation weights: for streams where a few dimensions carry most of the "
            "variance (Gemma 3's residual stream)."
        ),
    ] = False,
    seed: Annotated[int, typer.Option(help="Initialisation and batch-order seed.")] = 0,
    cache: Annotated[
        str | None,
        typer.Option(
            help="Activation cache folder (default: one under ~/.cache/gemma-scope-workbench)."
        ),
    ] = None,
    eval_corpus: Annotated[
        list[str] | None,
        typer.Option(help="Held-out text for the cards (default: the corpus after --tokens)."),
    ] = None,
    eval_tokens: Annotated[str, typer.Option(help="Held-out tokens for the cards.")] = "20k",
    save_dtype: Annotated[
        str, typer.Option(help="float32, or float16 where it keeps the weights within 1e-3.")
    ] = "float32",
    forward_batch: Annotated[int, typer.Option(help="Windows per forward pass.", min=1)] = 8,
    checkpoint_every: Annotated[int, typer.Option(help="Steps between checkpoints.")] = 100,
    note: Annotated[
        list[str] | None,
        typer.Option(help="KEY=TEXT copied into every card (e.g. a source and licence)."),
    ] = None,
    device: DeviceOpt = None,
    dtype: DtypeOpt = None,
) -> None:
    """Train JumpReLU SAEs (sae-lens' own training) on hooks of a model over a corpus, or
    JumpReLU transcoders with --site transcoder (e.g. --layer all: one per layer).

    One forward pass caches every hook's activations once (half precision, on disk); the SAEs
    then train for --epochs over them. Saved as a Gemma Scope release: --out/layer_L/width_W/
    average_l0_N/ with params.npz, cfg.json and card.json (L0, FVU, delta loss on held-out
    text). Ctrl-C saves a checkpoint; the same command again resumes. A transcoder is saved as
    sae-lens saves one (sae_weights.safetensors + cfg.json); its card's FVU is of the MLP
    output, and with several the delta loss with all spliced in at once.

    Recipe options against dead and dense features (all off by default): --threshold-init
    per_feature, --pre-act-loss (with --dead-tokens), --freq-penalty (with --freq-target),
    --l0-warm-up, --sparsity-loss; and --standardize, for streams whose variance sits in a few
    dimensions."""
    from scope.corpus import CorpusSpec, parse_tokens
    from scope.model import load_model
    from scope.train import TrainSettings, train_saes

    if not out_:
        raise ScopeError("give --out FOLDER: the release to write, e.g. saes/my-sae-release")

    def make_settings(n_layers: int | None) -> TrainSettings:
        reads, writes = hooks_from(parse_layers(layer, n_layers), site, hook)
        return TrainSettings(
            hooks=reads,
            outputs=writes,
            skip=skip,
            width=width,
            target_l0=target_l0,
            l0_coefficient=l0_coefficient,
            epochs=epochs,
            batch_size=batch_size,
            lr=lr,
            sparsity_loss=sparsity_loss,  # type: ignore[arg-type]  # checked by TrainSettings
            l0_warm_up=l0_warm_up,
            pre_act_loss=pre_act_loss,
            dead_tokens=parse_tokens(dead_tokens),
            freq_penalty=freq_penalty,
            freq_target=freq_target,
            threshold_init=threshold_init,  # type: ignore[arg-type]
            standardize=standardize,
            seed=seed,
            checkpoint_every=checkpoint_every,
        )

    every = any(v.strip().lower() == "all" for v in layer or [])
    settings = make_settings(None)  # bad options fail before the model loads
    spec = CorpusSpec(
        paths=tuple(corpus or ()), field=field, ctx=ctx, max_tokens=parse_tokens(tokens)
    )
    held_out = CorpusSpec(paths=tuple(eval_corpus), field=field, ctx=ctx) if eval_corpus else None
    n_eval = parse_tokens(eval_tokens) or 0
    notes = {}
    for item in note or []:
        key, sep, text = item.partition("=")
        if not sep or not key.strip():
            raise ScopeError(f"--note {item!r}: use KEY=TEXT, e.g. --note 'corpus=my texts, CC BY'")
        notes[key.strip()] = text.strip()
    with out.status(f"loading {model}"):
        loaded = load_model(model, device=device, dtype=dtype)
    if every:
        settings = make_settings(loaded.cfg.n_layers)
    with progress(err) as (on_cache, on_step):
        try:
            trained = train_saes(
                loaded,
                settings,
                spec,
                Path(out_),
                cache=Path(cache) if cache else None,
                eval_corpus=held_out,
                eval_tokens=n_eval,
                save_dtype=save_dtype,
                forward_batch=forward_batch,
                notes=notes,
                on_cache=on_cache,
                on_step=on_step,
            )
        except KeyboardInterrupt:
            err.print(
                "interrupted: the cache and a checkpoint are saved; run the same command to resume"
            )
            raise typer.Exit(130) from None
    kind = "transcoders" if settings.transcoders else "SAEs"
    table = Table(title=f"trained {len(trained)} {kind} into {escape(out_)}")
    for col in ("SAE", "hook", "L0", "FVU", "delta loss", "tokens seen", "minutes"):
        table.add_column(col, overflow="fold")
    for t in trained:
        ev = t.card["eval"]
        table.add_row(
            f"{t.release}/{t.sae_id}",
            t.card["hook"],
            f"{ev['l0']:.1f}",
            f"{ev['fvu']:.3f}",
            f"{ev['delta_loss']:.3f}",
            f"{t.card['training']['tokens_seen']:,}",
            f"{t.card['time']['total_seconds'] / 60:.1f}",
        )
    out.print(table)
    together = trained[0].card["eval"].get("all_spliced")
    if together:
        out.print(
            f"all {together['saes']} spliced in at once: delta loss "
            f"{together['delta_loss']:.3f} nats",
            highlight=False,
        )
    for t in trained:
        out.print(f"--sae {escape(str(t.folder))}", highlight=False, soft_wrap=True)
