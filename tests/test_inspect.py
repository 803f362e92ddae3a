"""Which features fire on a text: the top features at each token equal a brute-force encode."""

from __future__ import annotations

import torch
from typer.testing import CliRunner

from scope import load_sae
from scope.cli import app
from scope.inspect import inspect

TEXT = "The river ran fast under the old stone bridge near the mill."


def test_top_features_per_token_equal_brute_force(tiny_model, tiny_sae_dir):
    sae = load_sae(tiny_sae_dir, device="cpu")
    rows = inspect(tiny_model, [sae], TEXT, top=4)
    tokens = tiny_model.to_tokens(TEXT)
    with torch.no_grad():
        _, cache = tiny_model.run_with_cache(tokens, names_filter="blocks.2.hook_resid_post")
    acts = sae.encode(cache["blocks.2.hook_resid_post"])[0]  # [pos, d_sae]
    assert [r.position for r in rows] == list(range(1, tokens.shape[1]))  # BOS hidden
    assert sum(len(r.features) for r in rows) > 0
    for r in rows:
        want = acts[r.position].topk(4)
        expected = [(int(i), float(v)) for v, i in zip(*want, strict=True) if v > 0]
        got = [(h.feature, h.act) for h in r.features]
        assert [f for f, _ in got] == [f for f, _ in expected]
        torch.testing.assert_close(torch.tensor([a for _, a in got]),
                                   torch.tensor([a for _, a in expected]), rtol=1e-5, atol=1e-5)  # fmt: skip
        assert all(h.sae == "L2.res.256" for h in r.features)
        assert r.token == tiny_model.tokenizer.decode([int(tokens[0, r.position])])


def test_inspect_from_the_command_line(tiny_dir, tiny_sae_dir, tiny_model):
    result = CliRunner().invoke(
        app, ["inspect", TEXT, "--model", str(tiny_dir), "--sae", str(tiny_sae_dir), "--top", "2"]
    )
    assert result.exit_code == 0, result.output
    lines = result.stdout.strip().splitlines()
    assert len(lines) == tiny_model.to_tokens(TEXT).shape[1] - 1  # a line per token, BOS hidden
    assert "L2.res.256/" in result.output
    assert not any("<bos>" in line for line in lines)
    empty = CliRunner().invoke(
        app, ["inspect", " ", "--model", str(tiny_dir), "--sae", str(tiny_sae_dir)]
    )
    assert empty.exit_code == 2 and "the text is empty" in empty.output
