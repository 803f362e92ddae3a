"""Does an SAE fit a model, and which SAEs fit it: hook widths, sae-lens' registry, saes/."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TYPE_CHECKING

from scope.errors import ScopeError, closest
from scope.identity import SITE_HOOKS, hook_site, sae_info
from scope.sae import infer_hook, sae_registry, saes_dir

if TYPE_CHECKING:
    from sae_lens import SAE, HookedSAETransformer


def hook_size(model: HookedSAETransformer, hook_name: str) -> int:
    """Width an SAE must have (d_in) to read ``hook_name`` of ``model``."""
    cfg = model.cfg
    if hook_name not in model.hook_dict:
        layer, _ = hook_site(hook_name)
        if layer is not None and not 0 <= layer < cfg.n_layers:
            raise ScopeError(
                f"hook {hook_name}: layer {layer} is not in {cfg.model_name} "
                f"(layers 0-{cfg.n_layers - 1}): pick an SAE for one of its layers"
            )
        near = closest(hook_name, list(model.hook_dict), n=3)
        raise ScopeError(f"hook {hook_name} is not in {cfg.model_name}; close: {', '.join(near)}")
    if hook_name.endswith("hook_z"):
        return cfg.n_heads * cfg.d_head
    if "mlp.hook_pre" in hook_name or "mlp.hook_post" in hook_name:
        return cfg.d_mlp
    return cfg.d_model


def check_fit(model: HookedSAETransformer, sae: SAE) -> None:
    """Raise a ScopeError unless ``sae`` reads a hook of ``model`` with the right width."""
    info = sae_info(sae)
    size = hook_size(model, info.hook_name)
    if size != info.d_in:
        what = "n_heads x d_head" if info.site == "att" else "d_model"
        raise ScopeError(
            f"SAE {info.release or info.source} {info.sae_id or ''} expects d_in {info.d_in} at "
            f"{info.hook_name} but {model.cfg.model_name} has {what} {size} there: pick an SAE "
            "trained on this model"
        )
    if info.hook_out != info.hook_name:  # a transcoder: its output must fit where it writes
        size_out, d_out = hook_size(model, info.hook_out), int(sae.W_dec.shape[-1])
        if size_out != d_out:
            raise ScopeError(
                f"transcoder {info.release or info.source} {info.sae_id or ''} writes d_out "
                f"{d_out} to {info.hook_out} but {model.cfg.model_name} has {size_out} there: "
                "pick a transcoder trained on this model"
            )


@dataclass(frozen=True, kw_only=True)
class SAEListing:
    """One SAE that fits a model: where to get it and what it reads."""

    release: str
    sae_id: str
    hook_name: str | None
    neuronpedia_id: str | None
    local: bool
    """True when its weights are already under saes/."""


def list_saes(model: HookedSAETransformer | str) -> list[SAEListing]:
    """SAEs that fit ``model`` (a loaded model, or a hub name): sae-lens' registry entries
    for its name, and, for a loaded model, saes/ entries whose width fits one of its hooks."""
    from scope.params import npz_shapes

    name = model.split("/")[-1] if isinstance(model, str) else model.cfg.model_name
    names = {name, f"google/{name}"}
    rows: list[SAEListing] = []
    root = saes_dir()
    for release, lookup in sae_registry().items():
        if lookup.model not in names:
            continue
        site = re.search(r"-(res|mlp|att)\b", release)
        for sae_id, folder in lookup.saes_map.items():
            layer = re.search(r"layer_(\d+)", sae_id)
            hook = (
                SITE_HOOKS[site.group(1)].format(layer=layer.group(1)) if site and layer else None
            )
            rows.append(
                SAEListing(
                    release=release,
                    sae_id=sae_id,
                    hook_name=hook,
                    neuronpedia_id=lookup.neuronpedia_id.get(sae_id),
                    local=(root / lookup.repo_id.split("/")[-1] / folder / "params.npz").is_file(),
                )
            )
    registry_repos = {lookup.repo_id.split("/")[-1] for lookup in sae_registry().values()}
    if root.is_dir() and not isinstance(model, str):
        for params in sorted(root.rglob("params.npz")):
            release = params.relative_to(root).parts[0]
            if release in registry_repos:
                continue  # listed above under its registry release
            hook = infer_hook(params.parent)
            shapes = npz_shapes(params)
            d_in = shapes.get("W_enc", (0,))[0]
            try:
                fits = hook is not None and hook_size(model, hook) == d_in
            except ScopeError:
                fits = False
            if fits:
                rows.append(
                    SAEListing(
                        release=release,
                        sae_id=str(params.parent.relative_to(root / release)),
                        hook_name=hook,
                        neuronpedia_id=None,
                        local=True,
                    )
                )
    return rows


__all__ = ["SAEListing", "check_fit", "hook_size", "list_saes"]
