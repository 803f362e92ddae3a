"""Reading documents: text files and folders of them, .jsonl (a field), .parquet (a column) and
Hugging Face datasets saved with ``save_to_disk`` (read with pyarrow, no ``datasets`` needed).
Documents come in a fixed order (sorted paths, file order within a file), and whatever cannot
be read is skipped and counted, with the first few named."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from scope.errors import ScopeError

TEXT_SUFFIXES = {".txt", ".md", ".rst", ".text", ""}
TABLE_SUFFIXES = {".jsonl", ".parquet"}
SKIP_EXAMPLES = 3  # skipped files or rows named per reason


@dataclass
class ReadReport:
    """What was read and what was skipped, for the end-of-run summary."""

    documents: int = 0
    """Documents windowed (this shard's, when sharded)."""
    read: int = 0
    """Documents of the corpus up to the --tokens cut, every shard's: the same for all."""
    text_hash: Any = field(default_factory=hashlib.sha256)
    """sha256 over those documents' texts: the corpus fingerprint, the same for all shards."""
    skipped: dict[str, int] = field(default_factory=dict)
    """Reason -> how many."""
    examples: dict[str, list[str]] = field(default_factory=dict)
    """Reason -> the first few files or rows skipped for it."""

    def skip(self, reason: str, where: str) -> None:
        self.skipped[reason] = self.skipped.get(reason, 0) + 1
        names = self.examples.setdefault(reason, [])
        if len(names) < SKIP_EXAMPLES:
            names.append(where)

    def summary(self) -> str:
        """ "2 .txt files that are not UTF-8 (a.txt, b.txt); 1 empty documents (c.jsonl:3)" """
        return "; ".join(
            f"{n} {why} ({', '.join(self.examples.get(why, []))}{', ...' if n > SKIP_EXAMPLES else ''})"
            for why, n in self.skipped.items()
        )


def _files(paths: Sequence[str]) -> list[Path]:
    out: list[Path] = []
    for raw in paths:
        path = Path(raw).expanduser()
        if not path.exists():
            raise ScopeError(f"corpus path {raw} does not exist: check --corpus")
        if _is_saved_dataset(path):
            out.append(path)
        elif path.is_dir():
            found = sorted(
                p
                for p in path.rglob("*")
                if p.is_file()
                and not any(part.startswith(".") for part in p.relative_to(path).parts)
                and (p.suffix.lower() in TEXT_SUFFIXES | TABLE_SUFFIXES)
            )
            datasets = sorted(p for p in path.rglob("state.json") if _is_saved_dataset(p.parent))
            skip_under = [d.parent for d in datasets]
            found = [p for p in found if not any(d in p.parents for d in skip_under)]
            out += found + [d.parent for d in datasets]
        else:
            out.append(path)
    return out


def _is_saved_dataset(path: Path) -> bool:
    return (
        path.is_dir() and (path / "state.json").is_file() and (path / "dataset_info.json").exists()
    )


def _read_text(path: Path, report: ReadReport) -> Iterator[tuple[str, str]]:
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError:
        report.skip(f"{path.suffix or 'text'} files that are not UTF-8", str(path))
        return
    if text.strip():
        yield str(path), text
    else:
        report.skip("empty documents", str(path))


def _read_jsonl(path: Path, column: str, report: ReadReport) -> Iterator[tuple[str, str]]:
    seen_field = False
    with path.open("rb") as f:
        for i, raw in enumerate(f):
            if not raw.strip():
                continue
            try:
                row = json.loads(raw.decode("utf-8"))
            except UnicodeDecodeError:
                report.skip(".jsonl lines that are not UTF-8", f"{path}:{i + 1}")
                continue
            except json.JSONDecodeError:
                report.skip(".jsonl lines that are not JSON", f"{path}:{i + 1}")
                continue
            if not isinstance(row, dict) or column not in row:
                if i == 0 and isinstance(row, dict):
                    raise ScopeError(
                        f"{path}: the first row has no field {column!r} (fields: "
                        f"{', '.join(sorted(row))}): pass --field with one of them"
                    )
                report.skip(f".jsonl rows without {column!r}", f"{path}:{i + 1}")
                continue
            seen_field = True
            text = row[column]
            if isinstance(text, str) and text.strip():
                yield f"{path}:{i + 1}", text
            else:
                report.skip("empty documents", f"{path}:{i + 1}")
    if not seen_field:
        report.skip(f"files with no rows with {column!r}", str(path))


def _read_table(
    table: Any, name: str, column: str, report: ReadReport
) -> Iterator[tuple[str, str]]:
    if column not in table.column_names:
        raise ScopeError(
            f"{name} has no column {column!r} (columns: {', '.join(table.column_names)}): "
            "pass --field with one of them"
        )
    for i, text in enumerate(table.column(column).to_pylist()):
        if isinstance(text, str) and text.strip():
            yield f"{name}:{i}", text
        else:
            report.skip("empty documents", f"{name}:{i}")


def _read_dataset(path: Path, column: str, report: ReadReport) -> Iterator[tuple[str, str]]:
    import pyarrow as pa

    state = json.loads((path / "state.json").read_text())
    files = [path / f["filename"] for f in state.get("_data_files", [])]
    if not files:
        raise ScopeError(f"{path} looks like a saved dataset but lists no data files in state.json")
    offset = 0
    for file in files:
        with pa.memory_map(str(file)) as source:
            table = pa.ipc.open_stream(source).read_all()
        for name, text in _read_table(table, str(path), column, report):
            index = int(name.rsplit(":", 1)[1]) + offset
            yield f"{path}:{index}", text
        offset += table.num_rows


def iter_documents(
    paths: Sequence[str], column: str, report: ReadReport
) -> Iterator[tuple[str, str]]:
    """(name, text) for every non-empty document, in a fixed order; skips go to ``report``."""
    for path in _files(paths):
        suffix = path.suffix.lower()
        if _is_saved_dataset(path):
            yield from _read_dataset(path, column, report)
        elif suffix == ".jsonl":
            yield from _read_jsonl(path, column, report)
        elif suffix == ".parquet":
            import pyarrow.parquet as pq

            try:
                table = pq.read_table(path)
            except Exception as err:  # pyarrow raises several types for a bad file
                raise ScopeError(f"{path} is not a readable Parquet file ({err})") from err
            yield from _read_table(table, str(path), column, report)
        else:
            yield from _read_text(path, report)


__all__ = ["ReadReport", "iter_documents"]
