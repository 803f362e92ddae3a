"""`scope steer` and `scope sweep`: generate with features turned up, down or off."""

from __future__ import annotations

import time
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.markup import escape

from scope.cli.common import (
    DeviceOpt,
    DtypeOpt,
    HookOpt,
    RequiredModelOpt,
    app,
    friendly,
    load_model_and_saes,
    out,
)
from scope.errors import ScopeError

FeatureOpt = Annotated[
    list[int] | None, typer.Option("--feature", "-f", help="Feature index; repeat for several.")
]
SteerOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--steer",
        help="KEY/FEATURE:STRENGTH[:MODE][@POSITIONS] (L2.res.256/7:8, L2.res.256/7:4xmax, "
        "L2.res.256/7:ablate); KEY is an --sae's key or the --sae itself. Repeat for several; "
        "instead of --feature/--strength/--mode.",
    ),
]
SaeListOpt = Annotated[
    list[str],
    typer.Option(
        "--sae", "-s", help="RELEASE/ID or folder: one for all features, or one per --feature."
    ),
]
ModeOpt = Annotated[str, typer.Option(help="add, clamp or ablate.")]
UnitOpt = Annotated[
    str, typer.Option(help="add: absolute, max (recorded max; needs --store) or norm.")
]
PositionsOpt = Annotated[str, typer.Option(help="prompt, generated or all (BOS never).")]
PromptOpt = Annotated[str, typer.Option(help="Text to continue.")]
StoreOpt = Annotated[
    str | None, typer.Option(help="Recorded store: for --unit max, and where sweeps are saved.")
]
RawOpt = Annotated[bool, typer.Option(help="No chat template, even for -it models.")]


def feature_specs(sae: list[str], feature: list[int], strengths: list[float], mode: str,
                  unit: str, positions: str) -> list[Any]:  # fmt: skip
    """The ``SteerSpec`` of each --feature, its SAE named by its --sae (one --sae serves all
    features, one --strength all strengths), checked before anything loads."""
    from scope.steer_spec import SteerSpec

    if not feature:
        raise ScopeError("give --feature at least once (or --steer)")
    if len(sae) not in (1, len(feature)):
        raise ScopeError(
            f"give one --sae for all features or one per --feature ({len(sae)} SAEs, {len(feature)} features)"
        )
    if len(strengths) not in (1, len(feature)):
        raise ScopeError("give one --strength for all features or one per --feature")
    saes = sae * len(feature) if len(sae) == 1 else sae
    strengths = strengths * len(feature) if len(strengths) == 1 else strengths
    return [SteerSpec(sae=s, feature=f, strength=v, mode=mode, unit=unit, positions=positions)
            for s, f, v in zip(saes, feature, strengths, strict=True)]  # fmt: skip


def _setup(model: str, sae: list[str], specs: list[Any], device: str | None, dtype: str | None,
           hook: str | None, store: str | None) -> tuple[Any, list[Any], Any, list[Any]]:  # fmt: skip
    """The model, the steers of ``specs`` (named by an --sae or its key), the store and each
    --sae's SAE."""
    from scope.steer_spec import resolve, sae_map
    from scope.store import Store

    opened = Store(store) if store else None
    loaded, saes = load_model_and_saes(model, sae, device=device, dtype=dtype, hook=hook)
    unique = list({id(s): s for s in saes}.values())
    keys = {**sae_map(unique, opened), **dict(zip(sae, saes, strict=True))}
    return loaded, resolve(specs, keys, opened, where="--steer"), opened, saes


def _sampling(
    max_new_tokens: int, temperature: float, top_p: float, freq_penalty: float, seed: int, raw: bool
) -> Any:
    from scope.generate import Sampling

    return Sampling(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                    freq_penalty=freq_penalty, seed=seed, chat=False if raw else None)  # fmt: skip


def _streamer(tokenizer: Any, labels: dict[str, str]) -> Callable[[str, int], None]:
    """An ``on_token`` that prints each run's label, then its text as it grows (a character
    split across tokens is printed once its last token is in)."""
    ids: dict[str, list[int]] = {}
    shown: dict[str, str] = {}

    def show(which: str, token: int) -> None:
        if which not in ids:
            out.print(f"\n[bold]{escape(labels[which])}[/]")
            ids[which], shown[which] = [], ""
        ids[which].append(token)
        text = tokenizer.decode(ids[which], skip_special_tokens=True)
        if text.endswith("\ufffd") or len(text) <= len(shown[which]):
            return
        out.print(text[len(shown[which]) :], end="", highlight=False, markup=False)
        shown[which] = text

    return show


def describe(steer: Any) -> str:
    """How a steer reads to a person: "add 8", "add 4x max", "add 0.5x norm", "clamp 30"."""
    if steer.mode == "ablate":
        return "ablate"
    units = {"absolute": "", "max": "x max", "norm": "x norm"}
    return f"{steer.mode} {steer.strength:g}{units[steer.unit]}"


def check_output(path: str | None, flag: str, *, folder: bool) -> None:
    """Refuse an output path that cannot be written, before any work is done."""
    if path is None:
        return
    target = Path(path).expanduser()
    if folder:
        if target.exists() and not target.is_dir():
            raise ScopeError(f"{flag} {path} is a file: give a folder (it is created if missing)")
        return
    if target.is_dir():
        raise ScopeError(f"{flag} {path} is a folder: give a file name, e.g. {path}/sweep.html")
    if not target.parent.is_dir():
        raise ScopeError(
            f"{flag} {path}: the folder {target.parent} does not exist; create it or pick another"
        )


