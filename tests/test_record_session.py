"""The recording session and the run spec: snapshots readers open while the recording writes the
next, the progress the explorer's overview shows (AppTest, during a real recording), a stopped
session resumed, all ending equal to one uninterrupted `record`; the one same-run check's
one-line refusals."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
from store_compare import assert_identical
from streamlit.testing.v1 import AppTest

from scope import ScopeError, load_sae
from scope import testing as fixtures
from scope.corpus import CorpusSpec
from scope.record import RecordingSession, RecordSettings, RunSpec, record
from scope.record import session as session_module
from scope.record.spec import ADD_TO_STORE, SAME_CORPUS, SHARDS_OF_ONE_RUN, check_same
from scope.store import Store
from scope.store.manifest import read_manifest
from scope.store.progress import read_status

CTX = 24
HOME = Path(__file__).parents[1] / "app" / "Home.py"


def settings(**kw) -> RecordSettings:
    return RecordSettings(**{"ctx": CTX, "k": 4, "samples": 3, "batch_size": 4, **kw})


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> CorpusSpec:
    root = tmp_path_factory.mktemp("corpus")
    docs = [d[:400] for d in fixtures.training_text() if len(d) > 200][:12]
    (root / "c.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    return CorpusSpec(paths=(str(root / "c.jsonl"),), max_tokens=900)  # its ctx is not the run's


@pytest.fixture(scope="module")
def sae(tiny_sae_dir):
    return load_sae(tiny_sae_dir, device="cpu")


@pytest.fixture(scope="module")
def plain(tmp_path_factory, tiny_model, sae, corpus) -> Path:
    """One uninterrupted recording without snapshots: what every other way must equal."""
    root = tmp_path_factory.mktemp("plain") / "store"
    record(tiny_model, [sae], corpus, root, settings())
    return root


@pytest.fixture
def every_batch(monkeypatch):
    """Snapshots at every batch (the first one at once), so a short recording has many."""
    monkeypatch.setattr(session_module, "FIRST_SNAPSHOT_SECONDS", 0.0)
    return settings(snapshots=True, checkpoint_seconds=0.0)


def counted(store: Store) -> int:
    """Tokens in the snapshot ``store`` shows, checked consistent across its tables."""
    (tokens,) = store.sql("select tokens from saes").fetchone()
    assert store.sql("select sum(count) from l0").fetchone() == (tokens,)
    fired = store.sql("select sum(count) from hist").fetchone()
    assert fired == store.sql("select sum(count) from features").fetchone()
    return int(tokens)


def test_snapshots_are_readable_while_recording_and_change_nothing(
    tmp_path, tiny_model, tiny_dir, sae, corpus, plain, every_batch, monkeypatch
):
    root = tmp_path / "live"
    seen: list[tuple[str, int]] = []
    first: list[Store] = []
    shown: list[str] = []

    def on_snapshot(name: str) -> None:
        store = Store(root)  # a reader opening the store between two batches
        status = read_status(root)
        assert status is not None and status.snapshot == name == store.version.name
        final = store.manifest.state == "complete"  # the last one, at the end
        assert status.running() != final and status.state == ("complete" if final else "recording")
        assert status.snapshot_tokens == counted(store)  # what the overview says it shows
        seen.append((name, status.snapshot_tokens))
        if not first:
            first.append(store)
            monkeypatch.setenv("SCOPE_STORE", str(root))
            monkeypatch.setenv("SCOPE_MODEL", str(tiny_dir))
            at = AppTest.from_file(str(HOME), default_timeout=120).run()
            assert not at.exception and not at.error, [e.value for e in at.exception]
            bar = at.get("progress")[0].proto
            assert f"Recording: {status.tokens:,} of {status.total:,} tokens" in bar.text
            metrics = {m.label: m.value for m in at.metric}
            assert metrics["tokens recorded"] == f"{status.snapshot_tokens:,}"
            shown.append(bar.text)

    with RecordingSession.open(tiny_model, [sae], corpus, root, every_batch,
                               on_snapshot=on_snapshot) as session:  # fmt: skip
        assert session.spec.corpus is not None and session.spec.corpus.ctx == CTX
        session.record()
        summary = session.finish()
    assert shown and len(seen) >= 5
    tokens = [t for _, t in seen]
    assert tokens == sorted(tokens) and tokens[-1] == summary.tokens  # the last is the end
    assert [n for n, _ in seen] == sorted({n for n, _ in seen})  # a new version each time
    assert counted(first[0]) == tokens[0]  # a reader keeps its snapshot while newer ones land
    status = read_status(root)
    assert status is not None and status.state == "complete" and not status.running()
    assert status.tokens == status.total == summary.tokens
    assert not list(root.glob(".v*"))  # no half-built version left where readers look
    kept = sorted(p.name for p in root.glob("v[0-9]*") if (p / "state").is_dir())
    assert kept == [status.snapshot] and len(list(root.glob("v[0-9]*"))) == len(seen)
    assert_identical(plain, root)


def test_stopped_session_is_served_then_resumed_to_the_same_store(
    tmp_path, tiny_model, tiny_dir, sae, corpus, plain, monkeypatch
):
    monkeypatch.setattr(session_module, "FIRST_SNAPSHOT_SECONDS", 3600.0)  # none on the way
    root = tmp_path / "stopped"
    asked: list[int] = []

    def stop_at_third() -> str | None:
        asked.append(1)
        return "a test" if len(asked) == 3 else None

    with (
        pytest.raises(ScopeError, match="stopped by a test after 12/"),
        RecordingSession.open(tiny_model, [sae], corpus, root, settings(snapshots=True)) as s,
    ):
        s.record(should_stop=stop_at_third)
    status = read_status(root)
    assert status is not None and status.state == "stopped" and 0 < status.tokens < status.total
    store = Store(root)  # the stop wrote a snapshot readers open: a rerun serves it at once
    assert store.manifest.state == "recording" and counted(store) == status.tokens
    monkeypatch.setenv("SCOPE_STORE", str(root))
    monkeypatch.setenv("SCOPE_MODEL", str(tiny_dir))
    at = AppTest.from_file(str(HOME), default_timeout=120).run()
    assert not at.exception and not at.error
    assert any(f"The recording stopped at {status.tokens:,} of" in w.value for w in at.warning)

    with RecordingSession.open(tiny_model, [sae], corpus, root, settings(snapshots=True),
                               resume=True) as s:  # fmt: skip
        assert s.progress is not None and s.progress.tokens == status.tokens
        with pytest.raises(ScopeError, match=r"at window 12 of \d+: record\(\) to the end"):
            s.finish()
    with RecordingSession.open(tiny_model, [sae], corpus, root, settings(), resume=True) as s:
        s.record()
        s.finish()
    assert_identical(plain, root)
    with RecordingSession.open(tiny_model, [sae], corpus, root, settings(), resume=True) as s:
        assert s.already_recorded and s.record() == 0 and s.finish().already_recorded


def test_one_check_says_in_one_line_what_differs_and_the_fix(plain):
    m = read_manifest(plain)
    assert m is not None
    run = RunSpec.of_store(m)
    key = next(iter(m.saes))
    other_model = replace(run.model, name="other", fingerprint="f" * 16)
    other_sae = {key: replace(m.saes[key], sha256="0" * 64)}
    other_corpus = replace(run.corpus, max_tokens=500)
    cases = [
        (replace(run, model=other_model), ADD_TO_STORE,
         r"^S was recorded with model .*tiny-gemma2 .*, not other \(f{16}\): load the same model"),
        (replace(run, saes=other_sae), ADD_TO_STORE,
         rf"^S holds SAEs {key} \(weights \w{{12}}\), which differ from this run's \({key} "
         r"\(weights 000000000000\)\): pass the same --sae list"),
        (replace(run, settings=settings(k=7)), ADD_TO_STORE,
         r"^S was recorded with --k 4, not 7: use the same value, or record into a new --store"),
        (replace(run, settings=settings(shard=(1, 2))), ADD_TO_STORE,
         r"^S is shard 0/1, not 1/2: record each shard into a --store of its own"),
        (replace(run, corpus=other_corpus), SAME_CORPUS,
         r"^S was recorded from --corpus .*c.jsonl \(--field text, --tokens 900\), not .* "
         r"--tokens 500\): give the same --corpus, --field and --tokens"),
        (replace(run, windows=("x",)), SHARDS_OF_ONE_RUN,
         r"^S recorded another corpus from .*c.jsonl than this run \(the windows differ"),
    ]  # fmt: skip
    for asked, compare, message in cases:
        check_same(run, run, where="S", compare=compare)  # the same run passes
        with pytest.raises(ScopeError, match=message) as caught:
            check_same(run, asked, where="S", compare=compare)
        assert "\n" not in str(caught.value)
    # an aspect one side does not know is not compared (the Ray driver loads no model)
    check_same(run, replace(run, model=None, saes=None), where="S")
    with pytest.raises(ScopeError, match=r"not 7 \(shard 3\): only shards of one run merge$"):
        check_same(run, replace(run, settings=settings(k=7)), where="S", given="shard 3",
                   fix="only shards of one run merge", compare=SHARDS_OF_ONE_RUN)  # fmt: skip


def test_the_run_has_one_window_length(corpus):
    spec = RunSpec(model=None, saes=None, corpus=replace(corpus, ctx=64), settings=settings())
    assert spec.ctx == spec.settings.ctx == CTX and spec.corpus is not None
    assert spec.corpus.ctx == CTX
    with pytest.raises(ScopeError, match="snapshots need the tables"):
        settings(snapshots=True, tables=False)
