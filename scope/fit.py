"""Does an SAE fit a model, and which SAEs fit it: hook widths, sae-lens' registry, saes/."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from scope.codec import REFUSED_RELEASES
from scope.errors import ScopeError, closest
from scope.gemma_scope_2 import folder_site
from scope.identity import MLP_INPUT, SITE_HOOKS, hook_site, sae_info, width_label
from scope.sae import infer_hook, sae_registry, saes_dir

if TYPE_CHECKING:
    from sae_lens import SAE, HookedSAETransformer


def hook_size(model: HookedSAETransformer, hook_name: str) -> int:
    """Width an SAE must have (d_in) to read ``hook_name`` of ``model``."""
    cfg = model.cfg
    if hook_name not in model.hook_dict:
        if hook_name.endswith(".ln2.hook_out"):
            raise ScopeError(
                f"{cfg.model_name} has no hook {hook_name} (the MLP's input, which Gemma Scope's "
                "transcoders read): load the model with scope.load_model, which adds it"
            )
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
    site: str | None
    """res, mlp, att, or tc (a transcoder: reads the MLP's input, writes its output)."""
    layer: int | None
    width: str | None
    """As the id names it: ``16k``, ``1m``."""
    l0: str | None
    """The L0 variant the id names: ``l0_medium`` (Gemma Scope 2), ``average_l0_71`` or
    ``canonical`` (Gemma Scope)."""
    hook_name: str | None
    """The hook it reads, as sae-lens' loader for the release names it."""
    neuronpedia_id: str | None
    refused: str | None = None
    """Why the workbench refuses it (``scope.codec.REFUSED_RELEASES``), or None: served."""
    local: bool
    """True when its weights are already under saes/."""


_TC_INPUT_HOOKS = {"gemma_2_transcoder": MLP_INPUT, "gemma_3": MLP_INPUT}
"""The input hook a release's transcoders read (``scope.sae`` sets it at load)."""


def _registry_row(release: str, lookup: Any, sae_id: str, folder: str, root: Path) -> SAEListing:
    gemma_3 = lookup.conversion_func == "gemma_3"
    if gemma_3:
        site = folder_site(folder)
    elif m := re.search(r"-(res|mlp|att)\b", release):
        site = m.group(1)
    else:
        site = "tc" if "transcoder" in release else None
    m_layer = re.search(r"layer_(\d+)", sae_id)
    layer = int(m_layer.group(1)) if m_layer else None
    hook = None
    if layer is not None and site in SITE_HOOKS:
        hook = SITE_HOOKS[site].format(layer=layer)
    elif layer is not None and site == "tc" and lookup.conversion_func in _TC_INPUT_HOOKS:
        hook = _TC_INPUT_HOOKS[lookup.conversion_func].format(layer=layer)
    m_width = re.search(r"width_(\d+[km]?)(?![A-Za-z0-9])", sae_id)
    m_l0 = re.search(r"(?:^|[/_])((?:average_)?l0_\w+|canonical)$", sae_id)
    weights = "params.safetensors" if gemma_3 else "params.npz"
    return SAEListing(
        release=release,
        sae_id=sae_id,
        site=site,
        layer=layer,
        width=m_width.group(1) if m_width else None,
        l0=m_l0.group(1) if m_l0 else None,
        hook_name=hook,
        neuronpedia_id=lookup.neuronpedia_id.get(sae_id),
        refused=REFUSED_RELEASES.get(str(lookup.conversion_func)),
        local=(root / lookup.repo_id.split("/")[-1] / folder / weights).is_file(),
    )


def list_saes(model: HookedSAETransformer | str) -> list[SAEListing]:
    """SAEs that fit ``model`` (a loaded model, or a hub name): sae-lens' registry entries
    for its name (Gemma Scope 1 and 2, transcoders, and what else sae-lens knows), and, for a
    loaded model, saes/ entries whose width fits one of its hooks."""
    from scope.params import npz_shapes

    name = model.split("/")[-1] if isinstance(model, str) else model.cfg.model_name
    names = {name, f"google/{name}"}
    rows: list[SAEListing] = []
    root = saes_dir()
    for release, lookup in sae_registry().items():
        if lookup.model in names:
            rows += [
                _registry_row(release, lookup, sae_id, folder, root)
                for sae_id, folder in lookup.saes_map.items()
            ]
    registry_repos = {lookup.repo_id.split("/")[-1] for lookup in sae_registry().values()}
    if root.is_dir() and not isinstance(model, str):
        for params in sorted(root.rglob("params.npz")):
            release = params.relative_to(root).parts[0]
            if release in registry_repos:
                continue  # listed above under its registry release
            hook = infer_hook(params.parent)
            shapes = npz_shapes(params)
            d_in, d_sae = shapes.get("W_enc", (0, 0))
            try:
                fits = hook is not None and hook_size(model, hook) == d_in
            except ScopeError:
                fits = False
            if fits and hook is not None:
                sae_id = str(params.parent.relative_to(root / release))
                layer, site = hook_site(hook)
                m_l0 = re.search(r"(average_l0_\d+)", sae_id)
                rows.append(
                    SAEListing(
                        release=release,
                        sae_id=sae_id,
                        site=site,
                        layer=layer,
                        width=width_label(d_sae),
                        l0=m_l0.group(1) if m_l0 else None,
                        hook_name=hook,
                        neuronpedia_id=None,
                        local=True,
                    )
                )
    return rows


__all__ = ["SAEListing", "check_fit", "hook_size", "list_saes"]
