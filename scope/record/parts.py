"""A store's corpus parts as a recording adds and continues them: where a new part's document
numbering starts, and the part a session records (the interrupted one, or a new one)."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from scope.corpus import CHUNK_BITS
from scope.errors import ScopeError
from scope.record.spec import SAME_WINDOWS, RunSpec, check_same
from scope.record.windows import PartWindows
from scope.store.manifest import Manifest, Part
from scope.store.writer import StoreWriter, current_part


def next_doc(manifest: Manifest) -> int:
    """The document index a new part starts at: after every part's documents (and, for parts
    of older stores with dense window ids, after all of their ids)."""
    end = 0
    for p in manifest.parts:
        if p.first_doc is not None and p.docs is not None:
            end = max(end, p.first_doc + p.docs)
        else:
            last_id = (p.first_window or 0) + p.windows - 1
            end = max(end, (last_id >> CHUNK_BITS) + 1)
    return end


def part_first_doc(manifest: Manifest, root: Path) -> int:
    """Where the windows of the part to record are numbered from."""
    interrupted = current_part(manifest)
    if interrupted is None:
        return next_doc(manifest)
    if interrupted.first_doc is None:
        raise ScopeError(
            f"{root} holds a run interrupted under an older version of the workbench, which "
            "numbered windows differently: record that corpus into a new --store"
        )
    return interrupted.first_doc


def open_part(
    writer: StoreWriter, windows: PartWindows, spec: RunSpec, resume: bool, batch_size: int
) -> tuple[Part, PartWindows]:
    """The corpus part to record: the interrupted one (with --resume), or a new one appended.
    ``windows`` were written for it beside the store; they are moved into place."""
    manifest, root, corpus = writer.manifest, writer.root, spec.corpus
    assert manifest is not None and corpus is not None
    interrupted = current_part(manifest)
    if interrupted is not None:
        if not resume:
            raise ScopeError(
                f"{root} holds an interrupted run of {', '.join(interrupted.corpus)} "
                f"({interrupted.next:,} windows recorded and kept): add --resume to continue it"
            )
        recorded = replace(RunSpec.of_store(manifest), windows=(interrupted.fingerprint,))
        asked = replace(spec, windows=(windows.fingerprint,))
        check_same(recorded, asked, where=str(root), compare=SAME_WINDOWS)
    elif any(p.fingerprint == windows.fingerprint for p in manifest.parts):
        raise ScopeError(
            f"{root} already holds this corpus (same windows): adding it again would count it twice"
        )
    else:
        manifest.parts.append(
            Part(
                corpus=list(corpus.paths),
                field=corpus.field,
                max_tokens=corpus.max_tokens,
                fingerprint=windows.fingerprint,
                first_doc=next_doc(manifest),
                docs=windows.report.read,
                windows=len(windows),
                tokens=windows.n_tokens,
                documents=windows.report.documents,
                skipped=windows.report.skipped,
                next=0,
                batch_size=batch_size,
            )
        )
        manifest.state = "recording"
    path = writer.place_windows(len(manifest.parts) - 1, windows.path)
    writer.save()
    return manifest.parts[-1], replace(windows, path=path)


__all__ = ["next_doc", "open_part", "part_first_doc"]
