"""The generation engine behind the server: one thread owns the model and runs every request.

Requests generate together as ONE batch (``scope.batch.Batch``): a row per generation, each with
its own prompt (left-padded), sampling settings, steers, seed and length, so each row makes what
``scope.generate.generate`` makes for it alone (up to float rounding: see ``scope.batch``).
Requests that arrive while a batch runs join it: their prompts run in a forward of their own
(those arriving together, in one), then their rows make their tokens in the same forwards as
the others'. Past ``max_rows`` rows a second batch starts, and batches take turns a step at a
time. A cancelled request (its client went away) stops being read at once and its rows leave
the batch at the next step. A steer that fails its first forward (it would swamp the
activation) fails its own request only: a group that fails to join is retried a request at a
time. ``Engine.stats`` counts forwards and how many requests shared them.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, NamedTuple

import torch

from scope.batch import Batch, Gen, Step
from scope.errors import ScopeError
from scope.generate import Sampling
from scope.steer import Steer

log = logging.getLogger("scope.serve")

GATHER_GAP = 0.005
"""An idle engine's first job waits this long (s) for another to join its batch, and so on."""
GATHER_MAX = 0.05
"""... but never longer than this in all."""
MAX_ROWS = 64
"""At most this many rows (generations) in one batch; more requests start another."""


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

    def gens(self) -> list[Gen]:
        """Its rows as generations for a batch."""
        return [Gen(self.tokens, replace(self.sampling, seed=r.seed, max_new_tokens=r.length),
                    r.steers) for r in self.rows]  # fmt: skip


class Run:
    """Jobs generating as one batch, a step at a time; jobs join it as they come."""

    def __init__(self, model: Any, stats: Stats) -> None:
        self.model, self.stats = model, stats
        self.batch = Batch(model)
        self.jobs: dict[int, tuple[Job, list[int]]] = {}
        """id(job) -> the job and its rows' ids in the batch, for the jobs in it."""
        self.rows: dict[int, tuple[Job, int]] = {}
        """Batch row id -> its job and its index in the job."""
        self.waiting: list[list[Job]] = []
        """Jobs to join, a group at a time (a group joins in one forward)."""

    def size(self) -> int:
        """Rows in the batch or waiting to join."""
        waiting = sum(len(job.rows) for group in self.waiting for job in group)
        return waiting + sum(len(rows) for _, rows in self.jobs.values())

    def all_jobs(self) -> list[Job]:
        return [job for job, _ in self.jobs.values()] + [j for g in self.waiting for j in g]

    def step(self) -> bool:
        """Run one step (the next waiting group's prompts, or a token for every row) and hand
        each job its tokens; True when the run has nothing left to do."""
        self.batch.drop(k for k, (job, i) in self.rows.items()
                        if job.cancelled.is_set() or i in job.stopped)  # fmt: skip
        if self.waiting:
            group = [job for job in self.waiting.pop(0) if not job.cancelled.is_set()]
            if group:
                self._join(group)
                return self._settle()
        step = self.batch.step()
        if step is not None:
            self._hand(step)
        return self._settle()

    def _join(self, group: list[Job]) -> None:
        try:
            step = self.batch.join([g for job in group for g in job.gens()])
        except ScopeError as e:  # a steer that cannot run: find whose, or fail it
            if len(group) > 1:
                self.waiting[0:0] = [[job] for job in group]
            else:
                group[0].emit(Event(error=e))
            return
        self.stats.batches += 1
        self.stats.rows += len(step.rows)
        ids = iter(step.rows)
        for job in group:
            rows = [next(ids) for _ in job.rows]
            self.jobs[id(job)] = (job, rows)
            self.rows.update((r, (job, i)) for i, r in enumerate(rows))
        self._hand(step)

    def _hand(self, step: Step) -> None:
        """Give each job its rows' tokens (with log-probabilities when asked for)."""
        self.stats.forward(len(step.rows), len({id(self.rows[r][0]) for r in step.rows}))
        k_max = max((job.logprobs or 0 for job, _ in self.jobs.values()
                     if job.logprobs is not None), default=None)  # fmt: skip
        logp = top = None
        if k_max is not None:
            logp = torch.log_softmax(step.logits.float(), dim=-1)
            top = logp.topk(k_max, dim=-1) if k_max else None
        ids = step.tokens.tolist()
        out: dict[int, list[Token]] = {}
        for at, r in enumerate(step.rows):
            job, i = self.rows[r]
            if job.cancelled.is_set():
                continue
            lp = tops = None
            if job.logprobs is not None and logp is not None:
                lp = float(logp[at, ids[at]])
                tops = []
                if top is not None and job.logprobs:
                    vals = top.values[at, : job.logprobs].tolist()
                    tops = list(zip(top.indices[at, : job.logprobs].tolist(), vals, strict=True))
            out.setdefault(id(job), []).append(Token(i, ids[at], lp, tops, step.finish[at]))
        for key, tokens in out.items():
            self.jobs[key][0].emit(Event(tokens=tokens))

    def _settle(self) -> bool:
        """Let go of the jobs none of whose rows still generate; True when nothing is left."""
        alive = set(self.batch.rows) - self.batch.gone
        for key, (job, rows) in list(self.jobs.items()):
            if not alive.intersection(rows):
                del self.jobs[key]
                for r in rows:
                    del self.rows[r]
                if not job.cancelled.is_set():
                    job.emit(Event(done=True))
        return not self.jobs and not self.waiting


