"""Bad input found by trying the CLI as a new user would: each is refused with a clear line
(exit 2) before any work, and nothing already recorded is touched."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest
from typer.testing import CliRunner

from scope import ScopeError, load_sae
from scope import testing as fixtures
from scope.cli import app
from scope.corpus import CorpusSpec
from scope.record import RecordSettings, record
from scope.store import Store

runner = CliRunner()
CTX = 24


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    """Prose with terminal control sequences in every document."""
    path = tmp_path_factory.mktemp("corpus") / "c.jsonl"
    docs = [d for d in fixtures.training_text() if len(d) > 150][:12]
    with path.open("w") as f:
        for d in docs:
            f.write(json.dumps({"text": f"\x1b]0;pwned\x07{d[:300]}\x1b[2J end"}) + "\n")
    return path


@pytest.fixture(scope="module")
def store(tmp_path_factory, tiny_model, tiny_sae_dir, corpus) -> Path:
    root = tmp_path_factory.mktemp("stores") / "s"
    sae = load_sae(tiny_sae_dir, device="cpu")
    record(tiny_model, [sae], CorpusSpec(paths=(str(corpus),), ctx=CTX, max_tokens=800), root,
           RecordSettings(ctx=CTX, k=3, samples=2, batch_size=8))  # fmt: skip
    return root


def snapshot(root: Path) -> dict[str, bytes]:
    return {str(p): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


# ---------------------------------------------------------------- data safety


@pytest.mark.parametrize(
    "query",
    [
        "copy (select * from features where false) to '{root}/{version}/features.parquet'",
        "select 1; copy (select 1) to '{root}/manifest.json'",
        "attach '{root}/x.db' as x",
        "export database '{root}/dump'",
        "create table t as select 1",
        "set enable_external_access = true",
        "select * from read_csv('/etc/hostname')",
    ],
)
def test_sql_cannot_write_or_read_outside_the_store(store, query):
    before = snapshot(store)
    version = Store(store).version.name
    result = runner.invoke(
        app, ["sql", query.format(root=store, version=version), "--store", str(store)]
    )
    assert result.exit_code == 2, result.output
    assert "refused" in result.output or "disabled" in result.output
    assert snapshot(store) == before


def test_sql_exports_only_when_asked(store, tmp_path):
    ok = runner.invoke(app, ["sql", "select feature, count from features order by feature",
                             "--store", str(store), "--limit", "3"])  # fmt: skip
    assert ok.exit_code == 0 and "253 more rows" in ok.output
    out = tmp_path / "f.csv"
    got = runner.invoke(app, ["sql", "select feature from features", "--store", str(store),
                              "--csv", str(out), "--limit", "0"])  # fmt: skip
    assert got.exit_code == 0 and len(out.read_text().splitlines()) == 257  # header + 256
    lines = runner.invoke(app, ["sql", "select feature from features order by feature limit 2",
                                "--store", str(store), "--json"])  # fmt: skip
    assert [json.loads(x) for x in lines.stdout.splitlines()[:2]] == [
        {"feature": 0},
        {"feature": 1},
    ]
    empty = runner.invoke(app, ["sql", "  ", "--store", str(store)])
    assert empty.exit_code == 2 and "the query is empty" in empty.output


def test_ctx_longer_than_the_model_is_refused_before_writing(
    tiny_model, tiny_sae_dir, corpus, tmp_path
):
    sae = load_sae(tiny_sae_dir, device="cpu")
    with pytest.raises(ScopeError, match=r"--ctx 257 is longer than the context .* \(256 tokens\)"):
        record(tiny_model, [sae], CorpusSpec(paths=(str(corpus),)), tmp_path / "s",
               RecordSettings(ctx=257))  # fmt: skip
    assert not (tmp_path / "s").exists()


def test_a_store_killed_before_its_first_checkpoint_starts_over(
    tiny_model, tiny_sae_dir, corpus, tmp_path
):
    sae = load_sae(tiny_sae_dir, device="cpu")
    spec = CorpusSpec(paths=(str(corpus),), max_tokens=300)

    def die(_progress: object) -> None:
        raise KeyboardInterrupt  # a kill after the manifest, before any checkpoint

    with pytest.raises(KeyboardInterrupt):
        record(tiny_model, [sae], spec, tmp_path / "s", RecordSettings(ctx=16), on_progress=die)
    assert (tmp_path / "s" / "manifest.json").is_file()
    summary = record(tiny_model, [sae], spec, tmp_path / "s", RecordSettings(ctx=CTX))
    assert summary.tokens == 300 and Store(tmp_path / "s").manifest.settings.ctx == CTX


def test_resuming_a_finished_run_does_nothing(store, tiny_dir, tiny_sae_dir, corpus):
    before = snapshot(store)
    again = runner.invoke(app, ["record", "--model", str(tiny_dir), "--sae", str(tiny_sae_dir),
                                "--corpus", str(corpus), "--tokens", "800", "--ctx", str(CTX),
                                "--k", "3", "--samples", "2", "--store", str(store), "--resume"])  # fmt: skip
    assert again.exit_code == 0, again.output
    said = " ".join(again.output.split())  # the terminal width may wrap the line anywhere
    assert "nothing to do" in said and "already holds this corpus" in said
    assert snapshot(store) == before


def test_missing_absolute_sae_path_is_named_exactly(tmp_path, monkeypatch):
    (tmp_path / "fx" / "saes" / "x").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)  # a relative twin exists here; the absolute path does not
    with pytest.raises(ScopeError, match=r"SAE folder /fx/saes/x does not exist"):
        load_sae("/fx/saes/x", device="cpu")
    with pytest.raises(ScopeError, match=r"SAE folder /tmp/nope-\w*/sae does not exist"):
        load_sae(f"/tmp/nope-{os.getpid()}/sae", device="cpu")


def test_feature_output_shows_control_characters(store):
    s = Store(store)
    f = s.sql("select feature from features order by count desc limit 1").fetchall()[0][0]
    result = runner.invoke(app, ["feature", f"L2.res.256/{f}", "--store", str(store)])
    assert result.exit_code == 0, result.output
    assert "\x1b" not in result.output and "\x07" not in result.output
    assert "\\x1b" in result.output and "⟦" in result.output  # visible, max marked
    assert "interval examples" in result.output and "neighbours:" in result.output
    assert "histogram" in result.output


@pytest.mark.parametrize(
    "args,message",
    [
        (["--examples", "-3"], "--examples -3 must be 0 or more"),
        (["--address", "L2.res.256"], "has no index: give SAE/INDEX, e.g. L2.res.256/0"),
        (["--address", "L2.res.256/abc"], "the index 'abc' is not a number; give 0..255"),
    ],
)
def test_feature_address_errors(store, args, message):
    address = args[1] if args[0] == "--address" else "L2.res.256/1"
    extra = [] if args[0] == "--address" else args
    result = runner.invoke(app, ["feature", address, "--store", str(store), *extra])
    assert result.exit_code == 2 and message in result.output, result.output


# ---------------------------------------------------------------- clear errors


def common(tiny_dir, tiny_sae_dir) -> list[str]:
    return ["--model", str(tiny_dir), "--sae", str(tiny_sae_dir), "--prompt", "The river ran"]


def test_sweep_outputs_checked_before_any_work(tiny_dir, tiny_sae_dir, tmp_path):
    args = ["sweep", *common(tiny_dir, tiny_sae_dir), "--feature", "3"]
    plot = runner.invoke(app, [*args, "--plot", str(tmp_path / "missing" / "s.html")])
    assert plot.exit_code == 2 and "does not exist" in plot.output
    (tmp_path / "file").write_text("x")
    out = runner.invoke(app, [*args, "--out", str(tmp_path / "file")])
    assert out.exit_code == 2 and "is a file" in out.output


def test_steer_needs_a_strength(tiny_dir, tiny_sae_dir):
    result = runner.invoke(app, ["steer", *common(tiny_dir, tiny_sae_dir), "--feature", "3"])
    assert result.exit_code == 2 and "give --strength" in result.output


def test_device_that_is_not_there(tiny_dir):
    result = runner.invoke(app, ["info", "--model", str(tiny_dir), "--device", "cuda"])
    if result.exit_code == 0:
        pytest.skip("this machine has a CUDA device")
    assert result.exit_code == 2 and "there is no cuda device" in result.output


def test_store_that_is_a_file(tiny_dir, tiny_sae_dir, corpus, tmp_path):
    (tmp_path / "f").write_text("x")
    result = runner.invoke(app, ["record", "--model", str(tiny_dir), "--sae", str(tiny_sae_dir),
                                 "--corpus", str(corpus), "--store", str(tmp_path / "f")])  # fmt: skip
    assert result.exit_code == 2 and "is a file, not a folder" in result.output
    under = runner.invoke(app, ["record", "--model", str(tiny_dir), "--sae", str(tiny_sae_dir),
                                "--corpus", str(corpus), "--store", str(tmp_path / "f" / "s")])  # fmt: skip
    assert under.exit_code == 2 and "cannot create the store folder" in under.output


@pytest.mark.parametrize("hook", ["foo", "hook_embed"])
def test_hook_must_be_a_block_hook(tmp_path, hook):
    fixtures.write_params(tmp_path / "mine", fixtures.gemma_scope_params(
        __import__("torch").randn(40, 64), 32))  # fmt: skip
    with pytest.raises(ScopeError, match=rf"--hook '{hook}' is not a hook inside a block"):
        load_sae(tmp_path / "mine", device="cpu", hook=hook)


def test_long_prompt_is_counted_whole(tiny_model):
    from scope.generate import prompt_tokens

    with pytest.raises(ScopeError, match=r"the prompt is (\d{4}|[3-9]\d\d) tokens"):
        prompt_tokens(tiny_model, "word " * 600, chat=False, max_new_tokens=5)


def test_store_files_honour_the_umask(tiny_model, tiny_sae_dir, corpus, tmp_path):
    sae = load_sae(tiny_sae_dir, device="cpu")
    old = os.umask(0o022)
    try:
        record(tiny_model, [sae], CorpusSpec(paths=(str(corpus),), max_tokens=200),
               tmp_path / "s", RecordSettings(ctx=CTX))  # fmt: skip
    finally:
        os.umask(old)
    for path in (tmp_path / "s").rglob("*"):
        if path.name == ".lock":
            continue
        mode = stat.S_IMODE(path.stat().st_mode)
        assert mode == (0o755 if path.is_dir() else 0o644), (path, oct(mode))


def test_same_weights_at_another_hook_are_another_sae(tiny_model, tiny_sae_dir, corpus, tmp_path):
    """A store tells SAEs apart by weights and hook: unit max never borrows another hook's max."""
    import shutil

    shutil.copytree(tiny_sae_dir, tmp_path / "copy")
    at2 = load_sae(tiny_sae_dir, device="cpu")
    at1 = load_sae(tmp_path / "copy", device="cpu", hook="blocks.1.hook_resid_post")
    record(tiny_model, [at2, at1], CorpusSpec(paths=(str(corpus),), max_tokens=300),
           tmp_path / "s", RecordSettings(ctx=CTX))  # fmt: skip
    store = Store(tmp_path / "s")
    assert (store.key_of(at2), store.key_of(at1)) == ("L2.res.256", "L1.res.256")
    with pytest.raises(ScopeError, match="the same SAE is given twice"):
        record(tiny_model, [at2, load_sae(tiny_sae_dir, device="cpu")],
               CorpusSpec(paths=(str(corpus),)), tmp_path / "t")  # fmt: skip


