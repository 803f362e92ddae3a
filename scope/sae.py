"""Load SAEs and transcoders: Gemma Scope 1 and 2 by release and id (through sae-lens), a local
params.npz in Gemma Scope's layout, or a folder that sae-lens saved (any architecture
``scope.codec`` serves exactly; the rest are refused at load). Sites map to hooks; fits are
checked.

Lookup order for a release and id: ``saes/<repo>/<folder>/params.npz`` (Gemma Scope 1) or
``params.safetensors`` + ``config.json`` (Gemma Scope 2; see ``scope.gemma_scope_2``), in the
release's own folder structure so an air-gapped machine uses the same names, then the Hugging
Face hub or its local cache. Either way the SAE is built by ``sae_lens.SAE.from_pretrained``,
which keeps the release's config and Neuronpedia id; only the reading of the files is ours, so
a corrupt, truncated, pickled or non-finite file gets a clear error.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from scope.codec import REFUSED_RELEASES, prepare
from scope.errors import ScopeError, closest
from scope.identity import (
    MLP_INPUT,
    SITE_HOOKS,
    ModelIdentity,
    SAEInfo,
    hook_site,
    recorded_key,
    sae_info,
    sae_key,
    sae_keys,
    sae_sha256,
    weights_sha256,
    width_label,
)
from scope.params import GEMMA_SCOPE_KEYS, read_params_npz, refuse_unsafe_weights

if TYPE_CHECKING:
    from sae_lens import SAE

    from scope.store import Store


def saes_dir() -> Path:
    """The local SAE library: $SCOPE_SAES_DIR, else ./saes, else the checkout's saes/."""
    if env := os.environ.get("SCOPE_SAES_DIR"):
        return Path(env).expanduser()
    here = Path.cwd() / "saes"
    return here if here.is_dir() else Path(__file__).resolve().parent.parent / "saes"


def sae_registry() -> dict[str, Any]:
    from sae_lens.loading.pretrained_saes_directory import get_pretrained_saes_directory

    return get_pretrained_saes_directory()


def _unknown_release(release: str) -> ScopeError:
    local = [p.name for p in saes_dir().iterdir() if p.is_dir()] if saes_dir().is_dir() else []
    names = list(sae_registry()) + local
    near = closest(release, names)
    hint = f" Close names: {', '.join(near)}." if near else ""
    return ScopeError(
        f"SAE release {release!r} is not in sae-lens' registry, not a folder under "
        f"{saes_dir()}, and not a path.{hint} See `scope saes --model <model>` for what fits."
    )


def _unknown_id(release: str, sae_id: str, ids: list[str]) -> ScopeError:
    near = closest(sae_id, ids, n=6)
    return ScopeError(
        f"SAE id {sae_id!r} is not in release {release!r} ({len(ids)} ids). "
        f"Nearest ids: {', '.join(near) if near else ', '.join(ids[:6])}"
    )


def _gemma_scope_converter(release: str, sae_id: str) -> Any:
    """A sae-lens converter reading params.npz from saes/ if there, else from the hub/cache."""
    from sae_lens.loading.pretrained_sae_loaders import get_gemma_2_config_from_hf

    seen: dict[str, str] = {}

    def load(
        repo_id: str,
        folder_name: str,
        device: str = "cpu",
        force_download: bool = False,
        cfg_overrides: dict[str, Any] | None = None,
    ) -> tuple[dict, dict, None]:
        cfg = get_gemma_2_config_from_hf(
            repo_id, folder_name, device, force_download, cfg_overrides
        )
        local = saes_dir() / repo_id.split("/")[-1] / folder_name / "params.npz"
        if local.is_file():
            path, source = local, str(local)
        else:
            path, source = (
                _hub_download(repo_id, folder_name, force_download, local.parent),
                f"hub:{repo_id}/{folder_name}",
            )
        params = read_params_npz(
            path, d_in=cfg["d_in"], d_sae=cfg["d_sae"], what=f"{release} {sae_id}"
        )
        seen["source"] = source
        state = {k: torch.from_numpy(v).float().to(device) for k, v in params.items()}
        return cfg, state, None

    load.seen = seen  # type: ignore[attr-defined]
    return load


