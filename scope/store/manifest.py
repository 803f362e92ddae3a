"""The store's manifest.json as typed records: what was recorded, with what, and how far.

The JSON layout is the one every store since format 1 has: these classes read and write it
field for field, so stores written before them open unchanged.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from scope.errors import ScopeError
from scope.identity import ModelIdentity, SAEInfo
from scope.store.schema import MANIFEST

FORMAT = 1


def _known(cls: type, data: dict[str, Any]) -> dict[str, Any]:
    names = {f.name for f in fields(cls)}
    return {k: v for k, v in data.items() if k in names}


@dataclass(kw_only=True)
class StoreSettings:
    """Recording settings fixed for the store's life (adding corpus must use the same)."""

    ctx: int
    """Window length in tokens, BOS included."""
    k: int
    """Top windows kept per feature."""
    samples: int
    """Interval samples per feature per activation bin."""
    dense_threshold: float
    """Density above which a feature counts as dense."""


@dataclass(kw_only=True)
class Part:
    """One corpus added to the store (by one `scope record` run, maybe resumed)."""

    corpus: list[str]
    """The --corpus paths as given."""
    field: str
    """The .jsonl field / .parquet column read."""
    max_tokens: int | None
    fingerprint: str
    """sha256 of the part's windows: the same corpus and settings give the same value."""
    windows: int
    """Windows of the part in this store (this shard's, for a shard's store)."""
    tokens: int
    """Corpus tokens in those windows (BOS and padding excluded)."""
    documents: int
    """Documents windowed (this shard's, for a shard's store)."""
    skipped: dict[str, int]
    """Why documents or files were skipped, and how many."""
    next: int
    """How many of this shard's windows of the part are recorded (resume point)."""
    batch_size: int
    """Windows per forward pass (kept, so a resumed run batches identically)."""
    first_doc: int | None = None
    """Index of the part's first document: window ids are (document index << 20) | chunk.
    None in stores written before ids were keyed by document (dense ids from first_window)."""
    docs: int | None = None
    """Documents of the corpus up to the --tokens cut (every shard's)."""
    first_window: int | None = None
    """Stores written before ids were keyed by document: the part's first (dense) window id."""


@dataclass(kw_only=True)
class ShardedRun:
    """A corpus part recorded as many shards and merged in as each finished (`scope record
    --ray`). While ``merged`` is short of ``shards`` the store is readable but not complete."""

    shards: int
    """N: shard i records the documents whose index % N == i."""
    merged: list[int]
    """The shards merged so far, ascending: a resumed run records only the others."""

    @property
    def done(self) -> bool:
        return len(self.merged) == self.shards


@dataclass(kw_only=True)
class Manifest:
    """Everything a store knows about itself; readers use only the version it names."""

    model: ModelIdentity
    saes: dict[str, SAEInfo]
    """Store key (``L12.res.16k``) -> the SAE's identity."""
    settings: StoreSettings
    shard: list[int]
    """[i, N]: this store holds the windows of documents whose index % N == i."""
    parts: list[Part] = field(default_factory=list)
    state: str = "recording"
    """"recording" while a part is unfinished, "complete" once its tables are written."""
    hist_edges: list[float] = field(default_factory=list)
    sample_edges: list[float] = field(default_factory=list)
    versions: dict[str, str] = field(default_factory=dict)
    """Package versions of the run that created the store."""
    tokens_recorded: int = 0
    seconds: float = 0.0
    state_version: str | None = None
    """The version folder holding the resumable state."""
    tables_version: str | None = None
    """The version folder readers query (None until a recording first finishes)."""
    merged_from: list[str] | None = None
    sharded: ShardedRun | None = None
    """How the last part was recorded when it was recorded as shards merged in one by one."""
    format: int = FORMAT

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Manifest:
        return cls(
            **{
                **_known(cls, data),
                "model": ModelIdentity(**_known(ModelIdentity, data["model"])),
                "saes": {k: SAEInfo.from_json(v) for k, v in data["saes"].items()},
                "settings": StoreSettings(**_known(StoreSettings, data["settings"])),
                "parts": [Part(**_known(Part, p)) for p in data.get("parts", [])],
                "sharded": ShardedRun(**_known(ShardedRun, data["sharded"]))
                if data.get("sharded")
                else None,
            }
        )


def read_manifest(root: Path) -> Manifest | None:
    """The store's manifest, or None where there is none; a damaged or foreign one is an error."""
    path = root / MANIFEST
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ScopeError(f"{path} is not a valid store manifest ({err})") from err
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        found = data.get("format") if isinstance(data, dict) else None
        raise ScopeError(
            f"{root} was written by another version of the workbench (format {found}, "
            f"this one reads {FORMAT})"
        )
    try:
        return Manifest.from_json(data)
    except (KeyError, TypeError) as err:
        raise ScopeError(f"{path} is not a valid store manifest (missing {err})") from err
