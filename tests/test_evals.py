"""Each evaluation metric equals a brute-force computation, window by window, with sae-lens'
own encode and decode; an SAE that reconstructs its site exactly costs nothing."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from scope import load_sae
from scope import testing as fixtures
from scope.cli import app
from scope.corpus import CorpusSpec, build_windows
from scope.evals import evaluate

CTX = 20


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    path = tmp_path_factory.mktemp("corpus") / "c.jsonl"
    docs = [d[:250] for d in fixtures.training_text() if len(d) > 250][:6]
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    return path


def brute_force(model, sae, windows):
    """Per window: sae-lens encode/decode at the hook, spliced and zeroed forwards, float64."""
    hook = str(sae.cfg.metadata.hook_name)
    special = set(model.tokenizer.all_special_ids)
    xs, recons, l0s, fired = [], [], [], np.zeros(sae.cfg.d_sae, np.int64)
    ce = {"clean": [], "sae": [], "zero": []}
    kl = {"sae": [], "zero": []}
    for w in range(len(windows)):
        tokens = torch.tensor(windows.tokens[w, : windows.lengths[w]], dtype=torch.long)[None]
        counted = torch.tensor([t not in special for t in tokens[0].tolist()])
        with torch.no_grad():
            logits, cache = model.run_with_cache(tokens, names_filter=hook)
            x = cache[hook][0]
            codes = sae.encode(x)
            recon = sae.decode(codes)
            runs = {"clean": logits[0]}
            for name, fill in (("sae", recon), ("zero", torch.zeros_like(recon))):

                def put(act, hook, fill=fill, counted=counted):
                    act[0, counted] = fill[counted].reshape(act[0, counted].shape)
                    return act

                runs[name] = model.run_with_hooks(tokens, fwd_hooks=[(hook, put)])[0]
        flat = lambda t: t.reshape(t.shape[0], -1)  # noqa: E731  (hook_z heads flattened)
        xs.append(flat(x)[counted].double().numpy())
        recons.append(flat(recon)[counted].double().numpy())
        on = (codes[counted] > 0).numpy().reshape(int(counted.sum()), -1)
        l0s += list(on.sum(-1))
        fired += on.sum(0)
        clean_lp = torch.log_softmax(runs["clean"].double(), -1)
        for t in range(tokens.shape[1] - 1):
            if not (counted[t] and counted[t + 1]):
                continue
            target = int(tokens[0, t + 1])
            for name in ce:
                ce[name].append(-float(torch.log_softmax(runs[name][t].double(), -1)[target]))
            for name in kl:
                lp = torch.log_softmax(runs[name][t].double(), -1)
                kl[name].append(float((clean_lp[t].exp() * (clean_lp[t] - lp)).sum()))
    x, r = np.concatenate(xs), np.concatenate(recons)
    fvu = ((x - r) ** 2).sum() / ((x - x.mean(0)) ** 2).sum()
    cos = ((x * r).sum(-1) / np.linalg.norm(x, axis=-1) / np.linalg.norm(r, axis=-1)).mean()
    c, s, z = (np.mean(ce[k]) for k in ("clean", "sae", "zero"))
    return {
        "l0": np.mean(l0s), "fvu": fvu, "cossim": cos, "ce_loss_without_sae": c,
        "ce_loss_with_sae": s, "ce_loss_with_ablation": z, "ce_loss_score": (z - s) / (z - c),
        "kl_div_with_sae": np.mean(kl["sae"]), "kl_div_with_ablation": np.mean(kl["zero"]),
        "dead": int((fired == 0).sum()), "dense": int((fired > 0.1 * len(l0s)).sum()),
        "tokens": len(l0s), "predictions": len(ce["clean"]),
    }  # fmt: skip


def test_metrics_equal_brute_force(tiny_model, tiny_sae_dir, corpus, tmp_path):
    res = load_sae(tiny_sae_dir, device="cpu")
    _, cache = tiny_model.run_with_cache(fixtures.training_text()[3][:300],
                                         names_filter="blocks.1.attn.hook_z")  # fmt: skip
    att_dir = tmp_path / "t-att" / "layer_1" / "width_64" / "average_l0_5"
    fixtures.write_params(
        att_dir, fixtures.gemma_scope_params(cache["blocks.1.attn.hook_z"][0, 1:].flatten(-2), 64)
    )
    att = load_sae(att_dir, device="cpu")
    spec = CorpusSpec(paths=(str(corpus),), ctx=CTX, max_tokens=300)
    report = evaluate(tiny_model, [res, att], spec, batch_size=3)
    windows = build_windows(spec, tiny_model.tokenizer)
    assert [r.sae for r in report.rows] == ["L2.res.256", "L1.att.64"]
    for row, sae in zip(report.rows, [res, att], strict=True):
        want = brute_force(tiny_model, sae, windows)
        assert (row.tokens, row.predictions, row.dead, row.dense) == (
            want["tokens"], want["predictions"], want["dead"], want["dense"])  # fmt: skip
        assert row.dead + row.dense > 0 or row.l0 > 0
        for name in ("l0", "fvu", "cossim", "ce_loss_without_sae", "ce_loss_with_sae",
                     "ce_loss_with_ablation", "ce_loss_score", "kl_div_with_sae", "kl_div_with_ablation"):  # fmt: skip
            assert getattr(row, name) == pytest.approx(want[name], rel=1e-4, abs=1e-6), name
        assert row.delta_loss == pytest.approx(row.ce_loss_with_sae - row.ce_loss_without_sae)
        assert row.kl_div_with_sae > 0 and row.ce_loss_with_ablation != row.ce_loss_without_sae


def test_an_exact_sae_costs_nothing(tiny_model, corpus, tmp_path):
    """W_enc = [I, -I], W_dec = [I; -I], no biases, threshold 0: relu(x) - relu(-x) = x."""
    d = tiny_model.cfg.d_model
    eye = np.eye(d, dtype=np.float32)
    folder = tmp_path / "id-res" / "layer_2" / "width_128" / "average_l0_64"
    fixtures.write_params(folder, {
        "W_enc": np.concatenate([eye, -eye], 1), "W_dec": np.concatenate([eye, -eye], 0),
        "b_enc": np.zeros(2 * d, np.float32), "b_dec": np.zeros(d, np.float32),
        "threshold": np.zeros(2 * d, np.float32)})  # fmt: skip
    report = evaluate(tiny_model, [load_sae(folder, device="cpu")],
                      CorpusSpec(paths=(str(corpus),), ctx=CTX, max_tokens=200))  # fmt: skip
    (row,) = report.rows
    assert row.fvu == pytest.approx(0, abs=1e-10) and row.cossim == pytest.approx(1, abs=1e-6)
    assert row.delta_loss == pytest.approx(0, abs=1e-5) and row.kl_div_with_sae == pytest.approx(
        0, abs=1e-5
    )
    assert row.ce_loss_score == pytest.approx(1, abs=1e-5) and row.kl_div_score == pytest.approx(
        1, abs=1e-5
    )
    assert row.l0 == pytest.approx(d, abs=1)  # one of each +/- pair fires (both off at 0)


def test_a_zero_sae_costs_what_zero_ablation_costs(tiny_model, corpus, tmp_path):
    d = tiny_model.cfg.d_model
    folder = tmp_path / "zero-res" / "layer_2" / "width_32" / "average_l0_0"
    fixtures.write_params(folder, {
        "W_enc": np.zeros((d, 32), np.float32), "W_dec": np.zeros((32, d), np.float32),
        "b_enc": np.zeros(32, np.float32), "b_dec": np.zeros(d, np.float32),
        "threshold": np.ones(32, np.float32)})  # fmt: skip
    report = evaluate(tiny_model, [load_sae(folder, device="cpu")],
                      CorpusSpec(paths=(str(corpus),), ctx=CTX, max_tokens=200))  # fmt: skip
    (row,) = report.rows
    assert row.ce_loss_with_sae == pytest.approx(row.ce_loss_with_ablation, abs=1e-9)
    assert row.ce_loss_score == pytest.approx(0, abs=1e-9) and row.fvu > 1 - 1e-9
    assert (row.l0, row.dead, row.dense) == (0, 32, 0)


def test_eval_command_saves_to_the_store(tiny_dir, tiny_sae_dir, tiny_model, corpus, tmp_path):
    from scope.record import RecordSettings, record
    from scope.store import Store

    sae = load_sae(tiny_sae_dir, device="cpu")
    record(tiny_model, [sae], CorpusSpec(paths=(str(corpus),), max_tokens=200), tmp_path / "s",
           RecordSettings(ctx=CTX))  # fmt: skip
    result = CliRunner().invoke(app, [
        "eval", "--model", str(tiny_dir), "--sae", str(tiny_sae_dir), "--corpus", str(corpus),
        "--tokens", "200", "--ctx", str(CTX), "--store", str(tmp_path / "s"),
        "--plot", str(tmp_path / "e.html")], env={"COLUMNS": "200"})  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "L2.res.256" in result.stdout and "recovered" in result.stdout
    rows = Store(tmp_path / "s").sql("select sae, sha256, fvu, corpus from evals").fetchall()
    assert len(rows) == 1 and rows[0][0] == "L2.res.256" and rows[0][2] > 0
    assert (tmp_path / "e.html").stat().st_size > 1000
    again = CliRunner().invoke(app, ["eval", "--model", str(tiny_dir), "--sae", str(tiny_sae_dir),
                                     "--corpus", str(corpus), "--tokens", "200", "--ctx", str(CTX),
                                     "--store", str(tmp_path / "s")])  # fmt: skip
    assert again.exit_code == 0, again.output
    assert Store(tmp_path / "s").sql("select count(*) from evals").fetchone() == (1,)  # replaced