def _hub_download(
    repo_id: str, folder: str, force: bool, local: Path, filename: str = "params.npz"
) -> Path:
    """``folder/filename`` of ``repo_id`` from the hub, or only from its cache when offline."""
    from huggingface_hub import hf_hub_download

    from scope.model import hub_online

    try:
        return Path(
            hf_hub_download(
                repo_id=repo_id,
                filename=filename,
                subfolder=folder,
                force_download=force,
                token=os.environ.get("HF_TOKEN") or None,
                local_files_only=not hub_online(),  # offline: the cache only, no retries
            )
        )
    except Exception as err:  # hub errors come in many types; all mean "not reachable"
        raise ScopeError(
            f"could not get {repo_id}/{folder}/{filename} from the Hugging Face hub or its "
            f"cache ({type(err).__name__}). Check your connection (unset HF_HUB_OFFLINE), or "
            f"put the file at {local / filename} for offline use"
        ) from err


def _from_release(release: str, sae_id: str, device: str) -> SAE:
    from sae_lens import SAE

    registry = sae_registry()
    lookup = registry[release]
    if sae_id not in lookup.saes_map:
        raise _unknown_id(release, sae_id, list(lookup.saes_map))
    if lookup.conversion_func in REFUSED_RELEASES:  # before anything is downloaded
        raise ScopeError(
            f"SAE release {release!r} is not supported: {REFUSED_RELEASES[lookup.conversion_func]}"
        )
    if lookup.conversion_func in ("gemma_2", "gemma_3"):  # Gemma Scope 1 and 2: local first
        from scope.gemma_scope_2 import gemma_scope_2_converter

        make = (
            _gemma_scope_converter
            if lookup.conversion_func == "gemma_2"
            else gemma_scope_2_converter
        )
        converter = make(release, sae_id)
        sae = SAE.from_pretrained(release, sae_id, device=device, converter=converter)
        sae.cfg.metadata["scope_source"] = converter.seen["source"]
    else:  # other releases load with sae-lens' own converter
        sae = SAE.from_pretrained(release, sae_id, device=device)
        sae.cfg.metadata["scope_source"] = f"hub:{lookup.repo_id}/{lookup.saes_map[sae_id]}"
        if lookup.conversion_func == "gemma_2_transcoder":
            # Gemma Scope's transcoders read the MLP's input; sae-lens names ln2.hook_normalized,
            # which transformer-lens takes before the norm's weight (equal only with fold_ln)
            layer, _ = hook_site(str(sae.cfg.metadata.hook_name))
            sae.cfg.metadata.hook_name = MLP_INPUT.format(layer=layer)
    sae.cfg.metadata["release"] = release
    sae.cfg.metadata["sae_id"] = sae_id
    return sae


WEIGHT_FILES = ("params.npz", "sae_weights.safetensors")
"""What an SAE folder under saes/ holds: Gemma Scope's arrays, or a sae-lens save."""


def local_ids(release: str, root: Path | None = None) -> list[str]:
    """The ids of a release in the local SAE library (``root``, default ``saes_dir()``): its
    folders holding Gemma Scope's params.npz or a sae-lens save, sorted."""
    folder = (root or saes_dir()) / release
    return sorted({str(p.parent.relative_to(folder)) for name in WEIGHT_FILES
                   for p in folder.rglob(name)})  # fmt: skip


def infer_hook(path: Path) -> str | None:
    text = path.as_posix()
    layer = re.search(r"layer_(\d+)", text)
    site = re.search(r"-(res|mlp|att)(?:-|/|$)", text)
    if layer and site:
        return SITE_HOOKS[site.group(1)].format(layer=layer.group(1))
    return None


def cfg_hook(folder: Path) -> str | None:
    """The hook named by a cfg.json beside the weights (sae-lens writes it top-level in older
    versions, under ``metadata`` in newer ones), or None."""
    path = folder / "cfg.json"
    if not path.is_file():
        return None
    try:
        cfg = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ScopeError(f"{path} is not valid JSON ({err}): fix or remove it") from err
    if not isinstance(cfg, dict):
        return None
    meta = cfg.get("metadata")
    hook = cfg.get("hook_name") or (meta.get("hook_name") if isinstance(meta, dict) else None)
    return str(hook) if hook else None


def check_hook_name(hook: str) -> None:
    """An SAE reads a block's hook (``blocks.L.<name>``); anything else is a typo."""
    layer, site = hook_site(hook)
    if layer is None:
        raise ScopeError(
            f"--hook {hook!r} is not a hook inside a block: give blocks.L.hook_resid_post "
            "(res), blocks.L.hook_mlp_out (mlp) or blocks.L.attn.hook_z (att), with L the layer"
        )


