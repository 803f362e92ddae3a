"""Read SAE weight files safely: Gemma Scope's params.npz (never unpickled) and Gemma Scope 2's
params.safetensors, every array checked before use."""

from __future__ import annotations

import json
import zipfile
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from scope.errors import ScopeError

if TYPE_CHECKING:
    import torch

GEMMA_SCOPE_KEYS = ("W_enc", "W_dec", "b_enc", "b_dec", "threshold")
_PICKLE_MAGIC = (b"\x80", b"(", b"c")  # pickle protocol 2+ opcode, protocol 0/1 openers


def npz_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """Array shapes in an .npz, read from the headers alone (no data loaded)."""
    shapes: dict[str, tuple[int, ...]] = {}
    try:
        with zipfile.ZipFile(path) as zf:
            for name in zf.namelist():
                with zf.open(name) as f:
                    version = np.lib.format.read_magic(f)
                    read = (
                        np.lib.format.read_array_header_1_0
                        if version == (1, 0)
                        else np.lib.format.read_array_header_2_0
                    )
                    shape, _, _ = read(f)
                shapes[name.removesuffix(".npy")] = tuple(shape)
    except (zipfile.BadZipFile, ValueError, OSError):
        return {}
    return shapes


def refuse_missing(path: Path, label: str) -> None:
    """A clear error, naming what the folder holds, when an SAE's weights file is not there."""
    if not path.is_file():
        found = sorted(p.name for p in path.parent.iterdir()) if path.parent.is_dir() else []
        raise ScopeError(
            f"{path.name} is missing for {label}; the folder holds "
            f"{', '.join(found[:8]) or 'nothing'}. Download or copy {path.name} there"
        )


def read_params_npz(
    path: Path, *, d_in: int | None = None, d_sae: int | None = None, what: str = ""
) -> dict[str, np.ndarray]:
    """The five Gemma Scope arrays of ``path`` as float32, checked for layout and finiteness.

    Refuses pickled content (``allow_pickle=False`` and a magic-byte check), truncated or
    corrupt archives, missing or misshapen arrays, and NaN/inf values, each with the fix.
    """
    label = f"{what}: {path}" if what else str(path)
    refuse_missing(path, label)
    with path.open("rb") as f:
        head = f.read(4)
    if not head.startswith(b"PK"):
        if head[:1] in _PICKLE_MAGIC:
            raise ScopeError(
                f"{label} is a Python pickle, not an .npz archive: the workbench never "
                "unpickles files (they can run code). Re-export it with numpy.savez"
            )
        raise ScopeError(
            f"{label} is not an .npz archive (corrupt or truncated download?): "
            "delete it and download it again"
        )
    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {key: data[key] for key in data.files}
    except ValueError as err:
        if "pickle" in str(err).lower():
            raise ScopeError(
                f"{label} holds pickled object arrays: the workbench never unpickles "
                "files (they can run code). Re-export plain float arrays"
            ) from err
        raise ScopeError(f"{label} could not be read ({err}): download it again") from err
    except (zipfile.BadZipFile, EOFError, OSError) as err:
        raise ScopeError(
            f"{label} is truncated or corrupt ({type(err).__name__}): delete it and "
            "download it again"
        ) from err
    arrays = {("W_" + k[2:] if k.startswith("w_") else k): v for k, v in arrays.items()}
    missing = [k for k in GEMMA_SCOPE_KEYS if k not in arrays]
    if missing:
        raise ScopeError(
            f"{label} lacks {', '.join(missing)} (has {', '.join(sorted(arrays))}); "
            f"a Gemma Scope params.npz holds {', '.join(GEMMA_SCOPE_KEYS)}"
        )
    for key in GEMMA_SCOPE_KEYS:
        if arrays[key].dtype.kind != "f":
            raise ScopeError(f"{label}: {key} has dtype {arrays[key].dtype}, expected floats")
    _check_shapes(arrays, d_in, d_sae, label)
    out = {}
    for key in GEMMA_SCOPE_KEYS:
        arr = np.ascontiguousarray(arrays[key], dtype=np.float32)  # .npz may be Fortran-ordered
        bad = int(arr.size - np.isfinite(arr).sum())
        if bad:
            raise ScopeError(
                f"{label}: {key} has {bad} non-finite values (NaN or inf); the file "
                "is damaged: download or export it again"
            )
        out[key] = arr
    return out


