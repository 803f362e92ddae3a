"""Load Gemma 2 (and Gemma 3) as a HookedSAETransformer, from a hub name or a local checkpoint folder.

Every route takes the same path: read the Hugging Face config, load the Hugging Face model,
build the transformer-lens config from transformer-lens' own Gemma template with every size
read from the checkpoint's config (transformer-lens hard-codes sizes by name, so a local
checkpoint of another size would otherwise load wrongly), convert the weights with
transformer-lens' Gemma converter, and free the Hugging Face copy. No weight processing is
applied: hooks see the raw residual stream, exactly what Gemma Scope was trained on.
"""

from __future__ import annotations

import functools
import gc
import logging
import math
import os
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from scope.errors import ScopeError, closest

if TYPE_CHECKING:
    from sae_lens import HookedSAETransformer

log = logging.getLogger(__name__)

# transformer-lens template per Hugging Face model_type: architecture flags (post-norms,
# gated MLP, soft-cap style, qk-norm) come from it; every size is then read from the checkpoint.
TEMPLATES = {
    "gemma2": "google/gemma-2-2b",
    "gemma3_text": "google/gemma-3-270m",
    "gemma3": "google/gemma-3-4b-pt",
}
GEMMA2_NAMES = [
    f"google/gemma-2-{size}{suffix}" for size in ("2b", "9b", "27b") for suffix in ("", "-it")
]
# TL keeps the causal mask as an n_ctx x n_ctx buffer: cap the default so a 128k-context
# config does not allocate gigabytes. Pass n_ctx= to load_model for longer prompts.
DEFAULT_MAX_CTX = 8192


@dataclass(frozen=True, kw_only=True)
class ModelInfo:
    """What `scope info` prints about a model."""

    name: str
    """Hub name or local folder the model came from."""
    architecture: str
    n_layers: int
    d_model: int
    d_vocab: int
    n_ctx: int
    n_params: int
    dtype: str
    device: str


@functools.cache
def hub_online(timeout: float = 3.0) -> bool:
    """Whether the Hugging Face hub answers, asked once per process with one short request.
    When it does not (no network, HF_HUB_OFFLINE set), loads use the local cache only, so an
    offline machine fails in seconds with one clear error instead of retrying for half a minute."""
    from huggingface_hub import constants
    from huggingface_hub.utils import get_session

    if constants.HF_HUB_OFFLINE or os.environ.get("HF_HUB_OFFLINE", "").lower() in {
        "1",
        "true",
        "yes",
    }:
        return False
    try:
        get_session().head(constants.ENDPOINT, timeout=timeout)
    except Exception:  # any transport error means "not reachable now"
        return False
    return True


def resolve_device(device: str | torch.device | None = None) -> torch.device:
    """The device to use: the one asked for, else cuda, then mps, then cpu."""
    if device is not None:
        try:
            dev = torch.device(device)
        except RuntimeError:
            raise ScopeError(f"--device {device!r} is not a device: use cuda, mps or cpu") from None
        mps = getattr(torch.backends, "mps", None)
        there = {
            "cpu": True,
            "cuda": torch.cuda.is_available(),
            "mps": mps is not None and mps.is_available(),
        }
        if not there.get(dev.type, False):
            found = ", ".join(k for k, ok in there.items() if ok)
            raise ScopeError(
                f"--device {device}: there is no {dev.type} device on this machine (found: "
                f"{found}); leave --device out to use the best there is"
            )
        if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ScopeError(
                f"--device {device}: this machine has {torch.cuda.device_count()} CUDA devices"
            )
        return dev
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    """bf16 on a GPU, fp32 on the CPU, unless told."""
    if dtype is None:
        return torch.float32 if device.type == "cpu" else torch.bfloat16
    if isinstance(dtype, torch.dtype):
        return dtype
    names = {
        "float32": torch.float32,
        "fp32": torch.float32,
        "bfloat16": torch.bfloat16,
        "bf16": torch.bfloat16,
        "float16": torch.float16,
        "fp16": torch.float16,
    }
    if dtype not in names:
        raise ScopeError(f"dtype {dtype!r} is not known: use one of {sorted(names)}")
    return names[dtype]