def _from_folder(path: Path, device: str, hook_name: str | None, label: str) -> SAE:
    from sae_lens import SAE

    if (path / "params.npz").is_file():
        hook = hook_name or cfg_hook(path) or infer_hook(path)
        if hook is not None:
            check_hook_name(hook)
        if hook is None:
            raise ScopeError(
                f"cannot tell which hook the SAE in {path} reads: pass hook= (--hook), e.g. "
                "blocks.12.hook_resid_post, put a cfg.json with hook_name beside params.npz, or "
                "keep it under <release>-res/layer_12/... as Gemma Scope does"
            )

        def converter(
            p: str, device: str = "cpu", cfg_overrides: dict[str, Any] | None = None
        ) -> tuple[dict, dict]:
            params = read_params_npz(Path(p) / "params.npz", what=label)
            d_in, d_sae = params["W_enc"].shape
            cfg = {
                "architecture": "jumprelu",
                "d_in": d_in,
                "d_sae": d_sae,
                "dtype": "float32",
                "device": device,
                "hook_name": hook,
                "apply_b_dec_to_input": False,
                "normalize_activations": "none",
                "reshape_activations": "hook_z" if hook.endswith("hook_z") else "none",
            }
            state = {k: torch.from_numpy(v).float() for k, v in params.items()}
            return cfg, state

        sae = SAE.load_from_disk(path, device=device, converter=converter)
    elif (path / "cfg.json").is_file():
        refuse_unsafe_weights(path)
        sae = SAE.load_from_disk(path, device=device)
        if hook_name and hook_name != sae.cfg.metadata.hook_name:
            check_hook_name(hook_name)
            if sae.cfg.metadata.hook_name_out:
                raise ScopeError(
                    f"--hook {hook_name} given for the transcoder in {path}: --hook moves an "
                    "SAE's one hook, but a transcoder reads one hook and writes another; set "
                    "hook_name and hook_name_out in its cfg.json instead"
                )
            sae.cfg.metadata.hook_name = hook_name
    else:
        found = ", ".join(sorted(p.name for p in path.iterdir())[:8]) or "nothing"
        raise ScopeError(
            f"{path} holds neither params.npz (Gemma Scope layout) nor cfg.json + "
            f"sae_weights.safetensors (a sae-lens save); found {found}"
        )
    sae.cfg.metadata["scope_source"] = str(path.resolve())  # the app loads it from any folder
    return sae


def load_sae(
    release_or_path: str | os.PathLike[str],
    sae_id: str | None = None,
    *,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
    hook: str | None = None,
    fold_dec_norm: bool = False,
) -> SAE:
    """Load an SAE (or transcoder) as a sae-lens ``SAE``, its codec chosen (``scope.codec``).

    - ``load_sae("gemma-scope-2b-pt-res-canonical", "layer_20/width_16k/canonical")``: a release
      and id from sae-lens' registry; params.npz is read from ``saes/`` first, else the hub.
    - ``load_sae("path/to/folder")``: a folder with params.npz (Gemma Scope layout; the hook is
      read from the path, or pass ``hook=``) or a sae-lens save (cfg.json + safetensors).
    - ``load_sae("my-release", "layer_6/width_4k/average_l0_50")``: ``saes/my-release/<id>``.
    - ``load_sae("gemma-scope-2b-pt-res-canonical/layer_20/width_16k/canonical")``: release and
      id in one string, as ``--sae`` takes them.
    - ``load_sae("gemma-scope-2-270m-pt-res/layer_9_width_16k_l0_medium")``: Gemma Scope 2 (every
      Gemma 3 size); params.safetensors + config.json from ``saes/`` first, else the hub.

    Weights take ``dtype`` (default: fp32 on the CPU, bf16 on a GPU); thresholds stay fp32 so
    which features fire does not change with the dtype. ``fold_dec_norm=True`` folds the
    decoder rows' norms into the encoder (sae-lens' ``fold_W_dec_norm``): codes then measure
    each feature's write in units of its unit-norm direction, as Neuronpedia shows them; the
    SAE's sha256 is then that of the folded weights.
    """
    from scope.model import resolve_device, resolve_dtype

    dev = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, dev)
    target = str(release_or_path)
    path = Path(target).expanduser()
    if sae_id is None and not path.is_dir() and "/" in target:
        release, _, rest = target.partition("/")
        named = bool(release) and not release.startswith((".", "~"))  # not a path
        if named and (release in sae_registry() or (saes_dir() / release).is_dir()):
            target, sae_id = release, rest  # "RELEASE/ID" in one string, as the CLI takes it
        elif named and not Path(release).expanduser().exists():
            raise _unknown_release(release)
    if path.is_dir():
        full = path / sae_id if sae_id else path
        if not full.is_dir():
            raise ScopeError(f"SAE folder {full} does not exist: check the id")
        sae = _from_folder(full, str(dev), hook, label=str(full))
    elif target in sae_registry():
        if sae_id is None:
            ids = list(sae_registry()[target].saes_map)
            raise ScopeError(f"release {target!r} needs an SAE id, e.g. {ids[0]!r}")
        sae = _from_release(target, sae_id, str(dev))
    elif (saes_dir() / target).is_dir():
        local = saes_dir() / target / (sae_id or "")
        if not local.is_dir():
            raise _unknown_id(target, sae_id or "", local_ids(target))
        sae = _from_folder(local, str(dev), hook, label=f"{target} {sae_id}")
        sae.cfg.metadata["release"], sae.cfg.metadata["sae_id"] = target, sae_id
    elif "/" in target or target.startswith("."):
        raise ScopeError(f"SAE folder {target} does not exist: check the path")
    else:
        raise _unknown_release(target)
    _check_finite(sae, target)
    if fold_dec_norm:
        _fold(sae, target)
    sae.cfg.metadata["scope_sha256"] = weights_sha256(sae.state_dict())  # before any cast
    prepare(sae, torch_dtype)  # the codec (or a refusal), then the dtype
    sae.eval()
    return sae


