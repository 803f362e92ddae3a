"""Gemma Scope 2 (Gemma 3's SAEs and transcoders, Dec 2025) by release and id.

sae-lens' registry names them (``gemma-scope-2-270m-pt-res``, id
``layer_9_width_16k_l0_medium``) and its ``gemma_3`` loader maps a release's
``<site>/<id>/params.safetensors`` + ``config.json`` to an SAE. That loader asks the hub for the
file's tensor shapes with HTTP range requests whatever HF_HUB_OFFLINE says, so a pre-filled
cache alone does not load offline. The converter here, given to ``SAE.from_pretrained``, reads
the shapes and the config from the local file instead, looking in ``saes/<repo name>/<folder>/``
first, then the hub or its cache; the config and weights it returns are those of sae-lens'
loader (``tests/test_gemma_scope_2.py`` compares the two).
"""

from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path
from typing import Any

import torch

from scope.errors import ScopeError
from scope.identity import MLP_INPUT
from scope.params import SKIP_KEY, read_params_safetensors

FOLDER_SITES = {"resid_post": "res", "mlp_out": "mlp", "attn_out": "att", "transcoder": "tc"}
"""A release folder's first part (``_all`` dropped) -> the workbench's site name."""


def folder_site(folder: str) -> str | None:
    """``resid_post_all/layer_3_width_16k_l0_big`` -> "res"; ``transcoder/...`` -> "tc"."""
    return FOLDER_SITES.get(folder.split("/")[0].removesuffix("_all"))


def id_width(sae_id: str) -> int | None:
    """The width an id names. Gemma Scope widths are powers of two named in round thousands
    (16k = 16384, 65k = 65536, 262k = 262144, 1m = 2**20); None for an id without one."""
    m = re.search(r"width_(\d+)([km]?)(?![A-Za-z0-9])", sae_id)
    if m is None:
        return None
    if not m.group(2):
        return int(m.group(1))
    named = int(m.group(1)) * (1000 if m.group(2) == "k" else 1000_000)
    power = 1 << round(math.log2(max(named, 1)))
    return power if abs(power - named) <= 0.05 * power else named


def gemma_scope_2_converter(release: str, sae_id: str) -> Any:
    """A sae-lens converter for a Gemma Scope 2 release: reads ``params.safetensors`` and
    ``config.json`` from saes/ if there, else from the hub or its cache (the cache only when
    offline). ``converter.seen["source"]`` says which, once it has run."""
    from scope.sae import _hub_download, saes_dir

    seen: dict[str, str] = {}

    def load(
        repo_id: str,
        folder_name: str,
        device: str = "cpu",
        force_download: bool = False,
        cfg_overrides: dict[str, Any] | None = None,
    ) -> tuple[dict[str, Any], dict[str, torch.Tensor], None]:
        if "clt" in folder_name:
            raise ScopeError(
                f"{release} {sae_id} is a cross-layer transcoder: the workbench serves "
                "SAEs and single-layer transcoders"
            )
        local = saes_dir() / repo_id.split("/")[-1] / folder_name
        if (local / "params.safetensors").is_file():
            weights, source = local / "params.safetensors", str(local / "params.safetensors")
            config = local / "config.json" if (local / "config.json").is_file() else None
        else:
            weights = _hub_download(
                repo_id, folder_name, force_download, local, filename="params.safetensors"
            )
            source = f"hub:{repo_id}/{folder_name}"
            config = _hub_config(repo_id, folder_name, force_download)
        what = f"{release} {sae_id}"
        raw = _raw_config(config, repo_id, folder_name, what)
        params = read_params_safetensors(weights, d_sae=id_width(sae_id), what=what)
        shapes = {k: tuple(v.shape) for k, v in params.items()}
        cfg = sae_lens_cfg(raw, folder_name, shapes, device, cfg_overrides)
        state = {
            "W_enc": params["w_enc"],
            "W_dec": params["w_dec"],
            "b_enc": params["b_enc"],
            "b_dec": params["b_dec"],
            "threshold": params["threshold"],
        }
        if SKIP_KEY in params:  # stored [d_in, d_out]; sae-lens' W_skip is [d_out, d_in]
            state["W_skip"] = params[SKIP_KEY].T.contiguous()
        seen["source"] = source
        return cfg, {k: v.to(device) for k, v in state.items()}, None

    load.seen = seen  # type: ignore[attr-defined]
    return load


