"""The store on disk: a folder with manifest.json and immutable version folders.

    runs/wiki/
      manifest.json            the only file ever replaced (atomically, by rename)
      windows/part-000.parquet corpus windows of each corpus part, written once
      v000007/                 one snapshot: state/<sae>.safetensors, and the tables
      v000006/                 a replaced snapshot, kept a while so open readers are not cut off

A writer builds a new version folder under a temporary name, renames it into place, then
replaces manifest.json. A reader reads manifest.json once and then only that version's
files, so it always sees one consistent snapshot, whatever the writer does meanwhile.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from scope.store.schema import FEATURES, MANIFEST

READER_GRACE_SECONDS = 600.0
"""A replaced snapshot stays on disk this long, so readers that opened it can finish."""


def umask() -> int:
    """The process's umask (read by setting it and putting it back)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


def as_created(path: str | Path, *, folder: bool = False) -> None:
    """Give a temp file (0600) or folder (0700) the mode a plain create would have had, so
    colleagues sharing the machine can read the store as the umask intends."""
    os.chmod(path, (0o777 if folder else 0o666) & ~umask())


def write_json_atomic(path: Path, data: dict[str, Any]) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    as_created(tmp)
    with os.fdopen(fd, "w") as f:
        json.dump(data, f, indent=1, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_parquet_atomic(path: Path, table: pa.Table) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    os.close(fd)
    as_created(tmp)
    pq.write_table(table, tmp, compression="zstd")
    os.replace(tmp, path)


class VersionBuilder:
    """A new version folder, invisible to readers until ``commit``."""

    def __init__(self, root: Path, number: int) -> None:
        self.root = root
        self.name = f"v{number:06d}"
        self.tmp = Path(tempfile.mkdtemp(dir=root, prefix=f".{self.name}."))
        as_created(self.tmp, folder=True)

    def path(self, rel: str) -> Path:
        p = self.tmp / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        return p

    def commit(self, manifest: dict[str, Any]) -> None:
        """Move the folder into place, point the manifest at it, drop old versions."""
        final = self.root / self.name
        if final.exists():  # left by a run killed between rename and manifest update
            shutil.rmtree(final)
        os.replace(self.tmp, final)
        write_json_atomic(self.root / MANIFEST, manifest)
        live = {manifest.get("state_version"), manifest.get("tables_version")}
        for old in sorted(p for p in self.root.glob("v[0-9]*") if p.is_dir()):
            if old.name in live:
                continue
            if not (old / FEATURES.file).exists():  # checkpoint only: readers never use it
                shutil.rmtree(old, ignore_errors=True)
                continue
            # a snapshot readers may still have open: drop it a grace period after it is replaced
            # (its resumable state at once: readers never read it, and it is most of the size)
            shutil.rmtree(old / "state", ignore_errors=True)
            marker = old / ".superseded"
            if not marker.exists():
                marker.touch()
            elif time.time() - marker.stat().st_mtime > READER_GRACE_SECONDS:
                shutil.rmtree(old, ignore_errors=True)
        for stale in self.root.glob(".v[0-9]*"):  # temp folders of killed runs
            shutil.rmtree(stale, ignore_errors=True)


def next_version(root: Path) -> int:
    numbers = [int(p.name[1:]) for p in root.glob("v[0-9]*") if p.name[1:].isdigit()]
    return max(numbers, default=0) + 1
