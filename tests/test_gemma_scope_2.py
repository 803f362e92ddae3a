"""Gemma Scope 2 (Gemma 3's SAEs and transcoders) by name, offline: files in the release's own
layout (params.safetensors + config.json), built at test time for a tiny Gemma 3, load as
sae-lens' gemma_3 loader loads them, record as sae-lens' hooks encode them, and are listed by
`scope saes` with site, width and L0."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import huggingface_hub
import numpy as np
import pytest
import torch
from reference import assert_store_matches, reference
from typer.testing import CliRunner

from scope import ScopeError, load_sae, sae_info
from scope import testing as fixtures
from scope.cli import app
from scope.corpus import CorpusSpec, build_windows
from scope.fit import list_saes
from scope.identity import sae_keys
from scope.sae import sae_registry
from scope.store import Store

REPO = "google/gemma-scope-2-270m-pt"
LAYER = 5  # in the registry's 270m releases (layers 5, 9, 12, 15) and in the tiny model (0-5)
WIDTH = 16384
RES = ("gemma-scope-2-270m-pt-res", "layer_5_width_16k_l0_medium")
RES_SMALL = ("gemma-scope-2-270m-pt-res", "layer_5_width_16k_l0_small")
ATT = ("gemma-scope-2-270m-pt-att", "layer_5_width_16k_l0_medium")
MLP = ("gemma-scope-2-270m-pt-mlp", "layer_5_width_16k_l0_medium")
TC = ("gemma-scope-2-270m-pt-transcoders-all", "layer_5_width_16k_l0_small")
TC_AFFINE = ("gemma-scope-2-270m-pt-transcoders-all", "layer_5_width_16k_l0_small_affine")
ALL = [RES, RES_SMALL, ATT, MLP, TC, TC_AFFINE]
NEURONPEDIA = "gemma-3-270m/5-gemmascope-2-res-16k"
CTX, K, M, TOKENS = 24, 4, 3, 800

runner = CliRunner()
loaders = pytest.importorskip("sae_lens.loading.pretrained_sae_loaders")


def folder_of(release: str, sae_id: str) -> str:
    return sae_registry()[release].saes_map[sae_id]


@pytest.fixture(scope="module")
def gemma3_dir(tmp_path_factory) -> Path:
    """A tiny Gemma 3 saved under the demo model's folder name, so the registry knows it."""
    return fixtures.build_gemma3(tmp_path_factory.mktemp("g3") / "gemma-3-270m")


@pytest.fixture(scope="module")
def gemma3(gemma3_dir):
    from scope import load_model

    return load_model(gemma3_dir, device="cpu")


@pytest.fixture(scope="module")
def files(tmp_path_factory, gemma3) -> dict[tuple[str, str], Path]:
    """(release, id) -> the folder holding its params.safetensors and config.json, in Gemma
    Scope 2's layout, each SAE calibrated on the activation its hook reads."""
    text = " ".join(fixtures.training_text()[:6])[:2000]
    hooks = {
        "res": f"blocks.{LAYER}.hook_resid_post",
        "att": f"blocks.{LAYER}.attn.hook_z",
        "mlp": f"blocks.{LAYER}.hook_mlp_out",
        "tc": f"blocks.{LAYER}.ln2.hook_out",  # the MLP's input, which transcoders read
    }
    _, cache = gemma3.run_with_cache(text, names_filter=lambda n: n in hooks.values())
    acts = {site: cache[h][0, 1:].flatten(1) for site, h in hooks.items()}
    root = tmp_path_factory.mktemp("gs2files")
    out = {}
    for seed, (release, sae_id) in enumerate(ALL):
        kind = release.removesuffix("-all").split("-")[-1]
        site = "tc" if kind == "transcoders" else kind
        folder = folder_of(release, sae_id)
        rate = 0.001 if "small" in sae_id else 0.002
        params = fixtures.gemma_scope_params(acts[site], WIDTH, firing_rate=rate, seed=seed)
        d = acts[site].shape[1]
        skip = (
            np.random.default_rng(seed).normal(0, 0.1, (d, d)).astype(np.float32)
            if "affine" in sae_id
            else None
        )
        config = loaders._infer_gemma_3_raw_cfg_dict(REPO, folder)  # the release's keys
        fixtures.write_gemma_scope_2(root / folder, params, config, skip=skip)
        out[(release, sae_id)] = root / folder
    return out