def _check_shapes(
    arrays: dict[str, np.ndarray], d_in: int | None, d_sae: int | None, label: str
) -> None:
    w_enc = arrays["W_enc"]
    if w_enc.ndim != 2:
        raise ScopeError(f"{label}: W_enc has shape {list(w_enc.shape)}, expected [d_in, d_sae]")
    n_in, n_sae = w_enc.shape
    expected = {"W_dec": (n_sae, n_in), "b_enc": (n_sae,), "b_dec": (n_in,), "threshold": (n_sae,)}
    for key, shape in expected.items():
        if arrays[key].shape != shape:
            raise ScopeError(
                f"{label}: {key} has shape {list(arrays[key].shape)} but W_enc is "
                f"[{n_in}, {n_sae}], so {key} must be {list(shape)}"
            )
    if d_in is not None and n_in != d_in:
        raise ScopeError(
            f"{label}: W_enc is [{n_in}, {n_sae}] but this release expects d_in "
            f"{d_in}: the file belongs to another model or release"
        )
    if d_sae is not None and n_sae != d_sae:
        raise ScopeError(
            f"{label}: W_enc is [{n_in}, {n_sae}] but the folder's width is {d_sae}: "
            "the file belongs to another SAE"
        )


def refuse_unsafe_weights(folder: Path) -> None:
    """A sae-lens folder must carry safetensors; pickled .pt/.bin/.pkl weights are refused."""
    if (folder / "sae_weights.safetensors").is_file():
        return
    pickled = [p.name for p in folder.iterdir() if p.suffix in {".pt", ".pth", ".bin", ".pkl"}]
    if pickled:
        raise ScopeError(
            f"{folder} holds {', '.join(pickled)}: pickled weights are refused (they "
            "can run code). Save the SAE with sae-lens' save_model (safetensors)"
        )
    raise ScopeError(
        f"{folder} has cfg.json but no sae_weights.safetensors: copy the whole sae-lens save folder"
    )


# ---------------------------------------------------------------- Gemma Scope 2 (safetensors)

GEMMA_SCOPE_2_KEYS = ("w_enc", "w_dec", "b_enc", "b_dec", "threshold")
SKIP_KEY = "affine_skip_connection"
"""An affine transcoder's skip matrix, stored [d_in, d_out]."""
_ITEM_BYTES = {"F16": 2, "BF16": 2, "F32": 4, "F64": 8}
_MAX_HEADER = 100 << 20  # safetensors' own limit on the JSON header


