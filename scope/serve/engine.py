"""The generation engine behind the server: one thread owns the model and runs every request.

Requests that are waiting when the engine turns to new work start together: those with the
same prompt tokens and sampling settings run as ONE batch (``scope.generate.row_steps``, the
batched generation sweeps use), a row per generation with its own steers, seed and length, so
each row draws exactly the numbers it would draw alone. Batches of different prompts take
turns a token at a time, so a long request never holds up a short one. A cancelled request
(its client went away) stops being read at once, and its batch stops computing when no row in
it is wanted any more. A steer that fails its first forward (it would swamp the activation)
fails its own request only: a batch that fails before its first token is retried a request at
a time.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch

from scope.errors import ScopeError
from scope.generate import Sampling, Step, end_tokens, row_steps
from scope.steer import Steer

log = logging.getLogger("scope.serve")

GATHER_GAP = 0.005
"""An idle engine's first job waits this long (s) for another to join its batch, and so on."""
GATHER_MAX = 0.05
"""... but never longer than this in all."""


@dataclass(frozen=True, kw_only=True)
class Row:
    """One generation of a request."""

    steers: list[Steer]
    """The steers it runs with (none: unsteered)."""
    seed: int
    """Seeds its own random generator."""
    length: int
    """At most this many tokens."""


class ShuttingDown(ScopeError):
    """The server stops: requests in flight or arriving end with this."""

    def __init__(self) -> None:
        super().__init__("the server is shutting down: try again once it is back")


class Token(NamedTuple):
    """A token a row made, with its log-probabilities when the request asked for them."""

    row: int
    """The row's index in its request."""
    id: int
    """The token."""
    logprob: float | None
    """log-softmax of the row's logits at this token, steering on."""
    top: list[tuple[int, float]] | None
    """The most likely tokens there and their log-probabilities, most likely first."""
    finish: str | None
    """"stop" (an end token) or "length" when this is the row's last token, else None."""


class Event(NamedTuple):
    """What a request hears from the engine: tokens, or its end (``done``), or an error."""

    tokens: list[Token] = []
    done: bool = False
    error: ScopeError | Exception | None = None


@dataclass(eq=False, kw_only=True)
class Job:
    """One request: its rows share the prompt and sampling settings."""

    tokens: torch.Tensor
    """[1, pos] the prompt."""
    sampling: Sampling
    """Temperature, top_p, frequency penalty, end tokens (seed and length are per row)."""
    rows: list[Row]
    """Its generations."""
    logprobs: int | None
    """None: no log-probabilities; k: the chosen token's and the top k."""
    emit: Callable[[Event], None]
    """Called from the engine thread with each event (it must hand over, not block)."""
    cancelled: threading.Event = field(default_factory=threading.Event)
    """Set when nobody reads the request any more."""
    stopped: set[int] = field(default_factory=set)
    """Rows the reader is done with (a stop sequence); set from any thread."""

    def cancel(self) -> None:
        """Stop generating for this request (its client went away)."""
        self.cancelled.set()

    def stop_row(self, row: int) -> None:
        """Stop generating row ``row`` (it reached a stop sequence)."""
        self.stopped.add(row)

    def group(self) -> tuple[Any, ...]:
        """Requests with the same group run as one batch."""
        s = self.sampling
        return (
            tuple(self.tokens[0].tolist()),
            s.temperature,
            s.top_p,
            s.freq_penalty,
            s.stop_at_eos,
        )


class Run:
    """The jobs of one group generating as one batch, a step at a time."""

    def __init__(self, model: Any, jobs: list[Job]) -> None:
        self.model, self.jobs = model, jobs
        self.rows = [(job, i, row) for job in jobs for i, row in enumerate(job.rows)]
        """(job, row index in the job, row) for each row of the batch."""
        self.done = [False] * len(self.rows)
        self.made = [0] * len(self.rows)
        self.started = False
        """Whether the first forward has run (before it, a failure is retried job by job)."""
        self.ends = end_tokens(model.tokenizer) if jobs[0].sampling.stop_at_eos else set()
        self.steps: Iterator[Step] | None = None

    def start(self) -> None:
        job = self.jobs[0]
        self.steps = row_steps(self.model, job.tokens, job.sampling, [r.steers for _, _, r in self.rows],
                               seeds=[r.seed for _, _, r in self.rows],
                               lengths=[r.length for _, _, r in self.rows])  # fmt: skip

    def step(self) -> bool:
        """Run one step and hand each job its tokens; True when the run is over."""
        for k, (job, i, _) in enumerate(self.rows):
            if job.cancelled.is_set() or i in job.stopped:
                self.done[k] = True
        if all(self.done):
            self.close()
            return True
        if self.steps is None:
            self.start()
        assert self.steps is not None
        step = next(self.steps, None)
        self.started = True
        if step is None:  # every row ended
            self.finish()
            return True
        ids = step.tokens.tolist()
        k_max = max((j.logprobs for j in self.jobs if j.logprobs is not None), default=None)
        logp = top = None
        if k_max is not None:
            logp = torch.log_softmax(step.logits.float(), dim=-1)
            top = logp.topk(k_max, dim=-1) if k_max else None
        out: dict[int, list[Token]] = {}
        for k, (job, i, row) in enumerate(self.rows):
            if self.done[k]:
                continue
            self.made[k] += 1
            finish = (
                "stop" if ids[k] in self.ends else "length" if self.made[k] >= row.length else None
            )
            self.done[k] = finish is not None
            lp = tops = None
            if job.logprobs is not None and logp is not None:
                lp = float(logp[k, ids[k]])
                if top is not None and job.logprobs:
                    vals, idx = (
                        top.values[k, : job.logprobs].tolist(),
                        top.indices[k, : job.logprobs].tolist(),
                    )
                    tops = list(zip(idx, vals, strict=True))
                else:
                    tops = []
            out.setdefault(id(job), []).append(Token(i, ids[k], lp, tops, finish))
        for job in self.jobs:
            if id(job) in out:
                job.emit(Event(tokens=out[id(job)]))
        if all(self.done):
            self.finish()
            return True
        return False

    def finish(self) -> None:
        self.close()
        for job in self.jobs:
            if not job.cancelled.is_set():
                job.emit(Event(done=True))

    def close(self) -> None:
        if self.steps is not None and hasattr(self.steps, "close"):
            self.steps.close()  # type: ignore[attr-defined]