@pytest.fixture(scope="module")
def hf_home(tmp_path_factory, files) -> Path:
    """A Hugging Face cache as a download of the release repo leaves it."""
    home = tmp_path_factory.mktemp("hf")
    seeded = {}
    for (release, sae_id), folder in files.items():
        for name in ("params.safetensors", "config.json"):
            seeded[f"{folder_of(release, sae_id)}/{name}"] = folder / name
    fixtures.seed_hf_cache(home, REPO, seeded)
    return home


def _no_range_requests(repo_id: str, filename: str) -> dict:
    raise AssertionError(f"asked the hub for the header of {repo_id}/{filename}")


def _local_shapes(repo_id: str, filename: str) -> dict[str, list[int]]:
    """sae-lens' header lookup, answered from the cache instead of HTTP range requests."""
    from safetensors import safe_open

    path = huggingface_hub.hf_hub_download(repo_id, filename, local_files_only=True)
    with safe_open(path, framework="pt") as f:
        return {k: list(f.get_slice(k).get_shape()) for k in f.keys()}  # noqa: SIM118


@pytest.fixture
def offline_cache(monkeypatch, hf_home, tmp_path) -> Path:
    """The seeded cache as the hub cache, no local mirror, and sae-lens' range requests
    forbidden: loading must read the files alone."""
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(hf_home / "hub"))
    monkeypatch.setenv("SCOPE_SAES_DIR", str(tmp_path / "no-mirror"))
    monkeypatch.setattr(loaders, "get_safetensors_tensor_shapes", _no_range_requests)
    return hf_home


def sae_lens_loaded(monkeypatch, release: str, sae_id: str):
    """The SAE as sae-lens' own gemma_3 loader builds it (its header lookup served locally)."""
    from sae_lens import SAE

    with monkeypatch.context() as m:
        m.setattr(loaders, "get_safetensors_tensor_shapes", _local_shapes)
        return SAE.from_pretrained(release, sae_id, device="cpu")


@pytest.mark.parametrize("which", ALL, ids=lambda w: f"{w[0]}/{w[1]}")
def test_converter_equals_sae_lens_gemma_3_loader(offline_cache, monkeypatch, files, which):
    from scope.gemma_scope_2 import gemma_scope_2_converter

    release, sae_id = which
    args = dict(
        repo_id=REPO,
        folder_name=folder_of(release, sae_id),
        device="cpu",
        force_download=False,
        cfg_overrides={"device": "cpu", "dtype": "float32"},
    )
    cfg, state, _ = gemma_scope_2_converter(release, sae_id)(**args)
    with monkeypatch.context() as m:
        m.setattr(loaders, "get_safetensors_tensor_shapes", _local_shapes)
        their_cfg, their_state, _ = loaders.gemma_3_sae_huggingface_loader(**args)
    if which == ATT:  # a key we set otherwise: see test_att_reads_hook_z_heads_flattened
        assert (cfg.pop("reshape_activations"), their_cfg.pop("reshape_activations")) == (
            "hook_z",
            "none",
        )
    if "transcoders" in release:  # and the input hook: see test_transcoders_read_the_mlps_input
        assert (cfg.pop("hook_name"), their_cfg.pop("hook_name")) == (
            f"blocks.{LAYER}.ln2.hook_out",
            f"blocks.{LAYER}.hook_mlp_in",
        )
    assert cfg == their_cfg
    assert sorted(state) == sorted(their_state)
    for key in state:
        assert state[key].dtype == their_state[key].dtype == torch.float32
        assert torch.equal(state[key], their_state[key]), key
    # and both are the file's arrays under sae-lens' names
    from safetensors.numpy import load_file

    raw = load_file(files[which] / "params.safetensors")
    assert np.array_equal(state["W_enc"].numpy(), raw["w_enc"])
    assert np.array_equal(state["threshold"].numpy(), raw["threshold"])
    assert ("W_skip" in state) == ("affine" in sae_id)
    if "affine" in sae_id:
        assert np.array_equal(state["W_skip"].numpy(), raw["affine_skip_connection"].T)
        assert cfg["architecture"] == "jumprelu_skip_transcoder"
    expected_hook = {"res": "hook_resid_post", "att": "attn.hook_z", "mlp": "hook_mlp_out"}
    site = release.removesuffix("-all").split("-")[-1]
    if site != "transcoders":
        assert cfg["hook_name"] == f"blocks.{LAYER}." + expected_hook[site]
    assert cfg["model_name"] == "google/gemma-3-270m" and cfg["d_sae"] == WIDTH