def resolve_source(name_or_path: str | os.PathLike[str]) -> str:
    """A local checkpoint folder as an absolute path, or a hub name in its official spelling."""
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ScopeError(
                f"{path} is a folder but has no config.json: point at a Hugging Face checkpoint "
                "folder (config.json, *.safetensors, tokenizer files)"
            )
        return str(path.resolve())
    name = str(name_or_path)
    if name.startswith((".", "/", "~")) or os.sep in name.replace("/", "", 1):
        raise ScopeError(f"model folder {name} does not exist: check the path")
    if "/" not in name:  # "gemma-2-2b" -> "google/gemma-2-2b"
        name = f"google/{name}"
    if "gemma" not in name.lower():
        raise ScopeError(
            f"model {name_or_path!r} is not a Gemma model: the workbench loads Gemma 2 "
            f"({', '.join(GEMMA2_NAMES)}) and Gemma 3, by hub name or local folder"
        )
    return name


def _hub_error(name: str, err: Exception) -> ScopeError:
    text = f"{type(err).__name__}: {err}"
    local_hint = (
        "or download it once (huggingface-cli download "
        f"{name} --local-dir DIR) and pass --model DIR"
    )
    if "gated" in text.lower() or "401" in text or "403" in text:
        return ScopeError(
            f"{name} is a gated model on the Hugging Face hub: accept its license at "
            f"https://huggingface.co/{name}, then set HF_TOKEN to a token of that account "
            f"(or run `huggingface-cli login`), {local_hint}"
        )
    if "not a valid model identifier" in text or "RepositoryNotFound" in text or "404" in text:
        suggestions = closest(name, GEMMA2_NAMES + ["google/gemma-3-270m", "google/gemma-3-1b-pt"])
        hint = f" Did you mean {', '.join(suggestions)}?" if suggestions else ""
        return ScopeError(f"model {name} was not found on the Hugging Face hub.{hint}")
    return ScopeError(
        f"could not load {name} from the Hugging Face hub or its local cache ({text.splitlines()[0]}). "
        f"Check your connection and HF_TOKEN (unset HF_HUB_OFFLINE if it is set), {local_hint}"
    )


def _text_config(hf_config: Any) -> Any:
    return getattr(hf_config, "text_config", None) or hf_config


def _rope_theta(text_cfg: Any, kind: str, default: float) -> float:
    params = getattr(text_cfg, "rope_parameters", None) or {}
    if kind in params and isinstance(params[kind], dict):
        return float(params[kind].get("rope_theta", default))
    if "rope_theta" in params:
        return float(params["rope_theta"])
    return float(getattr(text_cfg, "rope_theta", default))


