"""The `scope` command line, and what importing scope does (and does not do) to a process."""

from __future__ import annotations

import io
import json
import logging
import os
import signal
import subprocess
import sys
import textwrap
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
from rich.console import Console
from typer.testing import CliRunner

from scope import testing as fixtures
from scope.cli import app
from scope.cli import record as cli_record
from scope.errors import ScopeError
from scope.store import Store

runner = CliRunner()


def test_info_on_fixtures_command_line(tiny_dir, tiny_sae_dir, tmp_path):
    """The real `scope` entry point, as a user types it, on the test fixtures."""
    bad = tmp_path / "big-res" / "layer_1" / "width_32" / "average_l0_5"
    fixtures.write_params(
        bad,
        {
            "W_enc": np.ones((2304, 32), np.float32),
            "W_dec": np.ones((32, 2304), np.float32),
            "b_enc": np.zeros(32, np.float32),
            "b_dec": np.zeros(2304, np.float32),
            "threshold": np.ones(32, np.float32),
        },
    )
    scope = os.path.join(os.path.dirname(sys.executable), "scope")
    result = subprocess.run(
        [scope, "info", "--model", str(tiny_dir), "--sae", str(tiny_sae_dir), "--sae", str(bad)],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "COLUMNS": "240"},
    )
    assert result.returncode == 1, result.stderr  # one SAE does not fit: scripts can tell
    text = result.stdout
    for expected in (
        "Gemma2ForCausalLM",
        "layers",
        "d_model",
        "64",
        "vocab",
        "512",
        "parameters",
        "float32",
        "cpu",
        "L2.res.256",
        "blocks.2.hook_resid_post",
        "yes: blocks.2.hook_resid_post of tiny-gemma2",
        "no: SAE",
        "expects d_in 2304 at blocks.1.hook_resid_post",
    ):
        assert expected in text, expected


def test_bad_input_exits_2_with_message(saes_root):
    wide = {"COLUMNS": "240"}
    result = runner.invoke(app, ["info", "--sae", "gemma-scope-2b-pt-res-canonicl"], env=wide)
    assert result.exit_code == 2
    assert "error:" in result.output and "gemma-scope-2b-pt-res-canonical" in result.output
    assert "Traceback" not in result.output
    no_slash = runner.invoke(app, ["info", "--sae", "x"], env=wide)
    assert no_slash.exit_code == 2 and "SAE release 'x'" in no_slash.output
    assert "Traceback" not in no_slash.output
    typo = runner.invoke(
        app, ["info", "--sae", "gemma-scope-2b-pt-res-canonicl/layer_1/x"], env=wide
    )
    assert typo.exit_code == 2 and "gemma-scope-2b-pt-res-canonicl" in typo.output
    result = runner.invoke(app, ["info"])
    assert result.exit_code == 2 and "give --model, --sae, or both" in result.output
    odd = runner.invoke(app, ["info", "--sae", "my[bold]release/layer_1"], env=wide)
    assert odd.exit_code == 2 and "my[bold]release" in odd.output  # shown as typed, not as markup


def test_saes_lists_registry_by_name(saes_root):
    result = runner.invoke(app, ["saes", "--model", "google/gemma-2-2b"], env={"COLUMNS": "300"})
    assert result.exit_code == 0, result.output
    assert "gemma-scope-2b-pt-res-canonical" in result.output
    assert "gemma-2-2b/20-gemmascope-res-16k" in result.output


def test_saes_lists_local_that_fit(tiny_dir, tiny_sae_dir, monkeypatch):
    monkeypatch.setenv("SCOPE_SAES_DIR", str(tiny_sae_dir.parents[3]))
    result = runner.invoke(app, ["saes", "--model", str(tiny_dir)], env={"COLUMNS": "300"})
    assert result.exit_code == 0, result.output
    assert "tiny-scope-res" in result.output and "layer_2/width_256/average_l0_13" in result.output