@app.command()
@friendly
def steer(
    model: RequiredModelOpt,
    sae: SaeListOpt,
    prompt: PromptOpt,
    feature: FeatureOpt = None,
    steer: SteerOpt = None,
    strength: Annotated[
        list[float] | None, typer.Option(help="One for all features, or one per --feature.")
    ] = None,
    mode: ModeOpt = "add",
    unit: UnitOpt = "absolute",
    positions: PositionsOpt = "all",
    store: StoreOpt = None,
    max_new_tokens: int = 40,
    temperature: float = 0.7,
    top_p: float = 0.9,
    freq_penalty: float = 0.0,
    seed: int = 0,
    raw: RawOpt = False,
    device: DeviceOpt = None,
    dtype: DtypeOpt = None,
    hook: HookOpt = None,
) -> None:
    """Generate from a prompt without and with steering (same seed), streaming the tokens."""
    from scope.generate import compare
    from scope.steer_spec import SteerSpec

    if steer:
        if feature or strength:
            raise ScopeError("give --steer, or --feature with --strength, not both")
        specs = [SteerSpec.parse(text) for text in steer]
    else:
        if not strength and mode != "ablate":
            raise ScopeError(
                "give --strength (e.g. --strength 8; with --unit max, 4 means 4x the recorded "
                "max), or --mode ablate"
            )
        specs = feature_specs(sae, feature or [], strength or [0.0], mode, unit, positions)
    loaded, steers, opened, _ = _setup(model, sae, specs, device, dtype, hook, store)
    sampling = _sampling(max_new_tokens, temperature, top_p, freq_penalty, seed, raw)
    label = "steered: " + ", ".join(f"{s.key}/{s.feature} {describe(s)}" for s in steers)
    show = _streamer(loaded.tokenizer, {"baseline": "baseline", "steered": label})
    compare(loaded, prompt, steers, sampling=sampling, store=opened, on_token=show)
    out.print()


@app.command()
@friendly
def sweep(
    model: RequiredModelOpt,
    sae: SaeListOpt,
    feature: Annotated[int, typer.Option("--feature", "-f", help="The feature to sweep.")],
    prompt: PromptOpt,
    strengths: Annotated[
        str, typer.Option(help="START:STOP:STEP (end included) or a list 0,4,8.")
    ] = "0:40:10",
    modes: Annotated[str | None, typer.Option(help="Also sweep modes, e.g. add,clamp.")] = None,
    mode: ModeOpt = "add",
    unit: UnitOpt = "absolute",
    positions: PositionsOpt = "all",
    store: StoreOpt = None,
    out_dir: Annotated[
        str | None, typer.Option("--out", help="Folder for the sweep (default: the store).")
    ] = None,
    plot: Annotated[
        str | None, typer.Option(help="Write the plotly figure to this .html file.")
    ] = None,
    max_new_tokens: int = 30,
    temperature: float = 0.0,
    top_p: float = 0.9,
    freq_penalty: float = 0.0,
    seed: int = 0,
    batch_size: Annotated[
        int,
        typer.Option(
            help="Generations run together: the baseline and the points, as rows of a batch; 1 runs one at a time."
        ),
    ] = 32,
    raw: RawOpt = False,
    device: DeviceOpt = None,
    dtype: DtypeOpt = None,
    hook: HookOpt = None,
) -> None:
    """Steer one feature at many strengths (several --sae: several layers); measure and save."""
    from rich.table import Table

    from scope.sweep import parse_strengths
    from scope.sweep import sweep as run_sweep

    values = parse_strengths(strengths)
    (spec,) = feature_specs(sae[:1], [feature], [0.0], mode, unit, positions)
    if batch_size < 1:
        raise ScopeError(
            f"--batch-size {batch_size} must be at least 1 (1 runs one generation at a time)"
        )
    check_output(out_dir, "--out", folder=True)
    check_output(plot, "--plot", folder=False)
    loaded, (base,), opened, saes = _setup(model, sae, [spec], device, dtype, hook, store)
    sampling = _sampling(max_new_tokens, temperature, top_p, freq_penalty, seed, raw)
    mode_list = [m.strip() for m in modes.split(",")] if modes else None
    total = len(values) * len(saes) * len(mode_list or [mode])
    with out.status(f"sweeping: 0/{total} points") as status:
        started = time.monotonic()

        def done(_point: Any, index: int, n: int) -> None:
            left = (time.monotonic() - started) / (index + 1) * (n - index - 1)
            status.update(f"sweeping: {index + 1}/{n} points, ETA {timedelta(seconds=round(left))}")

        result = run_sweep(loaded, prompt, base, values, modes=mode_list, saes=saes, sampling=sampling,
                           store=opened, save_to=out_dir, on_point=done, batch_size=batch_size)  # fmt: skip
    table = Table(title=f"sweep {result.id}: feature {feature}")
    for col in ("SAE", "mode", "strength", "target act", "text act", "KL", "loss", "text"):
        table.add_column(col)
    for p in result.points:
        table.add_row(p.sae, p.mode, f"{p.strength:g}", f"{p.target_act:.2f}", f"{p.text_act:.2f}",
                      f"{p.kl:.3f}", f"{p.loss:.2f}", p.text.replace("\n", " ")[:60])  # fmt: skip
    out.print(f"baseline: {result.baseline!r}", highlight=False)
    out.print(table)
    if plot:
        result.figure().write_html(plot)
        out.print(f"figure: {plot}")
    where = out_dir or (str(opened.root) if opened else None)
    out.print(
        f"saved to {where}/experiments/{result.id}.parquet"
        if where
        else "not saved: give --store or --out"
    )