def test_load_sae_offline_equals_sae_lens(offline_cache, monkeypatch, gemma3):
    """load_sae("RELEASE/ID") with HF_HUB_OFFLINE: the cache only, no range request, and the
    same SAE (weights, codes, Neuronpedia id) as sae-lens' from_pretrained."""
    ours = load_sae("/".join(RES), device="cpu")
    theirs = sae_lens_loaded(monkeypatch, *RES)
    info = sae_info(ours)
    assert info.source == f"hub:{REPO}/{folder_of(*RES)}"
    assert (info.release, info.sae_id, info.neuronpedia_id) == (*RES, NEURONPEDIA)
    assert (info.key, info.hook_name, info.d_in, info.d_sae) == (
        "L5.res.16k",
        "blocks.5.hook_resid_post",
        64,
        WIDTH,
    )
    assert ours.state_dict().keys() == theirs.state_dict().keys()
    for key, value in ours.state_dict().items():
        assert torch.equal(value, theirs.state_dict()[key]), key
    _, cache = gemma3.run_with_cache("A short text to encode.", names_filter=info.hook_name)
    x = cache[info.hook_name][0]
    assert torch.equal(ours.encode(x), theirs.encode(x))
    assert (ours.encode(x) > 0).any()


def test_att_reads_hook_z_heads_flattened(offline_cache, monkeypatch, gemma3, files):
    """sae-lens' Gemma 3 config leaves reshape_activations "none" for attn.hook_z, so its SAE
    fails on the hook's [batch, pos, heads, d_head]; ours flattens the heads as Gemma Scope 1's
    att SAEs do, and its codes are the JumpReLU of the flattened z."""
    ours = load_sae(*ATT, device="cpu")
    text = "Attention reads every earlier token."
    _, cache = gemma3.run_with_cache_with_saes(text, saes=[ours])
    got = cache["blocks.5.attn.hook_z.hook_sae_acts_post"][0].double()
    _, plain = gemma3.run_with_cache(text, names_filter="blocks.5.attn.hook_z")
    z = plain["blocks.5.attn.hook_z"][0].flatten(1).double()
    p = {k: v.double() for k, v in ours.state_dict().items()}
    pre = z @ p["W_enc"] + p["b_enc"]
    expected = torch.where(pre > p["threshold"], pre, 0.0)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert ((got > 0) == (expected > 0)).all() and (got > 0).any()
    theirs = sae_lens_loaded(monkeypatch, *ATT)
    with pytest.raises(RuntimeError, match="size of tensor"):
        gemma3.run_with_cache_with_saes(text, saes=[theirs])


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("gs2corpus") / "docs.jsonl"
    docs = [d for d in fixtures.training_text() if len(d) > 200][:20]
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    return path


def record_args(model: Path, corpus: Path, store: Path, *saes: tuple[str, str]) -> list[str]:
    args = ["record", "--model", str(model), "--corpus", str(corpus), "--store", str(store)]
    for release, sae_id in saes:
        args += ["--sae", f"{release}/{sae_id}"]
    return args + ["--ctx", str(CTX), "--k", str(K), "--samples", str(M), "--tokens",
                   str(TOKENS), "--batch-size", "4", "--device", "cpu"]  # fmt: skip


@pytest.fixture(scope="module")
def res_reference(gemma3, corpus, hf_home):
    """What sae-lens' own SAE gives through run_with_cache_with_saes, window by window."""
    monkeypatch = pytest.MonkeyPatch()
    try:
        monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(hf_home / "hub"))
        theirs = sae_lens_loaded(monkeypatch, *RES)
    finally:
        monkeypatch.undo()
    windows = build_windows(CorpusSpec(paths=(str(corpus),), ctx=CTX, max_tokens=TOKENS),
                            gemma3.tokenizer)  # fmt: skip
    ref = reference(gemma3, theirs, windows, K, M)
    assert ref.count.sum() > 1000 and (ref.count > 0).sum() > 1000  # the check is not vacuous
    return ref


