"""`scope info` and `scope saes` from the command line."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from scope import testing as fixtures
import numpy as np
import pytest
from typer.testing import CliRunner

from scope.cli import app, parse_sae_spec

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
    assert result.returncode == 0, result.stderr
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
    result = runner.invoke(
        app, ["info", "--sae", "gemma-scope-2b-pt-res-canonicl/layer_1/x"], env={"COLUMNS": "240"}
    )
    assert result.exit_code == 2
    assert "error:" in result.output and "gemma-scope-2b-pt-res-canonical" in result.output
    assert "Traceback" not in result.output
    result = runner.invoke(app, ["info"])
    assert result.exit_code == 2 and "give --model, --sae, or both" in result.output
    odd = runner.invoke(app, ["info", "--sae", "my[bold]release/layer_1"], env={"COLUMNS": "240"})
    assert odd.exit_code == 2 and "'my[bold]release'" in odd.output  # shown as typed, not as markup


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


@pytest.mark.parametrize(
    "spec,expected",
    [
        (
            "gemma-scope-2b-pt-res-canonical/layer_20/width_16k/canonical",
            ("gemma-scope-2b-pt-res-canonical", "layer_20/width_16k/canonical"),
        ),
    ],
)
def test_parse_sae_spec(spec, expected):
    assert parse_sae_spec(spec) == expected


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
