"""Ctrl-C and SIGTERM for long jobs (recording, training): the first one asks the job to stop at
its next safe point (a whole batch or step, then a checkpoint); a second one stops at once.

Stopping at once is safe because every checkpoint and store table is written to a temporary
name and renamed: what the last checkpoint saved is kept, and ``--resume`` continues from it, as
after a killed process."""

from __future__ import annotations

import signal
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

StopFn = Callable[[], str | None]
"""Asked at each safe point: a reason to stop (e.g. "SIGINT"), or None to go on."""

SIGNALS = (signal.SIGINT, signal.SIGTERM)


@contextmanager
def stop_on_signals(on_request: Callable[[str], None] | None = None) -> Iterator[StopFn]:
    """Turn the first Ctrl-C or SIGTERM into a stop request, and call ``on_request`` with the
    signal's name (e.g. to say that the job is stopping); a second one restores the previous
    handlers and raises KeyboardInterrupt where the job is. Yields the ``should_stop`` function
    to pass to the job. Off the main thread nothing is installed (Python allows signal handlers
    only there) and ``should_stop`` always says go on. The previous handlers come back on exit."""
    requested: list[str] = []

    def should_stop() -> str | None:
        return requested[0] if requested else None

    if threading.current_thread() is not threading.main_thread():
        yield should_stop
        return

    previous = {sig: signal.getsignal(sig) for sig in SIGNALS}

    def restore() -> None:
        for sig, handler in previous.items():
            signal.signal(sig, handler)

    def ask(signum: int, _frame: Any) -> None:
        if requested:
            restore()
            raise KeyboardInterrupt
        requested.append(signal.Signals(signum).name)
        if on_request is not None:
            on_request(requested[0])

    for sig in SIGNALS:
        signal.signal(sig, ask)
    try:
        yield should_stop
    finally:
        restore()
