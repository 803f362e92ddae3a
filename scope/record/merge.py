"""`scope merge`: combine the stores of shards i/N (same model, SAEs, settings and corpus) into
exactly the store one uninterrupted pass would have written."""

from __future__ import annotations

import shutil
from collections.abc import Sequence
from pathlib import Path

import torch

from scope.errors import ScopeError
from scope.record.finalize import finalize
from scope.record.runner import load_states, save_states, writer_lock
from scope.record.state import FeatureState
from scope.store.files import VersionBuilder, next_version, read_manifest


def merge_stores(out: str | Path, shards: Sequence[str | Path]) -> dict:
    """Merge shard stores into ``out``; return the merged manifest."""
    root = Path(out)
    paths = [Path(s) for s in shards]
    manifests = []
    for p in paths:
        m = read_manifest(p)
        if m is None:
            raise ScopeError(f"{p} is not a store (no manifest.json)")
        if m["state"] != "complete":
            raise ScopeError(
                f"{p} is not finished: complete it with `scope record ... --resume` first"
            )
        manifests.append(m)
    base = manifests[0]
    n = base["shard"][1]
    for p, m in zip(paths, manifests, strict=True):
        for field in ("model", "settings"):
            if m[field] != base[field]:
                raise ScopeError(
                    f"{p} has another {field} than {paths[0]}: only shards of one run merge"
                )
        if {k: v["sha256"] for k, v in m["saes"].items()} != {
            k: v["sha256"] for k, v in base["saes"].items()
        }:
            raise ScopeError(f"{p} holds other SAEs than {paths[0]}: only shards of one run merge")
        if [x["fingerprint"] for x in m["parts"]] != [x["fingerprint"] for x in base["parts"]]:
            raise ScopeError(
                f"{p} recorded another corpus than {paths[0]}: only shards of one run merge"
            )
    got = sorted(m["shard"][0] for m in manifests)
    if any(m["shard"][1] != n for m in manifests) or got != list(range(n)):
        raise ScopeError(f"shards given are {got} of {n}: give each of 0..{n - 1} exactly once")
    if root.exists() and any(p.name != ".lock" for p in root.iterdir()):
        raise ScopeError(f"{root} is not empty: merge into a new folder")
    cpu = torch.device("cpu")
    merged: dict[str, FeatureState] = {}
    for p, m in zip(paths, manifests, strict=True):
        for key, st in load_states(p, m, cpu).items():
            merged[key] = merged[key].merge(st) if key in merged else st
    with writer_lock(root):
        shutil.copytree(paths[0] / "windows", root / "windows")
        shutil.copyfile(paths[0] / "vocab.parquet", root / "vocab.parquet")
        manifest = dict(base)
        manifest["shard"] = [0, 1]
        manifest["parts"] = [{**part, "next": part["windows"]} for part in base["parts"]]
        manifest["tokens_recorded"] = sum(m["tokens_recorded"] for m in manifests)
        manifest["seconds"] = sum(m["seconds"] for m in manifests)
        manifest["merged_from"] = [str(p) for p in paths]
        manifest.pop("tables_version", None)
        builder = VersionBuilder(root, next_version(root))
        save_states(builder, merged)
        finalize(
            builder, manifest, merged, {}, None, root, lens_from=paths[0] / base["tables_version"]
        )
        manifest["state_version"] = manifest["tables_version"] = builder.name
        manifest["state"] = "complete"
        builder.commit(manifest)
    return manifest
