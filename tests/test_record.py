"""Recording equals a brute-force reference; shards merge, killed runs resume, readers stay
consistent, and bad input is refused without losing what is recorded."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from reference import assert_store_matches, reference

from scope import ScopeError, load_sae
from scope import testing as fixtures
from scope.corpus import CorpusSpec, build_windows
from scope.record import RecordSettings, record
from scope.record.merge import merge_stores
from scope.store import Store

CTX, K, M = 24, 4, 3


def settings(**kw) -> RecordSettings:
    return RecordSettings(**{"ctx": CTX, "k": K, "samples": M, "batch_size": 4, **kw})


@pytest.fixture(scope="session")
def corpus_dir(tmp_path_factory) -> Path:
    """Real prose (stdlib docstrings) as a .txt file and a .jsonl file."""
    root = tmp_path_factory.mktemp("corpus")
    docs = [d for d in fixtures.training_text() if len(d) > 200][:30]
    (root / "a.txt").write_text(docs[0])
    with (root / "b.jsonl").open("w") as f:
        for d in docs[1:]:
            f.write(json.dumps({"text": d, "id": 1}) + "\n")
    return root


@pytest.fixture(scope="session")
def att_sae_dir(tmp_path_factory, tiny_model) -> Path:
    _, cache = tiny_model.run_with_cache(
        fixtures.training_text()[3][:400], names_filter="blocks.1.attn.hook_z"
    )
    flat = cache["blocks.1.attn.hook_z"][0, 1:].flatten(-2)
    folder = (
        tmp_path_factory.mktemp("att") / "tiny-scope-att" / "layer_1" / "width_128" / "average_l0_6"
    )
    fixtures.write_params(folder, fixtures.gemma_scope_params(flat, 128, seed=5))
    return folder


@pytest.fixture(scope="session")
def mlp_sae_dir(tmp_path_factory, tiny_model) -> Path:
    _, cache = tiny_model.run_with_cache(
        fixtures.training_text()[4][:400], names_filter="blocks.1.hook_mlp_out"
    )
    folder = (
        tmp_path_factory.mktemp("mlp") / "tiny-scope-mlp" / "layer_1" / "width_64" / "average_l0_3"
    )
    fixtures.write_params(
        folder, fixtures.gemma_scope_params(cache["blocks.1.hook_mlp_out"][0, 1:], 64, seed=7)
    )
    return folder


@pytest.fixture(scope="session")
def saes(tiny_sae_dir, att_sae_dir, mlp_sae_dir):
    """A residual, an attention (hook_z) and an MLP-output SAE: every Gemma Scope site."""
    return [load_sae(d, device="cpu") for d in (tiny_sae_dir, att_sae_dir, mlp_sae_dir)]


@pytest.fixture(scope="session")
def spec(corpus_dir) -> CorpusSpec:
    return CorpusSpec(paths=(str(corpus_dir),), ctx=CTX, max_tokens=1500)


@pytest.fixture(scope="session")
def one_pass(tmp_path_factory, tiny_model, saes, spec) -> Path:
    root = tmp_path_factory.mktemp("stores") / "one"
    record(tiny_model, saes, spec, root, settings())
    return root


def table(store: Path, name: str, order: str) -> list[tuple]:
    return Store(store).sql(f"select * from {name} order by {order}").fetchall()


def assert_same_tables(a: Path, b: Path) -> None:
    """Integers and ids exactly; floats to 1e-5 (batching moves the last bits of a forward)."""
    for name, order in [
        ("features", "sae, feature"),
        ("topk", "sae, feature, rank"),
        ("hist", "sae, feature, bin"),
        ("samples", "sae, feature, bin, key"),
        ("l0", "sae, l0"),
        ("saes", "sae"),
        ("intervals", "sae, feature, interval, window_id"),
    ]:
        ta, tb = table(a, name, order), table(b, name, order)
        assert len(ta) == len(tb), name
        for ra, rb in zip(ta, tb, strict=True):
            for x, y in zip(ra, rb, strict=True):
                if isinstance(x, float):
                    assert x == pytest.approx(y, rel=1e-5, abs=1e-5), name
                elif isinstance(x, list):
                    np.testing.assert_allclose(
                        np.asarray(x, float), np.asarray(y, float), rtol=1e-5, atol=1e-5
                    )
                else:
                    assert x == y, name


def test_record_equals_brute_force(one_pass, tiny_model, saes, spec):
    windows = build_windows(spec, tiny_model.tokenizer)
    store = Store(one_pass)
    assert sorted(store.saes) == ["L1.att.128", "L1.mlp.64", "L2.res.256"]
    for sae in saes:
        key = store.key_of(sae)
        ref = reference(tiny_model, sae, windows, K, M)
        assert_store_matches(store, key, ref)
        assert ref.count.sum() > 100 and (ref.count == 0).mean() < 0.5  # not vacuous


def test_interval_examples_cover_the_range(one_pass):
    store = Store(one_pass)
    f = store.sql(
        "select feature from features where sae = 'L2.res.256' order by count desc limit 1"
    ).fetchall()[0][0]
    view = store.feature(f"L2.res.256/{f}")
    assert len(view.top) == K and view.top[0].act == pytest.approx(view.max)
    assert view.top[0].tokens[0] == "<bos>" and view.top[0].acts[0] == 0.0  # BOS never counts
    assert len(view.intervals) >= 3
    for interval, examples in view.intervals.items():
        assert 1 <= len(examples) <= 5
        for ex in examples:
            assert interval * view.max / 5 <= ex.act <= (interval + 1) * view.max / 5 + 1e-6
    assert sum(c for _, _, c in view.histogram) == view.count
    assert len(view.top_tokens) == 10 and len(view.neighbours) == 10


def test_logit_lens_and_neighbours_brute_force(one_pass, tiny_model, saes):
    store = Store(one_pass)
    sae = saes[0]
    logits = (sae.W_dec @ tiny_model.W_U).detach()
    lens = store.sql(
        "select feature, top_ids, bottom_ids, neighbours from lens where sae = 'L2.res.256' order by feature"
    ).fetchall()
    unit = sae.W_dec / sae.W_dec.norm(dim=-1, keepdim=True)
    cos = (unit @ unit.T).fill_diagonal_(-2)
    for f, top, bottom, near in lens[:50]:
        assert top == logits[f].topk(10).indices.tolist()
        assert bottom == logits[f].topk(10, largest=False).indices.tolist()
        assert near == cos[f].topk(10).indices.tolist()


def test_shards_merge_to_one_pass(tmp_path, one_pass, tiny_model, saes, spec):
    for i in range(3):
        record(tiny_model, saes, spec, tmp_path / f"s{i}", settings(shard=(i, 3)))
    merge_stores(tmp_path / "merged", [tmp_path / f"s{i}" for i in (2, 0, 1)])
    assert_same_tables(one_pass, tmp_path / "merged")
    with pytest.raises(ScopeError, match=r"shards given are \[0, 1\] of 3"):
        merge_stores(tmp_path / "m2", [tmp_path / "s0", tmp_path / "s1"])


def test_shards_without_a_budget_tokenize_their_own_documents(tmp_path, tiny_model, saes):
    """Without --tokens each shard reads only its own documents (here 4 documents over 5
    shards, so one shard has none); the merge still equals one pass, windows table too."""
    docs = [d[:300] for d in fixtures.training_text() if len(d) > 300][:4]
    (tmp_path / "c.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    spec = CorpusSpec(paths=(str(tmp_path / "c.jsonl"),), ctx=CTX)
    record(tiny_model, saes, spec, tmp_path / "one", settings())
    for i in range(5):
        record(tiny_model, saes, spec, tmp_path / f"s{i}", settings(shard=(i, 5)))
        part = Store(tmp_path / f"s{i}").manifest.parts[0] if i < 4 else None
        assert part is None or part.documents == 1
    assert Store(tmp_path / "s4").sql("select count(*) from windows").fetchone() == (0,)
    merge_stores(tmp_path / "merged", [tmp_path / f"s{i}" for i in range(5)])
    assert_same_tables(tmp_path / "one", tmp_path / "merged")
    assert table(tmp_path / "one", "windows", "window_id") == table(
        tmp_path / "merged", "windows", "window_id"
    )


def test_add_corpus_equals_single_pass(tmp_path, tiny_model, saes, corpus_dir):
    a = CorpusSpec(paths=(str(corpus_dir / "a.txt"),), ctx=CTX)
    b = CorpusSpec(paths=(str(corpus_dir / "b.jsonl"),), ctx=CTX)
    record(tiny_model, saes, a, tmp_path / "parts", settings())
    record(tiny_model, saes, b, tmp_path / "parts", settings())
    record(
        tiny_model,
        saes,
        CorpusSpec(paths=a.paths + b.paths, ctx=CTX),
        tmp_path / "single",
        settings(),
    )
    assert_same_tables(tmp_path / "parts", tmp_path / "single")
    before = (tmp_path / "parts" / "manifest.json").read_text()
    with pytest.raises(ScopeError, match="already holds this corpus"):
        record(tiny_model, saes, b, tmp_path / "parts", settings())
    assert (tmp_path / "parts" / "manifest.json").read_text() == before


RUN = """
import sys
from scope import load_model, load_sae
from scope.corpus import CorpusSpec
from scope.record import RecordSettings, record
model = load_model(sys.argv[1], device="cpu")
saes = [load_sae(p, device="cpu") for p in sys.argv[4].split(",")]
record(model, saes, CorpusSpec(paths=(sys.argv[2],), ctx={ctx}, max_tokens=1500), sys.argv[3],
       RecordSettings(ctx={ctx}, k={k}, samples={m}, batch_size=1, checkpoint_seconds=0.0),
       resume="--resume" in sys.argv)
