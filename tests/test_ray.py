"""Recording on Ray, on a local cluster the tests start (2 CPUs, this machine only): 2 workers
and 6 shards equal one plain process to the bit; a worker process killed mid-shard is retried
and the store is still identical; a driver killed and resumed records only the shards it had
not merged and finishes identical; an error in a worker reads as a local run's one line.
Without a cluster: options and stores refused before one starts."""

from __future__ import annotations

import json
import logging
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
from store_compare import assert_identical

from scope import ScopeError
from scope import testing as fixtures
from scope.corpus import CorpusSpec
from scope.record import RecordSettings, record
from scope.record.distributed import RayOptions, WorkerPlan, plan_workers, record_on_ray
from scope.record.shard_worker import Loader
from scope.store import Store, read_manifest

CTX, K, M = 24, 4, 3
SCOPE = str(Path(sys.executable).parent / "scope")


def settings(**kw) -> RecordSettings:
    """One window a forward pass: a window meets the same ops in a shard as in one pass, so
    the stores can be compared to the bit (batched, kernels may round differently)."""
    return RecordSettings(ctx=CTX, k=K, samples=M, batch_size=1, **kw)


class SlowLoader(Loader):
    """The model with a pause in every forward pass, so a shard lasts long enough to be
    interrupted half-way."""

    def __call__(self, device: str):
        model, saes = super().__call__(device)
        model.add_hook("blocks.0.hook_resid_pre", lambda act, hook: time.sleep(0.2))
        return model, saes


# ------------------------------------------------------------------ without a cluster


def test_plan_shares_out_the_cluster():
    assert plan_workers({"CPU": 2.0}, RayOptions()) == WorkerPlan("cpu", 2, 1, {"num_cpus": 1})
    assert plan_workers({"CPU": 16.0}, RayOptions(workers=2)).threads == 8
    gpus = plan_workers({"CPU": 32.0, "GPU": 4.0}, RayOptions())
    assert (gpus.device, gpus.workers, gpus.resources["num_gpus"]) == ("cuda", 4, 1)
    assert plan_workers({"CPU": 32.0, "GPU": 4.0}, RayOptions(device="cpu")).workers == 32
    with pytest.raises(ScopeError, match=r"--workers 3 x --threads 1 needs 3 CPUs .* has 2"):
        plan_workers({"CPU": 2.0}, RayOptions(workers=3, threads=1))
    with pytest.raises(ScopeError, match=r"needs 2 GPUs but the Ray cluster has 0.*--device cpu"):
        plan_workers({"CPU": 8.0}, RayOptions(workers=2, device="cuda"))


def test_bad_input_refused_before_a_cluster_starts(tmp_path, monkeypatch):
    spec = CorpusSpec(paths=("x.txt",), ctx=CTX)
    load = Loader(model="m", saes=("s",))
    for kw, message in [
        ({"workers": 0}, "--workers 0 must be at least 1"),
        ({"shards": -2}, "--shards -2 must be at least 1"),
        ({"device": "mps"}, "--device mps with --ray: use cuda or cpu"),
    ]:
        with pytest.raises(ScopeError, match=message):
            RayOptions(**kw)
    with pytest.raises(ScopeError, match="--shard does not go with --ray"):
        record_on_ray(load, spec, tmp_path / "s", RecordSettings(shard=(1, 4)))
    monkeypatch.setitem(sys.modules, "ray", None)  # as if Ray were not installed
    with pytest.raises(
        ScopeError, match=r"--ray needs Ray: pip install 'gemma-scope-workbench\[ray\]'"
    ):
        record_on_ray(load, spec, tmp_path / "s")
    monkeypatch.undo()
    pytest.importorskip("ray")
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("mine")
    with pytest.raises(ScopeError, match="exists and is not a store"):
        record_on_ray(load, spec, tmp_path / "mine")
    (tmp_path / "file").write_text("")
    with pytest.raises(ScopeError, match="is a file, not a folder"):
        record_on_ray(load, spec, tmp_path / "file")


