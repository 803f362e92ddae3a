"""`scope app`: serve the explorer (app/Home.py) over a store; `scope serve`: a steered model
behind an OpenAI-compatible API. Both on 127.0.0.1 by default."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Annotated

import typer

from scope.cli.common import (
    DeviceOpt,
    DtypeOpt,
    HookOpt,
    RequiredModelOpt,
    SaeOpt,
    app,
    err,
    friendly,
    load_model_and_saes,
    out,
)
from scope.errors import ScopeError
from scope.serve import LOCAL


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


class Explorer:
    """The explorer as a child process over a store that a recording in this process writes
    (`scope record --serve`): ``start`` once there is a snapshot to show (again: nothing),
    ``serve`` until Ctrl-C or SIGTERM, ``stop`` at the end whatever happened."""

    def __init__(self, store: str, port: int, model: str | None, device: str | None,
                 address: str = "127.0.0.1") -> None:  # fmt: skip
        check_port(address, port)  # before anything loads
        self.command = streamlit_command(app_script(), store, model, device, address, port)
        self.url = f"http://{address}:{port}"
        self.proc: subprocess.Popen[bytes] | None = None
        self._log = tempfile.TemporaryFile()  # noqa: SIM115 (closed by stop)

    def start(self, *_: object) -> None:
        """Serve (a snapshot's name may be given: the explorer shows the newest itself)."""
        if self.proc is not None:
            return
        self.proc = subprocess.Popen(self.command, stdout=subprocess.DEVNULL, stderr=self._log)
        out.print(f"explorer: {self.url}  (Ctrl-C stops it)", highlight=False)
        sys.stdout.flush()

    def serve(self) -> None:
        """Serve until Ctrl-C or SIGTERM, or until the explorer ends (an error says why where
        it failed; a terminal's Ctrl-C reaches it too, and it ends cleanly)."""
        self.start()
        assert self.proc is not None
        asked: list[int] = []
        previous = {sig: signal.signal(sig, lambda n, _f: asked.append(n)) for sig in STOPS}
        try:
            while not asked:
                try:
                    code = self.proc.wait(timeout=0.5)
                except subprocess.TimeoutExpired:
                    continue
                if code in (0, *(-sig for sig in STOPS)):  # stopped, as this process is
                    return
                self._log.seek(0)
                tail = self._log.read().decode(errors="replace").strip().splitlines()[-3:]
                raise ScopeError(
                    f"the explorer stopped (status {code}): {' / '.join(tail) or 'no output'}"
                )
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()


STOPS = (signal.SIGINT, signal.SIGTERM)


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
    explainer: Annotated[
        str | None,
        typer.Option(
            help="An endpoint URL or a model: the feature page gets an Explain button "
            "(as `scope explain --explainer`)."
        ),
    ] = None,
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
    if explainer:
        cmd += ["--explainer", explainer]
    os.execv(cmd[0], cmd)


@app.command("serve")
@friendly
def serve_api(
    model: RequiredModelOpt,
    sae: SaeOpt = None,
    store: Annotated[
        str | None, typer.Option(help="Recorded store: steers with unit max read its maxes.")
    ] = None,
    steer: Annotated[
        list[str] | None,
        typer.Option(
            help="Default steer for requests that send none: KEY/FEATURE:STRENGTH[:MODE]"
            "[@POSITIONS], e.g. L12.res.16k/1234:8. Repeat for several."
        ),
    ] = None,
    port: Annotated[int, typer.Option(help="Port to serve on.", min=1, max=65535)] = 8000,
    address: Annotated[str, typer.Option(help="Address to serve on.")] = "127.0.0.1",
    api_key: Annotated[
        str | None,
        typer.Option(
            envvar="SCOPE_API_KEY", help="Require this bearer token (or set SCOPE_API_KEY)."
        ),
    ] = None,
    no_auth: Annotated[
        bool, typer.Option("--no-auth", help="Serve a non-local address without an API key.")
    ] = False,
    max_tokens: Annotated[int, typer.Option(help="Cap on max_tokens per completion.", min=1)] = 512,
    raw: Annotated[bool, typer.Option(help="No chat template, even for -it models.")] = False,
    device: DeviceOpt = None,
    dtype: DtypeOpt = None,
    hook: HookOpt = None,
) -> None:
    """Serve the model, steerable with the SAEs, behind an OpenAI-compatible API (/v1)."""
    from scope.serve import Limits, check_address, create_app, run
    from scope.steer_spec import SteerSpec
    from scope.store import Store

    warning = check_address(address, api_key, no_auth)  # before anything loads
    defaults = [SteerSpec.parse(text) for text in steer or []]
    check_port(address, port)
    opened = Store(store) if store else None
    loaded, saes = load_model_and_saes(model, sae or [], device=device, dtype=dtype, hook=hook)
    api = create_app(loaded, saes, store=opened, steer=defaults, api_key=api_key,
                     chat=False if raw else None, limits=Limits(max_tokens=max_tokens))  # fmt: skip
    served = api.state.served
    if warning:
        err.print(f"[bold yellow]warning:[/] {warning}")
    host = f"[{address}]" if ":" in address else address
    out.print(f"serving {served.name} at http://{host}:{port}/v1  (Ctrl-C stops it)")
    out.print(
        f"SAE keys: {', '.join(served.saes) or 'none (give --sae to steer)'}", highlight=False
    )
    if defaults:
        out.print(f"default steers: {', '.join(str(s) for s in defaults)}", highlight=False)
    sys.stdout.flush()
    run(api, address, port)