"""


def script_args(
    tmp_path: Path, template: str, tiny_dir: Path, corpus: Path, store: Path, saes: list[Path]
) -> list[str]:
    """The command line of a recording script (one of the templates above) run as a subprocess."""
    script = tmp_path / "run.py"
    script.write_text(textwrap.dedent(template.format(ctx=CTX, k=K, m=M)))
    return [
        sys.executable,
        str(script),
        str(tiny_dir),
        str(corpus),
        str(store),
        ",".join(map(str, saes)),
    ]


@pytest.mark.slow
def test_killed_run_resumes_identically(
    tmp_path, tiny_dir, corpus_dir, tiny_sae_dir, att_sae_dir, mlp_sae_dir, one_pass
):
    store = tmp_path / "killed"
    args = script_args(
        tmp_path, RUN, tiny_dir, corpus_dir, store, [tiny_sae_dir, att_sae_dir, mlp_sae_dir]
    )
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while time.time() < deadline:  # kill -9 once a few checkpoints are on disk
        try:
            part = json.loads((store / "manifest.json").read_text())["parts"][-1]
            if part["next"] >= 12:
                break
        except (FileNotFoundError, json.JSONDecodeError, KeyError, IndexError):
            pass
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    manifest = json.loads((store / "manifest.json").read_text())
    assert (
        manifest["state"] == "recording"
        and 12 <= manifest["parts"][-1]["next"] < manifest["parts"][-1]["windows"]
    )
    with pytest.raises(ScopeError, match="no finished snapshot yet"):
        Store(store)
    again = subprocess.run(args, capture_output=True, text=True)
    assert again.returncode != 0 and "add --resume" in again.stderr
    resumed = subprocess.run([*args, "--resume"], capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert_same_tables(one_pass, store)


@pytest.mark.slow
def test_reader_sees_consistent_snapshots_while_writing(
    tmp_path, tiny_dir, corpus_dir, tiny_sae_dir, att_sae_dir, mlp_sae_dir, tiny_model, saes
):
    store = tmp_path / "live"
    first = CorpusSpec(paths=(str(corpus_dir / "a.txt"),), ctx=CTX)
    record(tiny_model, saes, first, store, settings())
    args = script_args(
        tmp_path,
        RUN,
        tiny_dir,
        corpus_dir / "b.jsonl",
        store,
        [tiny_sae_dir, att_sae_dir, mlp_sae_dir],
    )
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    seen = set()
    while True:
        running = proc.poll() is None
        s = Store(store)
        tokens = s.sql("select sae, tokens from saes").fetchall()
        fired = dict(s.sql("select sae, sum(count) from hist group by sae").fetchall())
        counts = dict(s.sql("select sae, sum(count) from features group by sae").fetchall())
        l0 = dict(s.sql("select sae, sum(count) from l0 group by sae").fetchall())
        for sae, n in tokens:
            assert fired[sae] == counts[sae] and l0[sae] == n  # one snapshot, never a mix
        seen.add(tuple(n for _, n in tokens))
        if not running:
            break
    assert proc.wait() == 0, proc.stderr.read()[-2000:] if proc.stderr else ""
    assert len(seen) >= 2  # read the first snapshot while writing, and the final one after


def test_refuses_another_model_or_sae(tmp_path, one_pass, tiny_model, saes, spec, tiny_dir):
    from scope import load_model

    other = load_model(fixtures.build_gemma2(tmp_path / "other", seed=1), device="cpu")
    before = (one_pass / "manifest.json").read_text()
    with pytest.raises(ScopeError, match=r"was recorded with model .*tiny-gemma2.*not .*other"):
        record(other, saes, spec, one_pass, settings())
    with pytest.raises(
        ScopeError, match=r"holds SAEs L1.att.128, L1.mlp.64, L2.res.256, which differ"
    ):
        record(tiny_model, saes[:1], spec, one_pass, settings())
    with pytest.raises(ScopeError, match=r"recorded with --k 4, not 7"):
        record(tiny_model, saes, spec, one_pass, settings(k=7))
    assert (one_pass / "manifest.json").read_text() == before  # nothing recorded is touched


def test_refuses_non_store_folder(tmp_path, tiny_model, saes, spec):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(ScopeError, match="exists and is not a store"):
        record(tiny_model, saes, spec, tmp_path, settings())


def test_misfit_sae_refused_before_anything(tmp_path, tiny_model, spec):
    folder = tmp_path / "x-res" / "layer_1" / "width_8" / "average_l0_1"
    fixtures.write_params(
        folder,
        {
            "W_enc": np.ones((2304, 8), np.float32),
            "W_dec": np.ones((8, 2304), np.float32),
            "b_enc": np.zeros(8, np.float32),
            "b_dec": np.zeros(2304, np.float32),
            "threshold": np.ones(8, np.float32),
        },
    )
    with pytest.raises(ScopeError, match="expects d_in 2304"):
        record(
            tiny_model,
            [load_sae(folder, device="cpu")],
            spec,
            tmp_path / "s",
            settings(),
        )
    assert not (tmp_path / "s").exists()


def test_store_feature_address_errors(one_pass):
    store = Store(one_pass)
    with pytest.raises(
        ScopeError, match=r"no SAE 'L2.res.25' in this store.*did you mean L2.res.256"
    ):
        store.feature("L2.res.25/3")
    with pytest.raises(ScopeError, match=r"index must be 0..255"):
        store.feature("L2.res.256/256")
    with pytest.raises(ScopeError, match="not a store"):
        Store(one_pass.parent / "nothing")


def test_states_are_on_device_tensors(one_pass):
    from scope.record.state import load_states

    manifest = json.loads((one_pass / "manifest.json").read_text())
    key = "L2.res.256"
    state = load_states(one_pass / manifest["state_version"], [key], torch.device("cpu"))[key]
    assert state.top_acts.shape == (256, K, CTX) and state.count.dtype == torch.int64


def test_fast_encode_is_bitwise_sae_encode(saes, tiny_model, tmp_path):
    from scope.acts import capture, encode, hook_names, site_input

    tokens = tiny_model.to_tokens(fixtures.training_text()[5][:300])
    with torch.no_grad():
        acts = capture(tiny_model, tokens, hook_names(saes), 3)
    for sae in saes:
        x = acts[sae.cfg.metadata.hook_name]
        assert torch.equal(encode(sae, site_input(x)), sae.encode(x))
    # negative thresholds: relu still applies
    params = fixtures.gemma_scope_params(acts["blocks.2.hook_resid_post"][0].detach(), 64)
    params["threshold"][:32] = -0.5
    folder = tmp_path / "n-res" / "layer_2" / "width_64" / "average_l0_1"
    fixtures.write_params(folder, params)
    sae = load_sae(folder, device="cpu")
    x = acts["blocks.2.hook_resid_post"]
    assert torch.equal(encode(sae, x), sae.encode(x))


def test_one_forward_stops_after_the_deepest_sae(tmp_path, tiny_model, saes, spec):
    """The forward pass ends at the deepest SAE's layer: later layers never run."""
    ran: list[str] = []
    tiny_model.add_hook("blocks.3.hook_resid_pre", lambda act, hook: ran.append(hook.name))
    try:
        record(tiny_model, saes, spec, tmp_path / "s", settings())
    finally:
        tiny_model.reset_hooks()
    assert ran == []