@dataclass
class Stats:
    """Counts of what an engine ran."""

    batches: int = 0
    """Groups of requests that started together (their prompts in one forward)."""
    rows: int = 0
    """Generations started."""
    forwards: int = 0
    """Forward passes run (each makes a token for every row in it)."""
    row_tokens: int = 0
    """Tokens made, all rows together: alone, each would have taken a forward of its own."""
    largest: int = 0
    """The most rows in one forward pass."""
    shared: int = 0
    """Forward passes that served more than one request."""
    widest: int = 0
    """The most requests served by one forward pass."""

    def forward(self, rows: int, requests: int) -> None:
        self.forwards += 1
        self.row_tokens += rows
        self.largest = max(self.largest, rows)
        self.shared += requests > 1
        self.widest = max(self.widest, requests)


class Engine:
    """Runs jobs on ``model`` in its own thread (``start``/``close``)."""

    def __init__(self, model: Any, max_rows: int = MAX_ROWS) -> None:
        self.model, self.max_rows = model, max_rows
        self.inbox: queue.Queue[Job | None] = queue.Queue()
        self.runs: list[Run] = []
        self.thread: threading.Thread | None = None
        self.closing = threading.Event()
        self.stats = Stats()
        """What it has run so far: batches, rows, forwards and how many requests shared them."""

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
            self._place(self._take(block=not self.runs))
            for run in list(self.runs):
                if self.closing.is_set():
                    break
                self._turn(run)
        for run in self.runs:
            for job in run.all_jobs():
                job.emit(Event(error=ShuttingDown()))
        self._drain()

    def _place(self, jobs: Sequence[Job]) -> None:
        """New jobs join the latest batch as one group while it has room (``max_rows``), else
        start a new one; batches take turns a step at a time."""
        if not jobs:
            return
        run = self.runs[-1] if self.runs else None
        group: list[Job] = []
        for job in jobs:
            if (
                run is None
                or run.size() + sum(len(j.rows) for j in group) + len(job.rows) > self.max_rows
            ):
                if run is not None and group:
                    run.waiting.append(group)
                run, group = Run(self.model, self.stats), []
                self.runs.append(run)
            group.append(job)
        assert run is not None
        run.waiting.append(group)

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
        except Exception as e:  # a bug, not the user's input: log it, fail only this batch
            log.exception("generation failed")
            self.runs.remove(run)
            for job in run.all_jobs():
                job.emit(Event(error=e))
            return
        if over:
            self.runs.remove(run)


__all__ = ["Engine", "Event", "Job", "Row", "ShuttingDown", "Stats", "Token"]