def test_cli_ray_options_need_ray(tmp_path):
    from typer.testing import CliRunner

    from scope.cli import app

    result = CliRunner().invoke(
        app,
        ["record", "--model", "m", "--sae", "s", "--corpus", "c", "--store", str(tmp_path / "s"),
         "--workers", "2"],
    )  # fmt: skip
    assert result.exit_code == 2
    assert "--workers, --shards and --threads go with --ray" in result.output


# ------------------------------------------------------------------ on a local cluster


@pytest.fixture(scope="module")
def cluster() -> str:
    """A Ray cluster of this machine with 2 CPUs; its address, for drivers in other processes."""
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, include_dashboard=False, logging_level=logging.ERROR, log_to_driver=False)
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # SlowLoader, by value
    yield ray.get_runtime_context().gcs_address
    ray.shutdown()


@pytest.fixture(scope="module")
def mlp_sae_dir(tmp_path_factory, tiny_model) -> Path:
    _, cache = tiny_model.run_with_cache(
        fixtures.training_text()[4][:400], names_filter="blocks.1.hook_mlp_out"
    )
    folder = tmp_path_factory.mktemp("mlp") / "tiny-mlp" / "layer_1" / "width_64" / "average_l0_3"
    acts = cache["blocks.1.hook_mlp_out"][0, 1:]
    return fixtures.write_params(folder, fixtures.gemma_scope_params(acts, 64, seed=7)).parent