SLOW_RUN = """
import sys, time
from scope import load_model, load_sae
from scope.corpus import CorpusSpec
from scope.record import RecordSettings, record, stop_on_signals
from scope.errors import ScopeError
model = load_model(sys.argv[1], device="cpu")
model.add_hook("blocks.0.hook_resid_pre", lambda act, hook: time.sleep(0.2))  # time to interrupt
saes = [load_sae(p, device="cpu") for p in sys.argv[4].split(",")]
try:
    with stop_on_signals() as should_stop:
        record(model, saes, CorpusSpec(paths=(sys.argv[2],), ctx={ctx}, max_tokens=1500), sys.argv[3],
               RecordSettings(ctx={ctx}, k={k}, samples={m}, batch_size=4, checkpoint_seconds=1e9),
               resume="--resume" in sys.argv, should_stop=should_stop)
except ScopeError as err:
    print(err)
    sys.exit(2)
"""


@pytest.mark.slow
def test_ctrl_c_saves_and_resumes_identically(
    tmp_path, tiny_dir, corpus_dir, tiny_sae_dir, att_sae_dir, mlp_sae_dir, one_pass
):
    store = tmp_path / "interrupted"
    args = script_args(
        tmp_path, SLOW_RUN, tiny_dir, corpus_dir, store, [tiny_sae_dir, att_sae_dir, mlp_sae_dir]
    )
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not (store / "manifest.json").exists() and time.time() < deadline:
        time.sleep(0.05)
    time.sleep(1.0)  # some batches in, with no periodic checkpoint yet
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 2, stderr[-2000:]
    assert "stopped by SIGINT" in stdout and "--resume" in stdout
    part = json.loads((store / "manifest.json").read_text())["parts"][-1]
    assert 0 < part["next"] < part["windows"]
    resumed = subprocess.run([*args, "--resume"], capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert_same_tables(one_pass, store)


def test_sae_identity_is_the_stored_weights_whatever_the_dtype(
    tmp_path, tiny_model, tiny_sae_dir, spec
):
    """A store recorded with an SAE in bf16 knows the same SAE loaded in fp32 (and back): the
    hash is of the weights as stored, taken at load, not of the run's dtype."""
    from scope.identity import sae_info, weights_sha256

    fp32 = load_sae(tiny_sae_dir, device="cpu", dtype="float32")
    bf16 = load_sae(tiny_sae_dir, device="cpu", dtype="bfloat16")
    with np.load(tiny_sae_dir / "params.npz") as f:
        stored = weights_sha256({k: torch.from_numpy(f[k]) for k in f.files})
    assert sae_info(fp32).sha256 == sae_info(bf16).sha256 == stored
    assert weights_sha256(bf16.state_dict()) != stored  # what the old hash after the cast saw
    first, second = (
        CorpusSpec(paths=(str(spec.paths[0]),), ctx=CTX, max_tokens=300),
        CorpusSpec(paths=(str(spec.paths[0]),), ctx=CTX, max_tokens=500),
    )
    record(tiny_model, [bf16], first, tmp_path / "s", settings())
    record(tiny_model, [fp32], second, tmp_path / "s", settings())  # adding with another dtype
    store = Store(tmp_path / "s")
    assert store.key_of(fp32) == store.key_of(bf16) == "L2.res.256"


def test_sae_keys_do_not_depend_on_order(tiny_sae_dir, tiny_acts, tmp_path):
    from scope.identity import sae_info, sae_keys

    other = tmp_path / "mine" / "second"  # no L0 variant in the path: told apart by hash
    fixtures.write_params(other, fixtures.gemma_scope_params(tiny_acts, 256, seed=4))
    a = sae_info(load_sae(tiny_sae_dir, device="cpu"))
    b = sae_info(load_sae(other, device="cpu", hook="blocks.2.hook_resid_post"))
    keys = sae_keys([a, b])
    assert keys == list(reversed(sae_keys([b, a])))
    assert keys == ["L2.res.256.l0_13", f"L2.res.256.{b.sha256[:8]}"]


def test_l0_variants_of_one_slot_record_side_by_side(
    tmp_path, tiny_model, tiny_sae_dir, tiny_acts, spec
):
    """Gemma Scope ships several L0s per layer and width: they get distinct keys, and steering
    in units of the recorded max finds its own SAE by its weights."""
    from scope.steer import Steer
    from scope.steer_spec import feature_max

    sparse = tmp_path / "tiny-scope-res" / "layer_2" / "width_256" / "average_l0_4"
    fixtures.write_params(
        sparse, fixtures.gemma_scope_params(tiny_acts, 256, firing_rate=0.01, seed=9)
    )
    dense, sparse_sae = load_sae(tiny_sae_dir, device="cpu"), load_sae(sparse, device="cpu")
    record(tiny_model, [dense, sparse_sae], spec, tmp_path / "s", settings())
    store = Store(tmp_path / "s")
    assert sorted(store.saes) == ["L2.res.256.l0_13", "L2.res.256.l0_4"]
    l0 = dict(store.sql("select sae, mean_l0 from saes").fetchall())
    assert l0["L2.res.256.l0_4"] < l0["L2.res.256.l0_13"]
    f = store.sql(
        "select feature from features where sae = 'L2.res.256.l0_4' order by max desc limit 1"
    ).fetchall()[0][0]
    top = store.feature(f"L2.res.256.l0_4/{f}").max
    assert feature_max(store, sparse_sae, f) == pytest.approx(top)
    assert Steer(sparse_sae, f, strength=1.0, unit="max").max_act is None
    with pytest.raises(ScopeError, match="the same SAE is given twice"):
        record(
            tiny_model,
            [dense, load_sae(tiny_sae_dir, device="cpu")],
            spec,
            tmp_path / "t",
            settings(),
        )


def test_vocab_table_is_every_token_as_the_tokenizer_names_it(tiny_model):
    """Pieces and texts per id as the tokenizer gives them one by one (ids past its
    vocabulary, up to the model's d_vocab, have an empty piece)."""
    from scope.record.tables import vocab_table

    tok = tiny_model.tokenizer
    n = len(tok) + 5
    t = vocab_table(tok, n).to_pydict()
    assert t["token"] == list(range(n))
    assert t["piece"] == [tok.convert_ids_to_tokens(i) or "" for i in range(len(tok))] + [""] * 5
    assert t["text"][: len(tok)] == [tok.decode([i]) for i in range(len(tok))]
