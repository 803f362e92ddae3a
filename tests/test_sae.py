"""SAEs load through every route and encode exactly as Gemma Scope's JumpReLU."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import PROMPT

from scope import check_fit, list_saes, load_sae, sae_info
from scope import testing as fixtures
from scope.identity import hook_site

RELEASE, SAE_ID = "gemma-scope-2b-pt-res-canonical", "layer_1/width_16k/canonical"
FOLDER = "layer_1/width_16k/average_l0_102"  # what the registry maps SAE_ID to
NEURONPEDIA = "gemma-2-2b/1-gemmascope-res-16k"


def brute_jumprelu(x: np.ndarray, p: dict[str, np.ndarray]) -> np.ndarray:
    """Gemma Scope's encoder in float64: relu(pre) where pre > threshold, strictly."""
    pre = x.astype(np.float64) @ p["W_enc"].astype(np.float64) + p["b_enc"]
    return np.where(pre > p["threshold"], pre, 0.0)


@pytest.fixture(scope="session")
def scope_2b_params() -> dict[str, np.ndarray]:
    """A 16k-wide SAE with gemma-2-2b's d_model, in Gemma Scope's exact layout."""
    acts = torch.randn(512, 2304, generator=torch.Generator().manual_seed(1)) * 3
    return fixtures.gemma_scope_params(acts, 16384, seed=2)


@pytest.fixture(scope="session")
def scope_2b_file(tmp_path_factory, scope_2b_params) -> Path:
    folder = tmp_path_factory.mktemp("gs") / FOLDER
    return fixtures.write_params(folder, scope_2b_params)


def test_encode_on_hooked_acts_equals_brute_force(tiny_model, tiny_sae_dir):
    sae = load_sae(tiny_sae_dir, device="cpu")
    params = dict(np.load(tiny_sae_dir / "params.npz"))
    _, cache = tiny_model.run_with_cache_with_saes(
        PROMPT, saes=[sae], names_filter=lambda n: "hook_sae_acts_post" in n or "resid_post" in n
    )
    acts = cache["blocks.2.hook_resid_post.hook_sae_acts_post"][0].double().numpy()
    _, plain = tiny_model.run_with_cache(PROMPT, names_filter="blocks.2.hook_resid_post")
    expected = brute_jumprelu(plain["blocks.2.hook_resid_post"][0].numpy(), params)
    assert (acts > 0).sum() > 0 and (acts == 0).mean() > 0.5  # sparse but alive
    np.testing.assert_allclose(acts, expected, rtol=1e-5, atol=1e-5)
    assert ((acts > 0) == (expected > 0)).all()


def test_reconstruction_and_error_term(tiny_model, tiny_sae_dir):
    sae = load_sae(tiny_sae_dir, device="cpu")
    params = dict(np.load(tiny_sae_dir / "params.npz"))
    _, cache = tiny_model.run_with_cache(PROMPT, names_filter="blocks.2.hook_resid_post")
    x = cache["blocks.2.hook_resid_post"][0]
    recon = sae.decode(sae.encode(x)).double().numpy()
    expected = brute_jumprelu(x.numpy(), params) @ params["W_dec"] + params["b_dec"]
    np.testing.assert_allclose(recon, expected, rtol=1e-4, atol=1e-4)
    assert torch.allclose(sae(x), sae.decode(sae.encode(x)))
    # spliced in with its error term, the SAE leaves the model's output unchanged
    plain = tiny_model(PROMPT)
    spliced = tiny_model.run_with_saes(PROMPT, saes=[sae], use_error_term=True)
    assert (plain - spliced).abs().max().item() < 1e-4
    without = tiny_model.run_with_saes(PROMPT, saes=[sae])
    assert (plain - without).abs().max().item() > 1e-3


def test_att_site_reads_hook_z(tiny_model, tmp_path):
    _, cache = tiny_model.run_with_cache(PROMPT, names_filter="blocks.1.attn.hook_z")
    z = cache["blocks.1.attn.hook_z"][0]  # [pos, n_heads, d_head]
    flat = z.reshape(z.shape[0], -1)
    folder = tmp_path / "tiny-scope-att" / "layer_1" / "width_128" / "average_l0_6"
    fixtures.write_params(folder, fixtures.gemma_scope_params(flat[1:], 128))
    sae = load_sae(folder, device="cpu")
    assert sae_info(sae).hook_name == "blocks.1.attn.hook_z" and sae_info(sae).site == "att"
    check_fit(tiny_model, sae)
    _, with_sae = tiny_model.run_with_cache_with_saes(PROMPT, saes=[sae])
    got = with_sae["blocks.1.attn.hook_z.hook_sae_acts_post"][0].double().numpy()
    expected = brute_jumprelu(flat.numpy(), dict(np.load(folder / "params.npz")))
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)


def test_sites_map_to_hooks():
    assert hook_site("blocks.12.hook_resid_post") == (12, "res")
    assert hook_site("blocks.3.hook_mlp_out") == (3, "mlp")
    assert hook_site("blocks.7.attn.hook_z") == (7, "att")