@pytest.fixture(scope="module")
def job(tmp_path_factory, tiny_dir, tiny_sae_dir, mlp_sae_dir) -> tuple[Loader, CorpusSpec]:
    """What every run here records: two SAEs (two sites) over a small real-prose corpus."""
    root = tmp_path_factory.mktemp("corpus")
    docs = [d[:300] for d in fixtures.training_text() if len(d) > 200][:12]
    (root / "c.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    load = Loader(model=str(tiny_dir), saes=(str(tiny_sae_dir), str(mlp_sae_dir)))
    return load, CorpusSpec(paths=(str(root / "c.jsonl"),), ctx=CTX)


@pytest.fixture(scope="module")
def one(tmp_path_factory, job) -> Path:
    """The same recording in one plain process (one thread, as each worker here has)."""
    load, spec = job
    model, saes = load("cpu")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        store = tmp_path_factory.mktemp("one") / "store"
        record(model, saes, spec, store, settings())
    finally:
        torch.set_num_threads(threads)
    return store


def cli_args(load: Loader, spec: CorpusSpec, store: Path, address: str) -> list[str]:
    sae_args = [a for s in load.saes for a in ("--sae", s)]
    return [SCOPE, "record", "--ray", address, "--workers", "2", "--shards", "6", "--threads",
            "1", "--model", load.model, *sae_args, "--corpus", spec.paths[0], "--ctx", str(CTX),
            "--k", str(K), "--samples", str(M), "--batch-size", "1", "--store", str(store)]  # fmt: skip


@pytest.mark.slow
def test_two_workers_six_shards_equal_one_process(cluster, job, one, tmp_path):
    """`scope record --ray` as a user types it, from its own process, on the running cluster."""
    load, spec = job
    store = tmp_path / "ray"
    env = {**os.environ, "COLUMNS": "200"}
    done = subprocess.run(
        cli_args(load, spec, store, cluster), capture_output=True, text=True, timeout=600, env=env
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "6 shards recorded by 2 workers" in done.stdout
    rows = [line for line in done.stdout.splitlines() if "│ cpu" in line]
    assert len(rows) == 2 and all(int(r.split("│")[5]) >= 1 for r in rows)  # both recorded
    assert "6/6 shards merged" in done.stderr  # the progress line, without a terminal
    manifest = read_manifest(store)
    assert manifest.state == "complete" and manifest.sharded.merged == list(range(6))
    assert_identical(one, store)


@pytest.mark.slow
def test_worker_killed_mid_shard_is_retried(cluster, job, one, tmp_path):
    load, spec = job
    store = tmp_path / "ray"
    killed: list[int] = []
    snapshots: set[int] = set()

    def on_progress(p) -> None:
        if 0 < p.shards_done < p.shards:  # readable, and consistent, while the run goes on
            s = Store(store)
            tokens = dict(s.sql("select sae, tokens from saes").fetchall())
            l0 = dict(s.sql("select sae, sum(count) from l0 group by sae").fetchall())
            assert tokens == l0 and s.manifest.state == "recording"
            snapshots.add(len(s.manifest.sharded.merged))
        for r in p.running.values():
            if not killed and r.total and 0 < r.tokens < r.total:
                os.kill(r.pid, signal.SIGKILL)
                killed.append(r.shard)

    summary = record_on_ray(
        SlowLoader(model=load.model, saes=load.saes),
        spec,
        store,
        settings(checkpoint_seconds=0.0),  # a snapshot after every shard
        RayOptions(workers=2, shards=6, threads=1),
        on_progress=on_progress,
    )
    assert killed, "no shard was caught half-way: the test did not test anything"
    assert sum(w.restarts for w in summary.workers) == 1
    assert summary.shards_recorded == 6 and len(snapshots) >= 2
    assert_identical(one, store)


DRIVER = """
import sys, time
from scope.corpus import CorpusSpec
from scope.record import RecordSettings
from scope.record.distributed import RayOptions, record_on_ray
from scope.record.shard_worker import Loader

class SlowLoader(Loader):
    def __call__(self, device):
        model, saes = super().__call__(device)
        model.add_hook("blocks.0.hook_resid_pre", lambda act, hook: time.sleep(0.2))
        return model, saes

address, store, corpus, model, *saes = sys.argv[1:]
record_on_ray(SlowLoader(model=model, saes=tuple(saes)), CorpusSpec(paths=(corpus,), ctx={ctx}),
              store, RecordSettings(ctx={ctx}, k={k}, samples={m}, batch_size=1,
                                    checkpoint_seconds=0.0),
              RayOptions(address=address, workers=2, shards=6, threads=1))
"""


@pytest.mark.slow
def test_driver_killed_and_resumed_finishes_identical(cluster, job, one, tmp_path):
    load, spec = job
    store = tmp_path / "ray"
    script = tmp_path / "driver.py"
    script.write_text(textwrap.dedent(DRIVER.format(ctx=CTX, k=K, m=M)))
    args = [sys.executable, str(script), cluster, str(store), spec.paths[0], load.model]
    driver = subprocess.Popen([*args, *load.saes], stderr=subprocess.PIPE, text=True)
    deadline, merged = time.time() + 300, []
    while time.time() < deadline and driver.poll() is None:
        m = read_manifest(store) if (store / "manifest.json").is_file() else None
        merged = m.sharded.merged if m is not None else []
        if len(merged) >= 2:
            break
        time.sleep(0.05)
    assert driver.poll() is None, driver.stderr.read()[-3000:] if driver.stderr else ""
    driver.send_signal(signal.SIGKILL)
    driver.wait()
    before = read_manifest(store)
    assert before.state == "recording" and 2 <= len(before.sharded.merged) < 6
    assert Store(store).sql("select count(*) from features").fetchone()[0] > 0  # readable
    summary = record_on_ray(
        load, spec, store, settings(), RayOptions(workers=2, threads=1), resume=True
    )
    assert summary.shards == 6
    assert summary.shards_recorded == 6 - len(before.sharded.merged)  # only the others ran
    assert_identical(one, store)
    again = record_on_ray(load, spec, store, settings(), RayOptions(), resume=True)
    assert again.record.already_recorded and again.shards_recorded == 0


@pytest.mark.slow
def test_worker_error_is_the_local_one_line_error(cluster, job, tmp_path):
    load, spec = job
    misfit = tmp_path / "big-res" / "layer_1" / "width_8" / "average_l0_1"
    fixtures.write_params(
        misfit,
        {"W_enc": np.ones((2304, 8), np.float32), "W_dec": np.ones((8, 2304), np.float32),
         "b_enc": np.zeros(8, np.float32), "b_dec": np.zeros(2304, np.float32),
         "threshold": np.ones(8, np.float32)},
    )  # fmt: skip
    bad = Loader(model=load.model, saes=(str(misfit),))
    store = tmp_path / "ray"
    done = subprocess.run(
        cli_args(bad, spec, store, cluster), capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "expects d_in 2304" in lines[0]
    assert "Traceback" not in done.stderr and "RayTaskError" not in done.stderr
    assert not store.exists()  # refused before anything was written
