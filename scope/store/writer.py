"""Writing a store: the one writer (lock, open-or-check, corpus parts, checkpoints, commits) and
side tables written atomically beside the snapshots.

Snapshots (``vNNNNNN/``) hold what a recording computes and are replaced as a whole. Side
tables hold what people and experiments add (labels and notes, sweeps, evals, SAE cards);
they live in their own folders, are never touched by a recording, and survive every later
`scope record` into the same store. Each is written by temp file + rename, so a reader sees a
file whole or not at all.
"""

from __future__ import annotations

import fcntl
import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from types import TracebackType
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from scope.errors import ScopeError
from scope.store.files import VersionBuilder, next_version, write_json_atomic, write_parquet_atomic
from scope.store.manifest import Manifest, Part, read_manifest
from scope.store.schema import (
    LABELS,
    MANIFEST,
    SIDE_TABLES,
    VOCAB,
    WINDOWS,
    WINDOWS_GLOB,
    windows_file,
)

LABEL_COLUMNS = tuple(LABELS.names)


@contextmanager
def _flock(path: Path, what: str, wait: bool) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            raise ScopeError(f"{what} is writing {path.parent}: wait for it to end") from None
        yield


class StoreWriter:
    """The single writer of a store, as a context manager that holds the store's lock.

    ``with StoreWriter(root) as w:`` then ``w.manifest`` (None for a new store),
    ``w.create(manifest, vocab)``, ``w.place_windows(part_index, file)``, ``w.save()``
    and ``w.commit(fill, final=...)``. Readers never see a half-written state: version folders
    are built under a temporary name and renamed, then the manifest is replaced.
    """

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        self.manifest: Manifest | None = None
        self._lock: Any = None

    def __enter__(self) -> StoreWriter:
        if self.root.exists() and not self.root.is_dir():
            raise ScopeError(f"store {self.root} is a file, not a folder: pick a folder path")
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise ScopeError(f"cannot create the store folder {self.root}: {err.strerror}") from err
        self._lock = _flock(self.root / ".lock", "another `scope record`", wait=False)
        self._lock.__enter__()
        try:
            self.manifest = read_manifest(self.root)
        except BaseException:
            self._lock.__exit__(None, None, None)
            raise
        return self

    def __exit__(
        self, kind: type[BaseException] | None, err: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._lock.__exit__(kind, err, tb)

    def check_new(self) -> None:
        """Refuse a folder that holds things other than a store's (a new store goes there)."""
        allowed = {".lock", WINDOWS.name, VOCAB.file, *SIDE_TABLES}
        extra = [p.name for p in self.root.iterdir() if p.name not in allowed]
        if extra:
            raise ScopeError(
                f"{self.root} exists and is not a store (it holds {', '.join(sorted(extra)[:5])}): "
                "pick an empty or new --store folder"
            )

    def create(self, manifest: Manifest, vocab: Callable[[], pa.Table]) -> Manifest:
        """Start a new store in an empty (or new) folder: the vocabulary, then the manifest.
        Windows left by a first run killed before it wrote a manifest go: nothing was recorded."""
        self.check_new()
        for stale in (self.root / WINDOWS.name).glob(WINDOWS_GLOB):
            stale.unlink()
        write_parquet_atomic(self.root / VOCAB.file, VOCAB.conform(vocab()))
        self.manifest = manifest
        return manifest

    def place_windows(
        self, index: int, written: Path, shard: tuple[int, int] | None = None
    ) -> Path:
        """Move a finished windows file (written beside, under a hidden name) into place as
        corpus part ``index`` (or as shard (i, N) of it, merged in); returns its path."""
        path = self.root / windows_file(index, shard)
        os.replace(written, path)
        return path

    def start_over(self) -> None:
        """Forget a store whose first recording stopped before its first checkpoint: nothing
        was recorded, so its manifest and windows go and the folder is new again."""
        assert self.manifest is not None and self.manifest.state_version is None
        for path in (self.root / WINDOWS.name).glob(WINDOWS_GLOB):
            path.unlink()
        (self.root / MANIFEST).unlink()
        self.manifest = None

    def save(self) -> None:
        """Write the manifest as it is now (e.g. after adding a part)."""
        assert self.manifest is not None
        write_json_atomic(self.root / MANIFEST, self.manifest.to_json())

    def commit(
        self, fill: Callable[[VersionBuilder], None], *, final: bool, complete: bool = True
    ) -> str:
        """A new version: ``fill`` writes its files; it becomes the state version, and with
        ``final`` also the tables readers query (and, unless ``complete`` is False, the store is
        complete). Returns its name."""
        assert self.manifest is not None
        builder = VersionBuilder(self.root, next_version(self.root))
        fill(builder)
        self.manifest.state_version = builder.name
        if final:
            self.manifest.tables_version = builder.name
            if complete:
                self.manifest.state = "complete"
        builder.commit(self.manifest.to_json())
        return builder.name


def current_part(manifest: Manifest) -> Part | None:
    """The part being recorded (an interrupted run's), or None when the store is complete."""
    return manifest.parts[-1] if manifest.state == "recording" and manifest.parts else None


# ---------------------------------------------------------------- side tables


def add_side_table(
    root: str | Path,
    table_name: str,
    name: str,
    table: pa.Table,
    meta: dict[str, Any] | None = None,
) -> Path:
    """Add ``table`` as ``<root>/<table_name>/<name>.parquet`` (and ``meta`` as ``<name>.json``),
    atomically. ``table_name`` is one of SIDE_TABLES; readers see it as a view of that name."""
    if table_name not in SIDE_TABLES:
        raise ValueError(f"side table {table_name!r} is not one of {SIDE_TABLES}")
    folder = Path(root) / table_name
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError) as err:
        raise ScopeError(f"cannot write {folder}: {err.strerror}; pick a folder") from err
    if meta is not None:
        write_json_atomic(folder / f"{name}.json", meta)
    write_parquet_atomic(folder / f"{name}.parquet", table)
    return folder / f"{name}.parquet"


def set_label(root: str | Path, sae: str, feature: int, label: str, notes: str = "") -> None:
    """Set (or, with both empty, clear) a feature's label and notes. Labels are one table,
    replaced atomically under their own lock, so writers queue instead of losing each other's
    edits, and a recording running meanwhile neither blocks nor touches them."""
    path = Path(root) / LABELS.name / LABELS.file
    with _flock(Path(root) / ".labels.lock", "another label edit", wait=True):
        rows = pq.read_table(path).to_pylist() if path.is_file() else []
        rows = [r for r in rows if (r["sae"], r["feature"]) != (sae, feature)]
        if label.strip() or notes.strip():
            rows.append(
                {
                    "sae": sae,
                    "feature": feature,
                    "label": label,
                    "notes": notes,
                    "updated": time.time(),
                }  # fmt: skip
            )
        write_parquet_atomic(path, pa.Table.from_pylist(rows, schema=LABELS.columns))


__all__ = [
    "LABEL_COLUMNS",
    "SIDE_TABLES",
    "StoreWriter",
    "add_side_table",
    "current_part",
    "set_label",
]