def tl_config_dict(hf_config: Any, template: str, n_ctx: int | None = None) -> dict[str, Any]:
    """transformer-lens config fields for a Gemma checkpoint: the template's flags, the
    checkpoint's sizes. Each field here moves logits if it is wrong (the parity tests check)."""
    from transformer_lens.loading_from_pretrained import convert_hf_model_config

    text = _text_config(hf_config)
    cfg = convert_hf_model_config(template)
    layer_types = list(getattr(text, "layer_types", None) or [])
    if not layer_types:  # older configs: Gemma 2 alternates, starting with a sliding layer
        layer_types = [
            "sliding_attention" if i % 2 == 0 else "full_attention"
            for i in range(text.num_hidden_layers)
        ]
    attn_types = ["local" if t == "sliding_attention" else "global" for t in layer_types]
    max_ctx = int(getattr(text, "max_position_embeddings", DEFAULT_MAX_CTX))
    cfg.update(
        d_model=text.hidden_size,
        d_head=text.head_dim,
        n_heads=text.num_attention_heads,
        n_key_value_heads=text.num_key_value_heads,
        d_mlp=text.intermediate_size,
        n_layers=text.num_hidden_layers,
        n_ctx=n_ctx or min(max_ctx, DEFAULT_MAX_CTX),
        eps=text.rms_norm_eps,
        d_vocab=text.vocab_size,
        act_fn=getattr(text, "hidden_activation", None) or cfg["act_fn"],
        attn_scale=math.sqrt(text.query_pre_attn_scalar),
        window_size=text.sliding_window,
        attn_types=attn_types,
        use_local_attn="local" in attn_types,
        rotary_dim=text.head_dim,
    )
    if cfg.get("rotary_base_local") is not None:  # Gemma 3: separate local and global rope bases
        cfg["rotary_base"] = _rope_theta(text, "full_attention", cfg["rotary_base"])
        cfg["rotary_base_local"] = _rope_theta(text, "sliding_attention", cfg["rotary_base_local"])
    else:
        cfg["rotary_base"] = _rope_theta(text, "full_attention", cfg["rotary_base"])
    full = (getattr(text, "rope_parameters", None) or {}).get("full_attention") or {}
    linear = isinstance(full, dict) and full.get("rope_type") == "linear"
    if linear or "rotary_scaling_factor" in cfg:
        # Gemma 3 4B and up stretch the global layers' rope linearly (x8): read, not assumed
        cfg["rotary_scaling_factor"] = float(full["factor"]) if linear else 1.0
    for ours, theirs in (
        ("attn_scores_soft_cap", "attn_logit_softcapping"),
        ("output_logits_soft_cap", "final_logit_softcapping"),
    ):
        value = getattr(text, theirs, None)
        cfg[ours] = float(value) if value else -1.0
    cfg["tokenizer_name"] = None
    return cfg


def load_model(
    name_or_path: str | os.PathLike[str],
    *,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
    n_ctx: int | None = None,
) -> HookedSAETransformer:
    """Load a Gemma 2 or Gemma 3 model as a ``HookedSAETransformer``.

    ``name_or_path`` is a hub name (``google/gemma-2-2b``, ``gemma-2-9b-it``, ...) or a local
    Hugging Face checkpoint folder of any size. The device defaults to cuda, then mps, then
    cpu; the dtype to bf16 on a GPU and fp32 on the CPU. ``n_ctx`` raises the context length
    the model accepts (default: the checkpoint's, capped at 8192).
    """
    from sae_lens import HookedSAETransformer
    from transformer_lens import HookedTransformerConfig
    from transformer_lens.pretrained.weight_conversions.gemma import convert_gemma_weights
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    source = resolve_source(name_or_path)
    is_local = Path(source).is_dir()
    dev = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, dev)
    token = os.environ.get("HF_TOKEN") or None
    offline = not is_local and not hub_online()  # then the local cache only, no retries
    try:
        hf_config = AutoConfig.from_pretrained(source, token=token, local_files_only=offline)
    except (OSError, ValueError) as err:
        if is_local:
            raise ScopeError(f"{source}/config.json could not be read: {err}") from err
        raise _hub_error(source, err) from err
    model_type = hf_config.model_type
    if model_type not in TEMPLATES:
        raise ScopeError(
            f"{source} is a {model_type!r} model: the workbench loads Gemma 2 and Gemma 3 "
            f"(model_type one of {sorted(TEMPLATES)})"
        )
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, token=token, local_files_only=offline)
        hf_model = AutoModelForCausalLM.from_pretrained(
            source,
            dtype=torch_dtype,
            attn_implementation="eager",
            token=token,
            local_files_only=offline,
        )
    except OSError as err:
        if is_local:
            raise ScopeError(f"{source} is missing weights or tokenizer files: {err}") from err
        raise _hub_error(source, err) from err

    cfg_dict = tl_config_dict(hf_config, TEMPLATES[model_type], n_ctx)
    cfg_dict.update(
        device=str(dev),
        dtype=torch_dtype,
        n_devices=1,
        default_prepend_bos=True,
        model_name=Path(source).name if is_local else source.split("/")[-1],
    )
    cfg = HookedTransformerConfig.from_dict(cfg_dict)
    state_dict = convert_gemma_weights(hf_model, cfg)
    del hf_model  # the state dict holds what is needed; drop the rest before the TL copy
    gc.collect()
    model = HookedSAETransformer(cfg, tokenizer, move_to_device=False)
    model.load_and_process_state_dict(
        state_dict,
        fold_ln=False,
        center_writing_weights=False,
        center_unembed=False,
        fold_value_biases=False,
        refactor_factored_attn_matrices=False,
    )
    del state_dict
    gc.collect()
    model.move_model_modules_to_device()
    transposed_layout(model)
    add_norm_output_hooks(model)
    model.eval()
    set_model_source(model, source)  # where it came from, for `scope info` and store manifests
    return model


