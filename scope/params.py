"""Read Gemma Scope params.npz files safely: never unpickle, check every array before use."""

from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np

from scope.errors import ScopeError

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


def read_params_npz(
    path: Path, *, d_in: int | None = None, d_sae: int | None = None, what: str = ""
) -> dict[str, np.ndarray]:
    """The five Gemma Scope arrays of ``path`` as float32, checked for layout and finiteness.

    Refuses pickled content (``allow_pickle=False`` and a magic-byte check), truncated or
    corrupt archives, missing or misshapen arrays, and NaN/inf values, each with the fix.
    """
    label = f"{what}: {path}" if what else str(path)
    if not path.is_file():
        found = sorted(p.name for p in path.parent.iterdir()) if path.parent.is_dir() else []
        raise ScopeError(
            f"params.npz is missing for {label}; the folder holds "
            f"{', '.join(found[:8]) or 'nothing'}. Download or copy params.npz there"
        )
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
