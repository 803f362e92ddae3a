"""`scope record` as one call: one forward pass per batch feeds every SAE; state is checkpointed
so a killed run resumes to exactly the same result; the store is written atomically. The steps
(open, record, finish) are ``scope.record.session.RecordingSession``'s."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from scope.corpus import CorpusSpec
from scope.interrupt import StopFn
from scope.record.loop import ProgressFn
from scope.record.session import RecordingSession, SnapshotFn, fit_batch_size
from scope.record.settings import RecordSettings, RecordSummary

if TYPE_CHECKING:
    from sae_lens import SAE, HookedSAETransformer


def record(
    model: HookedSAETransformer,
    saes: list[SAE],
    corpus: CorpusSpec,
    store: str | Path,
    settings: RecordSettings | None = None,
    *,
    resume: bool = False,
    on_progress: ProgressFn | None = None,
    should_stop: StopFn | None = None,
    on_snapshot: SnapshotFn | None = None,
) -> RecordSummary:
    """Record every feature of ``saes`` over ``corpus`` into the store at ``store``.

    ``on_progress`` is called after every batch with a ``RecordProgress``; ``should_stop`` is
    asked between batches and, when it returns a reason, the run checkpoints and raises a
    ScopeError that says how to resume (``stop_on_signals`` makes one from Ctrl-C/SIGTERM);
    ``on_snapshot`` is told each snapshot readers can open (``RecordSettings.snapshots``)."""
    with RecordingSession.open(model, saes, corpus, store, settings, resume=resume,
                               on_snapshot=on_snapshot) as session:  # fmt: skip
        session.record(on_progress, should_stop)
        return session.finish()


__all__ = ["fit_batch_size", "record"]