_SOURCES: weakref.WeakKeyDictionary[torch.nn.Module, str] = weakref.WeakKeyDictionary()


def set_model_source(model: HookedSAETransformer, source: str) -> None:
    """Record where ``model`` was loaded from (a hub name or folder); ``load_model`` does."""
    _SOURCES[model] = source


def model_source(model: HookedSAETransformer) -> str:
    """Where ``model`` was loaded from, as ``load_model`` was given it (a hub name or folder):
    what stores record and what loads it again; transformer-lens' own name for a model loaded
    another way."""
    return _SOURCES.get(model) or str(model.cfg.model_name)


def add_norm_output_hooks(model: HookedSAETransformer) -> None:
    """Give each block's pre-MLP norm a hook on its output, ``blocks.L.ln2.hook_out``: the MLP's
    input exactly (``scope.identity.MLP_INPUT``), which Gemma Scope's transcoders read.
    transformer-lens' own ``ln2.hook_normalized`` comes before the norm's weight."""
    from transformer_lens.hook_points import HookPoint

    for block in model.blocks:
        norm = block.ln2
        if isinstance(getattr(norm, "hook_out", None), HookPoint):
            continue
        norm.hook_out = HookPoint()  # [batch, pos, d_model]
        norm.forward = _hooked_output(norm.forward, norm.hook_out)
    model.setup()  # registers the new hook points in model.hook_dict


def _hooked_output(forward: Any, hook: Any) -> Any:
    def run(x: torch.Tensor) -> torch.Tensor:
        return hook(forward(x))

    return run


def transposed_layout(model: HookedSAETransformer) -> None:
    """Store the unembedding and the gated MLPs' matrices transposed in memory, values unchanged.

    TransformerLens runs these layers as ``F.linear(x, W.T.contiguous())``, which copies the
    whole matrix on every forward when W is laid out as [in, out]: for Gemma's 256k-token
    unembedding that is 0.7 GB (Gemma 3 270M) to 2.4 GB (Gemma 2 2B) of fp32 copied per
    generated token, most of a step's time on a CPU. Laid out transposed, ``W.T`` is already
    contiguous and the copy is skipped; every result is bit for bit what it was."""
    from transformer_lens.components import Unembed
    from transformer_lens.components.mlps.gated_mlp import GatedMLP

    for module in model.modules():
        if not isinstance(module, Unembed | GatedMLP):
            continue
        for name, param in list(module.named_parameters(recurse=False)):
            if param.dim() == 2 and not param.T.is_contiguous():
                laid = param.detach().T.contiguous().T
                setattr(module, name, torch.nn.Parameter(laid, requires_grad=param.requires_grad))


def model_info(model: HookedSAETransformer) -> ModelInfo:
    """Layers, sizes, parameter count, dtype and device of a loaded model."""
    cfg = model.cfg
    n_params = sum(p.numel() for p in model.parameters())
    return ModelInfo(
        name=model_source(model),
        architecture=str(cfg.original_architecture),
        n_layers=cfg.n_layers,
        d_model=cfg.d_model,
        d_vocab=cfg.d_vocab,
        n_ctx=cfg.n_ctx,
        n_params=n_params,
        dtype=str(cfg.dtype).removeprefix("torch."),
        device=str(next(model.parameters()).device),
    )
