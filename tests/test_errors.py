"""Every bad input gets a ScopeError that names the input and the fix."""

from __future__ import annotations

import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest

from scope import ScopeError, check_fit, load_sae
from scope import testing as fixtures


def good_params(d_in: int = 64, d_sae: int = 32) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {
        "W_enc": rng.standard_normal((d_in, d_sae), dtype=np.float32),
        "W_dec": rng.standard_normal((d_sae, d_in), dtype=np.float32),
        "b_enc": np.zeros(d_sae, np.float32),
        "b_dec": np.zeros(d_in, np.float32),
        "threshold": np.full(d_sae, 0.5, np.float32),
    }


def sae_folder(root: Path, layer: int = 2, site: str = "res") -> Path:
    folder = root / f"tiny-scope-{site}" / f"layer_{layer}" / "width_32" / "average_l0_5"
    folder.mkdir(parents=True)
    return folder


def test_d_in_mismatch(tiny_model, tmp_path):
    folder = sae_folder(tmp_path)
    fixtures.write_params(folder, good_params(d_in=2304))
    sae = load_sae(folder, device="cpu")
    with pytest.raises(
        ScopeError,
        match=r"expects d_in 2304 at blocks.2.hook_resid_post but "
        r"tiny-gemma2 has d_model 64.*pick an SAE trained",
    ):
        check_fit(tiny_model, sae)


def test_layer_not_in_model(tiny_model, tmp_path):
    folder = sae_folder(tmp_path, layer=9)
    fixtures.write_params(folder, good_params())
    with pytest.raises(ScopeError, match=r"layer 9 is not in tiny-gemma2 \(layers 0-3\)"):
        check_fit(tiny_model, load_sae(folder, device="cpu"))


def test_hook_not_in_model(tiny_model, tmp_path):
    folder = sae_folder(tmp_path)
    fixtures.write_params(folder, good_params())
    sae = load_sae(folder, device="cpu", hook="blocks.2.hook_resid_typo")
    with pytest.raises(
        ScopeError,
        match=r"hook blocks.2.hook_resid_typo is not in tiny-gemma2; "
        r"close: .*blocks.2.hook_resid_",
    ):
        check_fit(tiny_model, sae)


def test_hook_unknown_for_bare_folder(tmp_path):
    fixtures.write_params(tmp_path / "mysae", good_params())
    with pytest.raises(ScopeError, match="cannot tell which hook.*pass hook="):
        load_sae(tmp_path / "mysae", device="cpu")


def test_unknown_release_suggests(saes_root):
    with pytest.raises(
        ScopeError,
        match=r"'gemma-scope-2b-pt-res-canonicl'.*Close names: "
        r"gemma-scope-2b-pt-res-canonical",
    ):
        load_sae("gemma-scope-2b-pt-res-canonicl", "layer_20/width_16k/canonical")


def test_unknown_id_shows_nearest(saes_root):
    with pytest.raises(
        ScopeError,
        match=r"'layer_20/width_16k/canonicl' is not in release.*"
        r"Nearest ids: layer_20/width_16k/canonical",
    ):
        load_sae("gemma-scope-2b-pt-res-canonical", "layer_20/width_16k/canonicl")
    with pytest.raises(ScopeError, match=r"Nearest ids: layer_20/width_16k/average_l0_"):
        load_sae("gemma-scope-2b-pt-res", "layer_20/width_16k/average_l0_7")


def test_unknown_id_in_local_release(saes_root):
    fixtures.write_params(sae_folder(saes_root), good_params())
    with pytest.raises(ScopeError, match=r"Nearest ids: layer_2/width_32/average_l0_5"):
        load_sae("tiny-scope-res", "layer_2/width_32/average_l0_6")
    sae = load_sae("tiny-scope-res", "layer_2/width_32/average_l0_5", device="cpu")
    assert sae.cfg.d_sae == 32


def test_release_not_local_and_hub_unreachable(saes_root):
    with pytest.raises(
        ScopeError,
        match=r"could not get google/gemma-scope-2b-pt-res/layer_3/"
        r".*put the file at .*saes/gemma-scope-2b-pt-res/layer_3",
    ):
        load_sae("gemma-scope-2b-pt-res-canonical", "layer_3/width_16k/canonical")


def test_missing_params(tmp_path):
    folder = sae_folder(tmp_path)
    (folder / "notes.txt").write_text("x")
    with pytest.raises(ScopeError, match="holds neither params.npz.*found notes.txt"):
        load_sae(folder, device="cpu")


def write(folder: Path, **arrays) -> Path:
    np.savez(folder / "params.npz", **arrays)
    return folder