def _hub_config(repo_id: str, folder: str, force: bool) -> Path | None:
    """The release's config.json from the hub or its cache, or None where the repo (or, offline,
    the cache) has none: sae-lens then infers the config from the folder's name."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError

    from scope.model import hub_online

    try:
        return Path(
            hf_hub_download(
                repo_id=repo_id,
                filename="config.json",
                subfolder=folder,
                force_download=force,
                token=os.environ.get("HF_TOKEN") or None,
                local_files_only=not hub_online(),
            )
        )
    except EntryNotFoundError:  # also raised offline when the cache lacks it, as in sae-lens
        return None
    except Exception as err:  # hub errors come in many types; all mean "not reachable"
        raise ScopeError(
            f"could not get {repo_id}/{folder}/config.json from the Hugging Face hub "
            f"({type(err).__name__}): check your connection, or set HF_HUB_OFFLINE=1 to use "
            "the cache"
        ) from err


def _raw_config(path: Path | None, repo_id: str, folder: str, what: str) -> dict[str, Any]:
    """The release's own config.json, or, without one, what sae-lens infers from the names."""
    from sae_lens.loading.pretrained_sae_loaders import _infer_gemma_3_raw_cfg_dict

    if path is None:
        return _infer_gemma_3_raw_cfg_dict(repo_id, folder)
    try:
        raw = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ScopeError(f"{what}: {path} is not valid JSON ({err}): download it again") from err
    if not isinstance(raw, dict) or not isinstance(raw.get("model_name"), str):
        raise ScopeError(f"{what}: {path} has no model_name: it is not a Gemma Scope 2 config")
    if raw.get("architecture") != "jump_relu":
        raise ScopeError(
            f"{what}: {path} names architecture {raw.get('architecture')!r}; Gemma Scope 2's "
            "SAEs and transcoders are jump_relu"
        )
    return raw


def sae_lens_cfg(
    raw: dict[str, Any],
    folder: str,
    shapes: dict[str, tuple[int, ...]],
    device: str | None,
    cfg_overrides: dict[str, Any] | None,
) -> dict[str, Any]:
    """sae-lens' config for a Gemma Scope 2 folder, as ``get_gemma_3_config_from_hf`` builds it
    from ``raw`` (config.json) and the weights' shapes, here read from the local file.

    One key differs: attention SAEs read ``attn.hook_z`` [batch, pos, heads, d_head] with
    ``reshape_activations="hook_z"`` (heads flattened), as sae-lens' Gemma Scope 1 configs do;
    sae-lens' Gemma 3 config says "none", and ``run_with_cache_with_saes`` then fails on the
    shape mismatch."""
    layer_match = re.search(r"layer_(\d+)", folder)
    site = folder_site(folder)
    if layer_match is None or site is None:
        raise ScopeError(f"cannot tell the layer and site of Gemma Scope 2 folder {folder!r}")
    layer = int(layer_match.group(1))
    hook_name = {
        "res": f"blocks.{layer}.hook_resid_post",
        "att": f"blocks.{layer}.attn.hook_z",
        "mlp": f"blocks.{layer}.hook_mlp_out",
        "tc": MLP_INPUT.format(layer=layer),  # the config's pre_feedforward_layernorm.output
    }[site]
    d_in, d_sae = shapes["w_enc"]
    model_name = raw["model_name"]
    if "google" not in model_name:
        model_name = "google/" + model_name
    model_name = model_name.replace("-v3", "-3")
    if "270m" in model_name:  # the hub's 270m base model has no -pt suffix
        model_name = model_name.replace("-pt", "")
    architecture = "jumprelu"
    if site == "tc":
        affine = raw.get("affine_connection", False)
        architecture = "jumprelu_skip_transcoder" if affine else "jumprelu_transcoder"
    cfg: dict[str, Any] = {
        "architecture": architecture,
        "d_in": d_in,
        "d_sae": d_sae,
        "dtype": "float32",
        "model_name": model_name,
        "hook_name": hook_name,
        "hook_head_index": None,
        "finetuning_scaling_factor": False,
        "sae_lens_training_version": None,
        "prepend_bos": True,
        "dataset_path": "monology/pile-uncopyrighted",
        "context_size": 1024,
        "apply_b_dec_to_input": False,
        "normalize_activations": "none",
        "reshape_activations": "none",
        "hf_hook_name": raw.get("hf_hook_point_in"),
    }
    if site == "att":  # sae-lens says "none", which breaks its own hooks on hook_z's 4-d input
        cfg["reshape_activations"] = "hook_z"
    if site == "tc":
        cfg["hook_name_out"] = f"blocks.{layer}.hook_mlp_out"
        cfg["hf_hook_name_out"] = raw.get("hf_hook_point_out")
        cfg["d_out"] = shapes["w_dec"][-1]
    if device is not None:
        cfg["device"] = device
    if cfg_overrides is not None:
        cfg.update(cfg_overrides)
    return cfg


__all__ = ["FOLDER_SITES", "folder_site", "gemma_scope_2_converter", "id_width", "sae_lens_cfg"]