def _safetensors_header(path: Path, what: str) -> dict[str, tuple[str, tuple[int, ...], int]]:
    """name -> (dtype, shape, bytes) for each tensor, read from the header alone and checked
    against the file's size: refuses a file that is not safetensors (a pickle, a zip, HTML from
    a proxy), a header that is not JSON, and data cut short, each with the fix."""
    label = f"{what}: {path}" if what else str(path)
    size = path.stat().st_size
    with path.open("rb") as f:
        head = f.read(8)
        n = int.from_bytes(head, "little") if len(head) == 8 else -1
        raw = f.read(n) if 2 <= n <= min(size - 8, _MAX_HEADER) else b""
    try:
        header = json.loads(raw) if raw else None
    except (UnicodeDecodeError, json.JSONDecodeError):
        header = None
    if not isinstance(header, dict):
        if head.startswith(b"PK") or head[:1] in _PICKLE_MAGIC:
            raise ScopeError(
                f"{label} is a zip archive or a Python pickle (a PyTorch checkpoint?), not "
                "safetensors: the workbench never unpickles files (they can run code). Get "
                "the release's own params.safetensors"
            )
        raise ScopeError(
            f"{label} is not a safetensors file (corrupt or truncated download?): "
            "delete it and download it again"
        )
    data_bytes = size - 8 - n
    out: dict[str, tuple[str, tuple[int, ...], int]] = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape = str(entry["dtype"]), tuple(int(d) for d in entry["shape"])
            begin, end = (int(o) for o in entry["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise ScopeError(f"{label}: tensor {name!r} has a malformed header entry") from None
        if not 0 <= begin <= end or end > data_bytes:
            raise ScopeError(
                f"{label} is truncated: tensor {name!r} ends at byte {end} of {data_bytes} "
                "data bytes. Delete the file and download it again"
            )
        out[name] = (dtype, shape, end - begin)
    return out


def read_params_safetensors(
    path: Path, *, d_sae: int | None = None, what: str = ""
) -> dict[str, torch.Tensor]:
    """Gemma Scope 2's arrays of ``path`` (``w_enc`` [d_in, d_sae], ``w_dec`` [d_sae, d_out],
    ``b_enc``, ``b_dec``, ``threshold``, and ``affine_skip_connection`` [d_in, d_out] for an
    affine transcoder) as float32 tensors under the file's own names, checked first.

    Safetensors cannot run code, but a file can still be cut short, hold the wrong arrays or
    shapes, or NaN/inf: each is refused with the fix. ``d_sae`` is the width the SAE's id
    names (``width_16k``): a file of another width belongs to another SAE."""
    import torch
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    label = f"{what}: {path}" if what else str(path)
    refuse_missing(path, label)
    header = _safetensors_header(path, what)
    missing = [k for k in GEMMA_SCOPE_2_KEYS if k not in header]
    if missing:
        raise ScopeError(
            f"{label} lacks {', '.join(missing)} (has {', '.join(sorted(header)) or 'nothing'}); "
            f"a Gemma Scope 2 params.safetensors holds {', '.join(GEMMA_SCOPE_2_KEYS)}"
        )
    keys = [*GEMMA_SCOPE_2_KEYS, *([SKIP_KEY] if SKIP_KEY in header else [])]
    for key in keys:
        dtype, shape, nbytes = header[key]
        if dtype not in _ITEM_BYTES:
            raise ScopeError(f"{label}: {key} has dtype {dtype}, expected floats")
        if nbytes != int(np.prod(shape)) * _ITEM_BYTES[dtype]:
            raise ScopeError(
                f"{label}: {key}'s header says {dtype} {list(shape)} but it holds {nbytes} "
                "bytes: the file is corrupt. Delete it and download it again"
            )
    _check_safetensors_shapes({k: header[k][1] for k in keys}, d_sae, label)
    try:
        loaded = load_file(path)
    except (SafetensorError, OSError) as err:
        raise ScopeError(f"{label} could not be read ({err}): download it again") from err
    out = {}
    for key in keys:
        t = loaded[key].to(torch.float32).contiguous()
        bad = int((~torch.isfinite(t)).sum())
        if bad:
            raise ScopeError(
                f"{label}: {key} has {bad} non-finite values (NaN or inf); the file "
                "is damaged: download or export it again"
            )
        out[key] = t
    return out


def _check_safetensors_shapes(
    shapes: dict[str, tuple[int, ...]], d_sae: int | None, label: str
) -> None:
    w_enc, w_dec = shapes["w_enc"], shapes["w_dec"]
    if len(w_enc) != 2 or len(w_dec) != 2:
        raise ScopeError(
            f"{label}: w_enc is {list(w_enc)} and w_dec {list(w_dec)}; expected "
            "[d_in, d_sae] and [d_sae, d_out]"
        )
    n_in, n_sae = w_enc
    n_out = w_dec[1]
    expected = {
        "w_dec": (n_sae, n_out),
        "b_enc": (n_sae,),
        "b_dec": (n_out,),
        "threshold": (n_sae,),
        SKIP_KEY: (n_in, n_out),
    }
    for key, shape in expected.items():
        if key in shapes and shapes[key] != shape:
            raise ScopeError(
                f"{label}: {key} has shape {list(shapes[key])} but w_enc is [{n_in}, {n_sae}] "
                f"and w_dec [.., {n_out}], so {key} must be {list(shape)}"
            )
    if d_sae is not None and n_sae != d_sae:
        raise ScopeError(
            f"{label}: w_enc is [{n_in}, {n_sae}] but the SAE's id names width {d_sae}: "
            "the file belongs to another SAE"
        )