def load_recorded_sae(
    info: SAEInfo,
    *,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
) -> SAE:
    """Load the SAE a store recorded, from its identity (``Store.saes[key]``): by release and id
    when it has them, else from the folder it was read from. Refuses weights that changed since
    the recording (their sha256 differs), which would make the store's features lie."""
    where = info.source
    fold = info.folded
    if info.release and info.sae_id:
        sae = load_sae(info.release, info.sae_id, device=device, dtype=dtype, fold_dec_norm=fold)
    elif where and not where.startswith("hub:") and Path(where).is_dir():
        sae = load_sae(where, device=device, dtype=dtype, hook=info.hook_name, fold_dec_norm=fold)
    else:
        raise ScopeError(
            f"the SAE {info.key} was recorded from {where or 'an unknown place'}, which "
            "is not there now: put its params.npz back there (or under saes/)"
        )
    sha = sae.cfg.metadata["scope_sha256"]
    if sha != info.sha256:
        raise ScopeError(
            f"the SAE at {where or info.release} is not the one recorded as "
            f"{info.key}: its weights changed (sha256 {sha[:12]} vs "
            f"{info.sha256[:12]}); record again or restore the weights"
        )
    return sae


def open_recorded(
    store: Store, model: str | None = None, *, device: str | None = None
) -> tuple[Any, dict[str, SAE]]:
    """The model and SAEs a store recorded (``model`` overrides the manifest's name), checked:
    a model whose weights differ from the recorded one, or changed SAE weights, are refused.
    Gives (model, store key -> SAE)."""
    from scope.model import load_model

    recorded = store.manifest.model
    loaded = load_model(model or recorded.name, device=device)
    if ModelIdentity.of(loaded, like=recorded).fingerprint != recorded.fingerprint:
        raise ScopeError(
            f"{model or recorded.name} is not the model {store.root} was recorded with "
            f"({recorded.name}): its weights differ; name that one with --model"
        )
    dev = str(next(loaded.parameters()).device)
    return loaded, {key: load_recorded_sae(info, device=dev) for key, info in store.saes.items()}


def _fold(sae: SAE, label: str) -> None:
    try:
        sae.fold_W_dec_norm()
    except NotImplementedError as err:  # sae-lens refuses where folding would change codes
        raise ScopeError(f"SAE {label}: decoder norms cannot be folded ({err})") from err
    sae.cfg.metadata["scope_folded"] = True


def _check_finite(sae: SAE, label: str) -> None:
    for name, param in sae.named_parameters():
        bad = (~torch.isfinite(param)).sum().item()
        if bad:
            raise ScopeError(
                f"SAE {label}: {name} has {bad} non-finite values (NaN or inf); "
                "the file is damaged: download or export it again"
            )


__all__ = [
    "GEMMA_SCOPE_KEYS",
    "SAEInfo",
    "hook_site",
    "load_recorded_sae",
    "local_ids",
    "open_recorded",
    "load_sae",
    "recorded_key",
    "sae_info",
    "sae_key",
    "sae_keys",
    "sae_sha256",
    "saes_dir",
    "weights_sha256",
    "width_label",
]