def test_sweeps_are_checked_whole_before_generating(tiny_model, tiny_sae_dir):
    from scope.steer import Steer
    from scope.sweep import parse_strengths, sweep

    with pytest.raises(ScopeError, match=r"is 1,000,001 points, each a generation"):
        parse_strengths("0:1e6:1")
    sae = load_sae(tiny_sae_dir, device="cpu")
    calls: list[int] = []
    with pytest.raises(ScopeError, match="mode 'bogus' is not one of"):
        sweep(tiny_model, "The river", Steer(sae, 3), [0.0, 1.0], modes=["add", "bogus"],
              on_point=lambda p, i, n: calls.append(i))  # fmt: skip
    assert calls == []


def test_steer_labels_say_the_unit(tiny_sae_dir):
    from scope.cli.steer import describe
    from scope.steer import Steer

    sae = load_sae(tiny_sae_dir, device="cpu")
    assert describe(Steer(sae, 3, strength=4, unit="max")) == "add 4x max"
    assert describe(Steer(sae, 3, strength=0.5, unit="norm")) == "add 0.5x norm"
    assert describe(Steer(sae, 3, strength=30, mode="clamp")) == "clamp 30"
    assert describe(Steer(sae, 3, mode="ablate")) == "ablate"


def test_progress_without_a_terminal_prints_lines(monkeypatch):
    import io
    import time

    from rich.console import Console

    from scope.cli import common as cli_common
    from scope.cli import record as cli_record
    from scope.record import RecordProgress

    text = io.StringIO()
    console = Console(file=text, force_terminal=False, width=200)
    monkeypatch.setattr(cli_common, "LOG_SECONDS", 3600.0)
    monkeypatch.setattr(time, "monotonic", lambda: 5.0)  # a machine booted 5 s ago
    with cli_record.progress_bar(console) as show:
        show(RecordProgress(10, 100, 50.0, 1, 10))  # the first line comes at once
        show(RecordProgress(50, 100, 50.0, 5, 10))  # then not before LOG_SECONDS
        show(RecordProgress(100, 100, 50.0, 10, 10))  # and always at the end
    lines = text.getvalue().splitlines()
    assert lines == [
        "recorded 10/100 tokens (10%), 50 tok/s, ETA 0:00:02",
        "recorded 100/100 tokens (100%), 50 tok/s, ETA 0:00:00",
    ]