def test_threshold_stays_fp32_in_bf16(tiny_sae_dir, tiny_acts, tmp_path):
    sae = load_sae(tiny_sae_dir, device="cpu", dtype="bfloat16")
    assert sae.W_enc.dtype == torch.bfloat16 and sae.threshold.dtype == torch.float32
    x = tiny_acts.to(torch.bfloat16)
    pre = x @ sae.W_enc + sae.b_enc  # bf16, as the SAE computes it
    assert ((sae.encode(x) > 0) == (pre.float() > sae.threshold)).all()
    # A threshold of 0.999 rounds to 1.0 in bf16: a pre-activation of exactly 1.0 fires only
    # if the threshold is kept in fp32.
    eye = np.eye(4, dtype=np.float32)
    folder = tmp_path / "x-res" / "layer_0" / "width_4" / "average_l0_4"
    fixtures.write_params(
        folder,
        {
            "W_enc": eye,
            "W_dec": eye,
            "b_enc": np.zeros(4, np.float32),
            "b_dec": np.zeros(4, np.float32),
            "threshold": np.full(4, 0.999, np.float32),
        },
    )
    crafted = load_sae(folder, device="cpu", dtype="bfloat16")
    assert torch.bfloat16 == crafted.W_enc.dtype
    assert torch.equal(
        crafted.encode(torch.ones(1, 4, dtype=torch.bfloat16)).float(), torch.ones(1, 4)
    )


def test_local_library_release_route(saes_root, scope_2b_file, scope_2b_params):
    """saes/<repo>/<folder>/params.npz is used under the release's own names, offline."""
    dest = saes_root / "gemma-scope-2b-pt-res" / FOLDER
    dest.mkdir(parents=True)
    (dest / "params.npz").symlink_to(scope_2b_file)
    sae = load_sae(RELEASE, SAE_ID, device="cpu")
    info = sae_info(sae)
    assert info.source == str(dest / "params.npz")
    assert (info.release, info.sae_id, info.neuronpedia_id) == (RELEASE, SAE_ID, NEURONPEDIA)
    assert (info.hook_name, info.d_in, info.d_sae, info.key) == (
        "blocks.1.hook_resid_post",
        2304,
        16384,
        "L1.res.16k",
    )
    assert sae.cfg.apply_b_dec_to_input is False
    x = torch.randn(8, 2304, generator=torch.Generator().manual_seed(3)) * 3
    np.testing.assert_allclose(
        sae.encode(x).double().numpy(),
        brute_jumprelu(x.numpy(), scope_2b_params),
        rtol=1e-4,
        atol=1e-4,
    )
    listed = {(r.release, r.sae_id): r for r in list_saes("google/gemma-2-2b")}
    assert (
        listed[(RELEASE, SAE_ID)].local and listed[(RELEASE, SAE_ID)].neuronpedia_id == NEURONPEDIA
    )
    assert not listed[(RELEASE, "layer_2/width_16k/canonical")].local


def test_hf_cache_release_route_matches_sae_lens(tmp_path, scope_2b_file):
    """A pre-seeded Hugging Face cache with HF_HUB_OFFLINE=1: load_sae takes the hub route
    and gives exactly what sae-lens' own Gemma Scope loader gives; `scope info` prints it."""
    hf_home = tmp_path / "hf"
    fixtures.seed_hf_cache(
        hf_home, "google/gemma-scope-2b-pt-res", {f"{FOLDER}/params.npz": scope_2b_file}
    )
    env = {
        **os.environ,
        "HF_HOME": str(hf_home),
        "HF_HUB_OFFLINE": "1",
        "SCOPE_SAES_DIR": str(tmp_path / "empty"),
    }
    code = f"""
        import json, torch
        from sae_lens import SAE
        from scope import load_sae, sae_info
        ours = load_sae({RELEASE!r}, {SAE_ID!r}, device="cpu")
        theirs = SAE.from_pretrained({RELEASE!r}, {SAE_ID!r}, device="cpu")
        same = all(torch.equal(a, b) for a, b in zip(ours.state_dict().values(),
                                                     theirs.state_dict().values()))
        x = torch.randn(4, 2304) * 3
        print(json.dumps({{"source": sae_info(ours).source, "same": same,
                          "encode": torch.equal(ours.encode(x), theirs.encode(x)),
                          "np": ours.cfg.metadata.neuronpedia_id,
                          "keys": sorted(ours.state_dict())}}))
    """
    result = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["source"] == f"hub:google/gemma-scope-2b-pt-res/{FOLDER}"
    assert report["same"] and report["encode"] and report["np"] == NEURONPEDIA
    assert report["keys"] == ["W_dec", "W_enc", "b_dec", "b_enc", "threshold"]
    cli = subprocess.run(
        [sys.executable, "-m", "scope.cli", "info", "--sae", f"{RELEASE}/{SAE_ID}"],
        env={**env, "COLUMNS": "200"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert cli.returncode == 0, cli.stderr[-2000:]
    for text in ("blocks.1.hook_resid_post", "16384", NEURONPEDIA, "L1.res.16k"):
        assert text in cli.stdout
    # the average_l0 id of the same SAE, from the non-canonical release
    avg = subprocess.run(
        [
            sys.executable,
            "-c",
            textwrap.dedent("""
        from scope import load_sae, sae_info
        print(sae_info(load_sae("gemma-scope-2b-pt-res", "layer_1/width_16k/average_l0_102")).key)
    """),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert avg.stdout.strip().endswith("L1.res.16k"), avg.stderr[-2000:]


def test_sae_lens_saved_folder(tiny_sae_dir, tmp_path, tiny_acts):
    sae = load_sae(tiny_sae_dir, device="cpu")
    sae.save_model(tmp_path / "saved")
    again = load_sae(tmp_path / "saved", device="cpu")
    assert sae_info(again).hook_name == "blocks.2.hook_resid_post"
    assert torch.equal(again.encode(tiny_acts), sae.encode(tiny_acts))


def test_width_labels_are_gemma_scopes():
    from scope.identity import width_label

    widths = [4096, 16384, 32768, 65536, 131072, 262144, 524288, 1 << 20, 256]
    assert [width_label(w) for w in widths] == [
        "4k", "16k", "32k", "65k", "131k", "262k", "524k", "1m", "256",
    ]  # fmt: skip
