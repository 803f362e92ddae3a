"""Waiting for a served explorer: a free port, and the wait for Streamlit's health check."""

from __future__ import annotations

import socket
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_served(url: str, proc: subprocess.Popen, log: Path, timeout: float = 120) -> float:
    """Seconds until ``url`` answers Streamlit's health check; fails the test with the end of
    ``log`` if the process exits first or the time runs out."""
    start = time.monotonic()
    while True:
        try:
            with urllib.request.urlopen(f"{url}/_stcore/health", timeout=2) as r:
                if r.status == 200:
                    return time.monotonic() - start
        except OSError:
            pass
        if proc.poll() is not None or time.monotonic() - start > timeout:
            pytest.fail(f"the explorer did not start at {url}: {log.read_text()[-3000:]}")
        time.sleep(0.5)
