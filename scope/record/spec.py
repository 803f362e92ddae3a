"""What a recording is, in one value (``RunSpec``), and the one check that two recordings are
the same run (``check_same``): adding corpus to a store, resuming it, continuing a `--ray` run
and merging shards all ask it, each for the aspects that must agree there, and a refusal says in
one line what differs and how to fix it."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

from scope.corpus import CorpusSpec
from scope.errors import ScopeError
from scope.identity import ModelIdentity, SAEInfo
from scope.record.settings import RecordSettings

if TYPE_CHECKING:
    from scope.store.manifest import Manifest

STORE_SETTINGS = ("ctx", "k", "samples", "dense_threshold")
"""The settings fixed for a store's life (``StoreSettings``): every later recording uses them."""


@dataclass(frozen=True, kw_only=True)
class RunSpec:
    """One recording: which model, which SAEs, over which corpus, how. A field that is None is
    not known where the spec was made (the Ray driver never loads the model) and is not
    compared."""

    model: ModelIdentity | None
    """The model's identity (its fingerprint is what compares)."""
    saes: dict[str, SAEInfo] | None
    """Store key (``L12.res.16k``) -> the SAE's identity (its weights' sha256 is what compares)."""
    corpus: CorpusSpec | None
    """What is read. Its ``ctx`` is always the run's (``settings.ctx``): the window length has
    one owner, the settings, which the store keeps; a CorpusSpec's own ``ctx`` matters only to
    readers outside recording (training, evaluations)."""
    settings: RecordSettings
    windows: tuple[str, ...] | None = None
    """Fingerprints of the corpus parts' windows (``Part.fingerprint``), once tokenized: equal
    fingerprints are the same text cut the same way."""

    def __post_init__(self) -> None:
        if self.corpus is not None and self.corpus.ctx != self.settings.ctx:
            object.__setattr__(self, "corpus", replace(self.corpus, ctx=self.settings.ctx))

    @property
    def ctx(self) -> int:
        """Window length in tokens, BOS included."""
        return self.settings.ctx

    @classmethod
    def of_store(cls, m: Manifest) -> RunSpec:
        """The run a store was recorded as: its last corpus part, every part's windows."""
        part = m.parts[-1] if m.parts else None
        settings = RecordSettings(
            ctx=m.settings.ctx,
            k=m.settings.k,
            samples=m.settings.samples,
            dense_threshold=m.settings.dense_threshold,
            shard=(m.shard[0], m.shard[1]),
        )
        corpus = None
        if part is not None and part.corpus:
            corpus = CorpusSpec(paths=tuple(part.corpus), field=part.field, ctx=m.settings.ctx,
                                max_tokens=part.max_tokens)  # fmt: skip
        return cls(model=m.model, saes=dict(m.saes), corpus=corpus, settings=settings,
                   windows=tuple(p.fingerprint for p in m.parts))  # fmt: skip


# ---------------------------------------------------------------- the one check

ADD_TO_STORE = ("model", "saes", "settings", "shard")
"""What must agree to add corpus to a store (or resume it): everything but the corpus."""
SAME_WINDOWS = ("windows",)
"""What must agree to continue an interrupted part: the same windows."""
SAME_CORPUS = ("corpus", "settings")
"""What a `--ray --resume` driver, which tokenizes nothing, can compare."""
SHARDS_OF_ONE_RUN = ("model", "saes", "settings", "windows")
"""What shards that merge share: everything but the shard."""

FIXES = {
    "model": "load the same model, or record into a new --store",
    "saes": "pass the same --sae list, or record into a new --store",
    "settings": "use the same value, or record into a new --store",
    "shard": "record each shard into a --store of its own",
    "corpus": "give the same --corpus, --field and --tokens to continue it",
    "windows": "give the same --corpus and --tokens to continue it (or record into a new --store)",
}


def _model(a: RunSpec, b: RunSpec) -> str | None:
    x, y = a.model, b.model
    assert x is not None and y is not None
    if x.fingerprint == y.fingerprint and x.d_model == y.d_model:
        return None
    return (f"was recorded with model {x.name} (fingerprint {x.fingerprint}), not {y.name} "
            f"({y.fingerprint})")  # fmt: skip