@pytest.mark.slow
def test_record_offline_from_hub_cache_equals_sae_lens(
    tmp_path, gemma3_dir, corpus, hf_home, res_reference
):
    """`scope record --sae gemma-scope-2-...` in a fresh process with HF_HUB_OFFLINE=1, the hub
    unreachable and only the pre-filled cache: the store equals sae-lens' reference."""
    store = tmp_path / "store"
    env = {
        **os.environ,
        "HF_HOME": str(hf_home),
        "HF_HUB_OFFLINE": "1",
        "HF_ENDPOINT": "http://127.0.0.1:9",  # nothing listens there: any request fails
        "SCOPE_SAES_DIR": str(tmp_path / "no-mirror"),
    }
    env.pop("HF_HUB_CACHE", None)
    result = subprocess.run(
        [sys.executable, "-m", "scope.cli", *record_args(gemma3_dir, corpus, store, RES)],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    opened = Store(store)
    assert list(opened.saes) == ["L5.res.16k"]
    ident = opened.saes["L5.res.16k"]
    assert ident.source == f"hub:{REPO}/{folder_of(*RES)}"
    assert (ident.release, ident.sae_id, ident.neuronpedia_id) == (*RES, NEURONPEDIA)
    assert_store_matches(opened, "L5.res.16k", res_reference)


def test_record_from_saes_mirror_equals_sae_lens(
    tmp_path, monkeypatch, gemma3_dir, corpus, files, res_reference
):
    """The same SAE from saes/<repo name>/<folder>/ with no cache at all: the same store."""
    mirror = tmp_path / "saes" / "gemma-scope-2-270m-pt" / folder_of(*RES)
    mirror.mkdir(parents=True)
    for name in ("params.safetensors", "config.json"):
        (mirror / name).symlink_to(files[RES] / name)
    monkeypatch.setenv("SCOPE_SAES_DIR", str(tmp_path / "saes"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "empty"))
    monkeypatch.setattr(loaders, "get_safetensors_tensor_shapes", _no_range_requests)
    store = tmp_path / "store"
    result = runner.invoke(app, record_args(gemma3_dir, corpus, store, RES))
    assert result.exit_code == 0, result.output
    opened = Store(store)
    assert opened.saes["L5.res.16k"].source == str(mirror / "params.safetensors")
    assert_store_matches(opened, "L5.res.16k", res_reference)


def test_l0_variants_get_short_order_independent_keys(offline_cache):
    saes = [load_sae(*w, device="cpu") for w in (RES, RES_SMALL, TC, TC_AFFINE)]
    infos = [sae_info(s) for s in saes]
    keys = sae_keys(infos)
    assert keys[:2] == ["L5.res.16k.l0_medium", "L5.res.16k.l0_small"]
    assert keys[2].endswith(".16k.l0_small") and keys[3].endswith(".16k.l0_small_affine")
    assert sae_keys(infos[::-1]) == keys[::-1]


def test_scope_saes_lists_gemma_scope_2(tmp_path, monkeypatch, files):
    mirror = tmp_path / "saes" / "gemma-scope-2-270m-pt" / folder_of(*RES)
    mirror.mkdir(parents=True)
    (mirror / "params.safetensors").symlink_to(files[RES] / "params.safetensors")
    monkeypatch.setenv("SCOPE_SAES_DIR", str(tmp_path / "saes"))
    registry = {r: lk for r, lk in sae_registry().items() if lk.model == "google/gemma-3-270m"}
    assert len(registry) == 8  # res, mlp, att, transcoders, each with its -all release

    def listed(*extra: str) -> list[dict[str, str]]:
        args = ["saes", "--model", "google/gemma-3-270m", "--format", "tsv", *extra]
        result = runner.invoke(app, args)
        assert result.exit_code == 0, result.output
        head, *lines = result.output.rstrip("\n").splitlines()
        return [dict(zip(head.split("\t"), line.split("\t"), strict=True)) for line in lines]

    rows = listed()
    assert len(rows) == sum(len(lk.saes_map) for lk in registry.values())
    assert {r["release"] for r in rows} == set(registry)
    by_id = {(r["release"], r["id"]): r for r in rows}
    assert by_id[RES] == {
        "release": RES[0], "id": RES[1], "site": "res", "width": "16k", "l0": "l0_medium",
        "hook": "blocks.5.hook_resid_post", "neuronpedia": NEURONPEDIA, "local": "yes", "served": "yes",
    }  # fmt: skip
    assert [r for r in rows if r["local"]] == [by_id[RES]]
    assert by_id[TC_AFFINE]["site"] == "tc" and by_id[TC_AFFINE]["l0"] == "l0_small_affine"
    assert by_id[TC_AFFINE]["hook"] == "blocks.5.ln2.hook_out"
    assert by_id[ATT]["hook"] == "blocks.5.attn.hook_z"
    assert by_id[("gemma-scope-2-270m-pt-res", "layer_9_width_1m_l0_big")]["width"] == "1m"
    # filters as for Gemma Scope 1
    tc = listed("--layer", "9", "--site", "tc", "--width", "16k")
    expected = {
        (r, i)
        for r, lk in registry.items()
        if "transcoders" in r
        for i in lk.saes_map
        if "layer_9_width_16k_" in i
    }
    assert {(r["release"], r["id"]) for r in tc} == expected and len(expected) == 5
    res = listed("--layer", "5", "--site", "res", "--width", "16k")
    assert sorted((r["release"], r["l0"]) for r in res) == [
        ("gemma-scope-2-270m-pt-res", "l0_big"),
        ("gemma-scope-2-270m-pt-res", "l0_medium"),
        ("gemma-scope-2-270m-pt-res", "l0_small"),
        ("gemma-scope-2-270m-pt-res-all", "l0_big"),
        ("gemma-scope-2-270m-pt-res-all", "l0_small"),
    ]
    bad = runner.invoke(app, ["saes", "--model", "google/gemma-3-270m", "--site", "tx"])
    assert bad.exit_code == 2 and "res, mlp, att, tc" in bad.output


@pytest.mark.parametrize(
    "model", ["google/gemma-3-1b-pt", "google/gemma-3-4b-it", "google/gemma-3-12b-pt",
              "google/gemma-3-27b-pt", "google/gemma-3-270m-it"],
)  # fmt: skip
def test_every_gemma_3_size_lists_its_releases(model):
    rows = list_saes(model)
    releases = {r for r, lk in sae_registry().items() if lk.model == model}
    assert {r.release for r in rows} >= {r for r in releases if r.startswith("gemma-scope-2-")}
    scope2 = [r for r in rows if r.release.startswith("gemma-scope-2-")]
    assert scope2 and all(
        r.site in {"res", "mlp", "att", "tc"} and r.width and r.l0 and r.hook_name
        and r.layer is not None for r in scope2
    )  # fmt: skip


def test_loads_without_config_json_as_sae_lens_infers(tmp_path, monkeypatch, files):
    """A mirror with params.safetensors alone: the config sae-lens infers from the names."""
    mirror = tmp_path / "saes" / "gemma-scope-2-270m-pt" / folder_of(*TC_AFFINE)
    mirror.mkdir(parents=True)
    (mirror / "params.safetensors").symlink_to(files[TC_AFFINE] / "params.safetensors")
    monkeypatch.setenv("SCOPE_SAES_DIR", str(tmp_path / "saes"))
    sae = load_sae(*TC_AFFINE, device="cpu")
    assert type(sae).__name__ == "JumpReLUSkipTranscoder"
    assert sae.cfg.metadata.hf_hook_name == f"model.layers.{LAYER}.pre_feedforward_layernorm.output"


def _damage(folder: Path, kind: str) -> str:
    """Write a damaged release folder; return what the error must say."""
    rng = np.random.default_rng(0)
    good = {
        "w_enc": rng.normal(size=(64, WIDTH)).astype(np.float32),
        "w_dec": rng.normal(size=(WIDTH, 64)).astype(np.float32),
        "b_enc": np.zeros(WIDTH, np.float32),
        "b_dec": np.zeros(64, np.float32),
        "threshold": np.ones(WIDTH, np.float32),
    }
    config = loaders._infer_gemma_3_raw_cfg_dict(REPO, folder_of(*RES))
    weights = folder / "params.safetensors"
    match kind:
        case "truncated":
            fixtures.write_gemma_scope_2(folder, good, config)
            weights.write_bytes(weights.read_bytes()[:-100])
            return "is truncated"
        case "html":
            fixtures.write_gemma_scope_2(folder, good, config)
            weights.write_text("<html>502 Bad Gateway</html>")
            return "not a safetensors file"
        case "pickle":
            fixtures.write_gemma_scope_2(folder, good, config)
            torch.save({k: torch.from_numpy(v) for k, v in good.items()}, weights)
            return "never unpickles"
        case "missing":
            partial = {k: v for k, v in good.items() if k != "threshold"}
            fixtures.write_gemma_scope_2(folder, partial, config)
            return "lacks threshold"
        case "misshapen":
            short = {**good, "b_enc": np.zeros(WIDTH - 1, np.float32)}
            fixtures.write_gemma_scope_2(folder, short, config)
            return "b_enc has shape"
        case "nan":
            bad = good["w_dec"].copy()
            bad[3, 5] = np.nan
            fixtures.write_gemma_scope_2(folder, {**good, "w_dec": bad}, config)
            return "w_dec has 1 non-finite"
        case "width":
            small = {
                "w_enc": good["w_enc"][:, :1024],
                "w_dec": good["w_dec"][:1024],
                "b_enc": good["b_enc"][:1024],
                "b_dec": good["b_dec"],
                "threshold": good["threshold"][:1024],
            }
            fixtures.write_gemma_scope_2(folder, small, config)
            return "names width 16384"
        case "ints":
            fixtures.write_gemma_scope_2(folder, good, config)
            from safetensors.numpy import save_file

            save_file({**good, "threshold": np.ones(WIDTH, np.int32)}, weights)
            return "threshold has dtype I32"
        case "config":
            fixtures.write_gemma_scope_2(folder, good, config)
            (folder / "config.json").write_text("{not json")
            return "is not valid JSON"
        case "architecture":
            fixtures.write_gemma_scope_2(folder, good, {**config, "architecture": "topk"})
            return "names architecture 'topk'"
    raise AssertionError(kind)


@pytest.mark.parametrize(
    "kind",
    ["truncated", "html", "pickle", "missing", "misshapen", "nan", "width", "ints", "config",
     "architecture"],
)  # fmt: skip
def test_damaged_files_are_refused(tmp_path, monkeypatch, kind):
    folder = tmp_path / "saes" / "gemma-scope-2-270m-pt" / folder_of(*RES)
    expected = _damage(folder, kind)
    monkeypatch.setenv("SCOPE_SAES_DIR", str(tmp_path / "saes"))
    with pytest.raises(ScopeError, match=expected) as err:
        load_sae(*RES, device="cpu")
    assert "\n" not in str(err.value) and str(folder) in str(err.value)


def test_damaged_file_refused_by_record_before_anything(tmp_path, monkeypatch, gemma3_dir, corpus):
    _damage(tmp_path / "saes" / "gemma-scope-2-270m-pt" / folder_of(*RES), "nan")
    monkeypatch.setenv("SCOPE_SAES_DIR", str(tmp_path / "saes"))
    result = runner.invoke(app, record_args(gemma3_dir, corpus, tmp_path / "store", RES))
    assert result.exit_code == 2 and "non-finite" in result.output
    assert not (tmp_path / "store").exists()


def test_id_widths_are_the_releases_powers_of_two():
    """16k, 65k, 262k and 1m name 2**14, 2**16, 2**18 and 2**20 features, as sae-lens' Gemma
    Scope width table has them; a file of another width is refused (test above)."""
    from scope.gemma_scope_2 import id_width

    widths = {
        id_width(sae_id)
        for lookup in sae_registry().values()
        if lookup.conversion_func == "gemma_3"
        for sae_id in lookup.saes_map
    }
    assert widths == {1 << 14, 1 << 16, 1 << 18, 1 << 20}
    assert id_width("layer_1/width_131k/canonical") == 131072 and id_width("width_1000") == 1000
    assert id_width("layer_9") is None


def test_transcoders_read_the_mlps_input(offline_cache, gemma3_dir, gemma3):
    """Gemma Scope 2's config names the transcoder's input ``pre_feedforward_layernorm.output``.
    sae-lens maps it to ``hook_mlp_in``, which transformer-lens takes before the RMSNorm; the
    workbench reads ``ln2.hook_out``, the norm's output: equal to Hugging Face's, unlike both
    transformer-lens hooks sae-lens could name."""
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(gemma3_dir, dtype=torch.float32).eval()
    seen = {}
    norm = hf.model.layers[LAYER].pre_feedforward_layernorm
    handle = norm.register_forward_hook(lambda m, i, o: seen.setdefault("x", o.detach()))
    tokens = gemma3.to_tokens("The MLP reads the norm's output.")
    with torch.no_grad():
        hf(tokens)
    handle.remove()
    names = [f"blocks.{LAYER}.ln2.hook_out", f"blocks.{LAYER}.hook_mlp_in",
             f"blocks.{LAYER}.ln2.hook_normalized"]  # fmt: skip
    gemma3.set_use_hook_mlp_in(True)
    _, cache = gemma3.run_with_cache(tokens, names_filter=lambda n: n in names)
    torch.testing.assert_close(cache[names[0]], seen["x"], rtol=1e-4, atol=1e-4)
    for other in names[1:]:
        assert (cache[other] - seen["x"]).abs().max() > 0.1, other
    sae = load_sae(*TC_AFFINE, device="cpu")
    assert sae_info(sae).hook_name == names[0] and sae_info(sae).key.startswith("L5.tc.")