def test_sae_given_as_release_slash_id(tiny_sae_dir, monkeypatch):
    """--sae RELEASE/ID is one string that load_sae splits: here a release in the local library."""
    monkeypatch.setenv("SCOPE_SAES_DIR", str(tiny_sae_dir.parents[3]))
    result = runner.invoke(
        app,
        ["info", "--sae", "tiny-scope-res/layer_2/width_256/average_l0_13", "--device", "cpu"],
        env={"COLUMNS": "240"},
    )
    assert result.exit_code == 0, result.output
    for expected in ("SAE L2.res.256", "tiny-scope-res", "layer_2/width_256/average_l0_13"):
        assert expected in result.output, expected
    wrong = runner.invoke(
        app,
        ["info", "--sae", "tiny-scope-res/layer_2/width_256/average_l0_31"],
        env={"COLUMNS": "240"},
    )
    assert wrong.exit_code == 2 and "layer_2/width_256/average_l0_13" in wrong.output


def test_record_feature_sql_merge_from_command_line(tiny_dir, tiny_sae_dir, tmp_path):
    corpus = tmp_path / "corpus.jsonl"
    with corpus.open("w") as f:
        for text in fixtures.training_text()[:40]:
            f.write(json.dumps({"body": text}) + "\n")
    scope = os.path.join(os.path.dirname(sys.executable), "scope")
    env = {**os.environ, "COLUMNS": "200"}
    base = [
        scope,
        "record",
        "--model",
        str(tiny_dir),
        "--sae",
        str(tiny_sae_dir),
        "--corpus",
        str(corpus),
        "--field",
        "body",
        "--tokens",
        "2k",
        "--ctx",
        "32",
        "--batch-size",
        "8",
    ]
    for i in range(2):
        result = subprocess.run(
            [*base, "--store", str(tmp_path / f"s{i}"), "--shard", f"{i}/2"],
            capture_output=True,
            text=True,
            timeout=300,
            env=env,
        )
        assert result.returncode == 0, result.stderr[-2000:]
        assert (
            "tok/s" in result.stdout
            and "L2.res.256" in result.stdout
            and "mean L0" in result.stdout
        )
    merged = runner.invoke(
        app, ["merge", str(tmp_path / "s0"), str(tmp_path / "s1"), "--store", str(tmp_path / "all")]
    )
    assert merged.exit_code == 0, merged.output
    assert "2,000 tokens" in merged.output
    top = runner.invoke(
        app,
        [
            "sql",
            "select feature from features order by count desc limit 1",
            "--store",
            str(tmp_path / "all"),
        ],
    )
    index = int(top.output.split("│")[-2].strip()) if "│" in top.output else None
    assert top.exit_code == 0 and index is not None, top.output
    view = runner.invoke(
        app,
        ["feature", f"L2.res.256/{index}", "--store", str(tmp_path / "all")],
        env={"COLUMNS": "200"},
    )
    assert view.exit_code == 0, view.output
    assert (
        f"L2.res.256/{index}" in view.output
        and "fires on" in view.output
        and "promotes:" in view.output
    )
    bad = subprocess.run(
        [*base[:-6], "--corpus", str(tmp_path / "none"), "--store", str(tmp_path / "x")],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert bad.returncode == 2 and "corpus path" in bad.stderr and "does not exist" in bad.stderr


def write_corpus(path: Path, n: int = 40) -> Path:
    with path.open("w") as f:
        for text in fixtures.training_text()[:n]:
            f.write(json.dumps({"body": text}) + "\n")
    return path


def test_record_progress_bar_shows_tokens_rate_and_eta():
    from scope.record import RecordProgress

    console = Console(file=io.StringIO(), force_terminal=True, width=200)
    with cli_record.progress_bar(console) as show:
        show(
            RecordProgress(tokens=1000, total=2000, tokens_per_s=500.0, windows=8, windows_total=16)
        )
    text = console.file.getvalue()  # type: ignore[attr-defined]
    for expected in ("recording", "1,000/2,000 tokens", "500 tok/s", "0:00:0", "ETA 0:00:02"):
        assert expected in text, (expected, text)


def test_ctrl_c_stops_record_after_a_batch_and_resume_finishes(
    tiny_dir, tiny_sae_dir, tmp_path, monkeypatch
):
    """A real SIGINT mid-recording: the command's handler turns it into a clean stop (exit 2,
    everything saved, says --resume), and --resume then completes the store."""
    real_bar = cli_record.progress_bar

    @contextmanager
    def interrupting_bar(console: Console) -> Iterator[Callable[..., None]]:
        with real_bar(console) as show:

            def show_then_interrupt(p: object) -> None:
                show(p)
                os.kill(os.getpid(), signal.SIGINT)

            yield show_then_interrupt

    corpus = write_corpus(tmp_path / "corpus.jsonl")
    args = ["record", "--model", str(tiny_dir), "--sae", str(tiny_sae_dir), "--corpus",
            str(corpus), "--field", "body", "--tokens", "1k", "--ctx", "32", "--batch-size", "4",
            "--store", str(tmp_path / "s"), "--device", "cpu"]  # fmt: skip
    handler = signal.getsignal(signal.SIGINT)
    with monkeypatch.context() as patched:
        patched.setattr(cli_record, "progress_bar", interrupting_bar)
        stopped = runner.invoke(app, args, env={"COLUMNS": "240"})
    assert stopped.exit_code == 2, stopped.output
    assert "SIGINT: stopping after this batch" in stopped.output  # said at once
    assert "stopped by SIGINT after 4/" in stopped.output and "--resume" in stopped.output
    assert signal.getsignal(signal.SIGINT) is handler  # the command gives the handler back
    resumed = runner.invoke(app, [*args, "--resume"], env={"COLUMNS": "240"})
    assert resumed.exit_code == 0, resumed.output
    assert "tok/s" in resumed.output and "L2.res.256" in resumed.output


def test_second_ctrl_c_stops_record_at_once_and_resume_finishes(
    tiny_dir, tiny_sae_dir, tmp_path, monkeypatch
):
    """Ctrl-C twice: the second stops inside the batch, without waiting for it. The store keeps
    what its last checkpoint saved, the message says so, and --resume then completes it with
    every token counted once."""
    real_bar = cli_record.progress_bar
    shown: list[int] = []

    @contextmanager
    def interrupting_bar(console: Console) -> Iterator[Callable[..., None]]:
        with real_bar(console) as show:

            def show_then_interrupt(p: object) -> None:
                show(p)
                shown.append(1)
                if len(shown) == 2:  # a checkpoint after the first batch is on disk
                    os.kill(os.getpid(), signal.SIGINT)
                    os.kill(os.getpid(), signal.SIGINT)

            yield show_then_interrupt

    corpus = write_corpus(tmp_path / "corpus.jsonl")
    store = tmp_path / "s"
    args = ["record", "--model", str(tiny_dir), "--sae", str(tiny_sae_dir), "--corpus",
            str(corpus), "--field", "body", "--tokens", "1k", "--ctx", "32", "--batch-size", "4",
            "--store", str(store), "--device", "cpu", "--checkpoint-seconds", "0"]  # fmt: skip
    handler = signal.getsignal(signal.SIGINT)
    with monkeypatch.context() as patched:
        patched.setattr(cli_record, "progress_bar", interrupting_bar)
        stopped = runner.invoke(app, args, env={"COLUMNS": "240"})
    assert stopped.exit_code == 2, stopped.output
    assert "stopped at once by a second Ctrl-C" in stopped.output, stopped.output
    assert "--resume" in stopped.output and "stopped by SIGINT after" not in stopped.output
    assert signal.getsignal(signal.SIGINT) is handler
    assert json.loads((store / "manifest.json").read_text())["parts"][-1]["next"] >= 4
    resumed = runner.invoke(app, [*args, "--resume"], env={"COLUMNS": "240"})
    assert resumed.exit_code == 0, resumed.output
    whole = [tmp_path / "whole" if a == str(store) else a for a in args]
    assert runner.invoke(app, [str(a) for a in whole]).exit_code == 0
    stats = "select sae, feature, count, max, mean from features order by sae, feature"
    again, once = (
        Store(store).sql(stats).fetchall(),
        Store(tmp_path / "whole").sql(stats).fetchall(),
    )
    assert [r[:3] for r in again] == [r[:3] for r in once]  # every token counted once
    np.testing.assert_allclose([r[3:] for r in again], [r[3:] for r in once], rtol=1e-6)


def test_cli_quiets_libraries_only_while_a_command_runs(monkeypatch):
    seen: dict[str, object] = {}

    def spy(model: str) -> str:
        from scope.errors import ScopeError

        seen["filters"] = list(warnings.filters)
        seen["level"] = logging.getLogger("transformers").level
        raise ScopeError(f"model {model!r}: stop here")

    monkeypatch.setattr("scope.model.resolve_source", spy)
    monkeypatch.setattr(sys, "warnoptions", [])  # no -W given: the command silences warnings
    monkeypatch.delenv("TRANSFORMERS_VERBOSITY", raising=False)
    filters, level = list(warnings.filters), logging.getLogger("transformers").level
    result = runner.invoke(app, ["saes", "--model", "m"])
    assert result.exit_code == 2 and "stop here" in result.output
    assert seen["filters"][0][:4] == ("ignore", None, Warning, None)  # type: ignore[index]
    assert seen["level"] == logging.ERROR
    assert warnings.filters == filters and logging.getLogger("transformers").level == level
    assert "TRANSFORMERS_VERBOSITY" not in os.environ


def run_python(code: str) -> dict[str, object]:
    """Run ``code`` in a fresh interpreter; its last stdout line is JSON."""
    result = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_importing_scope_leaves_warnings_and_logging_alone():
    """A notebook's warning filters and transformers' log level are its own: importing scope
    (the CLI included) changes neither. The libraries scope uses are imported first, so what
    they do on import is not counted."""
    report = run_python("""
        import json, logging, warnings
        import duckdb, jaxtyping, numpy, pyarrow, rich, sae_lens, torch, transformer_lens
        import transformers, typer

        def snapshot():
            return [repr(f) for f in warnings.filters], logging.getLogger("transformers").level

        before = snapshot()
        import scope, scope.acts, scope.cli, scope.record, scope.steer, scope.store, scope.sweep
        after = snapshot()
        catch_all = [f for f in warnings.filters if f[0] == "ignore" and f[1] is None
                     and f[2] is Warning and f[3] is None]
        added = [f for f in after[0] if f not in before[0]]
        print(json.dumps({"same": before == after, "added": added, "level": after[1],
                          "catch_all": len(catch_all)}))
    """)
    assert report["same"], report
    assert report["catch_all"] == 0


def test_import_scope_is_lazy_and_every_name_resolves():
    report = run_python("""
        import json, sys
        import scope
        light = "torch" not in sys.modules
        import scope.cli
        cli_light = "torch" not in sys.modules
        from scope.record import RecordSettings  # the submodules load; the names stay functions
        from scope.sweep import parse_strengths
        missing = [n for n in scope.__all__ if getattr(scope, n, None) is None]
        from scope import record, sweep
        print(json.dumps({
            "light": light, "cli_light": cli_light, "missing": missing,
            "functions": [callable(scope.record), callable(scope.sweep), record is scope.record,
                          sweep is scope.sweep],
            "dir": sorted(set(scope.__all__) - set(dir(scope))),
            "same": scope.RecordSettings is RecordSettings,
        }))
    """)
    assert report["light"] and report["cli_light"], report
    assert report["missing"] == [] and report["dir"] == [] and report["same"]
    assert report["functions"] == [True, True, True, True]


def test_port_check_refuses_a_listener_but_not_a_just_stopped_explorer():
    """Stopping the explorer and starting it again on the same port works at once: the
    connections the stopped server closed (TIME_WAIT) do not count as the port being held.
    A program still listening on the port is refused with a message naming the port."""
    import socket

    from scope.cli.serve import check_port

    server = socket.socket()
    server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    server.bind(("127.0.0.1", 0))
    server.listen()
    port = server.getsockname()[1]
    with pytest.raises(ScopeError, match=f"127.0.0.1:{port}.*--port"):
        check_port("127.0.0.1", port)
    client = socket.create_connection(("127.0.0.1", port))
    conn, _ = server.accept()
    conn.close()  # the server closes first, as an HTTP server does: its side enters TIME_WAIT
    client.recv(1)
    client.close()
    server.close()
    check_port("127.0.0.1", port)
