"""Merging shard stores (shards i/N of one run: same model, SAEs, settings and corpus) into
exactly the store one uninterrupted pass would have written.

``ShardMerger`` folds finished shard stores into one store one at a time, committing a readable
snapshot whenever asked: `scope record --ray` merges each shard as it arrives, `scope merge`
folds them all and commits once. The per-feature state merges exactly (``FeatureState.merge``),
so the order shards arrive in changes nothing.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import pyarrow.parquet as pq
import torch

from scope.errors import ScopeError
from scope.record.finalize import finalize
from scope.record.spec import SHARDS_OF_ONE_RUN, RunSpec, check_same
from scope.record.state import FeatureState, load_states, save_states
from scope.store.files import VersionBuilder, as_created
from scope.store.manifest import MANIFEST, Manifest, Part, ShardedRun, read_manifest
from scope.store.schema import LENS, VOCAB, windows_file
from scope.store.writer import StoreWriter


def read_shard(path: Path, name: str | None = None) -> Manifest:
    """The manifest of a finished shard store (``name`` is how errors call it)."""
    name = name or str(path)
    m = read_manifest(path)
    if m is None:
        raise ScopeError(f"{name} is not a store (no manifest.json)")
    if m.state != "complete" or m.state_version is None or m.tables_version is None:
        raise ScopeError(
            f"{name} is not finished: complete it with `scope record ... --resume` first"
        )
    return m


def check_same_run(base: Manifest, base_name: str, m: Manifest, name: str) -> None:
    """Refuse a shard recorded with another model, SAEs, settings or corpus than ``base``."""
    check_same(RunSpec.of_store(base), RunSpec.of_store(m), where=base_name, given=name,
               fix="only shards of one run merge", compare=SHARDS_OF_ONE_RUN)  # fmt: skip


def _check_shards(paths: list[Path], manifests: list[Manifest]) -> None:
    for p, m in zip(paths, manifests, strict=True):
        check_same_run(manifests[0], str(paths[0]), m, str(p))
    n = manifests[0].shard[1]
    got = sorted(m.shard[0] for m in manifests)
    if any(m.shard[1] != n for m in manifests) or got != list(range(n)):
        raise ScopeError(f"shards given are {got} of {n}: give each of 0..{n - 1} exactly once")


def merged_part(parts: list[Part]) -> Part:
    """One corpus part as the shards recorded it, as a single run would have: windows, tokens
    and documents add up. Every shard reads every file, so skips found while reading are the
    same in each; a document that tokenizes to nothing is seen by its own shard only. Merging
    merged parts again gives the same (a running merge folds one shard at a time)."""
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


def shard_files(root: Path) -> list[str]:
    """What a merge reads of a finished shard store, as paths relative to ``root``: its
    manifest, vocabulary, windows, state and lens tables where it has them (not the tables
    made from the state, which the merge makes again). A shard sent from another machine
    needs only these."""
    m = read_shard(root)
    found = [MANIFEST, VOCAB.file]
    found += [windows_file(i) for i in range(len(m.parts))]
    for version, folder in ((m.state_version, "state"), (m.tables_version, LENS.name)):
        if (root / str(version) / folder).is_dir():
            found += sorted(
                str(p.relative_to(root)) for p in (root / str(version) / folder).iterdir()
            )
    return found


class ShardMerger:
    """Folds finished shard stores of one N-shard run, one at a time, into the store that
    ``writer`` holds (new, or one this merger left part-way). ``add`` folds a shard in memory;
    ``commit`` places the added shards' windows and writes a snapshot that readers see at
    once, marked complete when every shard is in. A shard's folder must stay until the next
    commit. A snapshot records which shards it holds, so a run that stopped part-way goes on
    with a ``ShardMerger`` on the same store and the other shards."""

    def __init__(self, writer: StoreWriter, shards: int) -> None:
        self.writer = writer
        self.shards = shards
        self.states: dict[str, FeatureState] = {}
        self._windows: list[tuple[int, Path, tuple[int, int]]] = []  # placed at commit
        self._lens_from: Path | None = None
        for stale in (writer.root / "windows").glob(".merge-*"):  # a commit that was cut off
            stale.unlink()
        m = writer.manifest
        if m is None:
            return
        if m.sharded is None or m.state_version is None:
            raise ScopeError(
                f"{writer.root} is a store that was not merged from shards: merge into a new folder"
            )
        if m.sharded.shards != shards:
            raise ScopeError(
                f"{writer.root} is being merged from {m.sharded.shards} shards, not {shards}: "
                f"use --shards {m.sharded.shards} to continue it"
            )
        self.states = load_states(writer.root / m.state_version, m.saes, torch.device("cpu"))

    @property
    def merged(self) -> list[int]:
        """The shards added (committed or not), ascending."""
        m = self.writer.manifest
        return list(m.sharded.merged) if m is not None and m.sharded is not None else []

    @property
    def pending(self) -> int:
        """Shards added since the last commit."""
        return len({shard for _, _, shard in self._windows})

    def add(self, shard: str | Path, name: str | None = None) -> Manifest:
        """Fold the finished shard store at ``shard`` in (``name`` is how errors call it);
        returns the shard's manifest."""
        path, writer = Path(shard), self.writer
        name = name or str(path)
        m = read_shard(path, name)
        i, n = m.shard
        if n != self.shards:
            raise ScopeError(f"{name} is shard {i}/{n}, not one of {self.shards} shards")
        out = writer.manifest
        if out is not None:
            assert out.sharded is not None
            check_same_run(out, str(writer.root), m, name)
            if i in out.sharded.merged:
                raise ScopeError(f"{name} is shard {i}/{n}, which {writer.root} already holds")
        assert m.state_version is not None
        loaded = load_states(path / m.state_version, m.saes, torch.device("cpu"))
        self.states = {
            key: self.states[key].merge(st) if key in self.states else st
            for key, st in loaded.items()
        }
        if out is None:
            out = writer.create(
                replace(
                    m,
                    shard=[0, 1],
                    parts=[merged_part([p]) for p in m.parts],
                    state="recording",
                    state_version=None,
                    tables_version=None,
                    merged_from=None,
                    sharded=ShardedRun(shards=n, merged=[]),
                ),
                lambda: pq.read_table(path / VOCAB.file),
            )
        else:
            out.parts = [merged_part([a, b]) for a, b in zip(out.parts, m.parts, strict=True)]
            out.tokens_recorded += m.tokens_recorded
            out.seconds += m.seconds
        assert out.sharded is not None
        out.sharded.merged = sorted([*out.sharded.merged, i])
        for index in range(len(m.parts)):  # each shard holds its own documents' windows
            self._windows.append((index, path / windows_file(index), (i, n)))
        if (path / str(m.tables_version) / LENS.name).is_dir():
            self._lens_from = path / str(m.tables_version)
        return m

    def use_lens(self, folder: Path) -> None:
        """Take the lens tables from ``folder``/lens (for shards recorded without tables),
        unless the store already has them. The folder must stay until the next commit."""
        self._lens_from = folder

    @property
    def needs_lens(self) -> bool:
        """True until lens tables are in the store or in a shard added."""
        m = self.writer.manifest
        return self._lens_from is None and (m is None or m.tables_version is None)

    def commit(self) -> str:
        """A snapshot of every shard added so far, which readers see at once; the store is
        complete when every shard is in."""
        out, root = self.writer.manifest, self.writer.root
        assert out is not None and out.sharded is not None, "add a shard before committing"
        if self.needs_lens:
            raise ScopeError("the shards merged have no lens tables: give them with use_lens")
        (root / "windows").mkdir(exist_ok=True)
        for index, source, shard in self._windows:
            fd, tmp = tempfile.mkstemp(dir=root / "windows", prefix=".merge-")
            os.close(fd)
            shutil.copyfile(source, tmp)
            as_created(tmp)
            self.writer.place_windows(index, Path(tmp), shard=shard)

        def fill(builder: VersionBuilder) -> None:
            save_states(builder, self.states)
            finalize(builder, out, self.states, {}, None, root, lens_from=self._lens_from)

        name = self.writer.commit(fill, final=True, complete=out.sharded.done)
        self._windows.clear()
        return name


def merge_stores(out: str | Path, shards: Sequence[str | Path]) -> Manifest:
    """Merge shard stores into ``out``; return the merged manifest."""
    root = Path(out)
    paths = [Path(s) for s in shards]
    manifests = [read_shard(p) for p in paths]
    _check_shards(paths, manifests)
    if root.exists() and any(p.name != ".lock" for p in root.iterdir()):
        raise ScopeError(f"{root} is not empty: merge into a new folder")
    with StoreWriter(root) as writer:
        merger = ShardMerger(writer, manifests[0].shard[1])
        for p in paths:
            merger.add(p)
        assert writer.manifest is not None
        writer.manifest.merged_from = [str(p) for p in paths]
        merger.commit()
    return writer.manifest