def _saes(a: RunSpec, b: RunSpec) -> str | None:
    x, y = a.saes, b.saes
    assert x is not None and y is not None
    if set(x) == set(y) and all(x[k].sha256 == y[k].sha256 for k in x):
        return None
    changed = {k for k in x if k in y and x[k].sha256 != y[k].sha256}

    def names(saes: dict[str, SAEInfo]) -> str:
        return ", ".join(
            f"{k} (weights {saes[k].sha256[:12]})" if k in changed else k for k in sorted(saes)
        )

    return f"holds SAEs {names(x)}, which differ from {{given}}'s ({names(y)})"


def _settings(a: RunSpec, b: RunSpec) -> str | None:
    for name in STORE_SETTINGS:
        was, now = getattr(a.settings, name), getattr(b.settings, name)
        if was != now:
            flag = f"--{name}" if name != "dense_threshold" else "dense_threshold"
            return f"was recorded with {flag} {was}, not {now}"
    return None


def _shard(a: RunSpec, b: RunSpec) -> str | None:
    (i, n), (j, m) = a.settings.shard, b.settings.shard
    return None if (i, n) == (j, m) else f"is shard {i}/{n}, not {j}/{m}"


def _corpus(a: RunSpec, b: RunSpec) -> str | None:
    x, y = a.corpus, b.corpus
    assert x is not None and y is not None

    def said(c: CorpusSpec) -> str:
        budget = f"{c.max_tokens:,}" if c.max_tokens is not None else "all"
        return f"--corpus {', '.join(c.paths)} (--field {c.field}, --tokens {budget})"

    asked = (x.paths, x.field, x.max_tokens) != (y.paths, y.field, y.max_tokens)
    return f"was recorded from {said(x)}, not {said(y)}" if asked else None


def _windows(a: RunSpec, b: RunSpec) -> str | None:
    x, y = a.windows, b.windows
    assert x is not None and y is not None
    if x == y:
        return None
    where = f" from {', '.join(a.corpus.paths)}" if a.corpus is not None else ""
    return (f"recorded another corpus{where} than {{given}} (the windows differ: were the corpus "
            "files changed?)")  # fmt: skip


ASPECTS: dict[str, Callable[[RunSpec, RunSpec], str | None]] = {
    "model": _model,
    "saes": _saes,
    "settings": _settings,
    "shard": _shard,
    "corpus": _corpus,
    "windows": _windows,
}
"""Each aspect of two runs: how it is told when it differs (None when it agrees)."""

NEEDS = {"model": "model", "saes": "saes", "corpus": "corpus", "windows": "windows"}
"""The RunSpec field an aspect reads: compared only where both runs know it."""


def difference(recorded: RunSpec, asked: RunSpec, compare: Iterable[str]) -> tuple[str, str] | None:
    """The first aspect of ``compare`` in which the runs differ, and how it is told (with
    ``{given}`` standing for the asked run's name); None when they agree in all of them."""
    for aspect in compare:
        need = NEEDS.get(aspect)
        if need is not None and None in (getattr(recorded, need), getattr(asked, need)):
            continue  # not known on one side: nothing to compare
        told = ASPECTS[aspect](recorded, asked)
        if told is not None:
            return aspect, told
    return None


def check_same(
    recorded: RunSpec,
    asked: RunSpec,
    *,
    where: str,
    given: str = "this run",
    fix: str | None = None,
    compare: Iterable[str] = ADD_TO_STORE,
) -> None:
    """Refuse ``asked`` where it is not the run ``recorded`` (what the store or shard ``where``
    holds) in the aspects ``compare``, with one line: what differs, then how to fix it (``fix``,
    else the aspect's own advice). ``given`` names the asked run."""
    found = difference(recorded, asked, compare)
    if found is None:
        return
    aspect, told = found
    if "{given}" in told:
        told = told.replace("{given}", given)
    elif given != "this run":
        told += f" ({given})"
    raise ScopeError(f"{where} {told}: {fix or FIXES[aspect]}")


__all__ = [
    "ADD_TO_STORE",
    "SAME_CORPUS",
    "SAME_WINDOWS",
    "SHARDS_OF_ONE_RUN",
    "RunSpec",
    "check_same",
    "difference",
]