@dataclass
class Stats:
    """Counts of what an engine ran."""

    batches: int = 0
    """Batches started (a retried batch counts again)."""
    rows: int = 0
    """Generations started."""
    largest: int = 0
    """Rows in the largest batch."""

    def count(self, run: Run) -> None:
        self.batches += 1
        self.rows += len(run.rows)
        self.largest = max(self.largest, len(run.rows))


class Engine:
    """Runs jobs on ``model`` in its own thread (``start``/``close``)."""

    def __init__(self, model: Any) -> None:
        self.model = model
        self.inbox: queue.Queue[Job | None] = queue.Queue()
        self.runs: list[Run] = []
        self.thread: threading.Thread | None = None
        self.closing = threading.Event()
        self.stats = Stats()
        """What it has run so far: batches, rows, the largest batch."""

    def start(self) -> None:
        if self.thread is None:
            self.thread = threading.Thread(
                target=self._loop, name="scope-serve-engine", daemon=True
            )
            self.thread.start()

    def submit(self, job: Job) -> None:
        """Queue ``job``; its events come through ``job.emit``."""
        if self.closing.is_set():
            job.emit(Event(error=ShuttingDown()))
            return
        self.inbox.put(job)

    def close(self, timeout: float = 5.0) -> None:
        """Stop: in-flight jobs end with an error; waits up to ``timeout`` s for the thread."""
        self.closing.set()
        self.inbox.put(None)
        if self.thread is not None:
            self.thread.join(timeout)

    def _take(self, block: bool) -> list[Job]:
        """The jobs waiting. When idle (``block``), waits for one, then gathers those arriving
        right behind it (each within GATHER_GAP of the last, for at most GATHER_MAX), so
        requests sent together start as one batch rather than as one and then the rest."""
        got: list[Job] = []
        try:
            job = self.inbox.get(block=block)
        except queue.Empty:
            return got
        until = time.monotonic() + GATHER_MAX
        while job is not None:
            got.append(job)
            wait = min(GATHER_GAP, until - time.monotonic()) if block else 0
            try:
                job = self.inbox.get(timeout=wait) if wait > 0 else self.inbox.get_nowait()
            except queue.Empty:
                break
        return got

    def _loop(self) -> None:
        while not self.closing.is_set():
            for group in _groups(self._take(block=not self.runs)):
                self.runs.append(Run(self.model, group))
                self.stats.count(self.runs[-1])
            for run in list(self.runs):
                if self.closing.is_set():
                    break
                self._turn(run)
        for run in self.runs:
            run.close()
            for job in run.jobs:
                job.emit(Event(error=ShuttingDown()))
        self._drain()

    def _drain(self) -> None:
        while True:
            try:
                job = self.inbox.get_nowait()
            except queue.Empty:
                return
            if job is not None:
                job.emit(Event(error=ShuttingDown()))

    def _turn(self, run: Run) -> None:
        try:
            over = run.step()
        except ScopeError as e:
            run.close()
            self.runs.remove(run)
            if not run.started and len(run.jobs) > 1:  # find whose steer failed
                self.runs.extend(Run(self.model, [job]) for job in run.jobs)
            else:
                for job in run.jobs:
                    job.emit(Event(error=e))
            return
        except Exception as e:  # a bug, not the user's input: log it, fail only this batch
            log.exception("generation failed")
            run.close()
            self.runs.remove(run)
            for job in run.jobs:
                job.emit(Event(error=e))
            return
        if over:
            self.runs.remove(run)


def _groups(jobs: Sequence[Job]) -> list[list[Job]]:
    """Jobs that can share a batch, in arrival order."""
    found: dict[tuple[Any, ...], list[Job]] = {}
    for job in jobs:
        found.setdefault(job.group(), []).append(job)
    return list(found.values())


__all__ = ["Engine", "Event", "Job", "Row", "ShuttingDown", "Stats", "Token"]