def test_train_progress_without_a_terminal_prints_lines(monkeypatch):
    """`scope train` in a log: the first cache and step lines at once, then at most one per
    LOG_SECONDS, and the last step always."""
    import io
    import time

    from rich.console import Console

    from scope.cli import common as cli_common
    from scope.cli import train as cli_train
    from scope.train.cache import CacheProgress
    from scope.train.loop import StepReport

    text = io.StringIO()
    monkeypatch.setattr(cli_common, "LOG_SECONDS", 3600.0)
    monkeypatch.setattr(time, "monotonic", lambda: 5.0)  # a machine booted 5 s ago
    on_cache, on_step = cli_train._log_lines(Console(file=text, force_terminal=False, width=200))
    hook = "blocks.3.hook_resid_post"
    on_cache(CacheProgress(1000, 8, 2.0))
    on_cache(CacheProgress(2000, 16, 4.0))
    on_step(StepReport(1, 10, 4096, 2.0, {hook: 61.5}, {hook: 0.25}, {hook: 300}))
    on_step(StepReport(10, 10, 40960, 20.0, {hook: 60.0}, {hook: 0.125}, {hook: 12}))
    assert text.getvalue().splitlines() == [
        "cached 1,000 tokens, 500 tok/s",
        "step 10/10, 40,960 tokens, 2,048 tok/s: L3.res L0 60.0 FVU 0.125 dead 12",
    ]
