"""`scope merge`: combine the stores of shards i/N (same model, SAEs, settings and corpus) into
exactly the store one uninterrupted pass would have written."""

from __future__ import annotations

import shutil
from collections.abc import Sequence
from dataclasses import asdict, replace
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import torch

from scope.errors import ScopeError
from scope.record.finalize import finalize
from scope.record.state import FeatureState, load_states, save_states
from scope.store.files import VersionBuilder, write_parquet_atomic
from scope.store.manifest import Manifest, Part, read_manifest
from scope.store.writer import StoreWriter


def _check_shards(paths: list[Path], manifests: list[Manifest]) -> None:
    base = manifests[0]
    for p, m in zip(paths, manifests, strict=True):
        for name in ("model", "settings"):
            if asdict(getattr(m, name)) != asdict(getattr(base, name)):
                raise ScopeError(
                    f"{p} has another {name} than {paths[0]}: only shards of one run merge"
                )
        if {k: v["sha256"] for k, v in m.saes.items()} != {
            k: v["sha256"] for k, v in base.saes.items()
        }:
            raise ScopeError(f"{p} holds other SAEs than {paths[0]}: only shards of one run merge")
        if [x.fingerprint for x in m.parts] != [x.fingerprint for x in base.parts]:
            raise ScopeError(
                f"{p} recorded another corpus than {paths[0]}: only shards of one run merge"
            )
    n = base.shard[1]
    got = sorted(m.shard[0] for m in manifests)
    if any(m.shard[1] != n for m in manifests) or got != list(range(n)):
        raise ScopeError(f"shards given are {got} of {n}: give each of 0..{n - 1} exactly once")


def merged_part(parts: list[Part]) -> Part:
    """One corpus part as the shards recorded it, as a single run would have: windows, tokens
    and documents add up. Every shard reads every file, so skips found while reading are the
    same in each; a document that tokenizes to nothing is seen by its own shard only."""
    skipped = dict(parts[0].skipped)
    no_tokens = "documents with no tokens"
    if any(no_tokens in p.skipped for p in parts):
        skipped[no_tokens] = sum(p.skipped.get(no_tokens, 0) for p in parts)
    windows = sum(p.windows for p in parts)
    return replace(
        parts[0],
        windows=windows,
        tokens=sum(p.tokens for p in parts),
        documents=sum(p.documents for p in parts),
        skipped=skipped,
        next=windows,
    )


def merge_stores(out: str | Path, shards: Sequence[str | Path]) -> Manifest:
    """Merge shard stores into ``out``; return the merged manifest."""
    root = Path(out)
    paths = [Path(s) for s in shards]
    manifests = []
    for p in paths:
        m = read_manifest(p)
        if m is None:
            raise ScopeError(f"{p} is not a store (no manifest.json)")
        if m.state != "complete" or m.state_version is None or m.tables_version is None:
            raise ScopeError(
                f"{p} is not finished: complete it with `scope record ... --resume` first"
            )
        manifests.append(m)
    _check_shards(paths, manifests)
    base = manifests[0]
    if root.exists() and any(p.name != ".lock" for p in root.iterdir()):
        raise ScopeError(f"{root} is not empty: merge into a new folder")
    cpu = torch.device("cpu")
    merged: dict[str, FeatureState] = {}
    for p, m in zip(paths, manifests, strict=True):
        assert m.state_version is not None
        for key, st in load_states(p / m.state_version, m.saes, cpu).items():
            merged[key] = merged[key].merge(st) if key in merged else st
    lens_from = paths[0] / str(base.tables_version)
    with StoreWriter(root) as writer:
        for index in range(len(base.parts)):  # each shard holds its own documents' windows
            name = f"windows/part-{index:03d}.parquet"
            union = pa.concat_tables([pq.read_table(p / name) for p in paths])
            write_parquet_atomic(root / name, union.sort_by("window_id"))
        shutil.copyfile(paths[0] / "vocab.parquet", root / "vocab.parquet")
        writer.manifest = manifest = replace(
            base,
            shard=[0, 1],
            parts=[merged_part([m.parts[i] for m in manifests]) for i in range(len(base.parts))],
            tokens_recorded=sum(m.tokens_recorded for m in manifests),
            seconds=sum(m.seconds for m in manifests),
            merged_from=[str(p) for p in paths],
            tables_version=None,
            state_version=None,
        )

        def fill(builder: VersionBuilder) -> None:
            save_states(builder, merged)
            finalize(builder, manifest, merged, {}, None, root, lens_from=lens_from)

        writer.commit(fill, final=True)
    return manifest
