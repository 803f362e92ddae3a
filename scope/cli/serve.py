"""`scope app`: serve the explorer (app/Home.py) over a store, on 127.0.0.1 by default."""

from __future__ import annotations

import os
import socket
import sys
from pathlib import Path
from typing import Annotated

import typer

from scope.cli.common import DeviceOpt, app, err, friendly, out
from scope.errors import ScopeError

LOCAL = {"127.0.0.1", "localhost", "::1"}


def app_script() -> Path:
    """The explorer's Home.py: app/ of a checkout or an editable install, or the installed
    package's scope/explorer/ (pyproject.toml ships app/ under that name)."""
    import importlib.util

    spec = importlib.util.find_spec("scope.explorer")
    where = list(spec.submodule_search_locations or []) if spec else []
    where.append(str(Path(__file__).resolve().parents[2] / "app"))
    for folder in where:
        home = Path(folder) / "Home.py"
        if home.is_file():
            return home
    raise ScopeError(
        f"the explorer's pages are not in {' or '.join(where)}: reinstall the workbench "
        "(pip install gemma-scope-workbench, or pip install -e . in a checkout)"
    )


def check_port(address: str, port: int) -> None:
    """Refuse a port another program holds, before Streamlit starts and fails less clearly.

    The port is tried the way the server binds it (SO_REUSEADDR, as Tornado does), so the
    closed connections an explorer stopped a moment ago leaves behind (TIME_WAIT) do not hold
    the port; only a program listening on it does."""
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((address, port))
        except OSError as e:
            raise ScopeError(
                f"cannot serve on {address}:{port}: {e.strerror}; pick another with --port"
            ) from None


def streamlit_command(home: Path, store: str, model: str | None, device: str | None,
                      address: str, port: int) -> list[str]:  # fmt: skip
    """The `streamlit run` command line that serves the explorer."""
    args = [sys.executable, "-m", "streamlit", "run", str(home),
            "--server.headless", "true", "--server.address", address, "--server.port", str(port),
            "--browser.gatherUsageStats", "false", "--server.fileWatcherType", "none",
            "--client.toolbarMode", "viewer",  # no "Deploy" button: the explorer is local
            "--", "--store", str(Path(store).expanduser().resolve())]  # fmt: skip
    if model:
        args += ["--model", model]
    if device:
        args += ["--device", device]
    return args


@app.command("app")
@friendly
def serve(
    store: Annotated[str, typer.Option(help="The recorded store to explore.")],
    model: Annotated[
        str | None,
        typer.Option(
            help="Model for the inspector and the lab (default: the one the store names)."
        ),
    ] = None,
    port: Annotated[int, typer.Option(help="Port to serve on.", min=1, max=65535)] = 8501,
    address: Annotated[str, typer.Option(help="Address to serve on.")] = "127.0.0.1",
    device: DeviceOpt = None,
) -> None:
    """Serve the explorer over a store: feature pages, search, prompt inspector, steering lab."""
    from scope.store import Store

    Store(store).close()  # a clear error now for a folder that is not a finished store
    home = app_script()
    if address not in LOCAL:
        err.print(
            f"[bold yellow]warning:[/] serving on {address}: anyone who can reach this address "
            "can use the explorer (it has no login), run the model and write labels"
        )
    check_port(address, port)
    host = f"[{address}]" if ":" in address else address
    out.print(f"explorer: http://{host}:{port}  (Ctrl-C stops it)")
    sys.stdout.flush()
    cmd = streamlit_command(home, store, model, device, address, port)
    os.execv(cmd[0], cmd)
