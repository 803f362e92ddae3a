"""How far a recording into a store is, as the recording itself says while it runs.

A recording session (``scope.record.session``) rewrites ``progress.json`` beside the manifest
every few seconds (temp file + rename, so a reader sees it whole or not at all); the explorer's
overview reads it to show tokens done of the total, the rate and the time left, beside the
snapshot it shows. It is only progress: nothing recorded depends on it, and a store without it
(recorded before, or by a merge) reads the same.
"""

from __future__ import annotations

import json
import os
import socket
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from scope.store.files import write_json_atomic

PROGRESS = "progress.json"
STALE_SECONDS = 900.0
"""A recording on another machine that has not said anything for this long is taken as gone
(on this machine the process itself is asked)."""


@dataclass(frozen=True, kw_only=True)
class RecordingStatus:
    """What a recording says about itself."""

    state: str
    """"recording" while it runs, "stopped" once stopped part-way (``--resume`` continues it),
    "complete" once its last snapshot is written."""
    tokens: int
    """Counted tokens of the corpus part recorded so far (earlier sessions included)."""
    total: int
    """Counted tokens of the corpus part (this shard's)."""
    tokens_per_s: float
    """Rate over this session (0 before its first batch)."""
    snapshot: str | None
    """The newest snapshot readers can open (a version folder name), or None before the first."""
    snapshot_tokens: int | None
    """Tokens of the part in that snapshot."""
    started: float
    """When this session started (Unix time)."""
    updated: float
    """When this status was written (Unix time)."""
    pid: int
    host: str
    writing: bool = False
    """A snapshot is being written now (its tables: seconds to minutes, the first one most)."""

    @property
    def fraction(self) -> float:
        return self.tokens / self.total if self.total > 0 else 1.0

    @property
    def eta_seconds(self) -> float | None:
        """Seconds left at this session's rate, None before the rate is known."""
        if self.tokens_per_s <= 0:
            return None
        return max(self.total - self.tokens, 0) / self.tokens_per_s

    def running(self, now: float | None = None) -> bool:
        """Whether the recording that wrote this is still going: its process is alive (on this
        machine), or it spoke within STALE_SECONDS (elsewhere)."""
        if self.state != "recording":
            return False
        if self.host == socket.gethostname():
            try:
                os.kill(self.pid, 0)
            except ProcessLookupError:
                return False
            except PermissionError:  # alive, another user's
                return True
            return True
        return (now if now is not None else time.time()) - self.updated < STALE_SECONDS


def write_status(root: Path, status: RecordingStatus) -> None:
    """Replace the store's progress file with ``status``."""
    write_json_atomic(root / PROGRESS, asdict(status))


def read_status(root: str | Path) -> RecordingStatus | None:
    """The store's progress file, or None where there is none (or it is not one)."""
    try:
        data = json.loads((Path(root) / PROGRESS).read_text())
        names = {f.name for f in fields(RecordingStatus)}
        return RecordingStatus(**{k: v for k, v in data.items() if k in names})
    except (OSError, ValueError, TypeError):
        return None


def this_process() -> tuple[int, str]:
    """(pid, host name) of the running process, as a status names it."""
    return os.getpid(), socket.gethostname()


__all__ = ["PROGRESS", "RecordingStatus", "read_status", "this_process", "write_status"]