@pytest.mark.parametrize(
    "case,pattern",
    [
        ("truncated", r"truncated or corrupt.*download it again"),
        ("garbage", r"not an .npz archive"),
        ("pickle_file", r"is a Python pickle.*never unpickles"),
        ("object_array", r"pickled object arrays.*never unpickles"),
        ("missing_key", r"lacks threshold.*holds W_enc, W_dec, b_enc, b_dec, threshold"),
        (
            "transposed",
            r"W_dec has shape \[64, 32\] but W_enc is \[64, 32\], so W_dec must be \[32, 64\]",
        ),
        ("nan", r"W_dec has 1 non-finite values"),
        ("inf_threshold", r"threshold has 1 non-finite values"),
        ("int_dtype", r"b_enc has dtype int64, expected floats"),
    ],
)
def test_bad_params_npz(tmp_path, case, pattern):
    folder = sae_folder(tmp_path)
    p = good_params()
    if case == "truncated":
        write(folder, **p)
        data = (folder / "params.npz").read_bytes()
        (folder / "params.npz").write_bytes(data[: len(data) // 2])
    elif case == "garbage":
        (folder / "params.npz").write_bytes(b"<html>rate limited</html>")
    elif case == "pickle_file":
        (folder / "params.npz").write_bytes(pickle.dumps(p))
    elif case == "object_array":
        write(folder, **{**p, "threshold": np.array([object()] * 32, dtype=object)})
    elif case == "missing_key":
        write(folder, **{k: v for k, v in p.items() if k != "threshold"})
    elif case == "transposed":
        write(folder, **{**p, "W_dec": p["W_dec"].T})
    elif case == "nan":
        p["W_dec"][3, 5] = np.nan
        write(folder, **p)
    elif case == "inf_threshold":
        p["threshold"][7] = np.inf
        write(folder, **p)
    elif case == "int_dtype":
        write(folder, **{**p, "b_enc": np.zeros(32, dtype=np.int64)})
    with pytest.raises(ScopeError, match=pattern):
        load_sae(folder, device="cpu")


def test_wrong_width_in_release_folder(saes_root, tmp_path):
    """A params.npz whose shape does not match the release (wrong model or width) is refused."""
    dest = saes_root / "gemma-scope-2b-pt-res" / "layer_1" / "width_16k" / "average_l0_102"
    dest.mkdir(parents=True)
    write(dest, **good_params(d_in=2304, d_sae=32))
    with pytest.raises(ScopeError, match=r"W_enc is \[2304, 32\] but the folder's width is 16384"):
        load_sae("gemma-scope-2b-pt-res-canonical", "layer_1/width_16k/canonical")
    shutil.rmtree(dest)
    dest.mkdir(parents=True)
    write(dest, **good_params(d_in=64, d_sae=16384))
    with pytest.raises(ScopeError, match=r"expects d_in 2304: the file belongs to another model"):
        load_sae("gemma-scope-2b-pt-res-canonical", "layer_1/width_16k/canonical")


def test_pickled_sae_lens_folder_refused(tmp_path):
    (tmp_path / "cfg.json").write_text("{}")
    (tmp_path / "sae_weights.pt").write_bytes(pickle.dumps({}))
    with pytest.raises(ScopeError, match=r"sae_weights.pt: pickled weights are refused"):
        load_sae(tmp_path, device="cpu")


def test_nonfinite_sae_lens_folder_refused(tiny_sae_dir, tmp_path):
    import torch

    sae = load_sae(tiny_sae_dir, device="cpu")
    with torch.no_grad():
        sae.W_dec[0, 0] = float("nan")
    sae.save_model(tmp_path / "saved")
    with pytest.raises(ScopeError, match=r"W_dec has 1 non-finite values"):
        load_sae(tmp_path / "saved", device="cpu")


def test_missing_folder_and_release_without_id(tmp_path):
    with pytest.raises(ScopeError, match="does not exist"):
        load_sae(str(tmp_path / "nope" / "x"))
    with pytest.raises(ScopeError, match="needs an SAE id, e.g. 'layer_0/width_16k/canonical'"):
        load_sae("gemma-scope-2b-pt-res-canonical")


@pytest.mark.parametrize(
    "cfg",
    [
        {"hook_name": "blocks.1.hook_mlp_out"},  # older sae-lens cfg.json
        {"architecture": "jumprelu", "metadata": {"hook_name": "blocks.1.hook_mlp_out"}},
    ],
)
def test_hook_read_from_cfg_json_beside_params(tmp_path, cfg):
    """A folder with params.npz and a sae-lens cfg.json: the hook comes from the cfg."""
    import json

    from scope import sae_info

    fixtures.write_params(tmp_path / "mysae", good_params())
    (tmp_path / "mysae" / "cfg.json").write_text(json.dumps(cfg))
    sae = load_sae(tmp_path / "mysae", device="cpu")
    assert sae_info(sae).hook_name == "blocks.1.hook_mlp_out" and sae_info(sae).site == "mlp"
    (tmp_path / "mysae" / "cfg.json").write_text("{not json")
    with pytest.raises(ScopeError, match=r"cfg.json is not valid JSON"):
        load_sae(tmp_path / "mysae", device="cpu")
