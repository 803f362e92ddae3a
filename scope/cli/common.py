"""What every command shares: the typer ``app``, its options, consoles, the error wrapper, the
command-time quieting of libraries, and loading a model with its SAEs."""

from __future__ import annotations

import functools
import logging
import os
import sys
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Annotated, Any, TypeVar

import typer
from rich.console import Console
from rich.markup import escape

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
RequiredModelOpt = Annotated[
    str, typer.Option("--model", "-m", help="Hub name or local checkpoint folder.")
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
RecordedStoreOpt = Annotated[str, typer.Option(help="A recorded store folder.")]
CorpusOpt = Annotated[
    list[str] | None,
    typer.Option(help="Text file, folder, .jsonl, .parquet or saved dataset. Repeat for several."),
]
FieldOpt = Annotated[str, typer.Option(help="The .jsonl field / .parquet column with the text.")]
CtxOpt = Annotated[int, typer.Option(help="Window length in tokens, BOS included.")]

_QUIET_ENV = {"TRANSFORMERS_VERBOSITY": "error", "HF_HUB_DISABLE_PROGRESS_BARS": "1"}


@contextmanager
def quiet_libraries() -> Iterator[None]:
    """While a command runs, hide library chatter (warnings, transformers' logging, hub progress
    bars) that would bury what the user asked for; everything is restored afterwards. Warnings
    stay on when Python was asked for them (``-W`` or ``PYTHONWARNINGS``)."""
    saved_env = {name: os.environ.get(name) for name in _QUIET_ENV}
    logger = logging.getLogger("transformers")
    level = logger.level
    with warnings.catch_warnings():
        if not sys.warnoptions:
            warnings.simplefilter("ignore")
        for name, value in _QUIET_ENV.items():
            os.environ.setdefault(name, value)
        logger.setLevel(logging.ERROR)
        try:
            yield
        finally:
            logger.setLevel(level)
            for name, saved in saved_env.items():
                if saved is None:
                    os.environ.pop(name, None)
                else:
                    os.environ[name] = saved


@app.callback()
def _at_command_time(ctx: typer.Context) -> None:
    # Runs in the `scope` process just before a command, never on import: a notebook that
    # imports scope keeps its own warning filters and logging levels.
    ctx.with_resource(quiet_libraries())


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


def load_model_and_saes(
    model: str,
    specs: Sequence[str],
    *,
    device: str | None = None,
    dtype: str | None = None,
    hook: str | None = None,
) -> tuple[Any, list[Any]]:
    """Load ``model`` and one SAE per ``--sae`` spec (RELEASE/ID or a folder), under a spinner.
    A spec given twice is loaded once: both places get the same SAE object."""
    from scope.model import load_model
    from scope.sae import load_sae

    with out.status(f"loading {model}"):
        loaded = load_model(model, device=device, dtype=dtype)
        cache: dict[str, Any] = {}
        for spec in specs:
            if spec not in cache:
                cache[spec] = load_sae(spec, device=device, dtype=dtype, hook=hook)
    return loaded, [cache[spec] for spec in specs]


LOG_SECONDS = 10.0
"""Without a terminal, a progress line at most this often (and at the end)."""


class LogEvery:
    """When progress printed as lines (no terminal) is due: the first at once, then at most
    one per ``LOG_SECONDS``, and always the last (``final``)."""

    def __init__(self) -> None:
        self.last = float("-inf")  # not 0: the monotonic clock starts near 0 at boot

    def due(self, final: bool = False) -> bool:
        now = time.monotonic()
        if not final and now - self.last < LOG_SECONDS:
            return False
        self.last = now
        return True


def human(n: int) -> str:
    """1234567 -> "1.23M": parameter counts at a glance."""
    for unit, size in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= size:
            return f"{n / size:.2f}{unit}"
    return str(n)
